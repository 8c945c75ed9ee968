"""Every command in README.md and docs/ names configs that exist, and every page the README links to is there."""
from __future__ import annotations

import fnmatch
import re
import shlex

import pytest
from conftest import REPO_ROOT

from cl_vit.config import CONFIG_GROUPS, check_group_choices
from cl_vit.errors import UserError

PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]


def code_lines(text: str) -> list[str]:
    """Lines of fenced and indented code blocks, continuation lines (trailing backslash) joined."""
    out, fenced, buf = [], False, ""
    for line in text.splitlines():
        if line.strip().startswith("```"):
            fenced = not fenced
            continue
        if fenced or line.startswith("    "):
            buf += line.strip()
            if buf.endswith("\\"):
                buf = buf[:-1] + " "
                continue
            out.append(buf)
        buf = ""
    return out


def run_commands(text: str) -> list[list[str]]:
    """The overrides of each ``python -m cl_vit.run ...`` in the code blocks (comments dropped), with the shell
    variables that the blocks set (``E=closer-look-digits`` then ``experiment=$E/l2``) substituted."""
    cmds, env = [], {}
    for line in code_lines(text):
        assign = re.fullmatch(r"([A-Za-z_]\w*)=(\S+)", line.strip())
        if assign:
            env[assign.group(1)] = assign.group(2)
            continue
        line = re.sub(r"\$\{?([A-Za-z_]\w*)\}?", lambda m: env.get(m.group(1), m.group(0)), line)
        for m in re.finditer(r"python -m cl_vit\.run\b([^#;&|]*)", line):
            cmds.append(shlex.split(m.group(1)))
    return cmds


def group_args(args: list[str]) -> list[str]:
    """Config-group choices of a command, a sweep (``a,b``) split into one choice per value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    out = []
    for a in args:
        if "=" not in a or a.startswith("-") or a.split("=", 1)[0].lstrip("+~") not in CONFIG_GROUPS:
            continue
        o = parser.parse_override(a)
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [a.split("=", 1)[1]]
        out += [f"{o.key_or_group}={v}" for v in values]
    return out


def test_the_command_parser_finds_commands_and_their_choices():
    text = "    python -m cl_vit.run -m strategy=finetune,ftpp seed=0,1 benchmark=x \\\n        model=y  # c\n"
    (cmd,) = run_commands(text)
    assert cmd == ["-m", "strategy=finetune,ftpp", "seed=0,1", "benchmark=x", "model=y"]
    assert group_args(cmd) == ["strategy=finetune", "strategy=ftpp", "benchmark=x", "model=y"]
    (cmd,) = run_commands("    E=closer-look-digits\n    python -m cl_vit.run -m experiment=$E/l2,$E/ewc\n")
    assert group_args(cmd) == ["experiment=closer-look-digits/l2", "experiment=closer-look-digits/ewc"]
    with pytest.raises(UserError, match="benchmark"):
        check_group_choices(["benchmark=x"])


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_documented_command_names_configs_that_exist(page):
    for cmd in run_commands(page.read_text()):
        for choice in group_args(cmd):
            try:
                check_group_choices([choice])
            except UserError as e:
                pytest.fail(f"{page.name}: `python -m cl_vit.run {' '.join(cmd)}`: {e}")


def test_the_readme_links_only_to_pages_that_exist():
    text = (REPO_ROOT / "README.md").read_text()
    links = re.findall(r"\]\(((?:docs|notebooks|configs|tasks)/[^)#]+)", text)
    assert any(link.startswith("docs/") for link in links)
    missing = [link for link in links if not (REPO_ROOT / link).exists()]
    assert not missing, missing


def test_the_docs_pages_mirror_the_package():
    names = {p.stem for p in (REPO_ROOT / "docs").glob("*.md")}
    assert {"benchmarks", "models", "strategies", "recipes", "results", "scale", "reliability",
            "architecture"} <= names


def test_every_config_option_is_named_in_the_docs():
    """Nothing is lost: each configs/<group>/<option>.yaml is named somewhere in the README or docs/ (a brace
    pattern such as ``deit-lt-*`` or ``{a,b}-x`` counts for the options it covers)."""
    text = "\n".join(p.read_text() for p in PAGES)
    names = set(re.findall(r"`([^`\s]+)`", text))
    patterns = set()
    for n in names:
        for alt in _expand(n):
            patterns.add(alt)
    missing = []
    for group in ("benchmark", "model", "strategy", "trainer", "logger", "experiment"):
        for path in sorted((REPO_ROOT / "configs" / group).rglob("*.yaml")):
            option = path.relative_to(REPO_ROOT / "configs" / group).with_suffix("").as_posix()
            if not any(fnmatch.fnmatchcase(option, p) for p in patterns):
                missing.append(f"{group}={option}")
    assert not missing, f"config options no page names: {missing}"


def _expand(name: str) -> list[str]:
    """``{a,b}-x`` -> [``a-x``, ``b-x``], recursively; ``group=option`` -> ``option``."""
    name = name.split("=", 1)[-1]
    m = re.search(r"\{([^{}]*)\}", name)
    if not m:
        return [name]
    return [e for alt in m.group(1).split(",") for e in _expand(name[:m.start()] + alt + name[m.end():])]
