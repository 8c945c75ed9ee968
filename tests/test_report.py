"""The loading API (cl_vit.runs.load_run & co.), `python -m cl_vit.report` and the end-of-run PNG figures, on
tiny real runs: a Hydra multirun (finetune, ftpp x seeds 0, 1), a run killed mid-stream, and a two-head long-tailed
run on digits-lt."""
import copy
import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from analysis_helpers import FAST, killed, lt_run, results, sweep  # noqa: F401  (fixtures)
from conftest import run_cli

from cl_vit import report
from cl_vit.runs import Run, group_runs, load_run, load_runs


def _jobs(sweep: Path) -> dict[tuple[str, int], Path]:
    """(strategy chosen, seed) -> job folder, from Hydra's own record of each job's overrides."""
    import yaml

    out = {}
    for job in sweep.iterdir():
        if job.is_dir():
            o = dict(x.split("=", 1) for x in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()))
            out[(o["strategy"], int(o["seed"]))] = job
    return out


def report_main(capsys, *args) -> str:
    """``python -m cl_vit.report ARGS`` in this process (the subprocess path is tested once below)."""
    capsys.readouterr()
    assert report.main([str(a) for a in args]) == 0
    return capsys.readouterr().out


def _markdown_rows(text: str) -> list[dict]:
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]


def test_report_groups_a_multirun_by_seed(sweep, capsys):
    jobs = _jobs(sweep)
    assert sorted(jobs) == [("finetune", 0), ("finetune", 1), ("ftpp", 0), ("ftpp", 1)]
    proc = run_cli(sweep, module="cl_vit.report", check=True)
    rows = {r["strategy"]: r for r in _markdown_rows(proc.stdout)}
    assert set(rows) == {"finetune", "ftpp"}  # Hydra's choice names the strategy, though both run "finetune"
    for strategy, row in rows.items():
        assert (row["seeds"], row["runs"], row["status"]) == ("0,1", "2", "completed")
        for key, column in (("final_average_accuracy", "A_N"), ("forgetting_max", "F max"), ("bwt", "BWT")):
            v = np.array([results(jobs[strategy, s])["metrics"][key] for s in (0, 1)])
            assert row[column] == f"{100 * v.mean():.2f} ± {100 * v.std(ddof=1):.2f}"
    assert "many" not in proc.stdout.splitlines()[0]  # no shot groups in a balanced benchmark

    out = report_main(capsys, sweep, "--csv")
    table = {r["strategy"]: r for r in csv.DictReader(io.StringIO(out))}
    for strategy, row in table.items():
        docs = [results(jobs[strategy, s]) for s in (0, 1)]
        v = np.array([d["metrics"]["global_accuracy"] for d in docs])
        assert float(row["global_accuracy"]) == pytest.approx(v.mean(), abs=1e-12)
        assert float(row["global_accuracy_std"]) == pytest.approx(v.std(ddof=1), abs=1e-12)
        w = np.array([d["wall_time"]["total"] for d in docs])
        assert float(row["wall_time_s"]) == pytest.approx(w.mean())
        assert sorted(row["run_dirs"].split(";")) == sorted(str(jobs[strategy, s].resolve()) for s in (0, 1))

    per_run = _markdown_rows(report_main(capsys, sweep, "--no-group"))
    assert [(r["strategy"], r["seeds"]) for r in per_run] == [("finetune", "0"), ("finetune", "1"), ("ftpp", "0"),
                                                             ("ftpp", "1")]
    a_n = results(jobs["ftpp", 1])["metrics"]["final_average_accuracy"]
    assert per_run[3]["A_N"] == f"{100 * a_n:.2f}"


def test_report_shows_unfinished_runs_apart(sweep, killed, capsys):
    doc = results(killed)
    assert (doc["status"], doc["completed_experiences"]) == ("running", 1)
    rows = _markdown_rows(report_main(capsys, sweep, killed))
    assert [r["status"] for r in rows] == ["completed", "completed", "unfinished (1/2)"]
    assert rows[0]["runs"] == "2"  # the killed finetune run is not averaged into the finished seeds
    assert rows[2]["A_N"] == f"{100 * doc['metrics']['final_average_accuracy']:.2f}"
    assert rows[2]["F max"] == "—"  # one experience: forgetting is undefined, not zero


