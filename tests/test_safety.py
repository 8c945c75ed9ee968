"""Nothing runs that the user did not ask for (docs/reliability.md, "No code runs from a file").

Each payload below would run if the suite resolved what a file names: a module on ``sys.path`` whose function
writes a marker file. Every test asserts that nothing ran and the user got one line; the trusted variants show that
the same payload does run once the user says ``trust_code=true``, so the refusals are what stops it.
"""
from __future__ import annotations

import ast
import json
import pickle
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO_ROOT, TINY, compose, run_cli

from cl_vit import loading
from cl_vit.loading import CodeFromFile, UnsafeFile


@pytest.fixture
def payload(tmp_path, monkeypatch):
    """``payload_mod.boom(**kwargs)`` writes ``marker`` and raises: what an attacker's target would do."""
    folder = tmp_path / "attacker"
    folder.mkdir()
    marker = tmp_path / "ran"
    (folder / "payload_mod.py").write_text(textwrap.dedent(f"""
        from pathlib import Path

        def boom(*args, **kwargs):
            Path({str(marker)!r}).write_text("ran")
            raise RuntimeError("payload ran")
    """))
    monkeypatch.syspath_prepend(str(folder))
    sys.modules.pop("payload_mod", None)
    return folder, marker


def _teacher_file(root: Path) -> Path:
    path = root / "teacher" / "checkpoints" / "exp_000.pt"
    path.parent.mkdir(parents=True)
    torch.save({"module": {"net.w": torch.zeros(1)}, "input_size": [1, 8, 8], "class_names": ["a", "b"],
                "class_counts": [1, 1], "model": {"_target_": "payload_mod.boom", "argv": ["-c", "1"]}}, path)
    return path


def _one_line(e) -> str:
    text = str(e.value if hasattr(e, "value") else e)
    assert "\n" not in text
    return text


# -- 1, 2: a teacher file, and the teacher kept in a run's own checkpoint -------------------------------------------


def test_a_teacher_whose_model_config_names_code_runs_nothing(tmp_path, payload):
    from cl_vit.models.teachers import load_teacher

    _, marker = payload
    file = _teacher_file(tmp_path)
    for path in (file.parent.parent, file):  # strategy.deit_lt.teacher=<run dir> or =<checkpoint>
        with pytest.raises(CodeFromFile) as e:
            load_teacher(path)
        assert "payload_mod.boom" in _one_line(e) and "trust_code=true" in str(e.value) and str(file) in str(e.value)
        assert not marker.exists()
    with loading.trust_code(True), pytest.raises(Exception):  # the user vouches for the file: it is resolved
        load_teacher(file)
    assert marker.exists()


def test_a_resumed_teacher_state_that_names_code_runs_nothing(payload):
    from cl_vit.models.teachers import Teacher

    _, marker = payload
    state = {"net": {}, "class_names": ["a"], "class_counts": [1], "input_size": [1, 8, 8], "path": "",
             "model": {"name": "vit_micro_patch2_8", "block": {"_target_": "payload_mod.boom"}}}
    with pytest.raises(CodeFromFile) as e:
        Teacher.from_state_dict(state)
    assert "model.block._target_" in _one_line(e)  # found at any depth
    assert not marker.exists()


