"""Find unreadable or corrupt image files before any training starts.

Why a pass before training: images are decoded lazily, in DataLoader workers, hours into a run; a bad file found
there kills the run mid-stream (and OpenCV decodes a truncated JPEG without complaint, filling the missing rows with
grey). So the sources check every file once, up front, and cache the verdict per (path, size, mtime), so later runs
only ``stat`` the files:

* ``header`` (default): the bytes of the container: the file is non-empty, starts with a known image signature, a
  JPEG and a PNG end with their end markers, a GIF with its trailer, and a WEBP (RIFF) or BMP is as long as its
  header says. This reads a few hundred bytes per file (3,000 files in about 2 s on a busy 2-core machine, 0.06 s
  once cached) and catches what actually goes wrong with downloaded datasets: truncated archives, zero-byte files,
  HTML error pages saved as .jpg.
* ``decode``: the header check plus a full decode of every file by PIL (truncated data raises) and by OpenCV (the
  decoder of the runs), in worker processes (cl_vit.data.decode_check) that also read libjpeg's warnings about
  damaged scan data, which neither library raises; the decoded size must equal the header's. About 8x slower than
  ``header``, once; ``skip_corrupt=true`` always uses it, so that every skipped file is known, and counted, before
  training. What no check can find: damage that still decodes without a warning (garbage in the scan data that
  happens to form valid codes, changed pixels of an uncompressed BMP): JPEG, WEBP and BMP carry no checksum of their
  pixels (PNG does, and PIL checks it).
* ``none``: no pass. A file that still fails to decode mid-run stops the run with one line naming it
  (``read_image`` raises :class:`cl_vit.data.base.CorruptImage`, whose ``path`` names the file; cl_vit.errors
  unwraps the DataLoader worker's traceback to that line).
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from cl_vit.errors import ConfigError, UserError
from cl_vit.rundir import atomic_write_json

log = logging.getLogger("cl_vit")

VERIFY_MODES = ("header", "decode", "none")
_JPEG_TAIL = 1024  # the end marker may be followed by a little padding
_DECODE_CHUNK = 256  # files per decode worker process (a process starts in about 0.2 s)


def _riff_or_bmp_problem(head: bytes, size: int) -> str | None:
    """A WEBP or BMP shorter than the length its header declares (``None``: long enough, or not one of them)."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        declared = int.from_bytes(head[4:8], "little") + 8
        return None if size >= declared else f"is truncated ({size} of the {declared} bytes its WEBP header declares)"
    if head[:2] == b"BM":
        declared, offset = int.from_bytes(head[2:6], "little"), int.from_bytes(head[10:14], "little")
        # some writers leave the file size 0; the pixel data must start inside the file in any case
        if size < declared or size <= offset:
            return f"is truncated ({size} bytes; its BMP header declares {declared}, pixels from byte {offset})"
    return None


