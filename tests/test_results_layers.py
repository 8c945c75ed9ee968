"""The run directory in layers (docs/architecture.md): writing files (``rundir``), the results of a stream
(``stream_results``) and reading runs back (``runs``); nothing else changed when results.py was split."""
from __future__ import annotations

import ast
import json

from conftest import REPO_ROOT, compose

from cl_vit.rundir import dumps

GOLDEN = REPO_ROOT / "tests" / "golden" / "results_micro_2exp.json"
#: what depends on the machine and the moment, not on what the run computed
VOLATILE = ("wall_time", "rss_mib", "versions")
#: keys results.json gained after the stored file was written (each with the change that added it)
ADDED_SINCE: tuple[str, ...] = (
    "threads",  # issue 26: the threads and cores the run used (results depend on them)
    "code",  # issue 24: the git commit and whether the tree was dirty
)


def _scrub(doc: dict) -> dict:
    doc = {k: v for k, v in doc.items() if k not in ADDED_SINCE}
    doc.update({k: None for k in VOLATILE})
    doc["cost"]["peak_memory"] = None
    for c in doc["cost"]["per_experience"]:
        c["host_peak_rss_bytes"] = c["time_s"] = None
    return doc


def test_results_json_is_what_it_was_before_the_split(tmp_path):
    from cl_vit.run import run

    run(compose(["model=vit_micro", "trainer.max_epochs=1", "logger=none", "benchmark.n_experiences=2"],
                tmp_path / "data"), tmp_path / "run")
    text = (tmp_path / "run" / "results.json").read_text()
    assert text == dumps(json.loads(text))  # written by the one encoder
    got, want = _scrub(json.loads(text)), json.loads(GOLDEN.read_text())
    assert list(got) == list(want)  # the same keys in the same order
    for key in want:
        assert got[key] == want[key], key


def _imports(path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cl_vit"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if node.module == "cl_vit")
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("cl_vit"))
    return found


def test_the_run_directory_module_imports_only_errors_and_the_loader():
    assert _imports(REPO_ROOT / "cl_vit" / "rundir.py") <= {"cl_vit", "cl_vit.errors", "cl_vit.loading"}
    assert _imports(REPO_ROOT / "cl_vit" / "loading.py") <= {"cl_vit.errors"}


def test_no_old_results_module_and_no_shim():
    assert not (REPO_ROOT / "cl_vit" / "results.py").exists()
    for name in ("checkpoints", "plugins"):
        assert not (REPO_ROOT / "cl_vit" / f"{name}.py").exists()


#: writes of files: only cl_vit/rundir.py does them (atomic, with the umask's mode)
WRITERS = {("json", "dump"), ("torch", "save")}


def _writes(tree):
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else None
        name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
        if (owner, name) in WRITERS or name in ("write_text", "write_bytes"):
            yield node.lineno, f"{owner}.{name}"
        elif name == "open" and owner in (None, "gzip", "io", "os"):
            mode = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"),
                                                                 None)
            if isinstance(mode, ast.Constant) and any(c in str(mode.value) for c in "wax+"):
                yield node.lineno, f"open(..., {mode.value!r})"
            elif mode is not None and not isinstance(mode, ast.Constant):
                yield node.lineno, "open(..., <mode chosen at run time>)"


def test_only_the_run_directory_module_writes_files():
    found = []
    for path in sorted((REPO_ROOT / "cl_vit").rglob("*.py")):
        if path.parent.name == "cl_vit" and path.name in ("rundir.py", "loading.py"):
            continue
        found += [f"{path.relative_to(REPO_ROOT)}:{line} {what}" for line, what in _writes(ast.parse(path.read_text()))]
    assert not found, "write through cl_vit/rundir.py instead:\n" + "\n".join(found)


def test_the_write_walk_finds_writes():
    src = "json.dump(d, f)\ntorch.save(s, p)\nopen(p, 'w')\nopen(p)\np.write_text('x')\ngzip.open(p, 'wb')\n"
    assert [w for _, w in _writes(ast.parse(src))] == ["json.dump", "torch.save", "open(..., 'w')", "p.write_text",
                                                      "open(..., 'wb')"]
