"""The package's one-way data line, and extension by file or by ``_target_`` (docs/architecture.md)."""
from __future__ import annotations

import ast
import json
import re
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, TINY, TINY_ANY_MODEL, compose, run_cli

#: the layers of docs/architecture.md, lowest first: a module may import from its own layer and the ones below.
#: The package root (cl_vit/__init__.py) stands outside them: it only registers the backbones with timm on import.
ROOT = "cl_vit"
LAYERS = [
    ("core", ["cl_vit.errors", "cl_vit.loading", "cl_vit.rundir", "cl_vit.hardware", "cl_vit.distributed",
              "cl_vit.cost", "cl_vit.metrics", "cl_vit.stream_results", "cl_vit.optim"]),
    ("data and models", ["cl_vit.data", "cl_vit.models"]),
    ("learning", ["cl_vit.streams", "cl_vit.strategies", "cl_vit.module", "cl_vit.ema"]),
    ("assembly", ["cl_vit.builder", "cl_vit.config"]),
    ("loop and results", ["cl_vit.runner", "cl_vit.runs", "cl_vit.loggers", "cl_vit.plots", "cl_vit.epoch_eval"]),
    ("entry points", ["cl_vit.run", "cl_vit.report", "cl_vit.bench", "cl_vit.experiments"]),
]


def layer_of(module: str) -> int | None:
    """The layer of the longest prefix that names ``module`` or a package above it."""
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > len(best[1])):
                best = (i, p)
    return None if best is None else best[0]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports_of(source: str, module: str, is_package: bool, known: set[str]) -> set[str]:
    """Every cl_vit module that ``module`` imports, at the top or inside functions (not under TYPE_CHECKING)."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for c in child.orelse:
                    visit_one(c)
                continue
            visit_one(child)

    def visit_one(child):
        if isinstance(child, ast.Import):
            found.update(a.name for a in child.names)
        elif isinstance(child, ast.ImportFrom):
            base = child.module or ""
            if child.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (child.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in child.names if f"{base}.{a.name}" in known)
        visit(child)

    visit(ast.parse(source))
    return {m for m in found if m.startswith(ROOT + ".")}


def import_graph() -> dict[str, set[str]]:
    files = sorted((REPO_ROOT / "cl_vit").rglob("*.py"))
    known = {_module_name(f) for f in files}
    return {_module_name(f): imports_of(f.read_text(), _module_name(f), f.name == "__init__.py", known)
            for f in files if _module_name(f) != ROOT}


def violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for mod, deps in sorted(graph.items()):
        lm = layer_of(mod)
        for dep in sorted(deps):
            ld = layer_of(dep)
            if ld is not None and lm is not None and ld > lm:
                out.append(f"{mod} ({LAYERS[lm][0]}) imports {dep} ({LAYERS[ld][0]})")
    return out


def test_no_module_imports_from_a_layer_above_its_own():
    graph = import_graph()
    unplaced = sorted(m for m in graph if layer_of(m) is None)
    assert not unplaced, f"place these modules in a layer (tests/test_architecture.py, docs/architecture.md): {unplaced}"
    assert violations(graph) == []
    # only the entry points reach the command line and the report
    top = len(LAYERS) - 1
    for mod, deps in graph.items():
        if layer_of(mod) != top:
            assert not deps & {"cl_vit.run", "cl_vit.report"}, mod


def test_the_import_walk_sees_what_a_module_imports():
    # the checker itself: relative, function-level and from-package imports are found; TYPE_CHECKING ones are not
    src = textwrap.dedent("""
        from typing import TYPE_CHECKING
        from . import streams
        if TYPE_CHECKING:
            from cl_vit.run import run
        def f():
            from cl_vit.report import main
    """)
    known = {"cl_vit.streams", "cl_vit.run", "cl_vit.report", "cl_vit.data.base"}
    deps = imports_of(src, "cl_vit.data.base", False, known)
    assert deps == {"cl_vit.data", "cl_vit.report"}
    deps = imports_of("from .. import streams", "cl_vit.data.base", False, known)
    assert deps == {"cl_vit.streams"}
    assert violations({"cl_vit.data.base": {"cl_vit.report", "cl_vit.errors"}}) == [
        "cl_vit.data.base (data and models) imports cl_vit.report (entry points)"]


def test_results_restore_builds_without_the_command_line():
    src = (REPO_ROOT / "cl_vit" / "runs.py").read_text()
    assert "cl_vit.builder" in src and not re.search(r"cl_vit\.run(?![a-z_])", src)


PLUGIN = '''
import torch
import torch.nn as nn

from cl_vit.data.synthetic import build_synthetic
from cl_vit.strategies import Strategy


class Counter(Strategy):
    """Counts its experiences and adds a (zero) loss term, so the run shows it took part."""

    def __init__(self, weight: float = 0.0):
        self.weight = weight
        self.seen = 0

    def training_loss(self, module, batch, outputs):
        return {"counter": self.weight * outputs["logits"].float().pow(2).mean()}

    def after_experience(self, module, experience):
        self.seen += 1

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = int(state.get("seen", 0))


class TinyNet(nn.Module):
    """The part of timm's model interface the suite calls."""

    def __init__(self, num_classes, in_chans=3, img_size=16, width=8):
        super().__init__()
        self.num_classes, self.num_features = num_classes, width
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_chans * img_size * img_size, width), nn.ReLU())
        self.head = nn.Linear(width, num_classes)

    def forward_features(self, x):
        return self.body(x)

    def forward_head(self, x, pre_logits=False):
        return x if pre_logits else self.head(x)

    def get_classifier(self):
        return self.head

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def six_classes(data_root, **_):  # the benchmark's own source_args are offered too; this source ignores them
    return build_synthetic(data_root, n_classes=6, n_train=12, n_test=4, size=16)
