"""python -m cl_vit.bench: a --quick smoke run of the CLI (structure of the JSON, never a timing), and its helpers."""
import io
import json
import sys
from contextlib import redirect_stderr

import pytest
import torch
from conftest import run_cli

from cl_vit.bench import __main__ as bench_cli
from cl_vit.bench import gpu, scratch
from cl_vit.bench.memory import peak_rss_mib
from cl_vit.models import build_model

ROW_KEYS = {"case", "metric", "value", "baseline", "ratio", "aim", "meets_aim"}


def test_bench_quick_prints_a_table_and_writes_ratios(tmp_path):
    out = tmp_path / "bench.json"
    scratch_root = tmp_path / "tmp"  # the benchmarks' temporary run directories go here, and must be gone after
    scratch_root.mkdir()
    proc = run_cli("runner", "avalanche", "gpu", "--quick", "--out", out, module="cl_vit.bench", timeout=900,
                   check=True, env={"TMPDIR": str(scratch_root)})
    assert sorted(p.name for p in scratch_root.iterdir()) == []
    assert "ratio" in proc.stdout and f"written to {out}" in proc.stdout
    results = {r["name"]: r for r in json.loads(out.read_text())["results"]}
    assert list(results) == ["runner", "avalanche", "gpu"]
    for res in results.values():
        assert {"name", "device", "rows", "notes"} <= set(res)
        for r in res["rows"]:
            assert ROW_KEYS <= set(r)
            assert r["value"] > 0 and r["baseline"] > 0
            assert r["ratio"] == pytest.approx(r["value"] / r["baseline"])
            assert r["meets_aim"] in (None, True, False)
    runner = results["runner"]["rows"]
    assert [r["metric"] for r in runner] == ["wall s: suite / bare loop", "CPU s: suite / bare loop"] * 2
    # the bare loop does the same work: same seeds, batches, loss and optimiser give the same accuracy
    assert runner[0]["accuracy"] == runner[0]["baseline_accuracy"]
    avalanche = results["avalanche"]["rows"]
    assert {r["metric"] for r in avalanche} == {
        "wall s: suite / Naive", "CPU s: suite / Naive", "A_N: suite / Naive",
        # the referee: the suite's methods beside avalanche-lib's own, one seed in --quick
        "A_N: suite finetune / Avalanche naive", "A_N: suite ewc / Avalanche ewc",
        "A_N: suite ewc / Avalanche ewc, classifier unpenalised", "A_N: suite lwf / Avalanche lwf"}
    for a_n in (r for r in avalanche if r["metric"].startswith("A_N")):
        assert 0 < a_n["value"] <= 1 and 0 < a_n["baseline"] <= 1
    referee = [r for r in avalanche if "Avalanche" in r["metric"]]
    assert all(r["seeds"] == [0] and len(r["suite_per_seed"]) == len(r["avalanche_per_seed"]) == 1 for r in referee)
    if not torch.cuda.is_available():
        assert results["gpu"]["rows"] == [] and "not measured" in results["gpu"]["notes"][0]


def test_scratch_is_removed_when_the_benchmark_fails():
    with pytest.raises(RuntimeError, match="midway"):
        with scratch("cl_vit_bench_test_") as root:
            (root / "run").mkdir()
            (root / "run" / "results.json").write_text("{}")
            raise RuntimeError("midway")
    assert not root.exists()


def test_unknown_bench_is_one_line():
    err = io.StringIO()
    with redirect_stderr(err):
        assert bench_cli.main(["nope"]) == 2
    assert err.getvalue().count("\n") == 1 and "unknown benchmark 'nope'" in err.getvalue()


def test_peak_rss_sees_a_known_allocation():
    base = peak_rss_mib([sys.executable, "-c", "import numpy"])
    big = peak_rss_mib([sys.executable, "-c", "import numpy; a = numpy.ones(256 * 2**20, dtype=numpy.uint8)"])
    assert 230 < big - base < 290


