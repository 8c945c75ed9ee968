"""Golden per-image augmentation: the official training and evaluation transforms of DeiT-LT, Refiner-ViT and
GCAB-CFDC, each under the timm version its own code ran, on generated images, on a CPU.

    pip download --no-deps timm==0.8.15.dev0 timm==0.5.4 continuum==1.2.4 -d /tmp/wheels
    pip install --no-deps --target /tmp/timm0815 /tmp/wheels/timm-0.8.15.dev0-py3-none-any.whl
    pip install --no-deps --target /tmp/timm054 /tmp/wheels/timm-0.5.4-py3-none-any.whl
    pip install --no-deps --target /tmp/continuum124 /tmp/wheels/continuum-1.2.4-py3-none-any.whl
    git clone https://github.com/zhoudaquan/Refiner_ViT /tmp/refgolden/Refiner_ViT
    git clone https://github.com/OcraM17/GCAB-CFDC /tmp/GCAB-CFDC
    python scripts/golden_augment.py /path/to/DeiT-LT /tmp/refgolden/Refiner_ViT --timm-0815 /tmp/timm0815 \
        --gcab /tmp/GCAB-CFDC --timm-054 /tmp/timm054 --continuum /tmp/continuum124

``/path/to/DeiT-LT``: a checkout of val-iisc/DeiT-LT, or a folder with just its datasets.py, augment.py and
arguments.py (``git archive HEAD datasets.py augment.py arguments.py | tar x -C DIR``); ``--run NAME`` runs one of
``RUNS`` only; ``--pillow DIR`` puts another Pillow (a pip ``--target`` folder, e.g. 9.5.0 of DeiT-LT's
environment.yml L152) first for the official code. The old timm and Pillow go into folders of their own, never into
the suite's environment.

DeiT-LT (``deit_*`` runs, timm 0.8.15.dev0 of environment.yml L199, from the ``--timm-0815`` folder): datasets.py
``build_transform_deit(is_train, args)`` (L578-629) with arguments.py's defaults (``get_args_parser()``: ``--aa
rand-m9-mstd0.5-inc1``, ``--color-jitter 0.3``, ``--train-interpolation bicubic``, ``--reprob 0.25 --remode pixel
--recount 1``) and ``--input-size``: ``deit_train32`` (the CIFAR path, ``resize_im`` false: RandomCrop(32, padding=4)
in place of the crop, L607-610) on 32 x 32 images, ``deit_train112`` (RandomResizedCrop, L597-606) and
``deit_eval112`` (Resize(int(256 / 224 * size), bicubic) + CenterCrop, L613-629) on ``photos()``.

Refiner-ViT (``refiner_*`` runs, the timm 0.4.8 bundled in the checkout): the per-image transform that data/loader.py
``create_relabel_loader`` (L133-193) installs for main.py's training loader (L521-547: ``is_training``,
``use_prefetcher=args.prefetcher``, ``auto_augment=args.aa``, ``interpolation=args.train_interpolation``, reprob /
remode / recount, ``color_jitter``, scale / ratio / hflip / vflip) with scripts/refiner_s.yaml's values (L1, L11,
L86, L71, L70, L68, L75-77, L65-67, L28, L92) and the model's mean / std (0.5, refined_transformer.py L36, set on
Refiner_ViT_S at L487):
``refiner_train_prefetcher`` (the default ``args.prefetcher``, L295: it ends in ``ToNumpy``, uint8 CHW) and
``refiner_train`` (``--no-prefetcher``: ToTensor, Normalize and RandomErasing per image); and the one timm's
``create_loader`` installs for its evaluation loader (L550-561: the model's ``crop_pct`` 0.9 and bicubic,
refined_transformer.py L26, L37): ``refiner_eval`` (prefetcher: uint8; its ``loader`` entry is the evaluation batch
of that loader, normalised by timm/data/loader.py's PrefetchLoader, L66, L89) and ``refiner_eval_float``
(``--no-prefetcher``: ToTensor, Normalize); ``refiner_eval_m`` and ``refiner_eval_l``: the same prefetcher loader
for Refiner-ViT-M and -L (scripts/refiner_m.yaml, refiner_l.yaml: crop_pct, interpolation, mean and std unset, L14,
L31, L41, L83), with what timm's ``resolve_data_config`` (main.py L364) takes from the model's default_cfg
(refined_transformer.py L39-48, set at L497 and L507: crop_pct 1.0 and 1.13, bicubic, mean / std 0.5); every
evaluation run resolves its crop so, at 112 px (L's 1.13 crops 112 from a 99 px resize: zero padding).

GCAB-CFDC (``gcab_*`` runs, timm 0.5.4 and continuum 1.2.4 of requirements.txt L77, L8, from the ``--timm-054`` and
``--continuum`` folders): continual/datasets.py ``build_transform(is_train, args)`` (L108-151) with main.py's
defaults (``get_args_parser()``: ``--aa rand-m9-mstd0.5-inc1``, ``--color-jitter 0.4``, L117-119) updated by the
option files of the README's command, as main.py's ``load_options`` (L494-506) sets them:
``gcab_train32`` / ``gcab_eval32`` (options/data/cifar100_10splits.yaml, options/model/cifar_GCAB_FDC.yaml: input
32, reprob 0, data_set CIFAR: RandomCrop(32, padding=4) and the CIFAR-100 Normalize swapped in, L126-133; at
evaluation ToTensor + that Normalize, L144-147) on 32 x 32 images, ``gcab_train64`` / ``gcab_eval64``
(tiny_10splits.yaml, tiny_GCAB_FDC.yaml: RandomResizedCrop(64, bicubic), L116-125; Resize(73, bicubic) +
CenterCrop(64), L137-142, ImageNet's Normalize, L149) and ``gcab_train224`` / ``gcab_eval224``
(imagenet100_10splits.yaml, ImageNet_GCAB_FDC.yaml) on ``photos()``. load_options refuses tiny_10splits.yaml (L4
``memory_size``) and ImageNet_GCAB_FDC.yaml (L29-33 ``finetuning``, ``dytox``), keys no main.py option takes: the
script sets every file's values as it would, without that check. DyTox (arthurdouillard/dytox @ 4da25c1, which
pins only ``timm>=0.3.2``) has the same ``build_transform`` (its continual/datasets.py L114-157) and the same
values in options/model/cifar_dytox.yaml (L11, L51) and imagenet_dytox.yaml (L11, L54).

Each run seeds Python's ``random``, numpy and torch with ``SEED`` once, then transforms the images in order; it
prints the class names of the transform's steps and per image the checksums (golden_refiner_mix.checksums: sum and
position-weighted sum in float64, exact for uint8 and float32 tensors alike) of the output, which
tests/test_golden_augment.py asserts the suite's pipelines reproduce.

Nothing of the official code is copied or changed on disk. At run time this script only: runs each family in its own
Python process with the official timm first on ``sys.path`` (asserting its version), makes ``.cuda()`` an identity
and ``torch.cuda.Stream`` / ``stream`` / ``current_stream`` stand-ins without effect (the PrefetchLoaders move
their mean and std to the device and copy on a side stream; only the evaluation one is iterated), builds the
evaluation loader without worker processes (``num_workers=0``, no persistent workers: they change no image), and
gives ``PIL.ImageOps.posterize`` the Pillow 9.5 result for 0 bits kept (environment.yml L152; a black image), where
the installed Pillow raises (RandAugment's PosterizeIncreasing keeps 0 bits at the clipped maximum magnitude); the
suite does the same (cl_vit.data.transforms.posterize). torch, torchvision and (without ``--pillow``) Pillow are the
installed ones on both sides. For GCAB-CFDC it also gives continuum's imports of packages no transform uses (h5py,
pandas, scikit-image, imagehash, datasets; those not installed) empty modules, as scripts/golden_gcab.py does, and
switches autograd's anomaly mode, which main.py's import turns on (L31), off again. It writes nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _official import cuda_streams_off, print_runs, sibling  # noqa: E402  (the scripts' shared helpers)

#: sum and position-weighted sum in float64 (the one checksum of the golden scripts)
checksums = sibling("golden_refiner_mix").checksums

#: the first seed (of 0-299) with which every training run applies all five geometric ops of RandAugment (Rotate,
#: ShearX/Y, TranslateX/YRel) and one PosterizeIncreasing keeps 0 bits; each run also erases some images
SEED = 265
#: odd shapes (height, width), smaller and larger than the 112 px crops, so that crops up- and downsample
PHOTO_SHAPES = [(37, 53), (53, 37), (64, 96), (96, 64), (45, 200), (200, 45), (121, 121), (150, 113), (257, 301),
                (301, 257), (80, 47), (47, 80), (113, 150), (224, 224), (99, 131), (131, 99), (60, 61), (255, 170)]
N_CIFAR = 18
#: run -> (family, images, input size)
RUNS = {
    "deit_train32": ("deit_lt", "cifar", 32), "deit_train112": ("deit_lt", "photos", 112),
    "deit_eval112": ("deit_lt", "photos", 112),
    "refiner_train_prefetcher": ("refiner_vit", "photos", 112), "refiner_train": ("refiner_vit", "photos", 112),
    "refiner_eval": ("refiner_vit", "photos", 112), "refiner_eval_float": ("refiner_vit", "photos", 112),
    "refiner_eval_m": ("refiner_vit", "photos", 112), "refiner_eval_l": ("refiner_vit", "photos", 112),
    "gcab_train32": ("gcab", "cifar", 32), "gcab_eval32": ("gcab", "cifar", 32),
    "gcab_train64": ("gcab", "photos", 64), "gcab_eval64": ("gcab", "photos", 64),
    "gcab_train224": ("gcab", "photos", 224), "gcab_eval224": ("gcab", "photos", 224),
}
#: Refiner-ViT's loader arguments (scripts/refiner_s.yaml, see the docstring) and model mean / std
REFINER = dict(auto_augment="rand-m9-mstd0.5-inc1", color_jitter=0.4, interpolation="random", re_prob=0.25,
               re_mode="pixel", re_count=1, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5, vflip=0.0)
REFINER_MEAN = REFINER_STD = (0.5, 0.5, 0.5)
#: evaluation run -> (the training script's options, the default_cfg its model sets: models/refined_transformer.py
#: L487, L497, L507)
REFINER_EVAL = {"refiner_eval": ("refiner_s", "Refined_vit_small_patch16_224"),
                "refiner_eval_float": ("refiner_s", "Refined_vit_small_patch16_224"),
                "refiner_eval_m": ("refiner_m", "Refined_vit_medium_patch16_224"),
                "refiner_eval_l": ("refiner_l", "Refined_vit_large_patch16_224")}
#: GCAB-CFDC's option files per input size (README's command: options/data/<scenario>, options/model/<dataset>)
GCAB_OPTIONS = {32: ("data/cifar100_10splits.yaml", "model/cifar_GCAB_FDC.yaml"),
                64: ("data/tiny_10splits.yaml", "model/tiny_GCAB_FDC.yaml"),
                224: ("data/imagenet100_10splits.yaml", "model/ImageNet_GCAB_FDC.yaml")}


def _image(rs: np.random.RandomState, h: int, w: int) -> np.ndarray:
    """Colour ramps, a stripe pattern and noise: structure for the geometric ops, a spread histogram for the
    colour ops."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    base = rs.uniform(0, 255, 3) + rs.uniform(-2, 2, 3) * y[..., None] + rs.uniform(-2, 2, 3) * x[..., None]
    stripes = 40 * np.sin((x + 2 * y)[..., None] / rs.uniform(3, 9))
    img = base + stripes + rs.normal(0, 12, (h, w, 3))
    return np.clip(np.abs((img + 255) % 510 - 255), 0, 255).astype(np.uint8)