def test_report_errors_are_one_line(tmp_path, capsys):
    assert report.main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'nope'} does not exist: give a run directory or a Hydra multirun folder\n"
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err.startswith(f"error: no cl_vit run directory under {tmp_path / 'empty'}")


def test_runs_that_never_started_are_left_out_and_settings_are_what_the_user_set(sweep, tmp_path, capsys):
    """A dry run of the sweep's finetune setting and a run refused at config time (optimizer.lr=-1), beside the
    sweep: the report leaves both out unless --all, and no row shows an unresolved ${...} of a run that never
    started."""
    finetune = ["strategy=finetune", *FAST, "benchmark.n_experiences=2"]
    assert run_cli(*finetune, "dry_run=true", f"hydra.run.dir={tmp_path / 'dry'}").returncode == 0
    refused = run_cli(*finetune, "optimizer.lr=-1", f"hydra.run.dir={tmp_path / 'refused'}")
    assert refused.returncode == 2 and (tmp_path / "refused" / ".hydra" / "config.yaml").exists()
    assert "${oc.select:" in (tmp_path / "dry" / ".hydra" / "config.yaml").read_text()

    out = report_main(capsys, sweep, tmp_path)
    assert [(r["strategy"], r["status"]) for r in _markdown_rows(out)] == [("finetune", "completed"),
                                                                           ("ftpp", "completed")]
    assert "settings" not in out.splitlines()[0]
    assert report.main([str(sweep), str(tmp_path), "--csv"]) == 0
    assert "2 runs that never started (refused or dry runs) left out: --all lists them" in capsys.readouterr().err

    out = report_main(capsys, sweep, tmp_path, "--all")
    rows = {(r["strategy"], r["status"], r["settings"]) for r in _markdown_rows(out)}
    lr = load_run(_jobs(sweep)["finetune", 0]).config_value("optimizer.lr")  # the benchmark's own
    assert rows == {("finetune", "completed", f"optimizer.lr={lr}"), ("ftpp", "completed", ""),
                    ("finetune", "not started", f"optimizer.lr={lr}"), ("finetune", "not started", "optimizer.lr=-1")}
    assert "${" not in out


def test_settings_are_the_command_line_keys_that_differ():
    def fake(seed, lr, overrides, status="completed", **extra):
        config = {"seed": seed, "optimizer": {"lr": lr}, "strategy": {"finetune": {}}, "benchmark": {"name": "b"},
                  "model": {"name": "m"}, "loss": {"name": "ce"}, **extra}
        done = {"completed_experiences": 1} if status == "completed" else {}
        return Run(Path(f"/r/{seed}-{lr}-{status}"), config, {"status": status, **done}, None,
                   overrides=[f"seed={seed}", *overrides])

    runs = [fake(0, 0.1, ["optimizer.lr=0.1"]), fake(1, 0.1, ["optimizer.lr=0.1"]), fake(0, 0.2, ["optimizer.lr=0.2"]),
            # never started: a key no other run has, and what Hydra leaves unresolved
            fake(0, 0.1, ["+trainer.max_epoch=3", "optimizer.lr=0.1"], status="not started",
                 trainer={"max_epoch": 3}, loss={"name": "${oc.select:benchmark.loss.name,ce}"})]
    groups = group_runs(runs)
    assert [g.settings for g in groups] == [{"optimizer.lr": 0.1}, {"optimizer.lr": 0.2},
                                            {"optimizer.lr": 0.1, "trainer.max_epoch": 3}]
    # no command line recorded (runs started from Python): the config values that differ, unresolved ones left out
    for r in runs:
        r.overrides = None
    assert [g.settings for g in group_runs(runs)] == [{"optimizer.lr": 0.1}, {"optimizer.lr": 0.2},
                                                      {"optimizer.lr": 0.1, "trainer.max_epoch": 3}]


