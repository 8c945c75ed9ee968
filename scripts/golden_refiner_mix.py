"""Golden batches from Refiner-ViT's own prefetcher loader (zhoudaquan/Refiner_ViT): Mixup/CutMix in the collate,
then normalisation and random erasing on the mixed batch, on a CPU.

    python scripts/golden_refiner_mix.py /path/to/Refiner_ViT [--run batch|pair|elem|minmax|all]

builds the training loader as main.py does with its default prefetcher (``args.prefetcher = not
args.no_prefetcher``, L295; ``collate_fn = FastCollateMixup(**mixup_args)``, L503-505; ``create_relabel_loader(...,
use_prefetcher=args.prefetcher, re_prob=..., re_mode=..., re_count=..., collate_fn=collate_fn)``, L521-547): its
data/loader.py ``create_relabel_loader`` with the bundled timm 0.4.8's ``FastCollateMixup`` (timm/data/mixup.py
L221-315) and data/loader.py's ``PrefetchLoader`` (L59-130: ``(x - 255 mean) / (255 std)`` on the device, then timm
0.4.8's ``RandomErasing`` on the mixed batch), and prints what tests/test_golden_refiner_mix.py asserts the suite
reproduces (``strategy=mixup`` on uint8 batches, cl_vit.strategies.mixup.mix_uint8, then
cl_vit.data.transforms.PrefetchStage): per batch the checksums (sum, position-weighted sum) of the mixed uint8 batch,
of the soft targets and of the normalised, erased batch. It also prints the per-image transform the loader
installs (``use_prefetcher``: it ends in ``ToNumpy``, without ``Normalize`` or ``RandomErasing``).

The data are ``BATCHES`` batches of uint8 ``SIZE`` images (odd sides: timm 0.4.8's CutMix box differs from timm 1.0's
there) from ``images()``, fed in a fixed order by an iterable data set (no shuffling), so no random per-image
augmentation (the loader's transform is installed but the fixed arrays bypass it). Settings: ``MIX`` (the recipes'
Mixup 0.8 / CutMix 1.0 / switch 0.5 / smoothing 0.1, per run the mode and the min-max box) and ``ERASE`` (pixel
mode, one box; probability 0.5 so that the few images show erasing).

Nothing of the official code is copied or changed on disk; at run time this script only makes ``.cuda()`` an
identity, ``torch.cuda.Stream`` / ``stream`` / ``current_stream`` stand-ins without effect (the prefetcher's
side stream), and sets the ``RandomErasing``'s device (timm 0.4.8's default ``'cuda'``, which the loader keeps) to
the CPU. numpy, Python's ``random`` and torch are seeded with ``SEED`` when the loader starts reading the data (after
torch's DataLoader draws its base seed); the suite's side is seeded at the same point. Run it from a checkout outside
this repository (it imports the checkout's ``timm``, never the installed one); it writes nothing.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _official import cuda_streams_off, print_runs, sibling  # noqa: E402  (the scripts' shared helpers)

#: images per batch, batches, image shape (odd sides), classes
BATCH, BATCHES, SIZE, N_CLASSES = 4, 4, (3, 15, 13), 5
#: main.py's mixup_args (scripts/refiner_s.yaml L43, L15, L46, L47, L44, L80); each run sets the mode and the box
MIX = dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, label_smoothing=0.1, num_classes=N_CLASSES)
RUNS = {"batch": dict(mode="batch", cutmix_minmax=None), "pair": dict(mode="pair", cutmix_minmax=None),
        "elem": dict(mode="elem", cutmix_minmax=None), "minmax": dict(mode="batch", cutmix_minmax=(0.3, 0.8))}
#: the prefetcher's random erasing (recipes: reprob 0.25, remode pixel, recount 1) and normalisation
ERASE = dict(re_prob=0.5, re_mode="pixel", re_count=1)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SEED = 7


def images() -> tuple[np.ndarray, np.ndarray]:
    """``BATCH * BATCHES`` uint8 images ``SIZE`` (channels first, as timm's ``ToNumpy`` gives them) and labels."""
    rs = np.random.RandomState(3)
    n = BATCH * BATCHES
    return rs.randint(0, 256, size=(n, *SIZE)).astype(np.uint8), np.arange(n) % N_CLASSES


def seed_all() -> None:
    """numpy (the collate's mixing), Python's ``random`` and torch (erasing), as golden_refiner.py seeds them."""
    sibling("golden_refiner").seed_all(SEED)


def checksums(x: torch.Tensor) -> list:
    """The sum and a position-weighted sum of ``x`` in float64 (exact for the uint8 batches; equal tensors give equal
    sums); the weights, ``k * k % 251 + 1`` for flat index k, are not affine in the row, so that a target and its
    flipped rows weigh differently. Summed on one thread: a float32 tensor's sums round, and torch's reduction order
    follows the thread count (an in-process run with OMP_NUM_THREADS=2 left the tests' process at two threads, and
    equal images then gave sums one bit apart)."""
    k = torch.arange(x.numel(), dtype=torch.float64)
    w = (k * k % 251 + 1).view(x.shape)
    x = x.detach().cpu().double()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [float(x.sum()), float((x * w).sum())]
    finally:
        torch.set_num_threads(threads)


def _patch(official: Path) -> None:
    """The run-time changes of the module docstring."""
    torch.Tensor.cuda = lambda self, *a, **k: self
    cuda_streams_off()
    sys.path.insert(0, str(official))


def run(official: Path, work: Path, name: str) -> dict:
    import timm
    from timm.data import FastCollateMixup

    from data.loader import create_relabel_loader

    assert timm.__version__ == "0.4.8" and str(official) in timm.__file__, timm.__file__
    x, y = images()

    class Fixed(torch.utils.data.IterableDataset):
        transform = None  # create_relabel_loader installs the per-image transform here

        def __iter__(self):
            seed_all()
            return iter([(x[i], int(y[i])) for i in range(len(x))])

    mixed = []
    collate = FastCollateMixup(**MIX, **RUNS[name])

    def recorded(batch):
        out, target = collate(batch)
        mixed.append(checksums(out))
        return out, target

    data = Fixed()
    loader = create_relabel_loader(data, input_size=SIZE, batch_size=BATCH, is_training=True, use_prefetcher=True,
                                   auto_augment="rand-m9-mstd0.5-inc1", interpolation="random", mean=MEAN, std=STD,
                                   num_workers=0, collate_fn=recorded, **ERASE)
    loader.random_erasing.device = "cpu"
    transform = [type(t).__name__ for t in data.transform.transforms]
    batches = [(out, target) for out, target in loader]
    return {"transform": transform, "mixed": mixed, "target": [checksums(t) for _, t in batches],
            "input": [checksums(out) for out, _ in batches]}


def main(argv=None) -> None:
    print_runs(argv, __doc__, "zhoudaquan/Refiner_ViT", "golden_refiner_mix_", RUNS, run, before=_patch)


if __name__ == "__main__":
    main()