def test_the_teacher_payload_through_the_command_line_is_one_line(tmp_path, payload):
    folder, marker = payload
    file = _teacher_file(tmp_path)
    proc = run_cli("experiment=deit-lt-digits-lt", f"strategy.deit_lt.teacher={file.parent.parent}", "dry_run=true",
                   f"hydra.run.dir={tmp_path / 'student'}", env={"PYTHONPATH": f"{REPO_ROOT}:{folder}"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "trust_code=true" in lines[0]
    assert not marker.exists()


# -- 3: a data pickle ----------------------------------------------------------------------------------------------


class _System:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        import os

        return (os.system, (self.command,))


def test_a_cifar_pickle_that_would_run_a_command_is_refused_before_it_runs(tmp_path):
    from data_gen import make_cifar

    root = tmp_path / "data"
    make_cifar(root, "cifar10", train_counts=[2] * 10, test_per_class=1)
    marker = tmp_path / "ran"
    batch = root / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(pickle.dumps({b"data": _System(f"touch {marker}"), b"labels": [0]}, protocol=2))
    proc = run_cli("benchmark=cifar10", "dry_run=true", f"hydra.run.dir={tmp_path / 'run'}", data_root=root)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "would construct posix.system" in lines[0] and str(batch) in lines[0], lines
    assert not marker.exists()


def test_data_pickles_admit_arrays_and_plain_values_only(tmp_path):
    doc = {b"data": np.arange(12, dtype=np.uint8).reshape(2, 6), b"labels": [1, 2], "batch_label": "x",
           "f": 1.5, "t": (1, None)}
    for protocol in (2, 4, 5):
        path = tmp_path / f"p{protocol}"
        path.write_bytes(pickle.dumps(doc, protocol=protocol))
        got = loading.load_pickle(path, encoding="latin1")
        assert np.array_equal(got[b"data"], doc[b"data"]) and got[b"labels"] == [1, 2] and got["t"] == (1, None)
    for evil in (_System("true"), {"k": Path("x")}, [type]):
        path = tmp_path / "evil"
        path.write_bytes(pickle.dumps(evil, protocol=2))
        with pytest.raises(UnsafeFile) as e:
            loading.load_pickle(path)
        assert "would construct" in _one_line(e)


# -- 4: a received run directory -----------------------------------------------------------------------------------


def _received_run(tmp_path: Path) -> Path:
    """A run directory whose config.yaml names an attacker's model, with everything restore and resume look at."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(compose(TINY), resolve=True)
    cfg["model"] = {"_target_": "payload_mod.boom", "name": "custom"}
    run_dir = tmp_path / "received"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run_dir / "results.json").write_text(json.dumps({"status": "running", "completed_experiences": 1,
                                                      "n_experiences": 5}))
    torch.save({"module": {}}, run_dir / "checkpoints" / "exp_000.pt")
    return run_dir


def test_restore_of_a_received_run_directory_runs_nothing(tmp_path, payload):
    from cl_vit.runs import load_run

    _, marker = payload
    run = load_run(_received_run(tmp_path))
    with pytest.raises(CodeFromFile) as e:
        run.restore(0)
    assert "model._target_='payload_mod.boom'" in _one_line(e) and "config.yaml" in str(e.value)
    assert not marker.exists()
    with pytest.raises(Exception):
        run.restore(0, trust_code=True)
    assert marker.exists()


def test_resume_of_a_received_run_directory_runs_nothing(tmp_path, payload):
    folder, marker = payload
    run_dir = _received_run(tmp_path)
    proc = run_cli(f"resume={run_dir}", env={"PYTHONPATH": f"{REPO_ROOT}:{folder}"})
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "names code to import" in lines[0] and "trust_code=true" in lines[0], lines
    assert not marker.exists()


# -- even the user's own targets go through Hydra's target policy ---------------------------------------------------


@pytest.mark.parametrize("target", ["os.system", "builtins.eval", "subprocess.run"])
def test_execution_capable_targets_are_refused_even_from_the_command_line(target):
    from cl_vit.errors import UserError

    with pytest.raises(UserError) as e:
        loading.resolve_target("model._target_", target)
    assert "target policy" in _one_line(e)


def test_an_own_target_still_resolves():
    from cl_vit.strategies.base import Strategy

    assert loading.resolve_target("strategy.x._target_", "cl_vit.strategies.finetune.Finetune", Strategy).name


# -- one module loads what could carry code ------------------------------------------------------------------------

#: calls that read code or data that could carry code: allowed in cl_vit/loading.py only
LOADERS = {("torch", "load"), ("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("yaml", "load"),
           ("yaml", "unsafe_load"), ("yaml", "full_load"), ("yaml", "load_all"), ("importlib", "import_module"),
           ("OmegaConf", "load")}
LOADER_NAMES = {"get_object", "get_class", "get_method", "instantiate", "eval", "exec", "__import__",
                "import_module", "_locate"}


#: attribute calls that resolve import paths whatever they are called on (``hydra.utils.instantiate(...)``)
RESOLVERS = {"get_object", "get_class", "get_method", "instantiate", "import_module", "_locate"}


def _calls(tree):
    """(node, (owner, name), name) of every call (owner: the name it is called on, "<expr>" for an expression, None
    for a bare name) and of every ``from X import`` of a loader."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute):
                yield node, (f.value.id if isinstance(f.value, ast.Name) else "<expr>", f.attr), f.attr
            elif isinstance(f, ast.Name):
                yield node, (None, f.id), f.id
        elif isinstance(node, ast.ImportFrom) and node.module in ("pickle", "hydra.utils", "importlib"):
            for a in node.names:
                if a.name in {"load", "loads", "Unpickler", "get_object", "get_class", "get_method", "instantiate",
                              "import_module", "call"}:
                    yield node, (node.module, a.name), a.name


def _forbidden(node, owner, attr) -> bool:
    return (isinstance(node, ast.ImportFrom) or (owner, attr) in LOADERS or (owner is None and attr in LOADER_NAMES)
            or (owner is not None and attr in RESOLVERS))


def test_only_the_loading_module_loads_code_or_pickles():
    found = []
    for path in sorted((REPO_ROOT / "cl_vit").rglob("*.py")):
        if path.name == "loading.py" and path.parent.name == "cl_vit":
            continue
        for node, (owner, attr), name in _calls(ast.parse(path.read_text())):
            if _forbidden(node, owner, attr):
                found.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} {owner}.{attr}")
    assert not found, "load through cl_vit/loading.py instead:\n" + "\n".join(found)


def test_the_walk_finds_a_forbidden_call():
    src = ("import torch, pickle, copy\nfrom hydra.utils import get_object\ntorch.load('x')\npickle.loads(b'')\n"
           "eval('1')\nhydra.utils.instantiate({})\ncopy.deepcopy(net).eval()\nnet.eval()\n")
    hits = sorted(f"{o}.{a}" for node, (o, a), _ in _calls(ast.parse(src)) if _forbidden(node, o, a))
    assert hits == ["<expr>.instantiate", "None.eval", "hydra.utils.get_object", "pickle.loads", "torch.load"]


def _unlimited_image_opens(src: str) -> list[int]:
    """Lines of ``Image.open(...)`` calls without ``formats=`` and of ``ImageFolder(...)`` without ``loader=`` (whose
    default PIL loader opens any format, EPS included)."""
    lines = []
    for node, (owner, attr), _ in _calls(ast.parse(src)):
        kw = {k.arg for k in getattr(node, "keywords", [])}
        if ((owner, attr) == ("Image", "open") and "formats" not in kw) or (attr == "ImageFolder" and "loader" not in kw):
            lines.append(node.lineno)
    return lines


def test_every_pil_open_of_the_suite_leaves_out_eps():
    found = [f"{p.relative_to(REPO_ROOT)}:{n}" for p in sorted((REPO_ROOT / "cl_vit").rglob("*.py"))
             for n in _unlimited_image_opens(p.read_text())]
    assert not found, "open images with Image.open(path, formats=pil_formats()):\n" + "\n".join(found)
    src = "from PIL import Image\nImage.open(p)\nImage.open(p, formats=f)\nImageFolder(r)\nImageFolder(r, loader=l)\n"
    assert _unlimited_image_opens(src) == [2, 4]


# -- 5: the weights file timm's own pretrained load would read -------------------------------------------------------


def _micro(tmp_path: Path, file: Path | None = None, key: str = "pretrained_cfg_overlay", **extra) -> dict:
    return {"name": "vit_micro_patch2_8", "pretrained": True, key: {"file": str(file)}, **extra}


@pytest.mark.parametrize("key", ["pretrained_cfg_overlay", "pretrained_cfg", "checkpoint_path"])
def test_a_pretrained_file_that_would_run_a_command_is_refused_before_timm_reads_it(tmp_path, key):
    from cl_vit.loading import UnsafeCheckpoint
    from cl_vit.models import build_model

    marker = tmp_path / "ran"
    evil = tmp_path / "weights.pth"
    torch.save({"pos_embed": _System(f"touch {marker}")}, evil)
    # timm.create_model's own checkpoint_path (loaded after building, pretrained or not) is checked as well
    cfg = ({"name": "vit_micro_patch2_8", "checkpoint_path": str(evil)} if key == "checkpoint_path"
           else _micro(tmp_path, evil, key))
    with pytest.raises(UnsafeCheckpoint) as e:
        build_model(cfg, num_classes=4, in_chans=1, img_size=8)
    named = "model.checkpoint_path" if key == "checkpoint_path" else f"model.{key}.file"
    assert "posix.system" in _one_line(e) and named in str(e.value)  # the key the file came from
    assert not marker.exists()
    pickle.loads(pickle.dumps(_System(f"touch {marker}")))  # the same payload, unpickled without the check: it runs
    assert marker.exists()


def test_a_pretrained_file_loads_offline_as_its_weights(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from cl_vit.models import build_model, weights_origin

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = build_model({"name": "vit_micro_patch2_8"}, num_classes=4, in_chans=1, img_size=8)
    for suffix in (".pth", ".safetensors"):
        file = tmp_path / f"w{suffix}"
        state = {k: v.contiguous() for k, v in src.state_dict().items()}
        save_file(state, file) if suffix == ".safetensors" else torch.save(state, file)
        net = build_model(_micro(tmp_path, file), num_classes=4, in_chans=1, img_size=8)
        # timm resets a classifier whose size differs from its pretrained_cfg's (10 classes here), the rest is the file's
        assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items() if not k.startswith("head."))
        assert weights_origin(net) == f"checkpoint:{file}"
    with pytest.raises(Exception) as e:
        build_model(_micro(tmp_path, tmp_path / "missing.pth"), num_classes=4, in_chans=1, img_size=8)
    assert "does not exist" in _one_line(e)


def test_resume_of_a_run_directory_whose_model_names_a_pickled_command_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    run_dir = _received_run(tmp_path)
    evil = run_dir / "weights.pth"
    torch.save({"pos_embed": _System(f"touch {marker}")}, evil)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg["model"] = {**compose(TINY).model, "pretrained": True, "pretrained_cfg_overlay": {"file": str(evil)}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = run_cli(f"resume={run_dir}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "posix.system" in lines[0] and "loading it could run code" in lines[0], lines
    assert not marker.exists()


# -- 6: an interpolation in a file's config that makes a _target_ only when the config is used ---------------------

#: a value that is a string when a file is read and a ``_target_`` once OmegaConf resolves it
_MADE_TARGET = "${oc.create:'{_target_: payload_mod.boom, name: custom}'}"


def test_restore_of_a_run_whose_config_makes_a_target_by_interpolation_runs_nothing(tmp_path, payload):
    from cl_vit.runs import load_run

    _, marker = payload
    run_dir = _received_run(tmp_path)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg["model"] = _MADE_TARGET
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(CodeFromFile) as e:
        load_run(run_dir).restore(0)
    assert "interpolation" in _one_line(e) and "model=" in str(e.value) and "trust_code=true" in str(e.value)
    assert not marker.exists()
    with pytest.raises(Exception):  # trusted, the interpolation is resolved and names the payload
        load_run(run_dir).restore(0, trust_code=True)
    assert marker.exists()


def test_resume_of_a_run_whose_config_makes_a_target_once_the_run_has_seeded_runs_nothing(tmp_path, payload):
    """The interpolation reads as no code when config.yaml is checked and as the payload once ``seed_everything`` has
    set PL_GLOBAL_SEED, just before the model is built: a check of the resolved values alone let it through."""
    folder, marker = payload
    run_dir = _received_run(tmp_path)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg["pick"] = {"unset": "{}", str(cfg["seed"]): "{_target_: payload_mod.boom, name: custom}"}
    cfg["model"] = "${oc.create:${pick.${oc.env:PL_GLOBAL_SEED,unset}}}"
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = run_cli(f"resume={run_dir}", env={"PYTHONPATH": f"{REPO_ROOT}:{folder}"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "interpolation" in lines[0] and "trust_code=true" in lines[0], lines
    assert not marker.exists()


def test_an_escaped_interpolation_in_a_file_config_is_refused(tmp_path):
    # resolved once it is the interpolation itself: OmegaConf would resolve that when the config is used
    for value in (_MADE_TARGET, "\\" + _MADE_TARGET, ["a", {"b": "x${oc.env:HOME}"}]):
        with pytest.raises(CodeFromFile) as e:
            loading.check_file_config({"model": {"name": "vit", "k": value}}, "config.yaml")
        assert "interpolation" in _one_line(e)
    loading.check_file_config({"model": {"name": "vit", "k": "$x {y}"}}, "config.yaml")  # no interpolation
    loading.check_file_config({"model": {"k": _MADE_TARGET}}, "config.yaml", trusted=True)


# -- 7: the GCAB probe reads a run directory ------------------------------------------------------------------------


def test_the_gcab_probe_of_a_received_run_directory_runs_nothing(tmp_path, payload, capsys):
    from cl_vit.experiments import gcab_probe

    _, marker = payload
    run_dir = _received_run(tmp_path)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg["strategy"] = {"gcab": {}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(CodeFromFile) as e:
        gcab_probe.probe(run_dir)
    assert "model._target_='payload_mod.boom'" in _one_line(e) and "config.yaml" in str(e.value)
    assert not marker.exists()
    assert gcab_probe.main([str(run_dir)]) == 2 and not marker.exists()
    assert "pass --trust-code" in capsys.readouterr().err
    with pytest.raises(Exception):  # --trust-code: the user's own choice, the target is built
        gcab_probe.probe(run_dir, trust_code=True)
    assert marker.exists()


def test_the_deit_lt_probe_of_a_received_run_directory_runs_nothing(tmp_path, payload, capsys):
    from cl_vit.experiments import deit_lt_probe

    _, marker = payload
    run_dir = _received_run(tmp_path)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg["strategy"] = {"deit_lt": {"teacher": str(tmp_path / "teacher")}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert deit_lt_probe.main([str(run_dir)]) == 2 and not marker.exists()
    err = capsys.readouterr().err
    assert "model._target_='payload_mod.boom'" in err and "pass --trust-code" in err and len(err.splitlines()) == 1


# -- 8: Hydra's --experimental-rerun, which unpickles the file it is given -----------------------------------------


@pytest.mark.parametrize("flag", ["--experimental-rerun", "--exp"])  # argparse takes a prefix too
def test_hydras_rerun_of_a_pickled_config_is_refused_before_it_is_read(tmp_path, flag):
    marker = tmp_path / "ran"
    evil = tmp_path / "config.pickle"
    evil.write_bytes(pickle.dumps(_System(f"touch {marker}")))
    proc = run_cli(flag, str(evil))
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "resume=RUN_DIR" in lines[0], lines
    assert not marker.exists()


# -- 9: an image file that PIL would hand to Ghostscript -----------------------------------------------------------


def test_a_postscript_file_among_the_images_is_not_run(tmp_path, monkeypatch):
    from PIL import EpsImagePlugin

    from cl_vit.data.base import CorruptImage, image_header, read_image_pil
    from cl_vit.data.decode_check import check

    marker = tmp_path / "ran"

    def ghostscript(*args, **kwargs):  # stands in for PIL's call of the gs program (absent on most test machines)
        marker.write_text("ran")
        raise OSError("ghostscript ran")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", "gs")
    image = tmp_path / "n01440764_1.JPEG"  # PIL goes by the content: PostScript, which gs would run
    image.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n/Helvetica findfont 4 scalefont setfont\n"
                     "0 0 moveto (x) show showpage\n%%EOF\n")
    assert image_header(image) is None
    with pytest.raises(CorruptImage):
        read_image_pil(image)
    with open(tmp_path / "stderr", "w+b") as f:
        assert "cannot be decoded by PIL" in check(str(image), f.fileno())
    assert not marker.exists()
