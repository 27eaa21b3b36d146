#!/usr/bin/env bash
# The GPU checks of issue 16, as one short script for a lent device machine (no CUDA path has run yet).
#
# The device image has torch, pandas, scipy, statsmodels, matplotlib, scikit-image, typer, rich, pyarrow,
# safetensors and pytest, but not diffusers: carry it, and the versions this project is tested with of
# huggingface_hub and importlib_metadata, as wheels. Once, here, in the repository's root:
#
#     echo /.whl/ >> .git/info/exclude
#     .venv/bin/python -m pip download --no-deps --only-binary=:all: -d .whl \
#         "diffusers==$(.venv/bin/python -c 'import diffusers; print(diffusers.__version__)')" \
#         "huggingface_hub==$(.venv/bin/python -c 'import huggingface_hub as h; print(h.__version__)')" \
#         "importlib_metadata==$(.venv/bin/python -c 'import importlib_metadata as m; print(m.version("importlib_metadata"))')"
#
# Then one device call (carry [".whl"], timeout_s 600), whose output and $OUT/gpu_checks.log come back:
#
#     bash benchmarks/gpu_checks.sh
#
# Each step has its own time limit, so that the whole call ends inside nine minutes whatever hangs; a step
# that runs out prints "TIMEOUT" and the next one starts. Read the figures off the log: pytest's line,
# capture_overhead_ratio in fp32 and bf16 (issue 16: bar 1.15, aim 1.10), the paper-scale throughputs
# and projected_full_protocol_minutes (fp32 and bf16), and the default run's wall time on the GPU (its
# cost per stage is in $OUT/run_manifest.json).
set -uo pipefail

cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-checks}
mkdir -p "$OUT"
LOG=$OUT/gpu_checks.log
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}  # the device image's python3 holds torch

step() {  # step SECONDS NAME COMMAND...: run COMMAND with a time limit, its output into the log
    local limit=$1 name=$2
    shift 2
    echo "=== $name (limit ${limit} s)" | tee -a "$LOG"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 124 ] && echo "TIMEOUT" | tee -a "$LOG"
    echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$LOG"
}

if [ -d .whl ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}

step 45 environment "$PYTHON" -c "
import torch, diffusers, diffcircuit
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')
print('diffusers', diffusers.__version__, 'diffcircuit', diffcircuit.__version__)
"
step 150 "pytest -m gpu" "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider tests
step 40 "capture overhead, fp32" "$PYTHON" benchmarks/capture_overhead.py --device cuda
step 40 "capture overhead, bf16" "$PYTHON" benchmarks/capture_overhead.py --device cuda --precision bf16
step 100 "paper scale, fp32, 400 images" "$PYTHON" benchmarks/paper_scale.py --device cuda --n 400
step 80 "paper scale, bf16, 400 images" "$PYTHON" benchmarks/paper_scale.py --device cuda --n 400 \
    --precision bf16
rm -rf /tmp/gpu-run
step 100 "default run on the GPU" "$PYTHON" -m diffcircuit.cli run --out /tmp/gpu-run --device cuda --quiet
cp /tmp/gpu-run/manifest.json "$OUT/run_manifest.json" 2>/dev/null  # its cost per stage
echo "log: $LOG"
