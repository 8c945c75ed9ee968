"""Every strategy with its recommended setting on a stream, against fine-tuning (docs/recipes.md, "Every strategy on
the default stream").

    python -m cl_vit.experiments.strategy_table                        # split-digits, every strategy, seeds 0-2
    python -m cl_vit.experiments.strategy_table --strategies finetune l2 gcab --seeds 0 --out outputs/t trainer.max_epochs=1

Each strategy runs with nothing but ``strategy=<name>`` and the seed (plus the overrides given here, for every
strategy alike), through the suite's own multirun (``python -m cl_vit.run -m``), one run directory per strategy and
seed: ``<out>/<strategy>/seed<k>``. A run directory that already holds a completed run is read, not trained again, so
an interrupted table continues where it stopped. The table, also written to ``<out>/strategy_table.md``: per
strategy, its setting (the strategy's arguments, and whatever else of the config differs from the fine-tuning run:
loss, epochs, batch), A_N mean ± sample std over the seeds, fine-tuning's beside it and the difference; the same
as a figure, ``<out>/strategy_table.png`` (a bar per strategy, its seeds as dots, fine-tuning's spread as a band).
``python -m cl_vit.report <out>`` reads the same runs with every column.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from cl_vit.errors import UserError, report_error

#: the strategies that apply to a class-incremental stream; deit_lt and ldam_drw are long-tailed recipes (a teacher,
#: a DRW schedule), cos_reg, mixup and token_label are training aids that compose with a method
STRATEGIES = ("finetune", "ftpp", "l2", "ewc", "lwf", "featkd", "gcab", "simplecil", "ranpac", "slca", "l2p",
              "dualprompt", "coda_prompt", "aper", "ease", "inflora", "sdlora", "replay", "er", "derpp", "icarl",
              "dytox", "joint")
BASELINE = "finetune"
#: config keys that never describe a setting in the table (where and how it ran, and the strategies' own block)
_NOT_SETTING = ("strategy.", "benchmark.strategy_args.", "split")
_REPO = str(Path(__file__).resolve().parents[2]) + os.sep


def run_dir(out: Path, strategy: str, seed: int) -> Path:
    return out / strategy / f"seed{seed}"


def completed(path: Path) -> bool:
    try:
        return json.loads((path / "results.json").read_text()).get("status") == "completed"
    except (OSError, ValueError):
        return False


def _a_n(path: Path) -> str:
    try:
        doc = json.loads((path / "results.json").read_text())
        return f"A_N {100 * doc['metrics']['final_average_accuracy']:.2f}" if doc.get("status") == "completed" \
            else f"status {doc.get('status')}"
    except (OSError, ValueError, KeyError, TypeError):
        return "no results"


def changed_since(path: Path, overrides: list[str]) -> tuple[str, object, object] | None:
    """The first config key whose value in the finished run at ``path`` differs from what the same command composes
    today (a default changed since: the run no longer shows it), as (key, then, now); None when they agree."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import cl_vit.run  # noqa: F401  (registers the config resolvers)
    from cl_vit.config import CONFIG_DIR
    from cl_vit.runs import Run, load_run

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        config = OmegaConf.to_container(compose(config_name="config", overrides=overrides), resolve=True)
    # what the run computed, as the report compares runs (cl_vit.runs.Run.setting), the data split aside
    now = Run(path=path, config=config, results={}, stream=None).setting()
    then = {k: v for k, v in load_run(path).setting().items() if k != "split"}
    for key in sorted(set(now) | set(then)):
        if now.get(key) != then.get(key):
            return key, then.get(key), now.get(key)
    return None


