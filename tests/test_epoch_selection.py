"""Best-epoch and final numbers per head and shot group (labelled as selected on the test set), and model EMA."""
import json

import pytest
import torch
from conftest import TINY, compose

from cl_vit.report import format_results
from cl_vit.run import build, run


def test_last_and_best_epoch_are_recorded_per_head_and_shot_group(tmp_path, data_root):
    cfg = compose([*TINY, "benchmark=digits-lt", "benchmark.shot_index_cutoffs=[3,7]", "trainer.max_epochs=3",
                   "data.batch_size=64"], data_root)
    doc = run(cfg, tmp_path / "run")
    sel = doc["epoch_selection"]
    assert "selected on the test set" in sel["definition"].lower()
    s = sel["experiences"]["0"]
    assert (s["epochs_evaluated"], s["last_epoch"]) == (3, 3) and 1 <= s["best_epoch"] <= 3
    # the last epoch's numbers are the run's final evaluation, in the default (index) groups and the named count ones
    last = s["last"]["main"]
    assert last["overall"] == pytest.approx(doc["metrics"]["global_accuracy"])
    for g in ("many", "medium", "few"):
        assert last[g] == pytest.approx(doc["shot_accuracy"]["main"]["index"][g])
        assert last[f"count/{g}"] == pytest.approx(doc["shot_accuracy"]["main"]["count"][g])
    assert s["best"]["main"]["overall"] >= last["overall"]
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["epoch_selection"] == sel
    assert "SELECTED ON THE TEST SET" in format_results(doc)


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


def test_ema_replaces_the_weights_at_the_end_of_the_experience(tmp_path, data_root):
    base = [*TINY, "trainer.max_epochs=1", "benchmark.n_experiences=1", "data.batch_size=256"]
    plain = run(compose(base, data_root), tmp_path / "plain")
    # decay 0: the average is the last weights, nothing changes
    zero = run(compose([*base, "ema.decay=0.0"], data_root), tmp_path / "zero")
    assert zero["confusion"] == plain["confusion"]
    # decay 1: the average never moves from the weights the experience started with
    cfg = compose([*base, "ema.decay=1.0"], data_root)
    _, _, _, module, _ = build(cfg)
    initial = {k: v.clone() for k, v in module.state_dict().items()}
    run(cfg, tmp_path / "one")
    after = _weights(tmp_path / "one" / "checkpoints" / "exp_000.pt")
    trained = _weights(tmp_path / "plain" / "checkpoints" / "exp_000.pt")
    net_keys = [k for k in initial if k.startswith("net.")]
    assert net_keys and all(torch.equal(after[k], initial[k]) for k in net_keys)
    assert any(not torch.equal(trained[k], initial[k]) for k in net_keys)


def test_bad_ema_decay_is_one_line(data_root):
    from cl_vit.config import validate
    from cl_vit.errors import ConfigError

    with pytest.raises(ConfigError, match="ema.decay"):
        validate(compose(["ema.decay=2"], data_root))
