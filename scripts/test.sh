#!/usr/bin/env bash
# The test command README.md gives: installs what the tests need (NVRTC and the
# CUDA headers from PyPI into ./.cuda; PyTorch, maturin and pytest from PyPI
# into ./.venv-py), then runs the whole workspace's tests and the Python
# package's. Works on a fresh machine with no GPU; GPU-only tests say that
# they skip. MIXC_PY_ENV names another virtual environment to use.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-cuda.sh .cuda
CUDA_DIR="$PWD/.cuda/nvidia/cu13"
# NVRTC dlopens libnvrtc-builtins by name, so the loader must see this folder
# from process start (setting it from inside a running process does not work).
export LD_LIBRARY_PATH="$CUDA_DIR/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export MIXC_CUDA_DIR="$CUDA_DIR"

cargo test --workspace --all-targets "$@"
# Doc tests (not covered by --all-targets).
cargo test --workspace --doc "$@"

# The Python package (python/): built into a virtual environment with
# PyTorch from PyPI, then its tests (CPU tensors).
PY_ENV="${MIXC_PY_ENV:-$PWD/.venv-py}"
if [ ! -x "$PY_ENV/bin/python" ]; then
    python3 -m venv "$PY_ENV"
fi
"$PY_ENV/bin/python" -m pip install -q --disable-pip-version-check "torch>=2.4" numpy "maturin>=1.5,<2" pytest transformers
# No build isolation: maturin from the environment; the dev profile, so cargo
# reuses what the tests above compiled in target/.
PATH="$PY_ENV/bin:$PATH" MATURIN_PEP517_ARGS="--profile dev" "$PY_ENV/bin/python" -m pip install \
    -q --disable-pip-version-check --no-build-isolation ./python
"$PY_ENV/bin/python" -m pytest -q python/tests
