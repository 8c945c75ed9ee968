"""Decode image files fully and report what is wrong with each: the worker of ``verify=decode`` (cl_vit.data.verify).

Run as a script, in its own process (``python decode_check.py`` with a JSON list of paths on stdin, a JSON list of
problems, ``null`` for a good file, on stdout), because libjpeg reports damaged scan data only as warnings that it
prints on the C stderr, which OpenCV and PIL do not surface: the process points its file descriptor 2 at a
temporary file and reads what each decode wrote there. It imports nothing of cl_vit (a fast start).
"""
import json
import os
import sys
import tempfile

#: libjpeg's warnings about damaged entropy-coded data (jerror.h JWRN_*): the decoder goes on and fills the rest of
#: the image with guesses. "extraneous bytes before marker 0xd9" (junk after the last scan, before the end marker) is
#: left out: every pixel was decoded, and some ImageNet files carry it.
JPEG_DAMAGE = ("Corrupt JPEG data", "Premature end of JPEG file", "Invalid SOS parameters",
               "Inconsistent progression sequence")


#: PIL formats whose decoding hands the file to another program: EPS is PostScript, a program that PIL runs in
#: Ghostscript. PIL identifies a file by its content, not its name, so a dataset's "x.jpg" holding PostScript would
#: run it: never opened as such.
NOT_OPENED = ("EPS",)


def pil_formats() -> list[str]:
    """The formats PIL may open an image file as (``Image.open(path, formats=pil_formats())``): every one it knows
    but ``NOT_OPENED``."""
    from PIL import Image

    Image.init()
    return [f for f in Image.ID if f not in NOT_OPENED]


def _jpeg_damage(messages: str) -> str | None:
    for line in messages.splitlines():
        if any(key in line for key in JPEG_DAMAGE) and not line.rstrip().endswith("before marker 0xd9"):
            return line.strip()
    return None


def check(path: str, fd: int) -> str | None:
    import cv2
    from PIL import Image, ImageFile

    ImageFile.LOAD_TRUNCATED_IMAGES = False  # PIL's default; a truncated file must raise
    try:
        with Image.open(path, formats=pil_formats()) as im:
            size = im.size
            im.load()
    except Exception as e:  # noqa: BLE001 - any PIL failure means the file cannot be used
        return f"cannot be decoded by PIL ({type(e).__name__}: {e})"
    start = os.lseek(fd, 0, os.SEEK_END)
    img = cv2.imread(path, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    os.lseek(fd, start, os.SEEK_SET)
    messages = os.read(fd, 1 << 16).decode(errors="replace")
    if img is None:
        return "cannot be decoded by OpenCV (corrupt image data)"
    if (img.shape[1], img.shape[0]) != size:
        return f"decodes to {img.shape[1]}x{img.shape[0]} pixels but its header says {size[0]}x{size[1]}"
    damage = _jpeg_damage(messages)
    return None if damage is None else f"has damaged image data (libjpeg: {damage})"


def main() -> None:
    paths = json.load(sys.stdin)
    log = tempfile.TemporaryFile()
    sys.stderr.flush()
    os.dup2(log.fileno(), 2)  # libjpeg's fprintf(stderr, ...) lands here
    sys.stdout.write(json.dumps([check(p, 2) for p in paths]))


if __name__ == "__main__":
    sys.path.pop(0)  # this folder holds modules of cl_vit, not the libraries imported here
    main()
