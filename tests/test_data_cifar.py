"""CIFAR-10/100 from the pickle archives, the LDAM-DRW long-tail profile, class orders, bad input."""
import pickle

import numpy as np
import pytest
from conftest import REPO_ROOT, compose
from data_gen import make_cifar
from omegaconf import OmegaConf

from cl_vit.data import build_source
from cl_vit.data.longtail import longtail_counts
from cl_vit.errors import UserError
from cl_vit.data.protocol import load_class_order_file
from cl_vit.streams import build_stream


def test_cifar10_reads_every_batch_in_order_with_names(tmp_path):
    folder = make_cifar(tmp_path, "cifar10", train_counts=[3] * 10, test_per_class=2)
    src = build_source("cifar10", tmp_path)
    labels = []
    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "rb") as f:
            labels += pickle.load(f, encoding="latin1")["labels"]
    assert src.train.targets == labels and len(src.test) == 20
    assert src.classes == [f"c10_{k}" for k in range(10)]
    # channel-major rows become HWC images: pixel (0, 0) of image 0 is data[0][0], data[0][1024], data[0][2048]
    with open(folder / "data_batch_1", "rb") as f:
        row = pickle.load(f, encoding="latin1")["data"][0]
    assert src.train.images[0][0, 0].tolist() == [row[0], row[1024], row[2048]]
    x, y = src.train[0]
    assert x.shape == (3, 32, 32) and y == labels[0]


def test_cifar100_lt_follows_ldam_drw(tmp_path):
    make_cifar(tmp_path, "cifar100", train_counts=[20] * 100, test_per_class=1)
    src = build_source("cifar100-lt", tmp_path, imbalance_ratio=10)
    expected = [int(20 * (1 / 10) ** (i / 99)) for i in range(100)]
    assert src.train_counts().tolist() == expected == longtail_counts(20, 100, 10)
    assert np.bincount(src.test_targets).tolist() == [1] * 100  # the balanced test set
    # the kept images: per class, indices shuffled by one numpy RandomState(0) in class order, first n_i kept
    full = build_source("cifar100", tmp_path)
    rng, keep = np.random.RandomState(0), []
    for c in range(100):
        idx = np.flatnonzero(np.asarray(full.train.targets) == c)
        rng.shuffle(idx)
        keep.append(idx[:expected[c]])
    keep = np.concatenate(keep)
    assert np.array_equal(src.train.images, full.train.images[keep])
    assert src.meta["imbalance_ratio"] == 10 and src.meta["train_counts"] == expected


def test_dytox_order_file_and_stream(tmp_path):
    order = load_class_order_file("cifar100-dytox.yaml")
    assert order[:10] == [87, 0, 52, 58, 44, 91, 68, 97, 51, 15] and sorted(order) == list(range(100))
    assert "class_order" in (REPO_ROOT / "tasks" / "cifar100-dytox.yaml").read_text()
    make_cifar(tmp_path, "cifar100", train_counts=[2] * 100, test_per_class=1)
    src = build_source("cifar100", tmp_path)
    _, info = build_stream(src, n_experiences=10, class_order="file:cifar100-dytox.yaml")
    assert info.class_order == order and info.class_names[0] == "c100_87"


def test_benchmark_configs_compose():
    cfg = compose(["benchmark=cifar100", "benchmark.class_order=file:cifar100-dytox.yaml"])
    assert cfg.benchmark.n_experiences == 10 and cfg.benchmark.source == "cifar100"
    cfg = compose(["benchmark=cifar100-lt", "benchmark.imbalance_ratio=50"])
    assert cfg.benchmark.source_args.imbalance_ratio == 50 and list(cfg.benchmark.shot_index_cutoffs) == [36, 71]
    assert compose(["benchmark=cifar10-lt"]).benchmark.source_args.imbalance_ratio == 100
    assert list(compose(["benchmark=cifar10-lt"]).benchmark.shot_index_cutoffs) == [3, 7]


def test_missing_archive_folder_names_download(tmp_path):
    with pytest.raises(UserError, match=r"cifar100 not found at .*cifar-100-python.*python -m cl_vit.data.download "
                                        r"cifar100 --root"):
        build_source("cifar100", tmp_path)


