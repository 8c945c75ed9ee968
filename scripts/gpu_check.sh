#!/usr/bin/env bash
# Every GPU number of docs/scale.md ("GPU") from one command: python -m cl_vit.bench.gpu_check, run from the
# repository root on a machine whose Python has torch, timm, lightning, torchmetrics, tensorboard and OpenCV.
#
#   bash scripts/gpu_check.sh OUT_DIR [--cpu] [--budget SECONDS]
#
# What that Python lacks (avalanche-lib, albumentations, hydra-core and their dependencies) can travel as wheels in
# .whl/ (docs/scale.md says which); where they are missing, the wheels are installed into a folder of their own and put first on PYTHONPATH.
# --cpu checks the script on the CPU with tiny sizes; it measures nothing.
set -euo pipefail
out=${1:?usage: bash scripts/gpu_check.sh OUT_DIR [--cpu] [--budget SECONDS]}
shift
python=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null && ! "$python" -c "import albumentations, avalanche, hydra" 2>/dev/null; then
  site=${TMPDIR:-/tmp}/cl_vit-site
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
  export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
# the checkout's cl_vit, also for the runs the check starts (no install needed)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$out"
set -o pipefail
PYTHONUNBUFFERED=1 "$python" -m cl_vit.bench.gpu_check "$out" "$@" 2>&1 | tee "$out/log.txt"