def photos() -> list[np.ndarray]:
    """RGB uint8 ``HxWx3`` images of :data:`PHOTO_SHAPES`."""
    rs = np.random.RandomState(17)
    return [_image(rs, h, w) for h, w in PHOTO_SHAPES]


def cifar() -> list[np.ndarray]:
    """``N_CIFAR`` CIFAR-sized (32 x 32) RGB uint8 images."""
    rs = np.random.RandomState(23)
    return [_image(rs, 32, 32) for _ in range(N_CIFAR)]


def images(name: str) -> list[np.ndarray]:
    return {"photos": photos, "cifar": cifar}[RUNS[name][1]]()


def seed_all() -> None:
    import random

    import torch

    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)


def apply(transform, name: str) -> dict:
    """The transform on the run's images, seeded once: its steps' class names and per image the checksums."""
    import torch
    from PIL import Image

    steps = [type(t).__name__ for t in transform.transforms]
    seed_all()
    out = []
    for img in images(name):
        x = transform(Image.fromarray(img))
        out.append(checksums(torch.from_numpy(x) if isinstance(x, np.ndarray) else x))
    return {"transform": steps, "images": out}


def deit_lt(official: Path, work: Path, name: str) -> dict:
    import timm
    from arguments import get_args_parser
    from datasets import build_transform_deit

    assert timm.__version__ == "0.8.15dev0", timm.__file__  # the wheel 0.8.15.dev0 spells it so
    args = get_args_parser().parse_args(["--input-size", str(RUNS[name][2])])
    with contextlib.redirect_stdout(sys.stderr):  # its "Deit val" line
        transform = build_transform_deit("train" in name, args)
    return apply(transform, name)


