#!/usr/bin/env bash
# Installs NVRTC and the CUDA headers (for cuda_fp16.h / cuda_bf16.h) from PyPI
# into DIR (default: .cuda at the repo root). No GPU or system CUDA needed.
# Idempotent: does nothing when the pinned versions are already there.
# Prints the lib and include folders; point MIXC_CUDA_DIR at DIR (or at the
# printed nvidia/cu13 folder) if DIR is not the default.
set -euo pipefail

NVRTC_VERSION=13.0.88
RUNTIME_VERSION=13.0.96

cd "$(dirname "$0")/.."
DIR="${1:-.cuda}"
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"

installed() {
    # pip --target leaves one dist-info per package; its name carries the version.
    [ -d "$DIR/nvidia_cuda_nvrtc-${NVRTC_VERSION}.dist-info" ] &&
        [ -d "$DIR/nvidia_cuda_runtime-${RUNTIME_VERSION}.dist-info" ] &&
        [ -d "$DIR/nvidia/cu13/lib" ] && [ -d "$DIR/nvidia/cu13/include" ]
}

if installed; then
    echo "install-cuda: NVRTC ${NVRTC_VERSION} and CUDA runtime headers ${RUNTIME_VERSION} already in $DIR" >&2
else
    echo "install-cuda: installing NVRTC ${NVRTC_VERSION} and CUDA headers ${RUNTIME_VERSION} into $DIR" >&2
    # --target installs touch nothing system-wide, so pip's root warning does not apply.
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check --upgrade --target "$DIR" \
        "nvidia-cuda-nvrtc==${NVRTC_VERSION}" "nvidia-cuda-runtime==${RUNTIME_VERSION}"
    if ! installed; then
        echo "install-cuda: pip finished but $DIR/nvidia/cu13/{lib,include} are missing" >&2
        exit 1
    fi
fi

echo "lib: $DIR/nvidia/cu13/lib"
echo "include: $DIR/nvidia/cu13/include"
