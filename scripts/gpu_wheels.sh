#!/usr/bin/env bash
# The wheels the GPU machine's Python lacks, for scripts/gpu_check.sh: run here (where PyPI is reachable), then carry
# the folder with the device tool (carry: [".whl"]); gpu_check.sh installs them into a folder of their own there.
#
#   bash scripts/gpu_wheels.sh [DIR]          # default .whl (keep it out of git: .git/info/exclude)
#
# The device image is Python 3.12 with torch, torchvision, timm, lightning, torchmetrics, tensorboard, OpenCV, numpy,
# scipy, scikit-learn, matplotlib, pandas, requests, tqdm and pillow (the tool library's device KINDS.md). What the
# suite imports beyond that, found by running `bash scripts/gpu_check.sh OUT --cpu` in a Python 3.12 venv holding only
# those packages, adding each missing module's wheel until every section passed (2026-12-06): hydra and its parser,
# albumentations and its pydantic, Avalanche and what it imports at import time. Versions: the ones the suite is
# tested with here. Two of them (antlr4 4.9.3, which omegaconf pins, and GPUtil) exist only as source archives and
# are built into pure-Python wheels here. About 33 MB in all (the device tool carries at most 64 MiB).
set -euo pipefail
dir=${1:-.whl}
python=${PYTHON:-python3}
mkdir -p "$dir"
binary=(hydra-core==1.3.8 omegaconf==2.3.1 albumentations==2.0.8 albucore==0.0.24 pydantic==2.14.4
        pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 simsimd==6.5.16 stringzilla==5.3.2
        avalanche-lib==0.6.0 dill==0.4.1 gdown==6.5.1 beautifulsoup4==4.15.0 soupsieve==4.1.4 pytorchcv==0.0.74
        wandb==0.31.0 qpsolvers==4.13.0 timm==1.0.31)
source_only=(antlr4-python3-runtime==4.9.3 gputil==1.4.0)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$dir" "${binary[@]}"
"$python" -m pip wheel -q --no-deps -w "$dir" "${source_only[@]}"
n=$(find "$dir" -type f -name '*.whl' | wc -l)
echo "$n wheels in $dir ($(du -sh "$dir" | cut -f1)); carry it with the device tool and run: bash scripts/gpu_check.sh \$OUT"
