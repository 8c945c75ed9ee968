"""ImageNet-LT and iNaturalist-2018 file-list sources: list/json formats, DeiT-LT's map-targets, bad input."""
import numpy as np
import pytest
from data_gen import make_imagenet_lt, make_inat

from cl_vit.data import build_source
from cl_vit.data.filelist import map_targets
from cl_vit.data.longtail import numpy1_argsort
from cl_vit.errors import UserError


def test_map_targets_is_deit_lt_class_map():
    labels = [0] * 2 + [1] * 5 + [2] * 1 + [3] * 5
    counts = np.bincount(labels)
    sorted_classes = numpy1_argsort(-counts)  # DeiT-LT datasets.py L265, under its numpy 1.24
    expected = [0] * 4
    for i in range(4):
        expected[sorted_classes[i]] = i
    assert map_targets(labels, 4).tolist() == expected
    assert sorted(expected[1:2] + expected[3:4]) == [0, 1] and expected[2] == 3


# numpy 1.24.3 (DeiT-LT environment.yml) outputs, recorded with that version: its introsort puts ties out of order
NUMPY_124 = [
    ([0] * 17, [0, 14, 13, 12, 11, 10, 9, 15, 8, 6, 5, 4, 3, 2, 1, 7, 16]),
    ([-((i * 7) % 5) for i in range(40)],
     [37, 2, 32, 27, 7, 22, 17, 12, 19, 34, 29, 24, 14, 39, 4, 9, 11, 1, 36, 31, 6, 26, 16, 21, 23, 8, 13, 38, 28, 18,
      33, 3, 20, 15, 35, 30, 5, 25, 10, 0]),
]


@pytest.mark.parametrize("values,expected", NUMPY_124)
def test_frequency_ties_come_out_as_numpy_1_24_orders_them_on_any_numpy(values, expected):
    assert numpy1_argsort(values).tolist() == expected


def test_numpy1_argsort_sorts_and_agrees_with_the_installed_numpy_where_it_should():
    rng = np.random.RandomState(0)
    for n in (1, 2, 16, 17, 300, 1000):
        x = rng.randint(0, 4, size=n)
        order = numpy1_argsort(x)
        assert sorted(order.tolist()) == list(range(n)) and np.all(np.diff(x[order]) >= 0)
        distinct = rng.permutation(n)  # no ties: every sort agrees
        assert numpy1_argsort(distinct).tolist() == np.argsort(distinct).tolist()
        if np.lib.NumpyVersion(np.__version__) < "1.25.0":  # the scalar introsort itself
            assert order.tolist() == np.argsort(x).tolist()


def test_imagenet_lt_lists_in_deit_lt_spelling(tmp_path):
    make_imagenet_lt(tmp_path, train_counts=[2, 1], test_per_class=1)
    for split in ("train", "test"):
        (tmp_path / "imagenet-lt" / f"ImageNet_LT_{split}.txt").rename(tmp_path / "imagenet-lt" / f"Imagenet_LT_{split}.txt")
    src = build_source("imagenet-lt", tmp_path, n_classes=2, img_size=16)
    assert src.meta["lists"] == ["Imagenet_LT_train.txt", "Imagenet_LT_test.txt"] and len(src.train) == 3


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
