"""Shot groups (counts and DeiT-LT index cut-offs) and their accuracies in results.json, for every head."""
import json

import numpy as np
from conftest import TINY, compose

from cl_vit import metrics as M
from cl_vit.data.longtail import DEIT_LT_CUTOFFS, index_shot_groups, shot_group_record, shot_groups
from cl_vit.stream_results import StreamResults
from cl_vit.runs import load_run
from cl_vit.streams import StreamInfo


def test_count_and_index_groups():
    counts = [500, 150, 101, 100, 20, 19, 5, 5]
    assert shot_groups(counts) == ["many", "many", "many", "medium", "medium", "few", "few", "few"]
    # DeiT-LT: ranks by descending count, [0, a) many, [a, b) medium, rest few; ties keep label order
    assert index_shot_groups(counts, (3, 6)) == ["many"] * 3 + ["medium"] * 3 + ["few"] * 2
    assert index_shot_groups(counts[::-1], (3, 6)) == (["many"] * 3 + ["medium"] * 3 + ["few"] * 2)[::-1]
    assert DEIT_LT_CUTOFFS == {"cifar10-lt": (3, 7), "cifar100-lt": (36, 71), "imagenet-lt": (390, 835),
                               "inat2018": (842, 4543)}
    rec = shot_group_record(counts, (3, 6), order=[7, 0, 1, 2, 3, 4, 5, 6])
    assert rec["count"]["groups"][0] == "few" and rec["index"]["groups"][:2] == ["few", "many"]
    assert rec["index"]["cutoffs"] == [3, 6]


def test_shot_accuracy_for_every_head_and_per_class():
    info = StreamInfo(4, [[0, 1, 2, 3]], [[0, 1, 2, 3]], [0, 1, 2, 3], list("abcd"), "identity")
    groups = shot_group_record([200, 50, 50, 3], (1, 3))
    res = StreamResults(info=info, meta={"shot_groups": groups})
    y = np.array([0, 0, 1, 1, 2, 2, 2, 2, 3, 3])
    main = np.array([0, 0, 1, 0, 2, 2, 2, 0, 0, 0])
    dist = np.array([0, 1, 1, 1, 2, 2, 2, 2, 3, 0])
    res.record(0, {"main": {0: M.confusion_entries(y, main)}, "dist": {0: M.confusion_entries(y, dist)}}, 1.0)
    doc = res.to_json("completed")
    # count groups: many = {0}, medium = {1, 2}, few = {3}; class-mean of per-class accuracies
    assert doc["shot_accuracy"]["main"]["count"] == {"many": 1.0, "medium": (0.5 + 0.75) / 2, "few": 0.0}
    assert doc["shot_accuracy"]["dist"]["count"] == {"many": 0.5, "medium": 1.0, "few": 0.5}
    assert doc["shot_accuracy"]["dist"]["index"] == {"many": 0.5, "medium": 1.0, "few": 0.5}
    # the flat metrics use the official index cut-offs when the benchmark has them: many = {0}, few = {3} again
    assert doc["shot_definition"] == "index"
    assert doc["metrics"]["many_shot_accuracy"] == doc["shot_accuracy"]["main"]["index"]["many"] == 1.0
    assert doc["metrics"]["medium_shot_accuracy"] == doc["shot_accuracy"]["main"]["index"]["medium"]
    assert doc["per_class_accuracy"] == [1.0, 0.5, 0.75, 0.0]
    json.dumps(doc, allow_nan=False)


def test_long_tailed_run_records_groups_from_the_whole_training_set(tmp_path, data_root):
    from cl_vit.run import run

    cfg = compose(TINY + ["benchmark=digits-lt", "benchmark.n_experiences=2", "benchmark.shot_index_cutoffs=[3,7]",
                          "benchmark.class_order=seeded", "data.batch_size=256"], data_root)
    doc = run(cfg, tmp_path / "run")
    counts = doc["class_counts"]
    assert doc["shot_groups"]["count"]["groups"] == shot_groups(counts)
    assert {"many", "medium", "few"} == set(doc["shot_groups"]["count"]["groups"])
    assert doc["shot_groups"]["index"]["cutoffs"] == [3, 7]
    # index groups follow the source labels' frequency ranks, carried to stream labels by the class order
    src_counts = np.zeros(10, dtype=int)
    src_counts[doc["class_order"]] = counts
    by_source = index_shot_groups(src_counts, (3, 7))
    assert doc["shot_groups"]["index"]["groups"] == [by_source[c] for c in doc["class_order"]]
    assert len(doc["per_class_accuracy"]) == 10
    assert set(doc["shot_accuracy"]["main"]) == {"count", "index"}
    assert doc["metrics"]["many_shot_accuracy"] == doc["shot_accuracy"]["main"]["index"]["many"]
    assert load_run(tmp_path / "run").shot_groups().kind == "index"  # the report's default follows the run
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["shot_accuracy"] == doc["shot_accuracy"]


def test_without_cut_offs_the_count_groups_are_the_default_and_epoch_curves_name_the_others():
    from cl_vit.epoch_eval import ShotGroupEpochEval

    info = StreamInfo(4, [[0, 1, 2, 3]], [[0, 1, 2, 3]], [0, 1, 2, 3], list("abcd"), "identity")
    res = StreamResults(info=info, meta={"shot_groups": shot_group_record([200, 50, 50, 3])})
    y = np.array([0, 1, 2, 3])
    res.record(0, {"main": {0: M.confusion_entries(y, np.array([0, 0, 2, 3]))}}, 1.0)
    doc = res.to_json("completed")
    assert doc["shot_definition"] == "count" and doc["metrics"]["medium_shot_accuracy"] == 0.5
    both = ShotGroupEpochEval(None, [200, 50, 50, 3], shot_groups_record=shot_group_record([200, 50, 50, 3], (2, 3)))
    assert both.definitions == {"": ["many", "many", "medium", "few"], "count/": ["many", "medium", "medium", "few"]}
