#!/usr/bin/env bash
# The environment of benchmarks/peers.py: its own venv at benchmarks/.peers-venv with torch,
# diffcircuit (editable, from this checkout) and nnsight, which the project itself does not depend on.
#
#     bash benchmarks/peers-setup.sh
#     benchmarks/.peers-venv/bin/python benchmarks/peers.py
#
# Re-runnable: it does nothing when the venv is already set up for the current pyproject.toml and
# this script. torch is installed first and pinned on every later pip command: a bare `torch`
# requirement (nnsight has one) would otherwise pull a multi-GB CUDA build onto a CPU-only machine.
# Where a GPU is present, override: TORCH_SPEC='torch==<your CUDA build>' bash benchmarks/peers-setup.sh
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=benchmarks/.peers-venv
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
NNSIGHT_SPEC=${NNSIGHT_SPEC:-nnsight==0.8.1}
STAMP=$VENV/.installed
WANT="$TORCH_SPEC $NNSIGHT_SPEC"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ "$STAMP" -nt pyproject.toml ] && [ "$STAMP" -nt "$0" ]; then
    echo "peers-setup: $VENV is up to date ($WANT)"
    exit 0
fi

test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
# 1. torch first, alone (skipped when the pinned version is already there)
"$VENV/bin/python" - "$TORCH_SPEC" <<'EOF' 2>/dev/null || "${PIP[@]}" install "$TORCH_SPEC"
import sys, torch
want = sys.argv[1].split("==", 1)[1]
sys.exit(0 if torch.__version__.split("+")[0] == want else 1)
EOF
# 2. diffcircuit and nnsight, with torch pinned on the same command line so that nothing replaces it
"${PIP[@]}" install -e . "$NNSIGHT_SPEC" "$TORCH_SPEC"
# 3. check
"$VENV/bin/python" - "$TORCH_SPEC" <<'EOF'
import sys
from importlib.metadata import version

import torch
import nnsight  # noqa: F401
import diffcircuit

want = sys.argv[1].split("==", 1)[1]
got = torch.__version__
if got.split("+")[0] != want:
    sys.exit(f"peers-setup: torch is {got}, wanted {want}")
print(f"peers-setup: torch {got}, nnsight {version('nnsight')}, diffusers {version('diffusers')}, "
      f"diffcircuit {diffcircuit.__version__}")
EOF
echo "$WANT" > "$STAMP"
