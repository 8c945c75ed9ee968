"""What a source is: train and test datasets over one label space, with their class names and metadata.

A source never knows about experiences: cl_vit.streams cuts it into a stream. Every dataset here yields
``(image_tensor, int_label)`` and exposes ``targets`` (one int per sample) so that Avalanche can split it
without decoding a single image.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from cl_vit.data.decode_check import pil_formats  # never EPS: PIL would run the file in Ghostscript
from cl_vit.errors import UserError


@dataclass
class Source:
    name: str
    train: Dataset
    test: Dataset
    classes: list[str]
    in_chans: int
    img_size: int
    #: recorded verbatim in results.json under "source" (split hashes, imbalance profile, skipped files, ...)
    meta: dict = field(default_factory=dict)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def train_targets(self) -> np.ndarray:
        return np.asarray(self.train.targets, dtype=np.int64)

    @property
    def test_targets(self) -> np.ndarray:
        return np.asarray(self.test.targets, dtype=np.int64)

    def train_counts(self) -> np.ndarray:
        """Training images per class (the long-tail profile)."""
        return np.bincount(self.train_targets, minlength=self.n_classes)


class TensorImageDataset(Dataset):
    """Images already decoded into one tensor ``[N, C, H, W]`` (small, in-memory sources such as digits)."""

    def __init__(self, images: torch.Tensor, targets: Sequence[int], transform: Callable | None = None):
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.images = images
        self.targets = [int(t) for t in targets]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        x = self.images[i]
        return (self.transform(x) if self.transform is not None else x), self.targets[i]


class CorruptImage(UserError):
    """An image file that cannot be decoded, found while a run reads it; ``path`` names the file.

    Raised inside DataLoader workers too: torch re-raises it in the main process as ``CorruptImage(message)``, so the
    path is recovered from the message, whose form is fixed for that reason."""

    PREFIX = "cannot decode image "
    SUFFIX = ": replace the file (re-download the dataset) or run with skip_corrupt=true"

    def __init__(self, message: str, path: str | Path | None = None, problem: str | None = None):
        if path is not None:  # the problem in brackets keeps the path recoverable from the message
            problem = str(problem or "corrupt or not an image").replace("(", "[").replace(")", "]")
            message = f"{self.PREFIX}{path} ({problem}){self.SUFFIX}"
        super().__init__(message)
        text = str(self)
        if path is None and text.startswith(self.PREFIX) and text.endswith(self.SUFFIX):
            path = text[len(self.PREFIX):-len(self.SUFFIX)].rsplit(" (", 1)[0]
        #: the file's path (None if the message did not come from this class)
        self.path = None if path is None else str(path)


#: EXIF orientation -> numpy ops on an ``[H, W, C]`` array giving the image as it is meant to be seen
#: (the TIFF/EXIF 2.3 definition; PIL's ImageOps.exif_transpose does the same, the tests compare with it)
_ORIENT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}
_T = Image.Transpose  # the same on PIL images (PIL rotates counter-clockwise)
_PIL_ORIENT = {2: _T.FLIP_LEFT_RIGHT, 3: _T.ROTATE_180, 4: _T.FLIP_TOP_BOTTOM, 5: _T.TRANSPOSE, 6: _T.ROTATE_270,
               7: _T.TRANSVERSE, 8: _T.ROTATE_90}


def _exif_orientation(im) -> int:
    try:
        return int(im.getexif().get(0x0112, 1))
    except Exception:  # a damaged EXIF block is the same image, unrotated
        return 1


def image_header(path: str | Path, exif: bool = True) -> tuple[int, int, str, int] | None:
    """``(height, width, format, orientation)`` from the file header, the size *as displayed*: with the EXIF
    orientation applied (5-8 swap height and width). ``None`` if PIL cannot parse the header. ``exif=False``
    (``exif_orientation=ignore``): the stored size and orientation 1, as ``Image.open(path).convert("RGB")`` sees it.

    The one place orientation is read: the reduced decode sizes its crop with it, and :func:`read_image` rotates the
    pixels with it, so that size, crop and pixels agree (OpenCV's own orientation handling is switched off)."""
    try:
        with Image.open(path, formats=pil_formats()) as im:
            w, h = im.size
            fmt = im.format or ""
            orientation = _exif_orientation(im) if exif else 1
    except Exception:  # read_image reports the file with a proper message
        return None
    orientation = orientation if orientation in _ORIENT else 1
    return (w, h, fmt, orientation) if orientation >= 5 else (h, w, fmt, orientation)


def orient(img: np.ndarray, orientation: int) -> np.ndarray:
    """The stored pixels ``img`` as displayed under EXIF ``orientation`` (1 or unknown: unchanged)."""
    op = _ORIENT.get(int(orientation))
    return img if op is None else np.ascontiguousarray(op(img))


def read_image(path: str | Path, flags: int = cv2.IMREAD_COLOR, orientation: int | None = None) -> np.ndarray:
    """Decode an image file to an RGB uint8 array ``[H, W, 3]`` with OpenCV, EXIF orientation applied; a clear
    error names a bad file (:class:`CorruptImage`).

    ``flags``: ``cv2.IMREAD_REDUCED_COLOR_{2,4,8}`` decode a JPEG at a reduced scale (cl_vit.data.transforms).
    ``orientation``: from :func:`image_header` when the caller already read it; 1 gives the stored pixels
    (``exif_orientation=ignore``)."""
    if orientation is None:
        header = image_header(path)
        orientation = header[3] if header else 1
    img = cv2.imread(str(path), flags | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is None:
        if not Path(path).exists():
            raise UserError(f"image file {path} does not exist: check data_root and the split file")
        raise CorruptImage("", path=path, problem="corrupt or not an image")
    return orient(cv2.cvtColor(img, cv2.COLOR_BGR2RGB), orientation)


def read_image_pil(path: str | Path, exif: bool = True):
    """Decode fully with PIL, as torchvision's ImageFolder loader does (``convert("RGB")``), EXIF orientation
    applied unless ``exif=False`` (then exactly that loader's pixels): the decode of the official pipelines that
    resize with PIL (cl_vit.data.transforms, ``backend=pil``)."""
    if not Path(path).exists():
        raise UserError(f"image file {path} does not exist: check data_root and the split file")
    try:
        with Image.open(path, formats=pil_formats()) as im:
            orientation = _exif_orientation(im) if exif else 1
            im = im.convert("RGB")  # loads the whole image: a truncated file raises here
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # PIL's errors for damaged files
        raise CorruptImage("", path=path, problem=f"PIL: {e}") from None
    op = _PIL_ORIENT.get(orientation)
    return im if op is None else im.transpose(op)


class ImageFileDataset(Dataset):
    """``(path, label)`` samples decoded with OpenCV and transformed with an albumentations pipeline.

    ``transform`` takes and returns albumentations' ``image=`` keyword (it must end in ``ToTensorV2``).
    ``decode(path) -> RGB uint8 array`` replaces the plain ``read_image`` (e.g. a crop decided before decoding, so
    that a JPEG is decoded at a reduced scale: cl_vit.data.transforms.imagenet_transforms).
    """

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable | None = None,
                 decode: Callable | None = None):
        self.samples = [(str(p), int(y)) for p, y in samples]
        self.targets = [y for _, y in self.samples]
        self.transform = transform
        self.decode = decode

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        path, y = self.samples[i]
        img = self.decode(path) if self.decode is not None else read_image(path)
        if self.transform is not None:
            img = self.transform(image=img)["image"]
        else:
            img = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
        return img, y


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def scan_image_folder(root: str | Path, classes: Sequence[str] | None = None) -> tuple[list[tuple[str, int]], list[str]]:
    """``root/<class>/<image>`` -> sorted ``(path, label)`` samples and the class list.

    Classes default to the sorted sub-folder names; a given class list fixes the label ids (missing folders and
    empty folders are errors naming the folder).
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"dataset folder {root} does not exist: expected {root}/<class>/<image files>")
    if classes is None:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        if not classes:
            raise UserError(f"dataset folder {root} has no class sub-folders: expected {root}/<class>/<image files>")
    samples = []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            raise UserError(f"class folder {folder} is missing: expected one folder per class under {root}")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"class folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        samples.extend((str(p), label) for p in files)
    return samples, list(classes)