def refiner_vit(official: Path, work: Path, name: str) -> dict:
    import timm
    import torch
    from PIL import Image
    from timm.data import create_loader

    from data.loader import create_relabel_loader

    assert timm.__version__ == "0.4.8" and str(official) in timm.__file__, timm.__file__

    class Holder(torch.utils.data.Dataset):
        transform = None  # the loader installs its per-image transform here

        def __init__(self, imgs):
            self.imgs = imgs

        def __len__(self):
            return len(self.imgs)

        def __getitem__(self, i):
            return self.transform(Image.fromarray(self.imgs[i])), 0

    data, size = Holder(images(name)), (3, RUNS[name][2], RUNS[name][2])
    prefetcher = name in ("refiner_train_prefetcher", "refiner_eval", "refiner_eval_m", "refiner_eval_l")
    if "train" in name:
        create_relabel_loader(data, input_size=size, batch_size=1, is_training=True, use_prefetcher=prefetcher,
                              mean=REFINER_MEAN, std=REFINER_STD, num_workers=0, **REFINER)
        return apply(data.transform, name)
    # main.py L364: the script's crop_pct, interpolation, mean, std (all unset) resolved by the model's default_cfg
    import yaml
    from timm.data import resolve_data_config

    from models.refined_transformer import default_cfgs

    script, cfg = REFINER_EVAL[name]
    args = {**yaml.safe_load((official / "scripts" / f"{script}.yaml").read_text()), "img_size": size[1]}
    config = resolve_data_config(args, default_cfg=default_cfgs[cfg])
    assert config["mean"] == REFINER_MEAN and config["std"] == REFINER_STD, config
    # no worker processes (main.py's loader keeps persistent ones; they change no evaluation image)
    loader = create_loader(data, input_size=config["input_size"], batch_size=len(data), is_training=False,
                           use_prefetcher=prefetcher, interpolation=config["interpolation"], mean=config["mean"],
                           std=config["std"], num_workers=0, persistent_workers=False, crop_pct=config["crop_pct"])
    out = apply(data.transform, name)
    if prefetcher:  # the images as the evaluation loop gets them: normalised by the PrefetchLoader
        out["loader"] = [checksums(x) for x in next(iter(loader))[0]]
    return out


