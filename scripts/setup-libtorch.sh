#!/usr/bin/env bash
# Installs PyTorch from PyPI into a virtual environment, for mvlt's LibTorch backend (the `tch`
# cargo feature links the libtorch inside that wheel), and prints the environment to build and run
# with. Idempotent: a second call installs nothing.
#
#   eval "$(scripts/setup-libtorch.sh)"            # PyTorch 2.9.0 into .venv-torch/
#   cargo build --release --features tch
#
# Options: --torch VERSION (default 2.9.0, the version tch 0.22 checks for; another sets
# LIBTORCH_BYPASS_VERSION_CHECK=1), --venv DIR (default .venv-torch in the repository, or
# $MVLT_TORCH_VENV). Only `export ...` lines go to standard output; messages go to standard error.
# The wheel is PyPI's default Linux build (CUDA 12.8 libraries included, about 3 GB installed
# with its NVIDIA dependencies): the same libtorch runs on the CPU and on NVIDIA GPUs.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
torch="2.9.0"
venv="${MVLT_TORCH_VENV:-$root/.venv-torch}"
while [ $# -gt 0 ]; do
    case "$1" in
        --torch) torch="${2:?--torch needs a version}"; shift 2 ;;
        --venv) venv="${2:?--venv needs a folder}"; shift 2 ;;
        -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 0 ;;
        *) echo "setup-libtorch: unknown argument '$1' (--torch VERSION, --venv DIR)" >&2; exit 2 ;;
    esac
done
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    command -v "$python" >/dev/null || { echo "setup-libtorch: $python not found (set PYTHON)" >&2; exit 1; }
    echo "setup-libtorch: creating the virtual environment $venv" >&2
    "$python" -m venv "$venv" >&2
fi
# safetensors (and numpy, which torch warns without): the PyTorch side of `mvlt bench
# --compare-pytorch` reads the reference fixtures.
installed="$("$venv/bin/python" -c 'import numpy, safetensors, torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)"
if [ "$installed" = "$torch" ]; then
    echo "setup-libtorch: torch $torch is already in $venv" >&2
else
    echo "setup-libtorch: installing torch==$torch into $venv (about 3 GB from PyPI; once)" >&2
    "$venv/bin/python" -m pip install --disable-pip-version-check --progress-bar off -q "torch==$torch" safetensors numpy >&2
fi
lib="$("$venv/bin/python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
[ -f "$lib/libtorch_cpu.so" ] || { echo "setup-libtorch: no libtorch_cpu.so in $lib" >&2; exit 1; }

# torch-sys (under burn-tch) asks `python` for the libtorch paths when VIRTUAL_ENV is set, and the
# binary finds libtorch at run time through LD_LIBRARY_PATH.
printf 'export VIRTUAL_ENV=%q\n' "$venv"
printf 'export PATH=%q:"$PATH"\n' "$venv/bin"
printf 'export LIBTORCH_USE_PYTORCH=1\n'
printf 'export LD_LIBRARY_PATH=%q"${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"\n' "$lib"
if [ "$torch" != "2.9.0" ]; then
    printf 'export LIBTORCH_BYPASS_VERSION_CHECK=1\n'
fi
echo "setup-libtorch: ready; now: cargo build --release --features tch" >&2
