#!/usr/bin/env bash
# The device check as one prepared call on a lent GPU machine, which has jax, torch and transformers but no
# package registry and lacks some pure-Python packages fairjax needs (diffusers, ml_collections,
# tensorboardX, importlib_metadata).
#
#   bash bench/gpu_sdxl.sh prepare            # here, with the registry: their wheels into .whl/ (ignored)
#   bash bench/gpu_sdxl.sh run [ARGS...]      # there (carry .whl): install them aside, run bench/gpu_sdxl.py
#
# `run` writes $OUT/results.json after every stage, $OUT/log.txt (the unbuffered log) and $OUT/gpu.txt, and
# exits with bench/gpu_sdxl.py's status. ARGS go to bench/gpu_sdxl.py (--budget, --stages, --small, ...).
# PYTHON (default python3) and PY_VERSION (the device's Python for `prepare`, default 3.12) can be set.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=(diffusers==0.42.1 ml_collections==1.1.0 "tensorboardX>=2.6,<3" "importlib_metadata>=6" "zipp>=3.20")

case "${1:-}" in
  prepare)
    rm -rf .whl.tmp && mkdir -p .whl.tmp
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "${PY_VERSION:-3.12}" \
      -d .whl.tmp "${WHEELS[@]}" || { echo "gpu_sdxl.sh: downloading the wheels failed (no registry?)"; exit 1; }
    rm -rf .whl && mv .whl.tmp .whl && ls .whl
    ;;
  run)
    shift
    OUT=${OUT:-/tmp/gpu_sdxl}
    mkdir -p "$OUT"
    if compgen -G ".whl/*.whl" >/dev/null; then
      site=$(mktemp -d /tmp/fairjax-site.XXXXXX)
      "$PYTHON" -m pip install -q --no-index --no-deps --target "$site" .whl/*.whl \
        || { echo "gpu_sdxl.sh: installing .whl/*.whl failed"; exit 1; }
      export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    else
      export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
    (nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi") > "$OUT/gpu.txt" 2>&1
    # unbuffered, and tee rather than a filter: a killed run still leaves its log (and results.json)
    "$PYTHON" -u bench/gpu_sdxl.py --out "$OUT" "$@" 2>&1 | tee "$OUT/log.txt"
    exit "${PIPESTATUS[0]}"
    ;;
  *)
    echo "usage: bash bench/gpu_sdxl.sh prepare | run [bench/gpu_sdxl.py args]"; exit 2
    ;;
esac
