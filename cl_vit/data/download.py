"""``python -m cl_vit.data.download NAME [NAME ...] --root DATA_ROOT``: fetch a dataset's official archive, check
its published md5, extract it where the source looks for it.

    python -m cl_vit.data.download cifar100 --root ~/data          # -> ~/data/cifar-100-python/
    python -m cl_vit.data.download imagenet-r --root ~/data        # -> ~/data/imagenet-r/<wnid>/*.jpg, and
                                                                   #    ~/data/imagenet-r-splits/coda/ (CODA-Prompt's split)
    python -m cl_vit.data.download tiny-imagenet --root ~/data     # -> ~/data/tiny-imagenet-200/
    python -m cl_vit.data.download fashion-mnist                   # -> $CL_VIT_DATA (else ~/data)/fashion-mnist/*.gz

An interrupted download leaves ``<archive>.part``; the next run asks the server for the rest (HTTP Range) and
appends, or starts again from zero when the server ignores the range. A finished archive whose md5 differs from the
published one is deleted (after one clean retry if it had been resumed) and the command fails with one line; nothing
is extracted from it. Extraction goes to a temporary folder first and is renamed into place, so an interrupted
extraction never leaves a half-filled dataset folder that a run would take for complete.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

from cl_vit.errors import UserError, report_error
from cl_vit.rundir import open_partial


@dataclass(frozen=True)
class Archive:
    url: str
    md5: str
    #: folder under --root that the archive is extracted into
    subdir: str = ""
    #: what exists once it is extracted (relative to --root): the archive is skipped when it does
    provides: str = ""
    #: False: the file is used as downloaded (kept in ``subdir``), not a tar archive to extract
    extract: bool = True

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


# URLs and md5s: CIFAR from torchvision's CIFAR10/CIFAR100 classes (the same in CODA-Prompt's and LDAM-DRW's code);
# ImageNet-R from its authors' README (hendrycks/imagenet-r), md5 as torch-uncertainty's ImageNetR dataset;
# iNaturalist-2018 from visipedia/inat_comp 2018/README.md (AWS Open Data); Fashion-MNIST's URL and md5s from
# torchvision's FashionMNIST class (the official S3 site of zalandoresearch/fashion-mnist's README).
_FMNIST = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_INAT = "https://ml-inat-competition-datasets.s3.amazonaws.com/2018/"
DATASETS: dict[str, list[Archive]] = {
    "cifar10": [Archive("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                        "c58f30108f718f92721af3b95e74349a", provides="cifar-10-batches-py")],
    "cifar100": [Archive("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                         "eb9058c3a382ffc7106e4002c42a8d85", provides="cifar-100-python")],
    "imagenet-r": [Archive("https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar",
                           "a61312130a589d0ca1a8fca1f2bd3337", provides="imagenet-r")],
    "inat2018": [
        Archive(_INAT + "train2018.json.tar.gz", "bfa29d89d629cbf04d826a720c0a68b0", "inat2018",
                "inat2018/train2018.json"),
        Archive(_INAT + "val2018.json.tar.gz", "f2ed8bfe3e9901cdefceb4e53cd3775d", "inat2018", "inat2018/val2018.json"),
        Archive(_INAT + "train_val2018.tar.gz", "b1c6952ce38f31868cc50ea72d066cc3", "inat2018",
                "inat2018/train_val2018"),
    ],
    "fashion-mnist": [Archive(f"{_FMNIST}{name}.gz", md5, "fashion-mnist", f"fashion-mnist/{name}.gz", extract=False)
                      for name, md5 in (("train-images-idx3-ubyte", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
                                        ("train-labels-idx1-ubyte", "25c81989df183df01b3e8a0aad5dffbe"),
                                        ("t10k-images-idx3-ubyte", "bef4ecab320f06d8554ea6380940ec79"),
                                        ("t10k-labels-idx1-ubyte", "bb300cfdad3c16e7a12a480ee83cd310"))],
    # the CS231n zip; md5 as Avalanche's and continuum's TinyImagenet classes
    "tiny-imagenet": [Archive("http://cs231n.stanford.edu/tiny-imagenet-200.zip", "90528d7ca1a48142e341f4ef8d21d0de",
                              provides="tiny-imagenet-200")],
}
#: single files fetched beside a dataset (no extraction), checked against their sha256: CODA-Prompt's ImageNet-R
#: split files from a pinned commit of GT-RIPL/CODA-Prompt (dataloaders/splits/), the default split of the suite
_CODA = "https://raw.githubusercontent.com/GT-RIPL/CODA-Prompt/6417d4f68754be68b697c7ca2323ee61e791e1a3/dataloaders/splits/"
FILES: dict[str, list[tuple[str, str, str]]] = {  # name -> [(url, sha256, path under --root)]
    "imagenet-r": [
        (_CODA + "imagenet-r_train.yaml", "6bcaa14ca9359915ac3a44c48ae71388146385686eb15da79a37844421a0b845",
         "imagenet-r-splits/coda/imagenet-r_train.yaml"),
        (_CODA + "imagenet-r_test.yaml", "57275ac242d68983a4f39ccb81ec34f48b1bd920b9cd79e6e8040d7c042db02a",
         "imagenet-r-splits/coda/imagenet-r_test.yaml"),
    ],
}
ALIASES = {"cifar10-lt": "cifar10", "cifar100-lt": "cifar100", "inaturalist2018": "inat2018",
           "fashion-mnist-lt": "fashion-mnist", "fmnist": "fashion-mnist"}
#: datasets that cannot be fetched without an account: what to do instead
MANUAL = {
    "imagenet-lt": "ImageNet-LT needs ImageNet (ILSVRC-2012, an account at image-net.org) and OLTR's "
                   "ImageNet_LT_{train,val,test}.txt lists: put the lists in <root>/imagenet-lt/ and link ImageNet's "
                   "train/ and val/ folders there",
    "imagenet100": "ImageNet-100 needs ImageNet (ILSVRC-2012, an account at image-net.org) as <root>/imagenet/train/"
                   "<wnid>/ and val/<wnid>/ and DyTox's split files train_100.txt and val_100.txt "
                   "(github.com/arthurdouillard/dytox, imagenet100_splits/) in <root>/imagenet100-splits/",
}


def known() -> list[str]:
    return sorted(DATASETS) + sorted(MANUAL) + sorted(ALIASES)


def missing_dataset_error(name: str, root: Path, layout: str, data_root: Path) -> UserError:
    """The one line a source raises when its folder is missing: the layout expected and how to get it."""
    key = ALIASES.get(name, name)
    if key in DATASETS:
        how = f"download it with: python -m cl_vit.data.download {name} --root {data_root}"
    else:
        how = MANUAL.get(key, "see docs/benchmarks.md").replace("<root>", str(data_root))
    return UserError(f"{name} not found at {root}: expected {layout.replace('<root>', str(root))}; {how} "
                     "(or set data_root=...)")


def file_digest(path: Path, algorithm: str, chunk: int = 1 << 20) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def md5_of(path: Path) -> str:
    return file_digest(path, "md5")


def sha256_of(path: Path) -> str:
    return file_digest(path, "sha256")


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _transfer(url: str, part: Path, timeout: float, progress: bool) -> None:
    """One request: append to ``part`` from its current size (HTTP Range) or rewrite it when the server sends all."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "cl_vit-download", **({"Range": f"bytes={offset}-"} if offset else {})}
    try:
        response = urlopen(Request(url, headers=headers), timeout=timeout)
    except HTTPError as e:
        if e.code == 416 and offset:  # nothing left to send: the part is complete (the md5 check decides)
            return
        raise
    with response:
        resumed = offset and response.status == 206
        if not resumed:
            offset = 0  # the server ignored the range: start again from zero
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        done, last = offset, 0.0
        with open_partial(part, append=bool(resumed)) as f:
            while True:
                block = response.read(1 << 20)
                if not block:
                    break
                f.write(block)
                done += len(block)
                if progress and time.monotonic() - last > 1:
                    last = time.monotonic()
                    of = f" of {_human(total)}" if total else ""
                    print(f"\r  {part.name[:-5]}: {_human(done)}{of}", end="", file=sys.stderr, flush=True)
        if progress:
            print(file=sys.stderr)
        if total is not None and done < total:
            raise HTTPException(f"connection closed after {done} of {total} bytes")


