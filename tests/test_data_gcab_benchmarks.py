"""GCAB's two remaining benchmarks: Tiny-ImageNet-200 (10 tasks of 20 at 64 px) and DyTox's ImageNet-100 (10 of 10
at 224 px), read from their real on-disk formats, and the experiment=gcab-tiny-imagenet / gcab-imagenet100 recipes."""
import zipfile

import numpy as np
import pytest
import yaml
from conftest import REPO_ROOT, compose
from data_gen import make_imagenet100, make_tiny_imagenet

from cl_vit.data import build_source
from cl_vit.data.download import MANUAL, extract
from cl_vit.errors import UserError
from cl_vit.data.protocol import experience_sizes, resolve_class_order

DYTOX = yaml.safe_load((REPO_ROOT / "tasks" / "imagenet100-dytox.yaml").read_text())


def test_tiny_imagenet_reads_train_folders_and_val_annotations_with_sorted_wnid_labels(tmp_path):
    root = make_tiny_imagenet(tmp_path, n_classes=4, train=3, val=2)
    wnids = (root / "wnids.txt").read_text().split()
    assert wnids != sorted(wnids)  # the file's own order is not the label order
    src = build_source("tiny-imagenet", tmp_path, normalize="imagenet")
    assert src.classes == sorted(wnids) and src.img_size == 64
    assert len(src.train) == 12 and len(src.test) == 8
    for path, label in src.train.samples:
        assert path.split("/")[-3] == src.classes[label]
    truth = dict(line.split("\t")[:2] for line in (root / "val" / "val_annotations.txt").read_text().splitlines())
    for path, label in src.test.samples:
        assert truth[path.rsplit("/", 1)[-1]] == src.classes[label]
    x, y = src.test[0]
    assert tuple(x.shape) == (3, 64, 64)
    assert not any("/test/" in p for p, _ in src.train.samples + src.test.samples)


def test_tiny_imagenet_missing_or_damaged_layout_is_one_line(tmp_path):
    with pytest.raises(UserError, match="tiny-imagenet not found at .*tiny-imagenet-200: expected .*wnids.txt.*"
                                        "train/<wnid>/images/.*val_annotations.txt.*download tiny-imagenet"):
        build_source("tiny-imagenet", tmp_path)
    root = make_tiny_imagenet(tmp_path, n_classes=2)
    with open(root / "val" / "val_annotations.txt", "a") as f:
        f.write("val_99.JPEG\tn_unknown\t0\t0\t1\t1\n")
    with pytest.raises(UserError, match=r"val_annotations.txt:5: expected"):
        build_source("tiny-imagenet", tmp_path)


def test_tiny_imagenet_zip_extracts_into_place_and_keeps_members_inside(tmp_path):
    make_tiny_imagenet(tmp_path / "src", n_classes=2, train=2, val=1)
    archive = tmp_path / "tiny-imagenet-200.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in sorted((tmp_path / "src").rglob("*")):
            if p.is_file():
                z.write(p, p.relative_to(tmp_path / "src"))
        z.writestr("../escaped.txt", "outside")
    extract(archive, tmp_path / "data")
    assert not (tmp_path / "escaped.txt").exists()
    src = build_source("tiny-imagenet", tmp_path / "data", normalize="imagenet")
    assert len(src.train) == 4 and len(src.test) == 2


def test_imagenet100_reads_dytox_split_files_over_an_imagenet_folder(tmp_path):
    wnids = DYTOX["wnids"][:3]
    root, splits = make_imagenet100(tmp_path, wnids, train=3, val=2)
    src = build_source("imagenet100", tmp_path, normalize="imagenet", img_size=32)
    assert src.classes == DYTOX["wnids"] and len(src.classes) == 100
    assert len(src.train) == 9 and len(src.test) == 6  # the ImageNet class outside the subset is not read
    assert all(p.split("/")[-2] == src.classes[y] for p, y in src.train.samples + src.test.samples)
    assert set(src.meta["files"]) == {"train_100.txt", "val_100.txt"}
    assert tuple(src.train[0][0].shape) == (3, 32, 32)
    # a split file whose labels are not DyTox's
    (splits / "val_100.txt").write_text(f"val/{wnids[1]}/ILSVRC2012_val_00010000.JPEG 0\n")
    with pytest.raises(UserError, match="not DyTox's split files"):
        build_source("imagenet100", tmp_path, normalize="imagenet")
    (splits / "val_100.txt").unlink()
    with pytest.raises(UserError, match="val_100.txt is missing: download .*arthurdouillard/dytox"):
        build_source("imagenet100", tmp_path, normalize="imagenet")
    with pytest.raises(UserError, match="imagenet100 not found at .*image-net.org.*imagenet100-splits"):
        build_source("imagenet100", tmp_path / "none")
    assert "imagenet100" in MANUAL


@pytest.mark.parametrize("experiment,size,patch,sizes,head", [
    # GCAB-CFDC options/data/tiny_10splits.yaml, tiny_order1.yaml; options/model/tiny_GCAB_FDC.yaml L10-11
    ("gcab-tiny-imagenet", 64, 8, [20] * 10, [165, 58, 126, 55, 188]),
    # DyTox options/data/imagenet100_10-10.yaml, imagenet100_order1.yaml; ImageNet_GCAB_FDC.yaml L10-11
    ("gcab-imagenet100", 224, 16, [10] * 10, [68, 56, 78, 8, 23]),
])
def test_gcab_recipes_bring_their_protocol_and_model(experiment, size, patch, sizes, head):
    cfg = compose([f"experiment={experiment}"])
    n = 200 if "tiny" in experiment else 100
    order, _ = resolve_class_order(cfg.benchmark.class_order, n, cfg.seed)
    assert order[:5] == head and sorted(order) == list(range(n))
    assert experience_sizes(n, cfg.benchmark.n_experiences, cfg.benchmark.get("classes_per_experience")) == sizes
    assert (cfg.model.img_size, cfg.model.patch_size, cfg.benchmark.source_args.img_size) == (size, patch, size)
    assert (size // patch) ** 2 == (64 if "tiny" in experiment else 196)
    assert cfg.benchmark.source_args.train_transform == "deit" and cfg.benchmark.source_args.augment.re_prob == 0.0
    assert list(cfg.strategy) == ["gcab"] and cfg.optimizer.lr == pytest.approx(5e-4 * 128 / 512)


def test_gcab_tiny_imagenet_runs_in_miniature(tmp_path, data_root):
    from conftest import TINY_ANY_MODEL

    from cl_vit.run import run

    make_tiny_imagenet(data_root, n_classes=4, train=2, val=1)
    over = ["experiment=gcab-tiny-imagenet", *TINY_ANY_MODEL, "model.img_size=16", "model.patch_size=8",
            "model.embed_dim=4", "model.num_heads=2", "model.depth=2", "model.local_up_to_layer=1",
            "benchmark.source_args.img_size=16", "benchmark.class_order=identity", "benchmark.n_experiences=2",
            "strategy.gcab.projector_norm=token", "data.num_workers=0", "data.persistent_workers=false",
            "data.drop_last=false", "epoch_eval=0"]
    run(compose(over, data_root), tmp_path / "run")
    doc = yaml.safe_load((tmp_path / "run" / "results.json").read_text())
    assert doc["status"] == "completed" and np.asarray(doc["accuracy_matrix"]).shape == (2, 2)
