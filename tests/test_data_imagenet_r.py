"""ImageNet-R: the project's wnid list, CODA-Prompt split files, the own split, class orders, transforms, bad input."""
import hashlib
import random
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from conftest import SHARED_REFERENCE, TINY, compose
from data_gen import WNIDS, make_imagenet_r, make_pilot_split, write_coda_split, write_jpeg

from cl_vit.data import build_source
from cl_vit.data.imagenet_r import imagenet_r_wnids
from cl_vit.data.transforms import (DecodeResizeCenterCrop, imagenet_eval_pipeline, random_resized_crop_box)
from cl_vit.errors import UserError
from cl_vit.data.protocol import resolve_class_order
from cl_vit.streams import build_stream

TINY_R = ["benchmark=imagenet-r", "benchmark.source_args.split=own", "model=vit_micro", "model.patch_size=8", "benchmark.source_args.img_size=32",
          "data.num_workers=0", "data.batch_size=8", "data.persistent_workers=false"]


def test_wnid_list_is_the_200_imagenet_r_classes():
    wnids = imagenet_r_wnids()
    assert len(wnids) == 200 == len(set(wnids)) and wnids == sorted(wnids)
    ref = SHARED_REFERENCE / "imagenet-r-wnids.txt"
    if not ref.exists():
        pytest.skip("shared reference wnid list not present")
    assert wnids == [ln.strip() for ln in ref.read_text().splitlines() if ln.strip()]


def test_coda_split_files_give_their_labels_and_paths(tmp_path):
    root = make_imagenet_r(tmp_path, per_class=6)
    labels = {w: k for k, w in enumerate(reversed(WNIDS))}  # CODA-Prompt's label ids are not the sorted order
    write_coda_split(tmp_path / "splits", root, labels)
    src = build_source("imagenet-r", tmp_path, split_dir=tmp_path / "splits", wnids=WNIDS, img_size=32)
    doc = yaml.safe_load((tmp_path / "splits" / "imagenet-r_train.yaml").read_text())
    assert [y for _, y in src.train.samples] == doc["targets"]
    assert [p for p, _ in src.train.samples] == [str(tmp_path / d[len("data/"):]) for d in doc["data"]]
    assert src.classes == list(reversed(WNIDS))  # label k is the wnid the file gives it
    assert src.meta["split"]["name"] == "coda" and src.meta["split"]["kind"].startswith("CODA-Prompt split files")
    assert src.meta["split"]["files"]["imagenet-r_train.yaml"] == hashlib.sha256(
        (tmp_path / "splits" / "imagenet-r_train.yaml").read_bytes()).hexdigest()


def test_own_split_is_deterministic_stratified_and_hashed(tmp_path):
    make_imagenet_r(tmp_path, per_class=10)
    a = build_source("imagenet-r", tmp_path, split="own", wnids=WNIDS, img_size=32)
    b = build_source("imagenet-r", tmp_path, split="own", wnids=WNIDS, img_size=32)
    c = build_source("imagenet-r", tmp_path, split="own", wnids=WNIDS, img_size=32, split_seed=1)
    assert a.train.samples == b.train.samples and a.meta["split"]["sha256"] == b.meta["split"]["sha256"]
    assert a.meta["split"]["sha256"] != c.meta["split"]["sha256"]
    assert np.bincount(a.train_targets).tolist() == [8] * 5 and np.bincount(a.test_targets).tolist() == [2] * 5
    assert not {p for p, _ in a.train.samples} & {p for p, _ in a.test.samples}


# TFDS's own numbers, from tensorflow-datasets 4.9.7 (PyPI wheel, no TensorFlow needed for these modules):
#   hashing.Hasher("test").hash_key(key) for three keys, and the sha256 (split_digest's format, sorted-wnid labels)
#   of test[:80%] / test[80%:] after feeding the 30,000 ImageNet-R file names of CODA-Prompt's split files through
#   core.shuffle.Shuffler(hash_salt="test") and core.splits.ReadInstruction("test[:80%]").to_absolute.
TFDS_HKEYS = {"n01443537_art_0.jpg": 222669811948030749069252859431485391404,
              "n02128757_sculpture_4.jpg": 130306407026264928769377371513515286046,
              "n04487394_cartoon_17.jpg": 82761357431121946293181140419999614145}
TFDS_SPLIT_SHA256 = "b4fea1cbde6ed9cbe92bc10ba4e9446e434bdf89abd12bdd2c39dd677e6fb15c"


