"""The default run imports only what it uses (issue 26): modules that are imported lazily stay out of
``python -m cl_vit.run``'s process, and what needs them imports them on first use."""
import subprocess
import sys

from conftest import cli_env

#: imported on first use only; none of them is needed by the default run (split-digits, Refiner-ViT-tiny,
#: TensorBoard). albumentations: the image pipelines (cl_vit/data/transforms.py)
LAZY = ("albumentations",)

_SCRIPT = """
import runpy, sys
sys.argv = ["cl_vit.run", "trainer.max_epochs=1", "trainer.limit_train_batches=1", "benchmark.n_experiences=1",
            "hydra.run.dir=" + sys.argv[1]]
runpy.run_module("cl_vit.run", run_name="__main__")
lazy = {lazy!r}
print("default run:", *[m in sys.modules for m in lazy])

import numpy as np
from cl_vit.data.transforms import cifar_train_pipeline, imagenet_transforms
img = np.random.default_rng(0).integers(0, 256, (40, 36, 3), dtype=np.uint8)
x = cifar_train_pipeline(32, (0.5,) * 3, (0.25,) * 3)(image=img)["image"]
_, to_tensor = imagenet_transforms(16, (0.5,) * 3, (0.25,) * 3, train=True)
y = to_tensor(image=img[:16, :16])["image"]
print("pipelines:", tuple(x.shape), tuple(y.shape), *[m in sys.modules for m in lazy])
"""


def test_default_run_leaves_lazy_modules_unimported_and_they_load_when_needed(tmp_path):
    out = subprocess.run([sys.executable, "-c", _SCRIPT.format(lazy=LAZY), str(tmp_path / "run")],
                         capture_output=True, text=True, env=cli_env(), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = {line.split(":")[0]: line.split(":")[1].split() for line in out.stdout.splitlines() if ":" in line}
    assert (tmp_path / "run" / "results.json").exists()
    assert lines["default run"] == ["False"] * len(LAZY)
    assert lines["pipelines"] == ["(3,", "32,", "32)", "(3,", "16,", "16)"] + ["True"] * len(LAZY)
