"""ImageNet-R (Hendrycks et al. 2021): 30,000 renditions of 200 ImageNet classes, in
``<data_root>/imagenet-r/<wnid>/*.jpg``.

The train/test split is data with a name (``benchmark.source_args.split``), recorded in results.json with the sha256
of its file lists (``source.split``):

* ``coda`` (default): CODA-Prompt's split files (GT-RIPL/CODA-Prompt ``dataloaders/splits/imagenet-r_{train,test}
  .yaml``, 24,000 / 6,000 images), fetched by ``python -m cl_vit.data.download imagenet-r`` from a pinned commit
  into ``<data_root>/imagenet-r-splits/coda/`` (or ``split_dir=DIR``). ``data:`` paths like
  ``data/imagenet-r/<wnid>/<file>.jpg`` are resolved under the dataset folder by the part after ``imagenet-r/``;
  ``targets:`` are the source labels, in CODA-Prompt's own order (label 0 = n02165456), so class order
  ``identity`` is CODA-Prompt's and ``coda`` reproduces its trials.
* ``pilot``: the train/test folders of the ImageNet-R archive of LAMDA-PILOT / EASE (``<data_root>/imagenet-r-pilot/
  {train,test}/<wnid>/``, torchvision ImageFolder labels: sorted wnids); their class order is
  ``benchmark.class_order=numpy:1993`` (utils/data_manager.py: ``np.random.seed(1993); np.random.permutation``).
* ``own``: the suite's stratified split: per class (in the order of ``tasks/imagenet-r-wnids.txt``), the sorted
  file paths are permuted by one ``numpy.random.RandomState(split_seed)`` and the first ``round(0.8 n)`` go to
  training. Reproducible on any machine with the same files.
* ``tfds``: DualPrompt's split (google-research/l2p ``libml/input_pipeline.py`` L420-424: ``test[:80%]`` of TFDS
  ``imagenet_r`` for training, ``test[80%:]`` for testing). TFDS orders a split's examples by the md5 of the split
  name followed by the example's key (``core/hashing.py``, ``core/shuffle.py``), and ``imagenet_r``'s key is
  ``<wnid>_<file name>`` (``imagenet_r_dataset_builder.py``); the first ``round(0.8 n)`` in that order train.
  Labels are the sorted wnids (l2p's ``IR_LABEL_LIST``, ascending ImageNet ids), class order ``identity``.
* ``inflora``: InfLoRA's (liangyanshuo/InfLoRA utils/data.py L187-209): torchvision's ImageFolder over the whole
  folder (sorted class folders, sorted file names), ``torch.utils.data.random_split`` into ``int(0.8 n)`` training
  and the rest test images right after ``torch.manual_seed(seed)`` of the run that made the split (trainer.py
  L50-53, L99-100: nothing draws in between), i.e. ``torch.randperm(n)`` from a generator seeded with
  ``split_seed``; the official run moves the images into train/ and test/ folders and reads them back sorted, as
  the lists here are. Labels are the sorted wnids, class order ``identity`` (``shuffle: false``).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np
import yaml
from cl_vit.data.base import Source, scan_image_folder
from cl_vit.data.transforms import check_pipelines, decode_options, imagenet_style_datasets, resolve_normalization
from cl_vit.data.verify import skipped_record, verify_images
from cl_vit import loading
from cl_vit.errors import UserError

TASKS_DIR = Path(__file__).resolve().parents[2] / "tasks"
WNIDS_FILE = TASKS_DIR / "imagenet-r-wnids.txt"
SPLIT_FILES = ("imagenet-r_train.yaml", "imagenet-r_test.yaml")
#: named splits (module docstring); the fetched split files go to <data_root>/SPLITS_DIR/<name>/
SPLITS = ("coda", "pilot", "own", "tfds", "inflora")
SPLITS_DIR = "imagenet-r-splits"
PILOT_DIR = "imagenet-r-pilot"
LAYOUT = "<root>/<wnid>/<image>.jpg for the 200 wnids of tasks/imagenet-r-wnids.txt"


def imagenet_r_wnids() -> list[str]:
    """The 200 ImageNet-R classes, sorted (the project's own list)."""
    lines = (ln.strip() for ln in WNIDS_FILE.read_text().splitlines())
    return [ln for ln in lines if ln and not ln.startswith("#")]


def _yaml_load(path: Path):
    return loading.read_yaml(path)


def read_split_file(path: Path, root: Path, n_classes: int) -> tuple[list[tuple[str, int]], list[str]]:
    """A CODA-Prompt split file -> ``(path, label)`` samples under ``root`` and the wnid of every entry."""
    try:
        doc = _yaml_load(path)
    except yaml.YAMLError as e:
        raise UserError(f"split file {path} is not valid YAML ({type(e).__name__}): restore the file") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list) or not isinstance(doc.get("targets"), list):
        raise UserError(f"split file {path} must hold 'data:' (a list of image paths) and 'targets:' (their labels)")
    data, targets = doc["data"], doc["targets"]
    if len(data) != len(targets):
        raise UserError(f"split file {path} has {len(data)} paths but {len(targets)} targets: they must pair up")
    samples, wnids = [], []
    for i, (entry, label) in enumerate(zip(data, targets)):
        entry = str(entry)
        if "imagenet-r/" not in entry:
            raise UserError(f"split file {path} entry {i} ({entry!r}) has no 'imagenet-r/' part to resolve under the "
                            "dataset folder")
        rel = entry.split("imagenet-r/", 1)[1]
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < n_classes:
            raise UserError(f"split file {path} entry {i} ({entry}) has label {label!r} outside the class range "
                            f"0..{n_classes - 1}")
        samples.append((str(root / rel), label))
        wnids.append(rel.split("/", 1)[0])
    missing = [(i, p) for i, (p, _) in enumerate(samples) if not Path(p).is_file()]
    if missing:
        i, p = missing[0]
        raise UserError(f"split file {path.name} entry {i} ({data[i]}) does not exist at {p} ({len(missing)} "
                        "missing in all): check data_root, or the split file belongs to another copy of ImageNet-R")
    return samples, wnids