def launch(out: Path, strategies: list[str], seeds: list[int], overrides: list[str], done: int = 0,
           total: int | None = None) -> int:
    """One multirun over ``strategies`` x ``seeds``; prints a line per job as it ends (``[k/total]``, counting from
    ``done``, with its A_N), the sweep's console goes to ``<out>/multirun.log``. Returns the exit status."""
    cmd = [sys.executable, "-m", "cl_vit.run", "-m", f"strategy={','.join(strategies)}",
           f"seed={','.join(map(str, seeds))}", "logger=none", *overrides, f"hydra.sweep.dir={out}",
           "hydra.sweep.subdir=${hydra:runtime.choices.strategy}/seed${seed}"]
    from cl_vit.rundir import open_partial

    out.mkdir(parents=True, exist_ok=True)
    job, start = None, time.time()

    def finished():
        if job is not None:
            print(f"[{done}/{total or '?'}] strategy={job[0]} seed={job[1]}: {_a_n(run_dir(out, *job))} "
                  f"({time.time() - start:.0f} s)", flush=True)

    with open_partial(out / "multirun.log", append=True) as log:  # the sweeps' console, beside their runs
        log.write(f"$ {' '.join(cmd)}\n".encode())
        log.flush()
        # the runs import this cl_vit, wherever the command was started
        path = os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                env={**os.environ, "PYTHONPATH": path.rstrip(os.pathsep)})
        for line in proc.stdout:
            log.write(line.encode())
            if "[HYDRA]" in line and "\t#" in line:  # "[HYDRA] 	#3 : strategy=l2 seed=0 logger=none ..."
                finished()
                values = dict(o.split("=", 1) for o in line.split(" : ", 1)[1].split()[:2])
                job, start, done = (values["strategy"], int(values["seed"])), time.time(), done + 1
        rc = proc.wait()
        finished()
        return rc


def _compact(v) -> str:
    if isinstance(v, list):
        items = [_compact(x) for x in v]
        return "[" + (", ".join(items) if len(items) <= 3 else f"{items[0]}, ..., {items[-1]}") + "]"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, str) and v.startswith(_REPO):  # a file the repository ships (weights/...): where it is in it
        return v[len(_REPO):]
    return str(v)


def setting_text(run, baseline) -> str:
    """The strategy's arguments, then the config keys whose values differ from the baseline run's."""
    parts = [f"{k}={_compact(v)}" for name, args in (run.config.get("strategy") or {}).items()
             for k, v in (args or {}).items()]
    mine = run.setting()
    base = baseline.setting() if baseline is not None else mine
    parts += [f"{k}={_compact(mine.get(k))}" for k in sorted(set(mine) | set(base))
              if not k.startswith(_NOT_SETTING) and mine.get(k) != base.get(k)]
    return ", ".join(parts) or "—"


def _mean_std(values: list[float]) -> str:
    import numpy as np

    if not values:
        return "—"
    v = 100 * np.asarray(values)
    return f"{v.mean():.2f}" + (f" ± {v.std(ddof=1):.2f}" if v.size > 1 else "")