@pytest.mark.parametrize("name,peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                       ("NVIDIA A100-SXM4-80GB", 312e12), ("Tesla V100-SXM2-16GB", None)])
def test_gpu_peak_table(name, peak):
    assert gpu.peak_bf16_flops(name) == peak


def test_gpu_measurement_runs_on_cpu_with_a_tiny_model():
    """The GPU bench's code path (suite vs bare loop, FLOP counting) on the CPU, where it can be tested."""
    m = gpu.measure("vit_micro_patch2_8", img_size=8, in_chans=1, num_classes=10, batch=4, steps=2, warmup=1,
                    device="cpu")
    assert m["images_per_s"] > 0 and m["bare_images_per_s"] > 0
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fwd:
        net(torch.zeros(3, 1, 8, 8))
    # forward 2*64*10 per image; backward twice that (the input needs no gradient here: only the weight's)
    assert fwd.get_total_flops() / 3 == 2 * 64 * 10
    assert gpu.training_flops_per_image(net, torch.zeros(3, 1, 8, 8)) == 2 * 2 * 64 * 10
    vit = build_model({"name": "vit_micro_patch2_8"}, 10, 1, 8)
    with FlopCounterMode(display=False) as fwd:
        vit(torch.zeros(2, 1, 8, 8))
    # backward ~ twice the forward (a little more for attention, whose backward recomputes the scores)
    assert 2.5 < m["flops_per_image"] / (fwd.get_total_flops() / 2) < 3.5


def test_gpu_check_without_a_gpu_is_one_line(tmp_path, capsys, monkeypatch):
    from cl_vit.bench import gpu_check

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no CUDA device") and "--cpu" in err[0]


def test_gpu_check_on_cpu_writes_each_section_and_survives_a_failing_one(tmp_path, monkeypatch):
    """The GPU check's script path with tiny sizes on the CPU: each section lands in results.json as it is measured;
    a section that fails is recorded with its error and the next one still runs; the budget skips what cannot fit."""
    from cl_vit.bench import gpu_check

    monkeypatch.setenv("CL_VIT_GPU_CHECK_WORK", str(tmp_path / "work"))

    def broken(check):
        raise RuntimeError("injected")

    monkeypatch.setattr(gpu_check, "deit_lt_section", broken)
    out = tmp_path / "out"
    keep = {"peak", "deit_lt", "eval_autocast", "data"}
    assert gpu_check.main([str(out), "--cpu", "--skip", *(s for s in gpu_check.SECTIONS if s not in keep)]) == 0
    sections = json.loads((out / "results.json").read_text())["sections"]
    assert list(sections) == ["peak", "deit_lt", "eval_autocast", "data"]
    # the CPU opened to trainer.eval_autocast (bfloat16): the evaluation forward in bf16, as a forward by hand
    assert sections["eval_autocast"]["ok"] is True
    assert sections["peak"]["measured_flops"] > 0
    assert sections["deit_lt"]["error"] == "RuntimeError: injected"
    data = sections["data"]
    # 4 classes x 10 generated JPEGs, batch 8, two passes without the first batch (the workers' start)
    assert data["images"] == 40 and {w: v["images"] for w, v in data["workers"].items()} == {"0": 72, "2": 72}
    assert len(list((tmp_path / "work" / "data" / "imagenet-r").glob("n*/*.jpg"))) == 40
    assert "Data pipeline images/s" in (out / "summary.md").read_text()

    assert gpu_check.main([str(tmp_path / "none"), "--cpu", "--budget", "5"]) == 0
    skipped = json.loads((tmp_path / "none" / "results.json").read_text())["sections"]
    assert all("skipped" in v for k, v in skipped.items() if k != "peak") and len(skipped) == len(gpu_check.SECTIONS)


def test_paired_times_alternate_the_order_and_pair_neighbours():
    """Each pair's two steps run back to back, the baseline first in even pairs: a host that slows down between
    pairs changes both members of a pair, not the ratio (a median over each side separately would mix them)."""
    from cl_vit.bench import pair_spread, paired_times

    clock_now, calls = [0.0], []
    slow = [1.0]

    def step(name, cost):
        def f():
            calls.append(name)
            clock_now[0] += cost * slow[0]
            if len(calls) % 4 == 0:
                slow[0] *= 3  # the host's speed drops after every second pair
        return f

    times = paired_times(step("b", 2.0), step("c", 1.0), pairs=4, warmup=0, clock=lambda: clock_now[0])
    assert calls == ["b", "c", "c", "b", "b", "c", "c", "b"]
    spread = pair_spread(times)
    assert spread["median"] == pytest.approx(2.0) and spread["q1"] == pytest.approx(2.0) and spread["pairs"] == 4
    assert spread["baseline_s"] > 2.0  # the sides' own medians carry the slowdown; the pairs' ratio does not


def test_gpu_check_on_cpu_measures_the_deferred_checks_the_recomputing_refiner_and_the_prefetcher(tmp_path,
                                                                                                  monkeypatch):
    """The sections issue 26 asks a lent GPU for run to the end on the CPU script path: the suite's step with the
    non-finite checks read every step and every DEFERRED_EVERY steps against the bare loop, the refiner's
    recompute rows (memory against the twin, paired speed), and the Refiner recipes' prefetcher order (uint8 mixing
    and the batch stage on the device against the CPU)."""
    from cl_vit.bench import gpu_check

    monkeypatch.setenv("CL_VIT_GPU_CHECK_WORK", str(tmp_path / "work"))
    keep = {"deferred_checks", "refiner_recompute", "prefetcher"}
    out = tmp_path / "out"
    assert gpu_check.main([str(out), "--cpu", "--skip", *(s for s in gpu_check.SECTIONS if s not in keep)]) == 0
    sections = json.loads((out / "results.json").read_text())["sections"]
    pf = sections["prefetcher"]  # (on the CPU both sides are the CPU: this checks the script, not the device)
    assert pf["mixed_equal"] is True and pf["targets_max_abs_diff"] == 0 and pf["images_per_s"] > 0
    dc = sections["deferred_checks"]
    assert "error" not in dc and len(dc["images_per_s_every_step"]) == 2 and dc["bare_images_per_s"] > 0
    assert dc[f"suite_over_bare_every_{gpu_check.DEFERRED_EVERY}"] > 0
    rows = sections["refiner_recompute"]["rows"]
    assert {r["metric"] for r in rows} == {"img/s: recompute/keep"}  # (memory rows: on the GPU only)
    assert all(r["ratio"] > 0 for r in rows)
    summary = (out / "summary.md").read_text()
    assert "suite / bare loop" in summary and "refiner recompute" in summary and "Prefetcher order" in summary
