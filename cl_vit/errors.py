"""The one exception type that reaches the user as a single line."""


class UserError(Exception):
    """Bad input: the message names the problem and the fix, in one line.

    ``python -m cl_vit.run`` prints it as ``error: <message>`` and exits with status 2,
    before any training starts.
    """

    def __init__(self, message: str):
        message = str(message)
        if message.startswith("Caught ") and "Original Traceback" in message:
            # re-raised from a DataLoader worker (torch's ExceptionWrapper puts the worker's traceback in the
            # message): keep the worker's own message, the traceback's last line
            last = message.rstrip().splitlines()[-1]
            message = last.split(": ", 1)[1] if ": " in last else last
        super().__init__(" ".join(message.split()))  # always one line


class ConfigError(UserError):
    """A config value that is not allowed: the message names the key and what is allowed."""

    def __init__(self, key: str, value, allowed: str):
        super().__init__(f"{key}={value!r} is not allowed: {allowed}")
        self.key = key