def table(out: Path, strategies: list[str], seeds: list[int]) -> tuple[str, list[dict]]:
    """The Markdown table and its rows (strategy, setting, per-seed A_N) from the run directories under ``out``."""
    from cl_vit.runs import load_run

    def runs_of(name):
        return [load_run(p) for s in seeds if completed(p := run_dir(out, name, s))]

    base_runs = runs_of(BASELINE)
    base = [r.metrics["final_average_accuracy"] for r in base_runs]
    rows = []
    for name in strategies:
        runs = runs_of(name)
        a_n = [r.metrics["final_average_accuracy"] for r in runs]
        rows.append({"strategy": name, "seeds": [r.seed for r in runs], "A_N": a_n,
                     "setting": setting_text(runs[0], base_runs[0] if base_runs else None) if runs else "—",
                     "paths": [str(r.path) for r in runs]})
    lines = [f"| strategy | setting | A_N | fine-tuning A_N | difference | seeds |",
             "| --- | --- | ---: | ---: | ---: | --- |"]
    for r in rows:
        diff = (f"{100 * (sum(r['A_N']) / len(r['A_N']) - sum(base) / len(base)):+.2f}"
                if r["A_N"] and base and r["strategy"] != BASELINE else "—")
        seeds_done = ",".join(map(str, r["seeds"])) or "none completed"
        lines.append(f"| {r['strategy']} | {r['setting'].replace('|', '/')} | {_mean_std(r['A_N'])} | "
                     f"{_mean_std(base)} | {diff} | {seeds_done} |")
    legend = ("A_N (final average accuracy) in %, mean ± sample standard deviation over the seeds; setting: the "
              "strategy's arguments, then what else differs from the fine-tuning run's config.")
    return "\n".join(lines) + "\n\n" + legend + "\n", rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cl_vit.experiments.strategy_table",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), metavar="NAME",
                        help=f"default: {' '.join(STRATEGIES)} (fine-tuning always runs: every row compares to it)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("outputs/strategy-table"))
    parser.add_argument("overrides", nargs="*",
                        help="overrides for every run, e.g. benchmark=split-fmnist or trainer.max_epochs=1")
    args = parser.parse_args(argv)
    strategies = list(dict.fromkeys([BASELINE, *args.strategies]))
    try:
        from cl_vit.config import check_group_choices, check_override_keys

        check_group_choices([f"strategy={','.join(strategies)}", *args.overrides])
        check_override_keys(args.overrides)
        clash = [o for o in args.overrides if o.split("=", 1)[0].lstrip("+~") in ("strategy", "seed")]
        if clash:
            raise UserError(f"{clash[0]!r}: the table chooses strategy and seed itself; use --strategies and --seeds")
    except UserError as e:
        return report_error(e)
    out = args.out.expanduser().resolve()
    todo = {name: [s for s in args.seeds if not completed(run_dir(out, name, s))] for name in strategies}
    try:
        for name in strategies:
            for seed in sorted(set(args.seeds) - set(todo[name])):
                path = run_dir(out, name, seed)
                diff = changed_since(path, [f"strategy={name}", f"seed={seed}", "logger=none", *args.overrides])
                if diff:
                    raise UserError(f"{path} ran with {diff[0]}={diff[1]!r}, today's setting is {diff[2]!r}: remove it "
                                    "(or give another --out) to train it again with today's defaults")
    except UserError as e:
        return report_error(e)
    batches: dict[tuple, list[str]] = {}
    for name, seeds in todo.items():
        if seeds:
            batches.setdefault(tuple(seeds), []).append(name)
    n_runs = sum(map(len, todo.values()))
    print(f"{n_runs} run{'s' * (n_runs != 1)} to train, {len(strategies) * len(args.seeds) - n_runs} found done "
          f"under {out}", flush=True)
    status, started = 0, 0
    for seeds, names in batches.items():
        start = time.time()
        rc = launch(out, names, list(seeds), args.overrides, started, n_runs)
        started += len(names) * len(seeds)
        print(f"  {', '.join(names)} x seeds {','.join(map(str, seeds))}: "
              f"{'done' if rc == 0 else f'exit {rc}, see {out}/multirun.log'} in {time.time() - start:.0f} s",
              flush=True)
        status = status or rc
    text, rows = table(out, strategies, args.seeds)
    from cl_vit.rundir import atomic_write_text

    command = " ".join(["python -m cl_vit.experiments.strategy_table", *(argv if argv is not None else sys.argv[1:])])
    atomic_write_text(out / "strategy_table.md", f"    {command}\n\n{text}")
    print(text)
    import matplotlib.pyplot as plt

    from cl_vit.plots import save_png, strategy_table_figure

    base = next((r["A_N"] for r in rows if r["strategy"] == BASELINE), [])
    fig = strategy_table_figure(rows, base)
    print(f"figure: {save_png(fig, out / 'strategy_table.png')}")
    plt.close(fig)
    return status


if __name__ == "__main__":
    sys.exit(main())