'''


@pytest.fixture
def plugin_dir(tmp_path):
    d = tmp_path / "plug"
    d.mkdir()
    (d / "myplug.py").write_text(PLUGIN)
    return d


def test_a_strategy_model_and_source_outside_the_package_run_from_the_command_line(tmp_path, plugin_dir):
    out = tmp_path / "run"
    proc = run_cli(
        "benchmark=synthetic", "benchmark.n_experiences=3", "+benchmark.source_args._target_=myplug.six_classes",
        "model=custom", "model._target_=myplug.TinyNet", "~model.patch_size",
        "+model.width=4", "strategy=finetune",
        "+strategy.counter._target_=myplug.Counter", "+strategy.counter.weight=0.5",
        *TINY_ANY_MODEL, f"hydra.run.dir={out}", data_root=tmp_path / "data", env={"PYTHONPATH": f"{REPO_ROOT}:{plugin_dir}"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((out / "results.json").read_text())
    assert doc["strategy"] == ["finetune", "counter"]
    assert len(doc["class_order"]) == 6 and len(doc["experiences"]) == 3
    state = torch.load(out / "checkpoints" / "exp_002.pt", map_location="cpu", weights_only=True)
    assert state["strategies"]["counter"] == {"seen": 3}
    assert state["module"]["net.head.weight"].shape == (6, 4)  # the model from model._target_, its width=4


def test_a_target_that_does_not_import_fails_in_one_line(tmp_path, plugin_dir):
    proc = run_cli("+strategy.mine._target_=myplug.Nope", *TINY, f"hydra.run.dir={tmp_path / 'run'}",
                   data_root=tmp_path / "data", env={"PYTHONPATH": f"{REPO_ROOT}:{plugin_dir}"})
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "strategy.mine._target_='myplug.Nope' cannot be imported" in lines[0]


def test_a_target_must_be_a_strategy(plugin_dir, monkeypatch):
    from cl_vit.errors import UserError
    from cl_vit.strategies import build_strategies

    monkeypatch.syspath_prepend(str(plugin_dir))
    with pytest.raises(UserError, match="not a cl_vit.strategies.base.Strategy subclass"):
        build_strategies({"x": {"_target_": "myplug.TinyNet"}})
    (s,) = build_strategies({"x": {"_target_": "myplug.Counter", "weight": 2.0}})
    assert s.name == "x" and s.weight == 2.0


def test_every_strategy_config_selects_registered_classes():
    from cl_vit.strategies import STRATEGIES

    for path in sorted((REPO_ROOT / "configs" / "strategy").glob("*.yaml")):
        cfg = compose([f"strategy={path.stem}"])
        assert cfg.strategy and set(cfg.strategy) <= set(STRATEGIES), path.name
