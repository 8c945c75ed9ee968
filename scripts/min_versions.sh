#!/usr/bin/env bash
# Install cl_vit with every requirement it declares at its lower bound, then run the test suite: the proof that
# the minimum versions in setup.cfg are ones the suite works with, and is safe with (the weights_only reads of
# docs/reliability.md depend on torch, Lightning and timm being at least those versions).
#
#   bash scripts/min_versions.sh VENV_DIR [pytest arguments]
#
# VENV_DIR is created if missing (about 5 GB: torch's registry build). uv's `--resolution lowest-direct` takes the
# lowest version each of the package's own requirements allows (install_requires and the extras of .[test]);
# what those require in turn is resolved as usual (--upgrade: an existing VENV_DIR is moved to them too). The
# versions installed are printed before the tests run.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:?usage: bash scripts/min_versions.sh VENV_DIR [pytest arguments]}
shift
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip uv
"$VENV/bin/uv" pip install -q --python "$VENV/bin/python" --upgrade --resolution lowest-direct -e ".[test]"
"$VENV/bin/python" - <<'PYEOF'
import configparser, re
from importlib.metadata import version
cfg = configparser.ConfigParser()
cfg.read("setup.cfg")
names = [re.split(r"[<>=!~ ]", line.split("#")[0].strip())[0]
         for line in cfg["options"]["install_requires"].splitlines() if line.split("#")[0].strip()]
print("installed:", " ".join(f"{n}=={version(n)}" for n in names))
PYEOF
"$VENV/bin/python" -m pytest "$@"
