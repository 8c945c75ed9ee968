"""ImageNet-LT and iNaturalist-2018 file-list sources: list/json formats, DeiT-LT's map-targets, bad input."""
import numpy as np
import pytest
from data_gen import make_imagenet_lt, make_inat

from cl_vit.data import build_source
from cl_vit.data.filelist import map_targets
from cl_vit.errors import UserError


def test_map_targets_is_deit_lt_class_map():
    labels = [0] * 2 + [1] * 5 + [2] * 1 + [3] * 5
    counts = np.bincount(labels)
    sorted_classes = np.argsort(-counts)  # DeiT-LT datasets.py, ties as numpy orders them
    expected = [0] * 4
    for i in range(4):
        expected[sorted_classes[i]] = i
    assert map_targets(labels, 4).tolist() == expected
    assert sorted(expected[1:2] + expected[3:4]) == [0, 1] and expected[2] == 3


def test_imagenet_lt_lists_and_frequency_reindexing(tmp_path):
    make_imagenet_lt(tmp_path, train_counts=[2, 6, 1, 4], test_per_class=2)
    src = build_source("imagenet-lt", tmp_path, n_classes=4, img_size=16)
    assert src.train_counts().tolist() == [6, 4, 2, 1]  # most frequent first
    assert src.classes == ["n00000001", "n00000003", "n00000000", "n00000002"]
    assert src.meta["map_targets"]["class_map"] == [2, 0, 3, 1]
    assert np.bincount(src.test_targets).tolist() == [2, 2, 2, 2]
    # the test labels follow the same map: every test image sits in its class's wnid folder
    for path, y in src.test.samples:
        assert f"/{src.classes[y]}/" in path
    plain = build_source("imagenet-lt", tmp_path, n_classes=4, img_size=16, map_targets=False)
    assert plain.train_counts().tolist() == [2, 6, 1, 4] and plain.meta["map_targets"] is None
    x, _ = src.train[0]
    assert x.shape == (3, 16, 16)


@pytest.mark.parametrize("fmt", ["list", "json"])
def test_inat2018_list_and_official_json_agree(tmp_path, fmt):
    make_inat(tmp_path, train_counts=[1, 5, 3], val_per_class=2, fmt=fmt)
    src = build_source("inat2018", tmp_path, n_classes=3, img_size=16)
    assert src.train_counts().tolist() == [5, 3, 1] and src.meta["map_targets"]["class_map"] == [2, 0, 1]
    assert len(src.test) == 6
    assert src.meta["annotations"] == (["iNaturalist18_train.txt", "iNaturalist18_val.txt"] if fmt == "list"
                                       else ["train2018.json", "val2018.json"])
    if fmt == "json":
        assert src.classes == ["species_1", "species_2", "species_0"]


def test_bad_lines_labels_and_missing_files_are_named(tmp_path):
    root = make_imagenet_lt(tmp_path, train_counts=[2, 2], test_per_class=1)
    lst = root / "ImageNet_LT_train.txt"
    lines = lst.read_text().splitlines()
    lst.write_text("\n".join(lines[:2] + ["train/n00000001/x.JPEG"] + lines[2:]) + "\n")
    with pytest.raises(UserError, match=r"ImageNet_LT_train.txt:3: expected '<relative/path> <integer label>'"):
        build_source("imagenet-lt", tmp_path, n_classes=2)
    lst.write_text("\n".join(lines[:3] + [lines[3].rsplit(" ", 1)[0] + " 5"]) + "\n")
    with pytest.raises(UserError, match=r"ImageNet_LT_train.txt:4: label 5 is outside the class range 0\.\.1"):
        build_source("imagenet-lt", tmp_path, n_classes=2)
    lst.write_text("\n".join(lines + ["train/n00000001/gone.JPEG 1"]) + "\n")
    with pytest.raises(UserError, match=r"gone.JPEG \(listed in ImageNet_LT_train.txt\) does not exist"):
        build_source("imagenet-lt", tmp_path, n_classes=2)


def test_missing_roots_say_what_to_do(tmp_path):
    with pytest.raises(UserError, match=r"imagenet-lt not found .*ImageNet_LT_train.txt.*image-net.org"):
        build_source("imagenet-lt", tmp_path)
    with pytest.raises(UserError, match=r"inat2018 not found .*python -m cl_vit.data.download inat2018 --root"):
        build_source("inat2018", tmp_path)