def test_report_columns_and_latex(sweep, capsys):
    jobs = _jobs(sweep)
    header = _markdown_rows(report_main(capsys, sweep, "--columns", "A_N,f max,wall_time_s"))[0]
    assert list(header) == ["benchmark", "model", "strategy", "seeds", "runs", "status", "A_N", "F max", "wall time"]
    full = next(csv.reader(io.StringIO(report_main(capsys, sweep, "--csv", "--columns", "A_N"))))
    assert "bwt" in full and "forgetting_max_std" in full  # the CSV keeps every column

    tex = report_main(capsys, sweep, "--latex", "--columns", "A_N,F max,BWT").splitlines()
    assert tex[:4] == [r"\begin{tabular}{lrrr}", r"\toprule", r"strategy & A\_N & F max & BWT \\", r"\midrule"]
    assert tex[6:8] == [r"\bottomrule", r"\end{tabular}"]
    cells = {line.split(" & ")[0]: line.rstrip(" \\").split(" & ")[1:] for line in tex[4:6]}
    for col, (key, best) in enumerate((("final_average_accuracy", max), ("forgetting_max", min), ("bwt", max))):
        mean = {s: 100 * np.mean([results(jobs[s, seed])["metrics"][key] for seed in (0, 1)]) for s in cells}
        std = {s: 100 * np.std([results(jobs[s, seed])["metrics"][key] for seed in (0, 1)], ddof=1) for s in cells}
        top = best(round(m, 2) for m in mean.values())
        for s, row in cells.items():
            text = rf"{mean[s]:.2f} $\pm$ {std[s]:.2f}"
            assert row[col] == (rf"\textbf{{{text}}}" if round(mean[s], 2) == top else text)

    assert report.main([str(sweep), "--columns", "A_N,fmax"]) == 2
    assert capsys.readouterr().err.startswith("error: --columns: 'fmax' is not a column: did you mean f max")


def _group_accuracy_by_hand(e: np.ndarray, classes) -> float:
    """Mean of the per-class accuracies of ``classes`` (OLTR / DeiT-LT's shot accuracy)."""
    accs = [e[(e[:, 0] == c) & (e[:, 1] == c), 2].sum() / e[e[:, 0] == c, 2].sum() for c in classes
            if e[e[:, 0] == c, 2].sum()]
    return float(np.mean(accs))


def _shot_accuracy_by_hand(doc: dict, head: str) -> dict:
    """From the stored truth only: pooled last-row confusion of ``head``, per-class accuracy, shot groups."""
    entries = [c for c in doc["confusion"] if c["head"] == head]
    last = max(c["trained_up_to"] for c in entries)
    e = np.concatenate([np.asarray(c["entries"]).reshape(-1, 3) for c in entries if c["trained_up_to"] == last])
    groups = np.asarray(doc["shot_groups"]["count"]["groups"])
    return {g: _group_accuracy_by_hand(e, np.flatnonzero(groups == g)) for g in ("many", "medium", "few")}


def test_long_tailed_two_head_run_loads_and_reports(lt_run, capsys):
    doc = results(lt_run)
    run = load_run(lt_run)
    assert run.head_names == ["main", "cls", "dist"] and run.finished and run.benchmark == "digits-lt"
    for head in run.head_names:
        R = run.head(head).accuracy_matrix
        assert R.shape == (2, 2) and np.isnan(R[0, 1])
        stored = doc if head == "main" else doc["heads"][head]
        np.testing.assert_array_equal(R[1], stored["accuracy_matrix"][1])
        assert run.shot_accuracy(head) == pytest.approx(_shot_accuracy_by_hand(doc, head))
    counts = np.asarray(doc["class_counts"])
    assert run.shot_groups().classes("few").tolist() == np.flatnonzero(counts < 20).tolist()
    e = run.final_entries("dist")
    correct = [e[(e[:, 0] == c) & (e[:, 1] == c), 2].sum() / e[e[:, 0] == c, 2].sum() for c in range(10)]
    np.testing.assert_allclose(run.per_class_accuracy("dist"), correct)

    for head in ("main", "dist"):
        rows = _markdown_rows(report_main(capsys, lt_run, "--head", head))
        want = _shot_accuracy_by_hand(doc, head)
        assert [rows[0][g] for g in ("many", "medium", "few")] == [f"{100 * want[g]:.2f}" for g in want]


