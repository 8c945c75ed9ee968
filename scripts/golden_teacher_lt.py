"""Golden trajectory from Saddle-LongTail's ImageNet-LT teacher training (val-iisc/Saddle-LongTail imnet_train_sam.py)
on a tiny ImageNet-LT written in its on-disk format, on a CPU.

    python scripts/golden_teacher_lt.py /path/to/Saddle-LongTail

runs the official ``imnet_train_sam.main`` with the arguments of run.sh L35 "ImageNet-LT (SAM)" for LDAM
(``--loss_type LDAM --train_rule DRW --dataset imagenet --arch resnet50 --cos_lr --rho_schedule step --lr 0.2
--seed 0 --rho_steps 0.05 0.1 0.5 0.5 --wd 2e-4 --margin 0.3 --gpu 0``; ``-b`` and ``--epochs`` below): its
``main_worker`` (torchvision's ResNet with ``fc = NormedLinear``, SAM around SGD with momentum 0.9,
``CosineAnnealingLR(T_max=epochs, eta_min=0)`` stepped after each epoch, ``adjust_rho``'s step schedule, the DRW
class weights ``idx = epoch // 60``, a fresh ``LDAMLoss(max_m=0.3, s=30)`` each epoch, the per-epoch ``validate``), its
``train`` (SAM's two passes per batch), datasets/imagenet.py ``ImageNet_LT`` (the list files, the class map by
descending frequency, its transforms and loaders), losses.py ``LDAMLoss`` and sam.py ``SAM``, and prints what
tests/test_golden_teacher.py asserts the suite's ``experiment=teacher-imagenet-lt`` reproduces (the numbers of
scripts/golden_teacher.py: per step the rate, SAM's radius, the LDAM loss at ``w`` and at ``w + e(w)``; after each
epoch the correct test images and the norms of the parameters and of the BatchNorm running statistics).

inat_train_sam.py differs from imnet_train_sam.py only in its data set (datasets/ina2018.py: the same classes with
iNaturalist's mean / std and list names), the class count and the head / medium / tail cut-offs of its printout
(``diff imnet_train_sam.py inat_train_sam.py``), so this one run holds the training loop of both recipes.

The epoch loop visits the official epochs ``EPOCHS`` (the loop's ``range(0, epochs)`` replaced, as in
golden_teacher.py), so that adjust_rho's steps (0-based epochs 5, 60, 75) and the DRW switch (epoch 60) are reached,
each from both sides; ``--epochs`` is their number, so that the cosine, which counts the loop's steps, spans the run
as the suite's ``scheduler.name=cosine_epoch`` spans ``trainer.max_epochs`` (90 and ``--epochs 90`` in the recipe).
At run time this script also

* makes ``.cuda()`` an identity and ``torch.cuda.FloatTensor`` the CPU one, stands in for a missing tensorboardX and
  gives the shuffled loader golden_coda.py's ``FixedOrder`` (golden_teacher.py's helpers);
* builds ``torchvision.models.resnet50()`` (imnet_train_sam.py L137) as torchvision's ``ResNet`` with Bottleneck blocks,
  ``DEPTHS`` blocks per stage and inner width ``WIDTH`` (resnet50: 3, 4, 6, 3 and 64; the stage outputs stay 256 ...
  2048), and ``NormedLinear(2048, 1000)`` (L142) with ``N_CLASSES`` outputs, both loaded with ``initial_weights()``;
  ``LT_Dataset.num_classes`` (1000) is ``N_CLASSES`` too;
* writes the images (PNG) and the list files ``ImageNet_LT_train.txt`` / ``ImageNet_LT_test.txt``
  (``write_imagenet_lt``) and copies the lists to ``./datasets/data_txt/`` of a temporary working directory, where
  datasets/imagenet.py L110-111 reads them;
* turns the random augmentation off: ``RandomResizedCrop(224)``, ``RandomHorizontalFlip`` and ``ColorJitter`` of
  transform_train (datasets/imagenet.py L93-98) become identities (the training images are written at ``SIZE``), and
  scales the test transform to ``SIZE``: ``Resize(256)`` + ``CenterCrop(224)`` (L102-106) become
  ``Resize(int(256 / 224 * SIZE))`` + ``CenterCrop(SIZE)``;
* writes its logs and checkpoints (``--root_log``, ``--root_model``) to the temporary directory;
* computes in float64 (``torch.set_default_dtype``: the network, SAM's state, the losses), as the test runs the suite
  (``trainer.precision=64-true``): the images are made in float32 as the loaders make them (``ToTensor`` and
  ``Normalize``) and cast to float64 at the network's input, as Lightning's double precision casts the batch; the
  LDAM margins and the DRW class weights stay the float32 tensors the code builds (losses.py L49, imnet_train_sam.py
  L241), the weights cast to the loss's dtype for ``F.cross_entropy``. In float32 this tiny ResNet-50 (BatchNorm over
  8 images, LDAM's scale 30) magnifies rounding about 10^4-fold within a few steps, so float32 numbers hold only on
  the CPU kernels that made them (another torch release or oneDNN off: 22-23 of 24 losses off by up to 128 %); in
  float64 the same magnification stays below the test's tolerance (golden_teacher.py's ``float32_images``,
  ``float64_loss`` and ``trace``, _official.py's ``float64_input``).
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _official import float64_input, print_runs, sibling  # noqa: E402  (the scripts' shared helpers)

teacher = sibling("golden_teacher")

#: Bottleneck blocks per stage and inner width of the shrunk ResNet-50 (3, 4, 6, 3 and 64 in resnet50)
DEPTHS, WIDTH = (1, 1, 1, 1), 16
#: training images per class of the original labels (not sorted by frequency, so that the class map matters);
#: 30 images, 4 batches of 8, the last of 6
COUNTS = (2, 10, 5, 1, 8, 4)
N_CLASSES = len(COUNTS)
TEST_PER_CLASS = 2
#: training images are SIZE squared; test images TEST_HW (height, width), cut to SIZE by the test transform
SIZE, TEST_HW = 48, (60, 64)
SEED = 0
#: the official epochs (0-based) visited: the first, rho 0.05 to 0.1 (4 | 5), the DRW switch with rho 0.1 to 0.5
#: (59 | 60), the last rho step (75; its value 0.5 equals the one before it)
RUNS = {"imagenet_lt": dict(epochs=(0, 4, 5, 59, 60, 75), batch=8)}
#: adjust_rho's boundaries (imnet_train_sam.py L448-453, 1-based epoch <= 5, > 60, > 75) and the DRW epoch (L236)
RHO_STEPS, DRW = (5, 60, 75), 60
#: ImageNet's mean and std (datasets/imagenet.py L91)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def samples() -> tuple[list[tuple[str, int, np.ndarray]], list[tuple[str, int, np.ndarray]]]:
    """The training and test images, ``(relative path, original label, RGB uint8 array)`` in list order: class c's
    images carry the colour ``c`` picks under uniform noise (numpy seeded ``SEED``)."""
    rng = np.random.RandomState(SEED)
    colours = rng.randint(0, 256, size=(N_CLASSES, 3))

    def image(c, hw):
        noise = rng.randint(-60, 61, size=(*hw, 3))
        return np.clip(colours[c] + noise, 0, 255).astype(np.uint8)

    train = [(f"train/n{c:08d}/n{c:08d}_{i}.png", c, image(c, (SIZE, SIZE))) for c, n in enumerate(COUNTS)
             for i in range(n)]
    test = [(f"val/n{c:08d}/ILSVRC2012_val_{c:03d}{i}.png", c, image(c, TEST_HW)) for c in range(N_CLASSES)
            for i in range(TEST_PER_CLASS)]
    return train, test


def write_imagenet_lt(root: Path) -> None:
    """The images under ``root/train`` and ``root/val`` and the lists ``root/ImageNet_LT_{train,test}.txt`` (lines
    ``path label``): the layout of OLTR's ImageNet-LT that both sides read."""
    from PIL import Image

    train, test = samples()
    for name, items in (("train", train), ("test", test)):
        lines = []
        for path, label, pixels in items:
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / path)
            lines.append(f"{path} {label}\n")
        (root / f"ImageNet_LT_{name}.txt").write_text("".join(lines))