def test_tfds_split_orders_by_tfds_hash_and_cuts_at_80_percent(tmp_path):
    from cl_vit.data.imagenet_r import tfds_order_key
    for key, hkey in TFDS_HKEYS.items():
        wnid, name = key.split("_", 1)
        assert tfds_order_key(f"{wnid}/{name}") == hkey
    root = make_imagenet_r(tmp_path, per_class=7)  # 35 images: the cut rounds 28.0
    src = build_source("imagenet-r", tmp_path, split="tfds", wnids=WNIDS, img_size=32)
    train, test = src.train.samples, src.test.samples
    assert (len(train), len(test)) == (28, 7) and src.meta["split"]["name"] == "tfds"
    rank = lambda samples: [tfds_order_key(Path(p).relative_to(root).as_posix()) for p, _ in samples]
    assert max(rank(train)) < min(rank(test))  # the first 80 % of TFDS's order, whatever the class
    own = build_source("imagenet-r", tmp_path, split="own", wnids=WNIDS, img_size=32)
    assert own.meta["split"]["sha256"] != src.meta["split"]["sha256"]


@pytest.mark.skipif(not (SHARED_REFERENCE / "imagenet-r_train.yaml").exists(), reason="no shared CODA-Prompt splits")
def test_tfds_split_of_the_30000_images_equals_tfds_own():
    from cl_vit.data.imagenet_r import split_digest, tfds_split
    names = []
    for split in ("train", "test"):
        names += [d.split("imagenet-r/", 1)[1] for d in yaml.safe_load(
            (SHARED_REFERENCE / f"imagenet-r_{split}.yaml").read_text())["data"]]
    label = {w: k for k, w in enumerate(imagenet_r_wnids())}
    root = Path("/imagenet-r")
    samples = sorted(((str(root / n), label[n.split("/")[0]]) for n in names), key=lambda s: (s[1], s[0]))
    train, test = tfds_split(samples, root)
    assert (len(train), len(test)) == (24000, 6000)
    assert split_digest(train, test, root) == TFDS_SPLIT_SHA256


def test_coda_class_order_is_identity_then_python_shuffles():
    assert resolve_class_order("coda", 200, 0)[0] == list(range(200))
    for seed in (1, 2):
        expected = list(range(200))
        random.seed(seed)
        random.shuffle(expected)  # CODA-Prompt trainer.py
        assert resolve_class_order("coda", 200, seed) == (expected, f"seeded({seed})")


@pytest.mark.skipif(not (SHARED_REFERENCE / "imagenet-r_train.yaml").exists(), reason="no shared CODA-Prompt splits")
def test_real_coda_split_files_map_every_label_to_one_wnid():
    from cl_vit.data.imagenet_r import _class_names_from_split, _yaml_load

    names = {}
    for split in ("train", "test"):
        doc = _yaml_load(SHARED_REFERENCE / f"imagenet-r_{split}.yaml")
        wnids = [d.split("imagenet-r/", 1)[1].split("/")[0] for d in doc["data"]]
        names[split] = _class_names_from_split(wnids, doc["targets"], 200, imagenet_r_wnids(), SHARED_REFERENCE)
        assert len(doc["data"]) == {"train": 24000, "test": 6000}[split]
    assert names["train"] == names["test"] and sorted(names["train"]) == imagenet_r_wnids()
    assert names["train"][0] == "n02165456"  # CODA-Prompt's own label order
    # the files python -m cl_vit.data.download imagenet-r fetches are these, byte for byte
    from cl_vit.data.download import FILES

    pinned = {rel.rsplit("/", 1)[-1]: sha for _, sha, rel in FILES["imagenet-r"]}
    assert pinned == {f"imagenet-r_{split}.yaml": hashlib.sha256(
        (SHARED_REFERENCE / f"imagenet-r_{split}.yaml").read_bytes()).hexdigest() for split in ("train", "test")}


def test_eval_decode_matches_full_decode_pipeline(tmp_path):
    """The reduced-decode centre crop equals Resize(256)+CenterCrop(224) on the full image up to resampling."""
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (20, 30, 3)).astype(np.uint8)
    img = cv2.resize(coarse, (600, 400), interpolation=cv2.INTER_CUBIC)
    write_jpeg(tmp_path / "a.jpg", img, quality=95)
    fast = DecodeResizeCenterCrop(224)(str(tmp_path / "a.jpg")).astype(np.float32)
    full = imagenet_eval_pipeline(224, (0, 0, 0), (1, 1, 1))(image=cv2.cvtColor(
        cv2.imread(str(tmp_path / "a.jpg")), cv2.COLOR_BGR2RGB))["image"].permute(1, 2, 0).numpy() * 255
    assert fast.shape == full.shape == (224, 224, 3)
    assert np.abs(fast - full).mean() < 4.0