def _class_names_from_split(wnids_of_entries, labels, n_classes: int, known: Sequence[str], path: Path) -> list[str]:
    names: dict[int, str] = {}
    for wnid, label in zip(wnids_of_entries, labels):
        if names.setdefault(label, wnid) != wnid:
            raise UserError(f"split file {path} gives label {label} to both {names[label]} and {wnid}: "
                            "one label per class folder")
    unknown = sorted(set(names.values()) - set(known))
    if unknown:
        raise UserError(f"split file {path} names class folders {unknown[:3]} that are not ImageNet-R wnids "
                        "(tasks/imagenet-r-wnids.txt)")
    return [names.get(k, f"label_{k}") for k in range(n_classes)]


def own_split(samples: Sequence[tuple[str, int]], n_classes: int, train_fraction: float, split_seed: int):
    """Per class: sorted paths, one seeded permutation, the first ``round(train_fraction * n)`` to training
    (at least one image on each side when a class has two or more)."""
    if not 0 < train_fraction < 1:
        raise UserError(f"benchmark.source_args.train_fraction={train_fraction} must be between 0 and 1")
    rng = np.random.RandomState(split_seed)
    by_class: list[list[str]] = [[] for _ in range(n_classes)]
    for p, y in samples:
        by_class[y].append(p)
    train, test = [], []
    for y, paths in enumerate(by_class):
        paths = sorted(paths)
        perm = rng.permutation(len(paths))
        n_train = int(round(train_fraction * len(paths)))
        if len(paths) >= 2:
            n_train = min(max(n_train, 1), len(paths) - 1)
        train += [(paths[k], y) for k in sorted(perm[:n_train])]
        test += [(paths[k], y) for k in sorted(perm[n_train:])]
    return train, test


def tfds_order_key(relative_path: str) -> int:
    """Where TFDS puts an ImageNet-R image in its ``test`` split: md5 of the salt ``test`` and the key
    ``<wnid>_<file name>``, as a 128-bit integer; examples are stored in ascending order of it."""
    wnid, name = relative_path.replace("\\", "/").split("/")[-2:]
    return int(hashlib.md5(f"test{wnid}_{name}".encode()).hexdigest(), 16)


def tfds_split(samples: Sequence[tuple[str, int]], root: Path, train_percent: float = 80):
    """``test[:80%]`` / ``test[80%:]`` of TFDS ``imagenet_r`` over ``samples`` (TFDS rounds the cut to the closest
    example, ``core/splits.py`` ``_pct_to_abs_closest``); both lists keep the order of ``samples``."""
    keys = {p: tfds_order_key(Path(p).relative_to(root).as_posix()) for p, _ in samples}
    ordered = sorted(keys, key=keys.__getitem__)
    train_paths = set(ordered[:int(round(train_percent * len(ordered) / 100.0))])
    return [s for s in samples if s[0] in train_paths], [s for s in samples if s[0] not in train_paths]