def training_images() -> torch.Tensor:
    """The training images in list order as the official transform_train gives them with the augmentation off
    (``ToTensor`` + ImageNet normalisation)."""
    x = torch.from_numpy(np.stack([p for _, _, p in samples()[0]])).permute(0, 3, 1, 2).float().div(255)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def suite_schedule(name: str) -> dict:
    """The suite's epoch settings that train suite epoch i as the run ``name`` trains its i-th visited official epoch:
    ``trainer.max_epochs``, ``optimizer.sam_rho_milestones`` and ``strategy.ldam_drw.drw_start_epoch`` (the positions
    where the visited epochs reach 5, 60, 75 and 60)."""
    epochs = RUNS[name]["epochs"]
    first = lambda bound: next((i for i, e in enumerate(epochs) if e >= bound), len(epochs))  # noqa: E731
    return {"max_epochs": len(epochs), "sam_rho_milestones": [first(m) for m in RHO_STEPS],
            "drw_start_epoch": first(DRW)}


def initial_weights() -> dict:
    """The starting weights of both runs: the suite's ``resnet50_ldam`` with ``DEPTHS``, ``WIDTH`` and ``N_CLASSES``
    outputs (torchvision's ResNet state-dict layout, ``fc.weight`` the cosine classifier's), seeded ``SEED``."""
    import timm

    import cl_vit  # noqa: F401  (registers resnet50_ldam)

    torch.manual_seed(SEED)
    net = timm.create_model("resnet50_ldam", layers=DEPTHS, base_width=WIDTH, num_classes=N_CLASSES)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _patch(official: Path):
    """The run-time changes listed in the module docstring (once per process); returns ``imnet_train_sam``."""
    if "imnet_train_sam" in sys.modules:
        return sys.modules["imnet_train_sam"]
    import torchvision
    import torchvision.transforms as transforms
    from torchvision.models.resnet import Bottleneck, ResNet

    teacher.patch_cuda()
    teacher.fixed_shuffle()
    transforms.RandomResizedCrop = transforms.RandomHorizontalFlip = transforms.ColorJitter = teacher.identity
    resize, crop = transforms.Resize, transforms.CenterCrop
    transforms.Resize = lambda size, *a, **k: resize(int(256 / 224 * SIZE) if size == 256 else size, *a, **k)
    transforms.CenterCrop = lambda size: crop(SIZE if size == 224 else size)
    teacher.float32_images()
    weights = initial_weights()

    def resnet50(**kwargs):
        net = ResNet(Bottleneck, list(DEPTHS), width_per_group=WIDTH)
        net.load_state_dict({k: v for k, v in weights.items() if not k.startswith("fc.")}, strict=False)
        return float64_input(net)

    torchvision.models.resnet50 = resnet50
    sys.path.insert(0, str(official))
    import datasets.imagenet as imagenet
    import imnet_train_sam

    imagenet.LT_Dataset.num_classes = imagenet.LT_Dataset_Eval.num_classes = N_CLASSES
    normed = imnet_train_sam.NormedLinear

    def normed_linear(in_features, out_features):
        fc = normed(in_features, N_CLASSES)
        fc.weight.data.copy_(weights["fc.weight"])
        return fc

    imnet_train_sam.NormedLinear = normed_linear
    teacher.float64_loss(imnet_train_sam)
    return imnet_train_sam


