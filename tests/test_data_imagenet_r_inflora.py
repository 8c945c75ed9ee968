"""ImageNet-R's ``split=inflora`` (cl_vit/data/imagenet_r.py): InfLoRA's random split, held to the calls the official
code makes (liangyanshuo/InfLoRA utils/data.py L187-209, trainer.py L50-53, L99-100): torchvision's ImageFolder over
the folder, ``torch.manual_seed(seed)``, ``torch.utils.data.random_split`` into ``int(0.8 n)`` and the rest, the
images read back from the moved folders in ImageFolder's order."""
from pathlib import Path

import pytest
import torch
import yaml
from conftest import SHARED_REFERENCE
from data_gen import WNIDS, make_imagenet_r

from cl_vit.data import build_source
from cl_vit.data.imagenet_r import imagenet_r_wnids, inflora_split_samples, split_digest


def official_split(root: Path, seed: int) -> tuple[list, list]:
    """What the official code's calls make of ``root``: (path, sorted-wnid label) lists, each as ImageFolder reads
    the train/ and test/ folders the official run moves the images into (by class, then file name)."""
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(root))
    train_size = int(0.8 * len(dataset))
    torch.manual_seed(seed)
    train, test = torch.utils.data.random_split(dataset, [train_size, len(dataset) - train_size])
    return tuple(sorted((dataset.imgs[i] for i in part.indices), key=lambda s: (s[1], s[0])) for part in (train, test))


def test_inflora_split_is_the_official_random_split(tmp_path):
    root = make_imagenet_r(tmp_path, per_class=7)
    for seed in (0, 1993):
        src = build_source("imagenet-r", tmp_path, split="inflora", split_seed=seed, wnids=WNIDS, img_size=32)
        expected = official_split(root, seed)
        assert (src.train.samples, src.test.samples) == expected
        assert (len(expected[0]), len(expected[1])) == (28, 7)
        assert src.meta["split"]["name"] == "inflora" and src.meta["split"]["sha256"] == split_digest(*expected, root)
    # not per class: the classes' shares vary, unlike split=own's stratified one
    counts = [sum(1 for _, y in src.train.samples if y == k) for k in range(len(WNIDS))]
    assert len(set(counts)) > 1 and sum(counts) == 28
    own = build_source("imagenet-r", tmp_path, split="own", wnids=WNIDS, img_size=32)
    assert own.meta["split"]["sha256"] != src.meta["split"]["sha256"]
    # a subset of the classes keeps their images where the whole folder's split put them, labelled in its order
    sub = build_source("imagenet-r", tmp_path, split="inflora", split_seed=1993, wnids=WNIDS[3:1:-1], img_size=32)
    for mine, whole in ((sub.train.samples, expected[0]), (sub.test.samples, expected[1])):
        relabel = {3: 0, 2: 1}
        assert mine == sorted(((p, relabel[y]) for p, y in whole if y in relabel), key=lambda s: (s[1], s[0]))


@pytest.mark.skipif(not (SHARED_REFERENCE / "imagenet-r_train.yaml").exists(), reason="no shared CODA-Prompt splits")
def test_inflora_split_of_the_30000_images_equals_the_official_calls():
    """The 30,000 file names of ImageNet-R (from CODA-Prompt's split files) in ImageFolder's order (the test above
    holds that order to ImageFolder's): 24,000 / 6,000 images, those ``random_split`` picks after
    ``torch.manual_seed(0)``, the seed of the first run of the json's seed list."""
    names = []
    for split in ("train", "test"):
        names += [d.split("imagenet-r/", 1)[1] for d in yaml.safe_load(
            (SHARED_REFERENCE / f"imagenet-r_{split}.yaml").read_text())["data"]]
    samples = sorted((f"/imagenet-r/{n}", n.split("/")[0]) for n in names)
    train, test = inflora_split_samples(samples, imagenet_r_wnids(), 0.8, 0)
    torch.manual_seed(0)
    parts = torch.utils.data.random_split(range(len(samples)), [24000, 6000])
    label = {w: k for k, w in enumerate(imagenet_r_wnids())}
    expected = [sorted(((samples[i][0], label[samples[i][1]]) for i in part.indices), key=lambda s: (s[1], s[0]))
                for part in parts]
    assert (len(train), len(test)) == (24000, 6000) and [train, test] == expected
