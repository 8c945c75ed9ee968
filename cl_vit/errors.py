"""The one exception type that reaches the user as a single line."""
import re
import shlex
import sys

#: override values Hydra's lexer and a POSIX shell both take as they are
_BARE = re.compile(r"^[A-Za-z0-9_./+-]+$")


def override(key: str, value) -> str:
    """``key=value`` as one command-line word that pastes as printed: Hydra-quoted when the value has characters its
    lexer would split or read (a space, a quote, a non-ASCII letter), then shell-quoted."""
    v = str(value)
    if not _BARE.match(v):  # Hydra keeps a backslash as it is unless a quote or the closing quote follows it
        v = '"' + re.sub(r'(\\+)(?="|$)', lambda m: m.group(1) * 2, v).replace('"', '\\"') + '"'
    return shlex.quote(f"{key}={v}")


def resume_command(run_dir) -> str:
    """The command that continues the run in ``run_dir``, ready to paste."""
    return f"python -m cl_vit.run {override('resume', run_dir)}"


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


def report_error(error) -> int:
    """A command's answer to a :class:`UserError` (or any one-line problem): ``error: <message>`` on stderr, and the
    exit status 2 to return."""
    print(f"error: {error}", file=sys.stderr)
    return 2


class ConfigError(UserError):
    """A config value that is not allowed: the message names the key and what is allowed."""

    def __init__(self, key: str, value, allowed: str):
        super().__init__(f"{key}={value!r} is not allowed: {allowed}")
        self.key = key


class RunStopped(Exception):
    """A fault during a run (non-finite loss, a signal, a full disk): the run stops at a safe point with one line.

    ``python -m cl_vit.run`` prints the message, records ``status`` and the message in results.json (the completed
    experiences stay as they were) and exits with ``exit_code``; ``resume=RUN_DIR`` continues the run.
    """

    status = "failed"
    exit_code = 1

    def __init__(self, message: str, experience: int | None = None):
        super().__init__(" ".join(str(message).split()))
        #: the index of the experience that was under way
        self.experience = experience


class BadDataDuringRun(RunStopped):
    """A data file that fails while the run reads it (an image that no longer decodes): the run stops with
    ``failed``; ``resume=RUN_DIR skip_corrupt=true`` leaves such files out, or the repaired file lets it continue."""

    resume_args = ("skip_corrupt=true",)


class NonFiniteLoss(RunStopped):
    """A loss term or a gradient became NaN or infinite."""


class Interrupted(RunStopped):
    """SIGINT or SIGTERM: the current step ended, the completed experiences are kept."""

    status = "interrupted"

    def __init__(self, signum: int, experience: int | None = None):
        import signal

        self.signum = int(signum)
        self.exit_code = 128 + self.signum  # what a shell reports for a process ended by the signal: 130, 143
        super().__init__(f"{signal.Signals(self.signum).name} received", experience)


class DiskFull(RunStopped):
    """A write into the run directory failed (no space left, file size or quota limit)."""