def run(official: Path, work: Path, name: str) -> dict:
    """The official run ``name`` (a key of ``RUNS``) on the tiny set; returns its numbers."""
    script = _patch(official)
    root = work / "imagenet-lt"
    write_imagenet_lt(root)
    lists = work / "datasets" / "data_txt"
    lists.mkdir(parents=True)
    for split in ("train", "test"):
        shutil.copy(root / f"ImageNet_LT_{split}.txt", lists)
    os.chdir(work)  # datasets/imagenet.py reads ./datasets/data_txt (in_checkout restores the directory)
    visited = RUNS[name]["epochs"]
    argv = ["imnet_train_sam.py", "--gpu", "0", "--imb_type", "exp", "--imb_factor", "0.01", "--data_path", str(root),
            "--loss_type", "LDAM", "--train_rule", "DRW", "--dataset", "imagenet", "-b", str(RUNS[name]["batch"]),
            "--epochs", str(len(visited)), "--arch", "resnet50", "--cos_lr", "--rho_schedule", "step", "--lr", "0.2",
            "--seed", str(SEED), "--rho_steps", "0.05", "0.1", "0.5", "0.5", "--wd", "2e-4", "--margin", "0.3",
            "-j", "0", "--root_log", str(work / "log"), "--root_model", str(work / "checkpoint")]
    # the epoch loop, imnet_train_sam.py L213: range(start_epoch, epochs); trace runs it in float64
    return teacher.trace(script, argv, visited, (0, len(visited)))


def main(argv=None) -> None:
    print_runs(argv, __doc__, "val-iisc/Saddle-LongTail", "golden_teacher_lt_", RUNS, run)


if __name__ == "__main__":
    main()