def inflora_split(root: Path, classes: Sequence[str], train_fraction: float, split_seed: int):
    """InfLoRA's random split (module docstring) of every image under ``root``, restricted to ``classes`` (labels
    in their order); each list sorted by class, then path, as ImageFolder reads the moved folders back."""
    samples, folders = scan_image_folder(root)  # the permutation runs over the whole folder, as ImageFolder sees it
    return inflora_split_samples([(p, folders[y]) for p, y in samples], classes, train_fraction, split_seed)


def inflora_split_samples(samples: Sequence[tuple[str, str]], classes: Sequence[str], train_fraction: float,
                          split_seed: int):
    """:func:`inflora_split` of ``(path, wnid)`` samples in ImageFolder's order (sorted wnids, then sorted paths)."""
    import torch

    if not 0 < train_fraction < 1:
        raise UserError(f"benchmark.source_args.train_fraction={train_fraction} must be between 0 and 1")
    n_train = int(train_fraction * len(samples))
    perm = torch.randperm(len(samples), generator=torch.Generator().manual_seed(split_seed)).tolist()
    label = {w: k for k, w in enumerate(classes)}

    def kept(indices):
        return sorted(((samples[i][0], label[samples[i][1]]) for i in indices if samples[i][1] in label),
                      key=lambda s: (s[1], s[0]))

    return kept(perm[:n_train]), kept(perm[n_train:])


def split_digest(train, test, root: Path) -> str:
    """sha256 of the split as ``split<TAB>relative/path<TAB>label`` lines: the same on every machine."""
    h = hashlib.sha256()
    for name, samples in (("train", train), ("test", test)):
        for p, y in samples:
            h.update(f"{name}\t{Path(p).relative_to(root).as_posix()}\t{y}\n".encode())
    return h.hexdigest()