def test_bad_pickles_are_named(tmp_path):
    folder = make_cifar(tmp_path, "cifar10", train_counts=[1] * 10, test_per_class=1)
    (folder / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(UserError, match="data_batch_3 cannot be read"):
        build_source("cifar10", tmp_path)
    folder = make_cifar(tmp_path / "b", "cifar10", train_counts=[1] * 10, test_per_class=1)
    with open(folder / "test_batch", "rb") as f:
        doc = pickle.load(f, encoding="latin1")
    doc["labels"][4] = 12
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(doc, f)
    with pytest.raises(UserError, match=r"test_batch has label 12 \(record 4\) outside the class range 0\.\.9"):
        build_source("cifar10", tmp_path / "b")
    (folder / "data_batch_5").unlink()
    with pytest.raises(UserError, match="data_batch_5 is missing"):
        build_source("cifar10", tmp_path / "b")


def test_ltcil_holdout_is_the_official_validation_split_with_its_quirk():
    """Long-Tailed-CIL holds back round(n / 10) images per class and task; a class of <= 5 images pops its task's
    first image instead (memory_dataset.py L121-122): in ordered B0 the last task's class 90 keeps 2 of its 7."""
    from cl_vit.data.longtail import ltcil_holdout

    counts = longtail_counts(500, 100, 100)
    labels = np.repeat(np.arange(100), counts)  # the long-tailed set is sorted by class, as IMBALANCECIFAR100's
    kept, held = ltcil_holdout(labels, list(range(100)), [10] * 10, 0.1, seed=0)
    assert sorted(kept.tolist() + held.tolist()) == list(range(len(labels)))
    left = np.bincount(labels[kept], minlength=100)
    assert counts[90:] == [7, 7, 6, 6, 6, 6, 5, 5, 5, 5]
    # 90: one sampled + four pops (classes 96-99, n = 5: numpy rounds 0.5 to 0); 91-95 lose one; 96-99 keep all
    assert left[90:].tolist() == [2, 6, 5, 5, 5, 5, 5, 5, 5, 5]
    expected = np.asarray(counts) - np.round(np.asarray(counts) * 0.1).astype(int)
    assert (left[:90] == expected[:90]).all() and len(held) == 1093
    # shuffled B50: the task lists mix head and tail classes, so the pops fall on another class's images
    order = load_class_order_file("cifar100-ltcil.yaml")
    kept_s, held_s = ltcil_holdout(labels, order, [50] + [5] * 10, 0.1, seed=0)
    assert len(held_s) == 1092 and not np.array_equal(held_s, held)
    # which images: Python's random.sample under the run's seed
    kept_1, _ = ltcil_holdout(labels, list(range(100)), [10] * 10, 0.1, seed=1)
    assert not np.array_equal(kept, kept_1) and np.array_equal(np.bincount(labels[kept_1]), left)


def test_ltcil_benchmarks_hold_back_validation_by_default_and_count_their_shot_groups(tmp_path):
    make_cifar(tmp_path, "cifar100", train_counts=[60] * 100, test_per_class=1)
    counts = np.asarray(longtail_counts(60, 100, 10))  # 60 .. 6 images: no class small enough for the quirk
    for name in ("ordered-b0", "ordered-b50", "shuffled-b0", "shuffled-b50"):
        cfg = compose([f"benchmark=cifar100-ltcil-{name}", "benchmark.imbalance_ratio=10"])
        assert cfg.benchmark.shot_index_cutoffs is None
        args = {**OmegaConf.to_container(cfg.benchmark.source_args, resolve=True), "normalize": "cifar"}
        src = build_source(cfg.benchmark.source, tmp_path, **args)
        assert src.train_counts().tolist() == (counts - np.round(counts * 0.1).astype(int)).tolist()
        assert src.meta["holdout"]["n_held_out"] == int(np.round(counts * 0.1).sum())
    args["holdout"] = None
    assert build_source("cifar100-lt", tmp_path, **args).train_counts().tolist() == counts.tolist()
    with pytest.raises(UserError, match="holdout leaves class"):
        make_cifar(tmp_path / "tiny", "cifar100", train_counts=[20] * 100, test_per_class=1)
        build_source("cifar100-lt", tmp_path / "tiny", imbalance_ratio=10, holdout={"n_experiences": 10},
                     normalize="cifar")