def test_loader_reads_the_dataset_schema_with_two_shot_definitions(lt_run, tmp_path, capsys):
    """results.json as the dataset and DeiT-LT issues extend it: shot groups under "count" and "index", stored
    shot accuracies per head, flat many/medium/few metrics; the loader and the report read them instead of
    recomputing."""
    doc = copy.deepcopy(results(lt_run))
    count = doc.pop("shot_groups")["count"]
    index = {"definition": "DeiT-LT class-index cut-offs [3, 7]", "groups": ["many"] * 3 + ["medium"] * 4 + ["few"] * 3}
    doc["shot_groups"] = {"count": count, "index": index}
    doc["shot_accuracy"] = {"dist": {"count": {"many": 0.5, "medium": 0.25, "few": 0.125}}}
    doc["metrics"].update(many_shot_accuracy=0.9, medium_shot_accuracy=0.8, few_shot_accuracy=0.7)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text((lt_run / "config.yaml").read_text())
    (run_dir / "results.json").write_text(json.dumps(doc))
    run = load_run(run_dir)
    assert run.shot_group_kinds == ["count", "index"]
    assert run.shot_groups("index").classes("few").tolist() == [7, 8, 9]
    assert run.shot_accuracy("dist") == {"many": 0.5, "medium": 0.25, "few": 0.125}  # stored values win
    assert run.shot_accuracy("main") == {"many": 0.9, "medium": 0.8, "few": 0.7}  # flat metrics: count definition
    e = run.final_entries("cls")
    assert run.shot_accuracy("cls", "index")["few"] == pytest.approx(_group_accuracy_by_hand(e, [7, 8, 9]))
    rows = _markdown_rows(report_main(capsys, run_dir, "--head", "dist"))
    assert [rows[0][g] for g in ("many", "medium", "few")] == ["50.00", "25.00", "12.50"]
    out = report_main(capsys, run_dir, "--shots", "index")
    assert "DeiT-LT class-index cut-offs [3, 7]" in out


def test_runs_of_one_setting_group_by_seed_only():
    def fake(seed, lr, status="completed", workers=0):
        config = {"seed": seed, "optimizer": {"lr": lr}, "data": {"num_workers": workers}, "strategy": {"finetune": {}},
                  "benchmark": {"name": "b"}, "model": {"name": "m"}}
        return Run(Path(f"/r/{seed}-{lr}-{status}"), config, {"status": status, "completed_experiences": 1}, None)

    runs = [fake(0, 0.1), fake(1, 0.1, workers=4), fake(0, 0.2), fake(1, 0.2), fake(2, 0.2, status="running")]
    groups = group_runs(runs)
    assert [[r.seed for r in g.runs] for g in groups] == [[0, 1], [0, 1], [2]]
    # same benchmark, model and strategy: the differing config value tells the groups apart
    assert [g.settings for g in groups] == [{"optimizer.lr": 0.1}, {"optimizer.lr": 0.2}, {"optimizer.lr": 0.2}]
    assert len(group_runs(runs, by_seed=False)) == 5


def test_a_key_that_follows_the_seed_by_design_can_be_named_same():
    """DeiT-LT students of seed s distil from the teacher run of seed s: the teacher path differs with the seed, and
    ``--same strategy.deit_lt.teacher`` still groups them as seeds of one setting (and nothing else)."""
    def fake(seed, teacher, alpha=0.5):
        config = {"seed": seed, "strategy": {"deit_lt": {"teacher": teacher, "alpha": alpha}},
                  "benchmark": {"name": "b"}, "model": {"name": "m"}}
        return Run(Path(f"/r/{seed}-{alpha}"), config, {"status": "completed", "completed_experiences": 1}, None)

    runs = [fake(s, f"teachers/seed{s}") for s in (0, 1, 2)] + [fake(s, f"teachers/seed{s}", 0.9) for s in (0, 1)]
    assert len(group_runs(runs)) == 5  # every teacher path is its own setting
    groups = group_runs(runs, same=["strategy.deit_lt.teacher"])
    assert [[r.seed for r in g.runs] for g in groups] == [[0, 1, 2], [0, 1]]
    assert [g.settings for g in groups] == [{"strategy.deit_lt.alpha": 0.5}, {"strategy.deit_lt.alpha": 0.9}]
    # a key's prefix does not swallow its siblings: strategy.deit_lt.teacher_size would stay a setting
    assert len(group_runs(runs, same=["strategy.deit_lt.teach"])) == 5


def test_end_of_run_figures_are_written(sweep, lt_run):
    pngs = lambda d: sorted(p.name for p in d.glob("*.png"))  # noqa: E731
    assert pngs(lt_run) == ["accuracy_matrix.png", "average_accuracy.png", "per_class_accuracy.png"]
    for job in _jobs(sweep).values():
        assert pngs(job) == ["accuracy_matrix.png", "average_accuracy.png"]  # not long-tailed: no per-class figure
    for p in lt_run.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 2000
    assert len(load_runs(sweep)) == 4
