#!/usr/bin/env bash
# Compiles every CUDA kernel module with NVRTC to PTX for sm_90 (the H200), on a machine with
# no GPU and no CUDA install. NVRTC and the CUDA headers (cuda_bf16.h) come from PyPI, pinned to
# 13.0.* to match the GPU machine's CUDA 13.0 driver (a newer NVRTC emits PTX that driver
# rejects). They are installed once into target/nvrtc-py (git-ignored) and reused.
#
# Usage: scripts/ci-nvrtc.sh            (from anywhere in the repository)
set -euo pipefail
cd "$(dirname "$0")/.."

dir=target/nvrtc-py
if ! ls "$dir"/nvidia/*/lib/libnvrtc.so.* >/dev/null 2>&1; then
    python3 -m pip install --quiet --disable-pip-version-check --no-deps --upgrade \
        --target "$dir" "nvidia-cuda-nvrtc==13.0.*" "nvidia-cuda-runtime==13.0.*"
fi
lib=$(dirname "$(find "$PWD/$dir" -name 'libnvrtc.so.*' -not -name '*alt*' -not -name '*builtins*' | head -n1)")
inc=$(dirname "$(find "$PWD/$dir" -name cuda_bf16.h | head -n1)")
if [ ! -d "$lib" ] || [ ! -d "$inc" ]; then
    echo "ci-nvrtc: libnvrtc or cuda_bf16.h missing under $dir" >&2
    exit 1
fi
export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export MIXLORA_CUDA_INCLUDE="$inc"
# The test fails instead of skipping when NVRTC cannot be loaded.
export MIXLORA_REQUIRE_NVRTC=1
echo "ci-nvrtc: NVRTC from $lib, headers from $inc" >&2
cargo test --release --features cuda -p mixlora-tests --test cuda_nvrtc -- --nocapture