def test_random_resized_crop_box_follows_torchvision():
    """Same distribution of crops as torchvision's RandomResizedCrop.get_params (area fraction, aspect, position)."""
    import torchvision.transforms as T

    torch.manual_seed(0)
    rng = random.Random(0)
    ours = np.array([random_resized_crop_box(300, 500, rng=rng) for _ in range(800)], dtype=float)
    image = torch.zeros(1, 300, 500)
    ref = np.array([T.RandomResizedCrop.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(800)],
                   dtype=float)
    for boxes in (ours, ref):
        assert (boxes[:, 0] + boxes[:, 2] <= 300).all() and (boxes[:, 1] + boxes[:, 3] <= 500).all()
    stats = lambda b: (np.mean(b[:, 2] * b[:, 3] / 150000), np.mean(np.log(b[:, 3] / b[:, 2])),  # noqa: E731
                       np.mean(b[:, 0] / (300 - b[:, 2] + 1)))
    assert np.allclose(stats(ours), stats(ref), atol=0.04)


def test_imagenet_r_benchmark_runs_with_tiny_model_and_records_order(tmp_path, data_root):
    from cl_vit.run import run

    make_imagenet_r(data_root, wnids=WNIDS[:4], per_class=5)
    cfg = compose(TINY + TINY_R + [f"benchmark.source_args.wnids=[{','.join(WNIDS[:4])}]",
                                   "benchmark.n_experiences=2", "seed=1"], data_root)
    assert cfg.benchmark.class_order == "coda" and cfg.trainer.max_epochs == 1
    doc = run(cfg, tmp_path / "run")
    expected = list(range(4))
    random.Random(1).shuffle(expected)
    assert doc["class_order"] == expected and doc["class_order_rule"] == "seeded(1)"
    assert doc["class_names"] == [WNIDS[c] for c in expected]
    assert len(doc["source"]["split"]["sha256"]) == 64
    assert doc["source"]["normalization"] == {"mean": [0.0] * 3, "std": [1.0] * 3}  # CODA-Prompt's [0, 1] pixels


def test_benchmark_brings_the_recommended_setting():
    cfg = compose(["benchmark=imagenet-r"])
    assert cfg.model.name == "vit_base_patch16_224" and cfg.model.pretrained is True
    assert cfg.model.pretrained_tag == "augreg_in21k_ft_in1k"
    assert (cfg.benchmark.n_experiences, cfg.trainer.max_epochs, cfg.data.batch_size) == (10, 50, 128)
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.weight_decay) == ("adam", 1e-3, 0.0)
    assert compose(["benchmark=imagenet-r-5"]).benchmark.n_experiences == 5
    assert compose(["benchmark=imagenet-r-20"]).benchmark.n_experiences == 20
    # L2 on the attention blocks' qkv, only those and the classifier trained (Smith et al. 2023)
    l2 = compose(["benchmark=imagenet-r"]).strategy
    assert list(l2) == ["l2"] and l2.l2.params == ["*attn.qkv.*"] and l2.l2.train_only_selected is True
    # another strategy chosen on the command line is not dragged along with the benchmark's
    assert list(compose(["benchmark=imagenet-r", "strategy=finetune"]).strategy) == ["finetune"]
    assert compose(["benchmark=split-fmnist", "strategy=l2"]).strategy.l2.train_only_selected is False


# -- bad input --------------------------------------------------------------------------------------------------------


def test_missing_root_names_layout_and_download_command(tmp_path):
    with pytest.raises(UserError) as e:
        build_source("imagenet-r", tmp_path)
    msg = str(e.value)
    assert "imagenet-r" in msg and "<wnid>" in msg and "python -m cl_vit.data.download imagenet-r --root" in msg
    assert "\n" not in msg


def test_empty_class_folder_is_named(tmp_path):
    make_imagenet_r(tmp_path, per_class=3)
    for f in (tmp_path / "imagenet-r" / WNIDS[2]).iterdir():
        f.unlink()
    with pytest.raises(UserError, match=f"{WNIDS[2]} holds no images"):
        build_source("imagenet-r", tmp_path, split="own", wnids=WNIDS, img_size=32)


