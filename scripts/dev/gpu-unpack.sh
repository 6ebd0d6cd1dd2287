#!/usr/bin/env bash
# Sourced by run-gpu.sh and bench-gpu.sh on the GPU machine: when gpu-bin/ is absent or empty and
# gpu-pack/gpu-bin.tar.xz (written by build-gpu.sh) is present, unpacks it in the repository root.
if ! ls gpu-bin/* >/dev/null 2>&1 && [ -f gpu-pack/gpu-bin.tar.xz ]; then
    xz -dc gpu-pack/gpu-bin.tar.xz | tar -xf - || {
        echo "gpu-unpack.sh: cannot unpack gpu-pack/gpu-bin.tar.xz" >&2
        exit 2
    }
fi