def header_problem(path: str) -> str | None:
    """Why ``path`` is not a readable image by its bytes (``None`` when it looks fine)."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "is empty (0 bytes)"
        with open(path, "rb") as f:
            head = f.read(16)
            if head[:3] == b"\xff\xd8\xff":
                f.seek(max(0, size - _JPEG_TAIL))
                return None if b"\xff\xd9" in f.read() else "is truncated (no JPEG end-of-image marker)"
            if head[:8] == b"\x89PNG\r\n\x1a\n":
                f.seek(max(0, size - 64))
                return None if b"IEND" in f.read() else "is truncated (no PNG IEND chunk)"
            if head[:6] in (b"GIF87a", b"GIF89a"):
                f.seek(max(0, size - 16))
                return None if b"\x3b" in f.read() else "is truncated (no GIF trailer)"
    except FileNotFoundError:
        return "does not exist"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if head[:2] == b"BM" or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return _riff_or_bmp_problem(head, size)
    return "is not an image (unknown file signature)"


_WORKER = Path(__file__).with_name("decode_check.py")


def decode_problems(paths: Sequence[str]) -> list[str | None]:
    """Full-decode verdicts of ``paths`` (``None``: good) from one worker process (cl_vit.data.decode_check)."""
    if not paths:
        return []
    done = subprocess.run([sys.executable, str(_WORKER)], input=json.dumps(list(paths)), capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the image decode check failed ({sys.executable} {_WORKER}): {done.stderr.strip()}")
    return json.loads(done.stdout)


def decode_problem(path: str) -> str | None:
    """The header check, then the full decode of ``path``."""
    return header_problem(path) or decode_problems([path])[0]


def _cache_file(cache_dir: Path | None, name: str, mode: str) -> Path | None:
    return None if cache_dir is None else Path(cache_dir) / f"{name}-{mode}.json"


def _load_cache(path: Path | None) -> dict:
    if path is None or not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # a damaged cache is only a cache
        return {}


def _save_cache(path: Path | None, cache: dict) -> None:
    if path is None:
        return
    try:
        atomic_write_json(path, cache)
    except OSError:  # a read-only data_root only costs the next run another pass
        pass


def verify_images(samples: Sequence[tuple[str, int]], *, mode: str = "header", skip_corrupt: bool = False,
                  cache_dir: Path | None = None, name: str = "images", workers: int | None = None,
                  ) -> tuple[list[tuple[str, int]], list[dict]]:
    """Check the files of ``samples``; returns the samples to keep and the skipped ones (``path``, ``problem``).

    A bad file raises UserError naming it, unless ``skip_corrupt``. ``skip_corrupt`` implies ``mode="decode"``.
    """
    if mode not in VERIFY_MODES:
        raise ConfigError("data.verify", mode, f"one of {list(VERIFY_MODES)}")
    if skip_corrupt:
        mode = "decode"
    if mode == "none":
        return list(samples), []
    cache_path = _cache_file(cache_dir, name, mode)
    cache = _load_cache(cache_path)
    stats, todo = {}, []
    for path, _ in samples:
        try:
            st = os.stat(path)
            stats[path] = [st.st_size, st.st_mtime_ns]
        except OSError:
            stats[path] = None
        if stats[path] is None or cache.get(path) != stats[path]:
            todo.append(path)
    problems = {}
    if todo:
        desc = f"checking {len(todo)} images ({mode})"
        log.info("%s: %s", name, desc)
        workers = workers or min(8, (os.cpu_count() or 1) * 2)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            verdicts = dict(zip(todo, pool.map(header_problem, todo, chunksize=64)))
        if mode == "decode":  # worker processes, one per core, fed in chunks by threads that wait on them
            whole = [p for p in todo if verdicts[p] is None]
            chunks = [whole[i:i + _DECODE_CHUNK] for i in range(0, len(whole), _DECODE_CHUNK)]
            with ThreadPoolExecutor(max_workers=min(workers, os.cpu_count() or 1)) as pool:
                results = pool.map(decode_problems, chunks)
                if len(whole) >= 2000:
                    from tqdm.auto import tqdm

                    results = tqdm(results, total=len(chunks), desc=desc, leave=False)
                for chunk, chunk_verdicts in zip(chunks, results):
                    verdicts.update(zip(chunk, chunk_verdicts))
        for path in todo:
            if verdicts[path] is None:
                cache[path] = stats[path]
            else:
                problems[path] = verdicts[path]
                cache.pop(path, None)
        _save_cache(cache_path, cache)
    if problems and not skip_corrupt:
        path = next(p for p, _ in samples if p in problems)
        more = f" ({len(problems) - 1} more bad files)" if len(problems) > 1 else ""
        raise UserError(f"image {path} {problems[path]}{more}: replace it (re-download the dataset), or run with "
                        "skip_corrupt=true to skip and count bad files")
    kept = [s for s in samples if s[0] not in problems]
    skipped = [{"path": p, "problem": problems[p]} for p, _ in samples if p in problems]
    if skipped:
        log.warning("%s: skipped %d corrupt images (skip_corrupt=true), e.g. %s", name, len(skipped),
                    skipped[0]["path"])
    return kept, skipped


def skipped_record(skipped: list[dict], limit: int = 50) -> dict:
    """What results.json records about skipped files: the count and the first ``limit`` of them."""
    return {"count": len(skipped), "files": skipped[:limit]}