def test_split_entry_missing_and_label_out_of_range_are_named(tmp_path):
    root = make_imagenet_r(tmp_path, per_class=4)
    write_coda_split(tmp_path / "s", root, {w: k for k, w in enumerate(WNIDS)})
    path = tmp_path / "s" / "imagenet-r_train.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["data"][1] = f"data/imagenet-r/{WNIDS[0]}/not_there.jpg"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(UserError, match=r"entry 1 \(data/imagenet-r/n01443537/not_there.jpg\) does not exist"):
        build_source("imagenet-r", tmp_path, split_dir=tmp_path / "s", wnids=WNIDS)
    doc = yaml.safe_load((tmp_path / "s" / "imagenet-r_test.yaml").read_text())
    doc["targets"][0] = 7
    (tmp_path / "s" / "imagenet-r_train.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(UserError, match=r"label 7 outside the class range 0\.\.4"):
        build_source("imagenet-r", tmp_path, split_dir=tmp_path / "s", wnids=WNIDS)


def test_corrupt_image_fails_by_default_and_is_skipped_and_counted_on_request(tmp_path):
    make_imagenet_r(tmp_path, per_class=5)
    bad = tmp_path / "imagenet-r" / WNIDS[1] / "art_0.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated download
    with pytest.raises(UserError) as e:
        build_source("imagenet-r", tmp_path, split="own", wnids=WNIDS, img_size=32)
    assert str(bad) in str(e.value) and "truncated" in str(e.value) and "skip_corrupt=true" in str(e.value)
    src = build_source("imagenet-r", tmp_path, split="own", wnids=WNIDS, img_size=32, skip_corrupt=True)
    assert src.meta["skipped_corrupt"]["count"] == 1
    assert src.meta["skipped_corrupt"]["files"][0]["path"] == str(bad)
    assert str(bad) not in {p for p, _ in src.train.samples + src.test.samples}
    assert len(src.train) + len(src.test) == 24


def test_corrupt_image_found_mid_run_gives_one_line_from_the_worker(tmp_path):
    """With the header check off, a file that fails to decode inside a DataLoader worker still ends in one line."""
    make_imagenet_r(tmp_path, per_class=2)
    src = build_source("imagenet-r", tmp_path, split="own", wnids=WNIDS[:2], img_size=32, verify="none")
    bad = src.train.samples[0][0]
    with open(bad, "wb") as f:
        f.write(b"<html>not found</html>")
    loader = torch.utils.data.DataLoader(src.train, batch_size=2, num_workers=1)
    with pytest.raises(UserError) as e:
        list(loader)
    assert str(e.value).startswith(f"cannot decode image {bad}") and "Traceback" not in str(e.value)


def test_verification_is_cached(tmp_path, monkeypatch):
    make_imagenet_r(tmp_path, per_class=3)
    build_source("imagenet-r", tmp_path, split="own", wnids=WNIDS, img_size=32)
    import cl_vit.data.verify as V

    calls = []
    monkeypatch.setattr(V, "header_problem", lambda p: calls.append(p))
    build_source("imagenet-r", tmp_path, split="own", wnids=WNIDS, img_size=32)
    assert calls == []  # every file already verified with the same size and mtime
    (tmp_path / "imagenet-r" / WNIDS[0] / "art_0.jpg").write_bytes(b"\xff\xd8\xff\xe0 changed \xff\xd9")
    build_source("imagenet-r", tmp_path, split="own", wnids=WNIDS, img_size=32)
    assert calls == [str(tmp_path / "imagenet-r" / WNIDS[0] / "art_0.jpg")]


def test_normalisation_follows_the_backbone_or_coda(tmp_path):
    from cl_vit.run import source_arguments

    assert source_arguments(compose(["benchmark=imagenet-r"], tmp_path))["normalize"] == "coda"
    cfg = compose(["benchmark=imagenet-r", "benchmark.source_args.normalize=model"], tmp_path)
    args = source_arguments(cfg)
    assert args["mean"] == [0.5, 0.5, 0.5] and args["std"] == [0.5, 0.5, 0.5]  # augreg ViT-B/16
    make_imagenet_r(tmp_path, wnids=WNIDS[:2], per_class=2)
    src = build_source("imagenet-r", tmp_path, split="own", wnids=WNIDS[:2], img_size=32, normalize="coda")
    x = torch.stack([src.test[i][0] for i in range(len(src.test))])
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.5  # CODA-Prompt's [0, 1] inputs


def test_stream_of_imagenet_r_uses_contiguous_label_ranges(tmp_path):
    make_imagenet_r(tmp_path, wnids=WNIDS[:4], per_class=3)
    src = build_source("imagenet-r", tmp_path, split="own", wnids=WNIDS[:4], img_size=32)
    scenario, info = build_stream(src, n_experiences=2, class_order="coda", seed=3)
    assert info.train_classes == [[0, 1], [2, 3]]
    first = sorted({int(y) for y in scenario.train_stream[0].dataset.targets})
    assert first == [0, 1] and info.class_names == [WNIDS[c] for c in info.class_order]


# -- named splits: coda (default), pilot, own ---------------------------------------------------------------------


def test_split_digest_names_the_file_lists_whatever_their_format(tmp_path):
    # the own split written out as CODA-Prompt split files is the same split: the same sha256 in results.json
    root = make_imagenet_r(tmp_path, per_class=5)
    own = build_source("imagenet-r", tmp_path, split="own", wnids=WNIDS, img_size=32)
    for part, samples in (("train", own.train.samples), ("test", own.test.samples)):
        doc = {"data": [f"data/imagenet-r/{Path(p).relative_to(root).as_posix()}" for p, _ in samples],
               "targets": [int(y) for _, y in samples]}
        (tmp_path / "s").mkdir(exist_ok=True)
        (tmp_path / "s" / f"imagenet-r_{part}.yaml").write_text(yaml.safe_dump(doc))
    coda = build_source("imagenet-r", tmp_path, split="coda", split_dir=tmp_path / "s", wnids=WNIDS, img_size=32)
    assert (own.meta["split"]["name"], coda.meta["split"]["name"]) == ("own", "coda")
    assert own.meta["split"]["sha256"] == coda.meta["split"]["sha256"]
    other = build_source("imagenet-r", tmp_path, split="own", split_seed=3, wnids=WNIDS, img_size=32)
    assert other.meta["split"]["sha256"] != own.meta["split"]["sha256"]


def test_default_split_is_coda_and_its_absence_names_the_download(tmp_path):
    assert compose(["benchmark=imagenet-r"]).benchmark.source_args.split == "coda"
    make_imagenet_r(tmp_path, per_class=2)
    with pytest.raises(UserError, match=r"imagenet-r-splits/coda/imagenet-r_train.yaml is missing: fetch it with "
                                        r"python -m cl_vit.data.download imagenet-r --root"):
        build_source("imagenet-r", tmp_path, wnids=WNIDS, img_size=32)
    with pytest.raises(UserError, match="split='dual' is not an ImageNet-R split"):
        build_source("imagenet-r", tmp_path, split="dual", img_size=32)


def test_pilot_split_reads_their_folders_with_imagefolder_labels_and_numpy_order(tmp_path):
    make_imagenet_r(tmp_path, per_class=1)
    make_pilot_split(tmp_path, train=3, test=2)
    src = build_source("imagenet-r", tmp_path, split="pilot", wnids=WNIDS, img_size=32)
    assert src.meta["split"]["name"] == "pilot" and len(src.meta["split"]["sha256"]) == 64
    assert (len(src.train), len(src.test)) == (3 * len(WNIDS), 2 * len(WNIDS))
    assert sorted({y for _, y in src.train.samples}) == list(range(len(WNIDS)))
    assert all(Path(p).parent.name == WNIDS[y] and "/train/" in p for p, y in src.train.samples)
    with pytest.raises(UserError, match="imagenet-r-pilot"):
        build_source("imagenet-r", tmp_path / "nowhere", split="pilot", root=tmp_path / "imagenet-r", img_size=32)
    # LAMDA-PILOT utils/data_manager.py: np.random.seed(1993); np.random.permutation(200)
    np.random.seed(1993)
    assert resolve_class_order("numpy:1993", 200, seed=0)[0] == np.random.permutation(200).tolist()


def test_report_groups_runs_by_split_as_well_as_config(tmp_path):
    from cl_vit.runs import Run, group_runs

    def fake(i, seed, sha):
        results = {"status": "completed", "seed": seed, "benchmark": "imagenet-r", "model": "m", "strategy": ["l2"],
                   "completed_experiences": 1, "source": {"split": {"name": "coda", "sha256": sha}}}
        return Run(tmp_path / str(i), {"seed": seed, "benchmark": {"name": "imagenet-r"}}, results, None)

    runs = [fake(0, 0, "a" * 64), fake(1, 1, "a" * 64), fake(2, 0, "b" * 64), fake(3, 1, "b" * 64)]
    groups = group_runs(runs)
    assert [len(g.runs) for g in groups] == [2, 2]
    assert [g.settings for g in groups] == [{"split": "coda:" + "a" * 12}, {"split": "coda:" + "b" * 12}]