def gcab(official: Path, work: Path, name: str) -> dict:
    import timm
    import torch
    import yaml

    import main
    from continual.datasets import build_transform

    assert timm.__version__ == "0.5.4", timm.__file__
    torch.autograd.set_detect_anomaly(False)  # main.py L31 turns it on at import
    args = main.get_args_parser().parse_args([])
    # main.py's load_options (L494-506) sets the files' values; it refuses tiny_10splits.yaml (L4 memory_size) and
    # ImageNet_GCAB_FDC.yaml (L29-33 finetuning, dytox), which no main.py option takes: set as it would set them
    for f in GCAB_OPTIONS[RUNS[name][2]]:
        vars(args).update(yaml.safe_load((official / "options" / f).read_text()))
    assert args.input_size == RUNS[name][2], args.input_size  # the model file's input_size (L11)
    return apply(build_transform("train" in name, args), name)


def _gcab_imports() -> None:
    """Empty modules for the packages continuum imports and no transform uses (as scripts/golden_gcab.py)."""
    gcab_golden = sibling("golden_gcab")
    missing = []
    for m in gcab_golden.OPTIONAL:
        try:
            __import__(m)
        except ImportError:
            missing.append(m)
    sys.meta_path.append(gcab_golden._Stubs(missing))


def _pillow_95_posterize() -> None:
    """Where this Pillow refuses 0 bits, Pillow 9.5's black image."""
    from PIL import Image, ImageOps

    posterize = ImageOps.posterize
    try:
        posterize(Image.new("RGB", (1, 1)), 0)
    except ValueError:
        ImageOps.posterize = lambda img, bits: Image.new(img.mode, img.size) if bits < 1 else posterize(img, bits)


