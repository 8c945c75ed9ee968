"""The default benchmark runs end to end through the real configs."""
import json

from conftest import TINY, compose

from cl_vit.run import run


def test_split_digits_runs_and_writes_results(tmp_path, data_root):
    cfg = compose(TINY, data_root)
    doc = run(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["status"] == "completed"
    assert saved["accuracy_matrix"] == doc["accuracy_matrix"]
    assert len(saved["accuracy_matrix"]) == 5
