#!/usr/bin/env bash
# The test command README.md gives: installs what the tests need (NVRTC and the
# CUDA headers from PyPI into ./.cuda), then runs the whole workspace's tests.
# Works on a fresh machine with no GPU; GPU-only tests say that they skip.
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