FAMILIES = {"deit_lt": ("val-iisc/DeiT-LT", deit_lt), "refiner_vit": ("zhoudaquan/Refiner_ViT", refiner_vit),
            "gcab": ("OcraM17/GCAB-CFDC", gcab)}


def _child(family: str, first: list[str], argv: list[str]) -> None:
    """One family's runs in this process, with ``first`` (another Pillow's and the official timm's folders) and the
    checkout leading ``sys.path``."""
    import torch

    def before(official: Path) -> None:
        sys.path[:0] = [*first, str(official)]
        import PIL

        print(f"Pillow {PIL.__version__} ({PIL.__file__})", file=sys.stderr)
        torch.Tensor.cuda = lambda self, *a, **k: self
        cuda_streams_off()
        _pillow_95_posterize()
        if family == "gcab":
            _gcab_imports()

    repo, run = FAMILIES[family]
    runs = [n for n, (f, _, _) in RUNS.items() if f == family]
    print_runs(argv, __doc__, repo, f"golden_augment_{family}_", runs, run, before=before)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        family, first = argv[1], argv[2].split(":") if argv[2] else []
        return _child(family, first, argv[3:])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("deit_lt", type=Path, help="a folder with val-iisc/DeiT-LT's datasets.py, augment.py, arguments.py")
    p.add_argument("refiner_vit", type=Path, help="a checkout of zhoudaquan/Refiner_ViT")
    p.add_argument("--timm-0815", type=Path, required=True, help="a pip --target folder holding timm 0.8.15.dev0")
    p.add_argument("--gcab", type=Path, help="a checkout of OcraM17/GCAB-CFDC (the gcab_* runs; skipped without it)")
    p.add_argument("--timm-054", type=Path, help="a pip --target folder holding timm 0.5.4 (with --gcab)")
    p.add_argument("--continuum", type=Path, help="a pip --target folder holding continuum 1.2.4 (with --gcab)")
    p.add_argument("--pillow", type=Path, help="a pip --target folder with another Pillow for the official code "
                                                "(e.g. 9.5.0 of DeiT-LT's environment.yml, 9.1.0 of GCAB-CFDC's "
                                                "requirements.txt); default: the installed one")
    p.add_argument("--run", default="all", choices=[*RUNS, "all"])
    a = p.parse_args(argv)
    if a.gcab and not (a.timm_054 and a.continuum):
        p.error("--gcab needs --timm-054 and --continuum (GCAB-CFDC's requirements.txt: timm 0.5.4, continuum 1.2.4)")
    if a.run.startswith("gcab") and not a.gcab:
        p.error(f"--run {a.run} needs --gcab")
    pillow = [str(a.pillow.resolve())] if a.pillow else []
    families = [("deit_lt", a.deit_lt, [*pillow, str(a.timm_0815.resolve())]), ("refiner_vit", a.refiner_vit, pillow)]
    if a.gcab:
        families.append(("gcab", a.gcab, [*pillow, str(a.timm_054.resolve()), str(a.continuum.resolve())]))
    for family, official, first in families:
        chosen = [n for n, (f, _, _) in RUNS.items() if f == family and a.run in (n, "all")]
        if chosen:
            run = chosen[0] if len(chosen) == 1 else "all"
            subprocess.run([sys.executable, __file__, "--child", family, ":".join(first), str(official), "--run", run],
                           check=True)


if __name__ == "__main__":
    main()
