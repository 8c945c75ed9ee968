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
        # attention_mosaic's 64-pixel panels 4 apart: the image and 2 heads; block 0 refines (2 rows), block 1 not
        assert (shots[0].width, shots[0].height) == (3 * 68 - 4, (2 if block == "attention/block_00" else 1) * 68 - 4)
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


def test_the_attention_mosaic_holds_each_panel_of_the_figure():
    """TensorBoard's attention image (plots.attention_mosaic) shows the figure's panels: the image, then each head's
    class-token attention over the patch grid on its own colour scale, the refined map in the second row."""
    import timm
    from matplotlib import colormaps

    from cl_vit import plots

    torch.manual_seed(0)  # the stand-in model is registered by importing analysis_helpers
    net = timm.create_model("attnmaps_micro_patch2_8", num_classes=10)
    image = torch.randn(1, 8, 8)
    maps = plots.attention_maps(net, image)
    prefix, grid = plots.token_layout(net, maps[0]["raw"].shape[-1])
    mosaic = plots.attention_mosaic(maps[0], image, "cls", prefix, grid, cell=8, gap=1)
    assert mosaic.shape == (2 * 9 - 1, 3 * 9 - 1, 3) and mosaic.dtype == np.uint8
    for row, kind in enumerate(("raw", "refined")):
        for h in range(2):
            a = maps[0][kind][h, 0, 1:].reshape(4, 4)
            want = np.round(255 * colormaps["inferno"]((a - a.min()) / (a.max() - a.min()))[..., :3])
            panel = mosaic[9 * row:9 * row + 8, 9 * (h + 1):9 * (h + 1) + 8]
            np.testing.assert_array_equal(panel[::2, ::2], want)  # each patch 2 x 2 pixels
    gray = (image[0] - image.min()) / (image.max() - image.min())
    np.testing.assert_array_equal(mosaic[:8, :8, 0], np.round(255 * gray.numpy()).astype(np.uint8))
    assert (mosaic[8] == 255).all() and (mosaic[9:, :8] == 255).all()  # the gap; no image in the refined row
    assert plots.attention_mosaic(maps[1], image, "cls", prefix, grid, cell=8, gap=1).shape == (8, 26, 3)