def fetch(url: str, dest: Path, md5: str, retries: int = 5, timeout: float = 60, progress: bool = True,
          algorithm: str = "md5") -> Path:
    """Download ``url`` to ``dest`` (resuming ``dest.part``) and check its digest (``md5`` holds the expected one,
    of ``algorithm``); returns ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and file_digest(dest, algorithm) == md5:
        return dest
    part = dest.with_name(dest.name + ".part")
    restarted = False
    while True:
        resumed_from = part.stat().st_size if part.exists() else 0
        for attempt in range(retries + 1):
            try:
                _transfer(url, part, timeout, progress)
                break
            except HTTPError as e:
                raise UserError(f"download of {url} failed: HTTP {e.code} {e.reason}; check the URL or try "
                                "later") from e
            except (URLError, HTTPException, OSError) as e:
                if attempt == retries:
                    raise UserError(f"download of {url} failed after {retries + 1} tries ({e}); run the command again "
                                    f"to resume from {part}") from e
                time.sleep(min(2 ** attempt, 30) * 0.1)
        got = file_digest(part, algorithm)
        if got == md5:
            os.replace(part, dest)
            return dest
        part.unlink(missing_ok=True)
        if resumed_from and not restarted:  # the kept part may have come from another file: once more from zero
            restarted = True
            continue
        raise UserError(f"{dest.name} from {url} has {algorithm} {got}, not the published {md5}: the download was "
                        "corrupt or the server sent another file; it was deleted, run the command again")


def _plain_members(tar: tarfile.TarFile, archive: Path) -> list[tarfile.TarInfo]:
    """Every member of ``tar`` when each is a file or folder that stays inside the destination; else a one-line
    error naming the first that is not (an absolute path, a ``..`` step, a link or a device file could write or
    point outside it, as ``tarfile.data_filter`` refuses on the Pythons that have it)."""
    members = tar.getmembers()
    for m in members:
        if m.name.startswith(("/", "\\")) or ".." in Path(m.name).parts or not (m.isfile() or m.isdir()):
            raise UserError(f"cannot extract {archive}: its member {m.name!r} is not a plain file or folder inside the "
                            "archive's own folder; delete it and download again")
    return members


def extract(archive: Path, into: Path) -> None:
    """Extract into a temporary folder beside ``into``, then move each top-level entry into place."""
    into.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{archive.name}.", dir=into))
    try:
        try:
            if zipfile.is_zipfile(archive):  # zipfile drops absolute paths and '..' from member names
                with zipfile.ZipFile(archive) as z:
                    z.extractall(tmp)
            else:
                with tarfile.open(archive) as tar:
                    members = _plain_members(tar, archive)  # on every Python, with or without tarfile's filters
                    if hasattr(tarfile, "data_filter"):  # and its own refusals where it has them
                        tar.extractall(tmp, members=members, filter="data")
                    else:  # Python < 3.10.12 / 3.11.4
                        tar.extractall(tmp, members=members)
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
            raise UserError(f"cannot extract {archive} ({type(e).__name__}: {e}): delete it and download again") from e
        for entry in tmp.iterdir():
            target = into / entry.name
            if target.exists():
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            os.replace(entry, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def download(name: str, root: str | Path, mirror: str | None = None, keep_archive: bool = False,
             progress: bool = True) -> list[Path]:
    """Fetch, check and extract every archive of ``name`` under ``root``; returns the extracted paths."""
    key = ALIASES.get(name, name)
    if key in MANUAL:
        raise UserError(f"{name} cannot be downloaded automatically: {MANUAL[key].replace('<root>', str(root))}")
    if key not in DATASETS:
        raise UserError(f"unknown dataset {name!r}: choose from {known()}")
    root = Path(root).expanduser()
    out = []
    for archive in DATASETS[key]:
        provided = root / archive.provides
        if archive.provides and provided.exists():
            print(f"{provided} already exists: skipping {archive.filename}")
            out.append(provided)
            continue
        url = f"{mirror.rstrip('/')}/{archive.filename}" if mirror else archive.url
        dest = root / (archive.filename if archive.extract else archive.provides)
        print(f"downloading {url}")
        fetch(url, dest, archive.md5, progress=progress)
        if not archive.extract:
            out.append(dest)
            continue
        print(f"md5 ok ({archive.md5}); extracting into {root / archive.subdir}")
        extract(dest, root / archive.subdir)
        if not keep_archive:
            dest.unlink()
        out.append(provided)
    for url, sha256, rel in FILES.get(key, []):
        dest = root / rel
        if mirror:
            url = f"{mirror.rstrip('/')}/{url.rsplit('/', 1)[-1]}"
        fetch(url, dest, sha256, progress=progress, algorithm="sha256")
        print(f"{rel}: sha256 ok ({sha256[:12]}...)")
        out.append(dest)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cl_vit.data.download", description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="+", metavar="NAME", help=f"datasets: {', '.join(known())}")
    p.add_argument("--root", default=os.environ.get("CL_VIT_DATA", "~/data"),
                   help="data_root: where the datasets go (default: the runs' default, $CL_VIT_DATA, else ~/data)")
    p.add_argument("--mirror", default=None, help="base URL serving the same archive file names (a local mirror)")
    p.add_argument("--keep-archive", action="store_true", help="keep the archive after extracting it")
    args = p.parse_args(argv)
    try:
        for name in args.names:
            for path in download(name, args.root, args.mirror, args.keep_archive, progress=sys.stderr.isatty()):
                print(f"{name}: {path}")
    except UserError as e:
        return report_error(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
