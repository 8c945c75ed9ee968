"""The analysis notebooks run top to bottom (nbclient, a kernel on this interpreter) against tiny runs made here; and
the attention helper behind 03_attention.ipynb draws what a model's get_attention_maps returns."""
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
import timm
import torch
from analysis_helpers import attention_run, killed, lt_run, sweep  # noqa: F401  (fixtures; registers test nets)
from conftest import REPO_ROOT, cli_env
from nbclient import NotebookClient

from cl_vit import plots
from cl_vit.errors import UserError

NOTEBOOKS = REPO_ROOT / "notebooks"
TESTS_DIR = Path(__file__).resolve().parent
KERNEL = "cl-vit-test"


@pytest.fixture(scope="module")
def kernel(tmp_path_factory) -> str:
    """A kernelspec on this very interpreter (found first through JUPYTER_PATH), whatever else is installed."""
    spec = tmp_path_factory.mktemp("jupyter") / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"}))
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = str(spec.parent.parent)
    yield KERNEL
    if old is None:
        os.environ.pop("JUPYTER_PATH")
    else:
        os.environ["JUPYTER_PATH"] = old


def execute(name: str, kernel: str, runs: list[Path], cwd: Path) -> list[dict]:
    """Run the notebook with CL_VIT_RUNS set; returns every output of every code cell (errors raise)."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit notebooks without outputs"
    assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells)
    env = cli_env()
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(TESTS_DIR)])
    env.update(CL_VIT_RUNS=os.pathsep.join(map(str, runs)), CL_VIT_PLUGINS="analysis_helpers")
    NotebookClient(nb, kernel_name=kernel, timeout=600, resources={"metadata": {"path": str(cwd)}}).execute(env=env)
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


def _text(outputs) -> str:
    return "".join(o.get("text", "") + o.get("data", {}).get("text/markdown", "") for o in outputs)


def _images(outputs) -> int:
    return sum("image/png" in o.get("data", {}) for o in outputs)


def test_01_results(kernel, sweep, killed, tmp_path):
    out = execute("01_results.ipynb", kernel, [sweep, killed], tmp_path)
    text = _text(out)
    assert "5 runs, 3 settings" in text
    assert "| split-digits | vit_micro_patch2_8 | ftpp | 0,1 | 2 | completed |" in text
    assert "unfinished (1/2)" in text
    assert _images(out) == 3  # matrices, A_t curves, forgetting bars


def test_02_long_tail(kernel, lt_run, sweep, tmp_path):
    out = execute("02_long_tail.ipynb", kernel, [lt_run, sweep / "0"], tmp_path)
    text = _text(out)
    assert "seed 0: no shot groups (count) or nothing evaluated (not a long-tailed run): skipped" in text
    assert "1 long-tailed runs" in text
    for head in ("main", "cls", "dist"):
        assert f"| digits-lt · twohead_micro_patch2_8 · finetune · seed 0 | {head} |" in text
    assert _images(out) == 3  # per-class accuracy, shot-group bars per head, DIST - CLS per class


def test_03_attention(kernel, attention_run, sweep, tmp_path):
    out = execute("03_attention.ipynb", kernel, [attention_run, sweep / "0"], tmp_path)
    text = _text(out)
    assert ("attnmaps_micro_patch2_8 · finetune · seed 0: 2 blocks, 2 heads, 17 tokens, "
            "checkpoint after experience 5") in text
    assert "model vit_micro_patch2_8 has no get_attention_maps(x)" in text
    assert _images(out) == 3  # two blocks, then the summary


@pytest.mark.slow
def test_the_documented_jupyter_commands(sweep, tmp_path):
    """docs/results.md's commands, as the `notebooks` extra of the README's install provides them (no test kernel:
    papermill starts the notebook's own ``python3`` kernel, this interpreter's ipykernel)."""
    bin_dir = Path(sys.executable).parent
    env = {**cli_env(), "PATH": os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")])}
    proc = subprocess.run(["jupyter", "lab", "--version"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "out.ipynb"
    proc = subprocess.run(["papermill", str(NOTEBOOKS / "01_results.ipynb"), str(out), "-p", "runs", str(sweep)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outputs = [o for c in nbformat.read(out, as_version=4).cells if c.cell_type == "code" for o in c.outputs]
    assert "4 runs, 2 settings" in _text(outputs) and _images(outputs) == 3
    proc = subprocess.run(["jupyter", "nbconvert", "--to", "html", "--execute", str(NOTEBOOKS / "01_results.ipynb"),
                           "--output-dir", str(tmp_path / "figures")], cwd=tmp_path,
                          env={**env, "CL_VIT_RUNS": str(sweep)}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 runs, 2 settings" in (tmp_path / "figures" / "01_results.html").read_text()


def test_attention_figures_draw_what_get_attention_maps_returns():
    torch.manual_seed(0)  # the stand-in model is registered by importing analysis_helpers
    net = timm.create_model("attnmaps_micro_patch2_8", num_classes=10).train()
    image = torch.randn(1, 8, 8)
    figs = plots.attention_figures(net, image)
    assert len(figs) == 2 and net.training  # one figure per block; the model's mode is restored
    with torch.no_grad():
        net.eval()
        raw = net.get_attention_maps(image[None])
    # block 0 refines: image + 2 heads on the raw row, 2 heads on the refined row
    ax = [a for a in figs[0].axes if a.images]
    assert len(ax) == 1 + 2 + 2
    np.testing.assert_allclose(ax[2].images[0].get_array(), raw[0]["raw"][0, 1, 0, 1:].reshape(4, 4).numpy(), rtol=1e-6)
    np.testing.assert_allclose(ax[4].images[0].get_array(), raw[0]["refined"][0, 1, 0, 1:].reshape(4, 4).numpy(),
                               rtol=1e-6)
    assert len([a for a in figs[1].axes if a.images]) == 1 + 2  # block 1 does not refine
    matrix = plots.attention_figures(net, image, view="matrix", blocks=[1])[0]
    assert [a for a in matrix.axes if a.images][1].images[0].get_array().shape == (17, 17)

    plain = timm.create_model("vit_micro_patch2_8", num_classes=10)
    assert not plots.has_attention_maps(plain)
    with pytest.raises(UserError, match="has no get_attention_maps"):
        plots.attention_maps(plain, image)