def build_imagenet_r(
    data_root: str | Path,
    root: str | Path | None = None,
    split: str = "coda",
    split_dir: str | Path | None = None,
    wnids: Sequence[str] | None = None,
    train_fraction: float = 0.8,
    split_seed: int = 0,
    img_size: int = 224,
    normalize: str = "imagenet",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    test_resize: str = "crop",
    skip_corrupt: bool = False,
    verify: str = "header",
    train_transform: str = "default",
    test_transform: str = "default",
    augment: dict | None = None,
    test_crop_pct: float | None = None,
    backend: str = "opencv",
    crop_scale: Sequence[float] = (0.08, 1.0),
    train_interpolation: str = "bilinear",
    test_interpolation: str = "bilinear",
    exif_orientation: str = "apply",
    **_,
) -> Source:
    """``split``: ``coda`` | ``pilot`` | ``own`` | ``tfds`` | ``inflora`` (module docstring); ``split_dir``: where the ``coda`` files are.
    ``wnids``: a subset of the 200 classes (tests, quick runs); label ids follow its order (split files then hold
    labels below its length).
    ``train_transform``, ``test_transform``, ``augment``, and for the default pipelines ``backend``, ``crop_scale``,
    ``train_interpolation``, ``test_interpolation``; ``exif_orientation`` (every pipeline): see
    cl_vit.data.transforms.imagenet_style_datasets."""
    from cl_vit.data.download import missing_dataset_error

    data_root = Path(data_root).expanduser()
    root = Path(root).expanduser() if root else data_root / "imagenet-r"
    all_wnids = imagenet_r_wnids()
    classes = list(wnids) if wnids else all_wnids
    bad = [w for w in classes if w not in all_wnids]
    if bad:
        raise UserError(f"benchmark.source_args.wnids names {bad[:3]}, not ImageNet-R classes "
                        "(tasks/imagenet-r-wnids.txt)")
    if not root.is_dir():
        raise missing_dataset_error("imagenet-r", root, LAYOUT, data_root)
    mean, std = resolve_normalization(normalize, mean, std)
    pipelines = dict(train_transform=train_transform, test_transform=test_transform, augment=augment,
                     test_crop_pct=test_crop_pct)
    meta = {"root": str(root), "normalization": {"mean": list(mean), "std": list(std)}, "test_resize": test_resize,
            "transforms": check_pipelines(**pipelines, test_resize=test_resize)}
    meta["transforms"]["decode"] = decode = decode_options(backend, crop_scale, train_interpolation,
                                                           test_interpolation, exif_orientation)
    if split not in SPLITS:
        raise UserError(f"benchmark.source_args.split={split!r} is not an ImageNet-R split: choose from {list(SPLITS)}")
    if split == "coda":
        split_dir = Path(split_dir).expanduser() if split_dir else data_root / SPLITS_DIR / "coda"
        paths = [split_dir / f for f in SPLIT_FILES]
        for p in paths:
            if not p.is_file():
                raise UserError(f"CODA-Prompt's split file {p} is missing: fetch it with python -m "
                                f"cl_vit.data.download imagenet-r --root {data_root} (or give "
                                "benchmark.source_args.split_dir=DIR, or split=own for the suite's own split)")
        train, train_wnids = read_split_file(paths[0], root, len(classes))
        test, test_wnids = read_split_file(paths[1], root, len(classes))
        classes = _class_names_from_split(train_wnids + test_wnids, [y for _, y in train + test], len(classes),
                                          all_wnids, paths[0])
        meta["split"] = {"name": "coda", "kind": "CODA-Prompt split files (GT-RIPL/CODA-Prompt dataloaders/splits)",
                         "split_dir": str(split_dir),
                         "files": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}}
    elif split == "pilot":
        pilot = data_root / PILOT_DIR
        if not (pilot / "train").is_dir() or not (pilot / "test").is_dir():
            raise UserError(f"the LAMDA-PILOT / EASE ImageNet-R split is not at {pilot}: unpack their archive (README, "
                            f"'ImageNet-R' download link) so that {pilot}/train/<wnid>/ and {pilot}/test/<wnid>/ exist")
        train, _ = scan_image_folder(pilot / "train", classes)
        test, _ = scan_image_folder(pilot / "test", classes)
        root = pilot
        meta["root"] = str(pilot)
        meta["split"] = {"name": "pilot", "kind": "LAMDA-PILOT / EASE train/ and test/ folders (ImageFolder labels)",
                         "root": str(pilot)}
    elif split == "tfds":
        samples, _ = scan_image_folder(root, classes)
        train, test = tfds_split(samples, root)
        meta["split"] = {"name": "tfds", "kind": "DualPrompt's: TFDS imagenet_r test[:80%] / test[80%:] by TFDS's "
                                                  "md5 example order (google-research/l2p)"}
    elif split == "inflora":
        train, test = inflora_split(root, classes, train_fraction, split_seed)
        meta["split"] = {"name": "inflora", "kind": f"InfLoRA's: random_split of ImageFolder({root.name}) into "
                                                    f"int({train_fraction:g} n) / rest after torch.manual_seed("
                                                    f"{split_seed}) (liangyanshuo/InfLoRA utils/data.py)"}
    else:
        samples, _ = scan_image_folder(root, classes)
        train, test = own_split(samples, len(classes), train_fraction, split_seed)
        kind = (f"own per-class {train_fraction:g}/{1 - train_fraction:g} split of sorted paths, "
                f"numpy RandomState({split_seed}) permutation")
        meta["split"] = {"name": "own", "kind": kind}
    # the same digest for the same (relative path, label) lists, whatever the split's file format
    meta["split"]["sha256"] = split_digest(train, test, root)
    meta.update(n_train=len(train), n_test=len(test))
    cache = data_root / ".cache" / "cl_vit-verify"
    train, skipped_train = verify_images(train, mode=verify, skip_corrupt=skip_corrupt, cache_dir=cache,
                                         name="imagenet-r")
    test, skipped_test = verify_images(test, mode=verify, skip_corrupt=skip_corrupt, cache_dir=cache, name="imagenet-r")
    if skip_corrupt:
        meta["skipped_corrupt"] = skipped_record(skipped_train + skipped_test)
    train_ds, test_ds = imagenet_style_datasets(train, test, img_size, mean, std, test_resize, **pipelines,
                                                decode=decode)
    return Source(
        name="imagenet-r",
        train=train_ds,
        test=test_ds,
        classes=classes,
        in_chans=3,
        img_size=img_size,
        meta=meta,
    )
