"""Fashion-MNIST: small IDX files in the real format (gzipped or not, in each supported layout), the checks, the
download command against a loopback server, the benchmarks; the real files only where they are installed."""
import gzip
import random
import hashlib
import struct

import numpy as np
import pytest
import torch
from conftest import TINY, compose
from test_data_download import Server

from cl_vit.data import build_source
from cl_vit.data import download as D
from cl_vit.data import fashion_mnist as FM
from cl_vit.errors import UserError


def idx_bytes(array: np.ndarray) -> bytes:
    array = np.asarray(array, dtype=np.uint8)
    return struct.pack(f">BBBB{array.ndim}I", 0, 0, 8, array.ndim, *array.shape) + array.tobytes()


def make_fmnist(folder, train_per_class=3, test_per_class=2, gz=True, seed=0) -> dict:
    """The four IDX files in ``folder``; returns their ``FILES`` entries (size, sha256 of the content)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, per in (("train", train_per_class), ("t10k", test_per_class)):
        y = np.repeat(np.arange(10), per)
        x = rng.integers(0, 256, size=(len(y), 28, 28))
        x[:, :, 0] = y[:, None] * 20  # the label drawn into the first column, to check image/label pairing
        for kind, arr in (("images-idx3", x), ("labels-idx1", y)):
            name = f"{split}-{kind}-ubyte"
            data = idx_bytes(arr)
            (folder / (name + ".gz" if gz else name)).write_bytes(gzip.compress(data) if gz else data)
            files[name] = (len(data), hashlib.sha256(data).hexdigest())
    return files


@pytest.fixture
def no_debian(monkeypatch, tmp_path):
    monkeypatch.setattr(FM, "DEBIAN_DIR", tmp_path / "no-debian")


def test_official_layout_reads_pairs_and_checks(tmp_path, monkeypatch, no_debian):
    monkeypatch.setattr(FM, "FILES", make_fmnist(tmp_path / "fashion-mnist"))
    src = build_source("fashion-mnist", tmp_path)
    assert (len(src.train), len(src.test), src.n_classes, src.in_chans) == (30, 20, 10, 1)
    assert src.classes[0] == "T-shirt/top" and src.meta["root"] == str(tmp_path / "fashion-mnist")
    x, y = src.train[7]
    assert x.shape == (1, 28, 28)
    assert round(float(x[0, 0, 0]) * 0.3530 + 0.2860, 4) == round(y * 20 / 255, 4)  # Avalanche's normalisation
    # a flipped byte: the sha256 of the content no longer matches
    path = tmp_path / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(gzip.decompress(path.read_bytes()))
    data[-1] ^= 1
    path.write_bytes(gzip.compress(bytes(data)))
    with pytest.raises(UserError, match="sha256.*download again"):
        build_source("fashion-mnist", tmp_path)
    path.write_bytes(gzip.compress(bytes(data[:-1])))
    with pytest.raises(UserError, match="holds 27 bytes, expected 28"):
        build_source("fashion-mnist", tmp_path)


def test_torchvision_layout_uncompressed_resized_and_long_tailed(tmp_path, monkeypatch, no_debian):
    monkeypatch.setattr(FM, "FILES", make_fmnist(tmp_path / "FashionMNIST" / "raw", train_per_class=20, gz=False))
    src = build_source("fashion-mnist", tmp_path, img_size=8, normalize="half")
    assert src.train[0][0].shape == (1, 8, 8) and src.img_size == 8
    assert -1 <= float(src.train[0][0].min()) and float(src.train[0][0].max()) <= 1
    lt = build_source("fashion-mnist-lt", tmp_path, imbalance_ratio=10)
    counts = lt.train_counts()
    assert counts[0] == 20 and counts[-1] == 2 and (np.diff(counts) <= 0).all()
    assert lt.meta["train_counts"] == counts.tolist() and len(lt.test) == 20  # the test set stays balanced


def test_missing_and_incomplete_folders_are_one_line(tmp_path, monkeypatch, no_debian):
    with pytest.raises(UserError, match="python -m cl_vit.data.download fashion-mnist"):
        build_source("fashion-mnist", tmp_path)
    monkeypatch.setattr(FM, "FILES", make_fmnist(tmp_path / "fashion-mnist"))
    (tmp_path / "fashion-mnist" / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(UserError, match="lacks train-labels-idx1-ubyte.gz"):
        build_source("fashion-mnist", tmp_path)
    (tmp_path / "fashion-mnist" / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x09\x01"))
    monkeypatch.setitem(FM.FILES, "train-labels-idx1-ubyte", None)
    with pytest.raises(UserError, match="not an IDX file"):
        build_source("fashion-mnist", tmp_path)


def test_download_fetches_the_four_files_and_checks_md5(tmp_path, monkeypatch, no_debian):
    src_dir = tmp_path / "src"
    monkeypatch.setattr(FM, "FILES", make_fmnist(src_dir))
    served = {p.name: p.read_bytes() for p in src_dir.iterdir()}
    archives = [D.Archive(a.url, hashlib.md5(served[a.filename]).hexdigest(), a.subdir, a.provides, a.extract)
                for a in D.DATASETS["fashion-mnist"]]
    assert [a.filename for a in archives] == [f"{n}.gz" for n in FM.FILES]
    assert all(a.url.startswith("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/") for a in archives)
    monkeypatch.setitem(D.DATASETS, "fashion-mnist", archives)
    root = tmp_path / "data"
    with Server(served) as srv:
        assert D.main(["fashion-mnist", "--root", str(root), "--mirror", srv.url]) == 0
    assert sorted(p.name for p in (root / "fashion-mnist").iterdir()) == sorted(served)
    assert len(build_source("fashion-mnist", root).train) == 30
    # a file whose md5 is not the published one is refused and not kept
    monkeypatch.setitem(D.DATASETS, "fashion-mnist", [archives[0].__class__(archives[0].url, "0" * 32, "fashion-mnist",
                                                                            "fashion-mnist/x.gz", False)])
    with Server(served) as srv:
        assert D.main(["fashion-mnist", "--root", str(tmp_path / "other"), "--mirror", srv.url]) == 2
    assert not (tmp_path / "other" / "fashion-mnist" / "x.gz").exists()


def test_benchmarks_compose_and_split_fmnist_runs(tmp_path, monkeypatch, no_debian):
    from cl_vit.run import run

    cfg = compose(["benchmark=fmnist-lt"])
    assert (cfg.benchmark.source, cfg.benchmark.source_args.imbalance_ratio) == ("fashion-mnist-lt", 100)
    assert list(cfg.benchmark.shot_index_cutoffs) == [3, 7] and cfg.benchmark.long_tailed
    monkeypatch.setattr(FM, "FILES", make_fmnist(tmp_path / "fashion-mnist"))
    cfg = compose(["benchmark=split-fmnist", *TINY, "benchmark.source_args.img_size=8", "model.patch_size=2"],
                  data_root=tmp_path)
    doc = run(cfg, tmp_path / "run")
    assert doc["experiences"] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert len(doc["accuracy_matrix"]) == 5 and doc["status"] == "completed"
    assert doc["source"]["n_train"] == 30 and doc["source"]["img_size"] == 8


@pytest.mark.skipif(not all(FM._file_of(FM.DEBIAN_DIR, n) for n in FM.FILES),
                    reason="the real Fashion-MNIST files are not installed (apt-get install dataset-fashion-mnist)")
def test_real_files_pass_the_official_checks(tmp_path):
    src = build_source("fashion-mnist", tmp_path)  # nothing under tmp_path: the Debian folder is found
    assert (len(src.train), len(src.test)) == (60000, 10000)
    assert src.train_counts().tolist() == [6000] * 10 and np.bincount(src.test_targets).tolist() == [1000] * 10
    lt = build_source("fashion-mnist-lt", tmp_path)
    assert lt.train_counts().tolist() == [6000, 3596, 2156, 1292, 774, 464, 278, 166, 100, 60]


def test_small_long_tail_and_deit_pipeline(tmp_path, monkeypatch, no_debian):
    """n_max: the same profile and shuffle on a smaller head class; train_transform=deit: DeiT-LT's student pipeline
    per image, seeded; misuse is one line."""
    monkeypatch.setattr(FM, "FILES", make_fmnist(tmp_path / "fashion-mnist", train_per_class=20))
    full = build_source("fashion-mnist-lt", tmp_path, imbalance_ratio=10, img_size=8)
    small = build_source("fashion-mnist-lt", tmp_path, imbalance_ratio=10, img_size=8, n_max=10)
    assert small.meta["train_counts"] == [int(10 * 0.1 ** (i / 9)) for i in range(10)]
    # each class's images are the first of the full set's (one shuffle, cut shorter)
    first = {c: [i for i, t in enumerate(full.train.targets) if t == c] for c in range(10)}
    kept = [full.train.images[first[c][k]] for c in range(10) for k in range(small.meta["train_counts"][c])]
    assert torch.equal(torch.stack(kept), small.train.images)
    aug = build_source("fashion-mnist-lt", tmp_path, imbalance_ratio=10, img_size=8, n_max=10, train_transform="deit")
    assert aug.meta["transforms"]["augment"]["auto_augment"] == "rand-m9-mstd0.5-inc1"
    random.seed(0), torch.manual_seed(0)  # timm's RandAugment draws from random, the crop and erasing from torch
    a = aug.train[3][0]
    random.seed(0), torch.manual_seed(0)
    assert torch.equal(a, aug.train[3][0]) and a.shape == (1, 8, 8)
    assert not torch.equal(a, aug.train[3][0])  # a new draw of the augmentation
    assert torch.equal(aug.test[0][0], small.test[0][0])  # evaluation is not augmented
    with pytest.raises(UserError, match="n_max caps the head class"):
        build_source("fashion-mnist", tmp_path, n_max=10)
    with pytest.raises(UserError, match="train_transform"):
        build_source("fashion-mnist", tmp_path, train_transform="torchvision")
