"""Long-tailed class-incremental CIFAR-100 (Liu et al., ECCV 2022): the four named benchmarks, their class orders and
splits, and many / medium / few accuracy after every experience."""
import json

import numpy as np
import pytest
from conftest import TINY, compose
from data_gen import make_cifar

from cl_vit import metrics as M
from cl_vit.stream_results import StreamResults
from cl_vit.run import build, run
from cl_vit.data.protocol import load_class_order_file
from cl_vit.streams import StreamInfo

#: the official shuffled order's first entries (xialeiliu/Long-Tailed-CIL src/datasets/dataset_config.py L50)
SHUFFLED_HEAD = [68, 56, 78, 8, 23, 84, 90, 65, 74, 76]


def _stream(cfg):
    src, _, info, _, _ = build(cfg)
    return src, info


@pytest.mark.parametrize("protocol", ["ordered", "shuffled"])
def test_ltcil_benchmarks_follow_the_official_protocols(protocol, data_root):
    make_cifar(data_root, "cifar100", train_counts=[20] * 100, test_per_class=1)
    for split, sizes in (("b0", [10] * 10), ("b50", [50] + [5] * 10)):
        # holdout=null: the tiny set's classes are too small for the official validation split (test_data_cifar.py)
        cfg = compose(TINY + [f"benchmark=cifar100-ltcil-{protocol}-{split}", "benchmark.imbalance_ratio=10",
                              "benchmark.source_args.holdout=null",
                              "benchmark.source_args.img_size=8"], data_root)
        assert cfg.benchmark.long_tailed and cfg.benchmark.source == "cifar100-lt"
        src, info = _stream(cfg)
        assert [len(c) for c in info.train_classes] == sizes
        order = list(range(100)) if protocol == "ordered" else load_class_order_file("cifar100-ltcil.yaml")
        assert info.class_order == order
        # the long-tail counts belong to the CIFAR fine label, before the reordering
        counts = src.train_counts()
        assert counts.tolist() == [int(20 * 0.1 ** (i / 99)) for i in range(100)]
        first = [counts[info.class_order[c]] for c in info.train_classes[0]]
        if protocol == "ordered":  # head to tail: the first experience holds the most frequent classes
            assert min(first) >= max(counts[info.class_order[c]] for c in info.train_classes[-1])
        else:
            assert info.class_order[:10] == SHUFFLED_HEAD and sorted(info.class_order) == list(range(100))


def test_shot_accuracy_after_every_experience_hand_case():
    info = StreamInfo(4, [[0, 1], [2, 3]], [[0, 1], [2, 3]], list(range(4)), list("abcd"))
    res = StreamResults(info=info, meta={"shot_groups": {"count": {"groups": ["many", "few", "many", "medium"]}}})
    # after experience 1: class 0 2/2 right, class 1 0/2 right
    res.record(0, {"main": {0: M.confusion_entries([0, 0, 1, 1], [0, 0, 0, 0])}}, 1.0)
    # after experience 2: class 0 1/2, class 1 2/2, class 2 0/2, class 3 1/2
    res.record(1, {"main": {0: M.confusion_entries([0, 0, 1, 1], [0, 1, 1, 1]),
                            1: M.confusion_entries([2, 2, 3, 3], [3, 3, 3, 2])}}, 1.0)
    per = res.to_json("completed")["shot_accuracy_per_experience"]["main"]["count"]
    assert per[0] == {"many": 1.0, "few": 0.0}  # no medium class seen yet
    assert per[1] == {"many": (0.5 + 0.0) / 2, "medium": 0.5, "few": 1.0}
    assert res.to_json("completed")["shot_accuracy"]["main"]["count"] == per[1]


def test_any_strategy_runs_on_ltcil_and_records_shot_groups_per_task(tmp_path, data_root, capsys):
    make_cifar(data_root, "cifar100", train_counts=[20] * 100, test_per_class=1)
    over = TINY + ["benchmark=cifar100-ltcil-shuffled-b50", "benchmark.imbalance_ratio=10",
                   "benchmark.source_args.holdout=null",
                   "benchmark.source_args.img_size=8", "strategy=simplecil", "data.num_workers=0",
                   "data.persistent_workers=false", "epoch_eval=0"]
    run(compose(over, data_root), tmp_path / "run")
    doc = json.loads((tmp_path / "run" / "results.json").read_text())
    assert doc["status"] == "completed" and len(doc["accuracy_matrix"]) == 11
    per = doc["shot_accuracy_per_experience"]["main"]
    assert set(per) == {"count"} and len(per["count"]) == 11  # LT-CIL counts; no DeiT-LT rank cut-offs
    groups = doc["shot_groups"]["count"]["groups"]
    for i, row in enumerate(per["count"]):
        seen = [c for exp in doc["experiences"][: i + 1] for c in exp]
        assert set(row) == {groups[c] for c in seen}
    # the per-task table of docs/miniatures.md reads the same numbers back
    from cl_vit.experiments.shots_per_task import GROUPS, main as shots_main
    assert shots_main([str(tmp_path / "run")]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| cifar100-ltcil"))
    cells = [c.strip() for c in line.strip("|").split("|")][3:]
    assert len(cells) == 11
    for cell, row in zip(cells, per["count"]):
        assert cell == " / ".join(f"{100 * row[g]:.1f}" if g in row else "-" for g in GROUPS)


@pytest.mark.parametrize("protocol,first", [("ordered", [0, 1]), ("shuffled", [4, 2])])
def test_digits_ltcil_protocols_order_head_first_or_mixed(protocol, first):
    cfg = compose(TINY + [f"benchmark=digits-ltcil-{protocol}"])
    src, info = _stream(cfg)
    counts = np.bincount(np.asarray(src.train_targets), minlength=10)
    assert counts[0] > 100 and counts[9] < 20 and all(np.diff(counts) <= 0)  # class i: the i-th largest
    assert list(info.class_order[:2]) == first and len(info.train_classes) == 5


def test_pretrained_vit_recipes_compose_and_run_in_miniature(tmp_path, data_root):
    expected = {"ltcil-simplecil": "simplecil", "ltcil-ranpac": "ranpac", "ltcil-l2": "l2"}
    for experiment, strategy in expected.items():
        cfg = compose([f"experiment={experiment}"])
        assert list(cfg.strategy) == [strategy] and cfg.benchmark.name == "cifar100-ltcil-ordered-b0"
        assert cfg.model.pretrained and cfg.model.pretrained_tag == "augreg_in21k"
        assert cfg.benchmark.source_args.img_size == 224
    assert compose(["experiment=ltcil-ranpac"]).optimizer.name == "sgd"
    # the RanPAC recipe end to end on generated data, with the micro ViT in place of ViT-B/16
    make_cifar(data_root, "cifar100", train_counts=[20] * 100, test_per_class=1)
    over = ["experiment=ltcil-ranpac", *TINY, "model.pretrained=false", "benchmark.source_args.img_size=8",
            "benchmark.imbalance_ratio=10", "benchmark.source_args.holdout=null", "benchmark.n_experiences=2",
            "strategy.ranpac.M=32", "trainer.limit_train_batches=2", "data.num_workers=0",
            "data.persistent_workers=false", "epoch_eval=0"]
    cfg = compose(over, data_root)
    assert cfg.model.name == "vit_micro_patch2_8"
    doc = run(cfg, tmp_path / "run")
    assert doc["status"] == "completed" and len(doc["shot_accuracy_per_experience"]["main"]["count"]) == 2
