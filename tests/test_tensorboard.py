"""TensorBoard events of real runs, read back with TensorBoard's own reader: scalar steps across experiences, the
figures as images, attention maps for models that expose them, and the hparams plugin's records."""
from pathlib import Path

import numpy as np
import pytest
import torch
from analysis_helpers import attention_run, results, sweep  # noqa: F401  (fixtures)
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.plugins.hparams import plugin_data_pb2


def _events(run_dir: Path) -> ea.EventAccumulator:
    # a multirun job's events are one folder down, named by its overrides (cl_vit.loggers.run_name)
    folder = next((p.parent for p in (run_dir / "tensorboard").glob("*/events.out.tfevents.*")), run_dir / "tensorboard")
    acc = ea.EventAccumulator(str(folder),
                              size_guidance={ea.SCALARS: 0, ea.IMAGES: 0, ea.TENSORS: 0})  # keep every value
    acc.Reload()
    return acc


def test_scalar_steps_continue_across_experiences(attention_run):
    acc = _events(attention_run)
    doc = results(attention_run)
    n = doc["n_experiences"]
    # 2 batches per experience, logged every step: the StreamLogger offset makes steps 0..2n-1, none repeated
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(2 * n))
    state = torch.load(attention_run / "checkpoints" / f"exp_{n - 1:03d}.pt", weights_only=False)
    assert state["global_step"] == 2 * n
    a_t = acc.Scalars("eval/A_t")
    assert [e.step for e in a_t] == list(range(1, n + 1))  # experiences numbered from 1
    np.testing.assert_allclose([e.value for e in a_t], doc["average_accuracy_per_experience"], rtol=1e-6)
    assert [e.step for e in acc.Scalars("eval/acc/exp_3")] == list(range(3, n + 1))


def test_figures_and_attention_maps_are_images(attention_run):
    acc = _events(attention_run)
    n = results(attention_run)["n_experiences"]
    images = acc.Tags()["images"]
    assert [e.step for e in acc.Images("eval/accuracy_matrix")] == list(range(1, n + 1))
    for block in ("attention/block_00", "attention/block_01"):  # the stand-in has 2 blocks
        shots = acc.Images(block)
        assert [e.step for e in shots] == list(range(1, n + 1))
        assert shots[0].encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n" and shots[0].width > shots[0].height
    assert "attention/block_02" not in images
    for name in ("figures/accuracy_matrix", "figures/average_accuracy"):
        assert [e.step for e in acc.Images(name)] == [n]


def test_hparams_hold_the_config_and_final_metrics(attention_run):
    acc = _events(attention_run)
    doc = results(attention_run)
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert {"seed", "model.name", "strategy", "optimizer.lr", "benchmark.n_experiences"} <= set(start.hparams)
    assert start.hparams["model.name"].string_value == "attnmaps_micro_patch2_8"
    assert start.hparams["strategy"].string_value == "finetune"
    assert start.hparams["seed"].number_value == 0
    assert start.hparams["trainer.limit_train_batches"].number_value == 2
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    tags = {m.name.tag for m in experiment.metric_infos}
    assert {"final/final_average_accuracy", "final/forgetting_max", "final/bwt", "final/wall_time"} <= tags
    for key in ("final_average_accuracy", "global_accuracy", "forgetting_consecutive"):
        (event,) = acc.Scalars(f"final/{key}")
        assert event.step == doc["n_experiences"]
        assert event.value == pytest.approx(doc["metrics"][key], rel=1e-6)


def test_models_without_attention_maps_log_none(sweep):
    acc = _events(sweep / "0")
    assert not [t for t in acc.Tags()["images"] if t.startswith("attention/")]
    assert "figures/accuracy_matrix" in acc.Tags()["images"]
    assert "_hparams_/experiment" in acc.PluginTagToContent("hparams")
