#!/usr/bin/env bash
# Builds, on a machine without a GPU, the release binaries that the GPU machine runs (the CUDA
# test binaries), and copies them into gpu-bin/ (git-ignored) under stable names:
#   gpu-bin/test-<name>     a test binary (run with --test-threads=1): the tests crate's GPU
#                           targets and the trainer's trainer/tests/*_gpu.rs
#   gpu-bin/example-<name>  an example binary (benches/examples/*cuda*.rs, *gpu*.rs)
#   gpu-bin/bench-<name>    a criterion bench that runs on the GPU (run with --bench)
#   gpu-bin/mixlora         the trainer, with the CUDA backend (--device cuda)
# stripped, and packs them into gpu-pack/gpu-bin.tar.xz (about a sixth of the size), the form
# that travels to the GPU machine; run-gpu.sh and bench-gpu.sh unpack it there when gpu-bin/ is
# absent. Fails when the pack would exceed 60 MiB.
# Then, on the GPU machine, from the repository root: scripts/dev/run-gpu.sh [--memcheck]
set -euo pipefail
cd "$(dirname "$0")/../.."

out=gpu-bin
rm -rf "$out"
mkdir -p "$out"

# Test binaries: the targets whose modules hold their parity tests in a `gpu` module (ops:
# tests/tests/ops/, fused: tests/tests/fused/) and every tests/tests/cuda_*.rs, built with the
# engine's CUDA backend.
tests=(--test ops --test fused)
for f in tests/tests/cuda_*.rs; do
    tests+=(--test "$(basename "$f" .rs)")
done
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --release --features cuda -p mixlora-tests "${tests[@]}" --no-run 2>&1 | tee "$log" >&2
# cargo prints "Executable tests/cuda_nvrtc.rs (target/release/deps/cuda_nvrtc-0123abcd)", or
# "Executable tests/ops/main.rs (target/release/deps/ops-0123abcd)".
grep -o '(target/release/deps/[A-Za-z0-9_]*-[0-9a-f]*)' "$log" | tr -d '()' | sort -u |
    while read -r exe; do
        name=$(basename "$exe")
        cp "$exe" "$out/test-${name%-*}"
    done

# The trainer's GPU tests (trainer/tests/*_gpu.rs), built with its CUDA backend.
trainer_tests=()
for f in trainer/tests/*_gpu.rs; do
    [ -e "$f" ] || continue
    trainer_tests+=(--test "$(basename "$f" .rs)")
done
if [ ${#trainer_tests[@]} -gt 0 ]; then
    cargo test --release --features cuda -p mixlora-trainer "${trainer_tests[@]}" --no-run 2>&1 |
        tee "$log" >&2
    grep -o '(target/release/deps/[A-Za-z0-9_]*-[0-9a-f]*)' "$log" | tr -d '()' | sort -u |
        while read -r exe; do
            name=$(basename "$exe")
            cp "$exe" "$out/test-${name%-*}"
        done
fi

# Examples that exercise the GPU, when there are any (named *cuda* or *gpu*).
examples=()
for f in benches/examples/*cuda*.rs benches/examples/*gpu*.rs; do
    [ -e "$f" ] || continue
    examples+=("$(basename "$f" .rs)")
done
if [ ${#examples[@]} -gt 0 ]; then
    cargo build --release --features mixlora-engine/cuda -p mixlora-benches \
        "${examples[@]/#/--example=}"
    for name in "${examples[@]}"; do
        cp "target/release/examples/$name" "$out/example-$name"
    done
fi

# Criterion benches that run on the GPU (moe_ffn), as gpu-bin/bench-<name>.
log2=$(mktemp)
cargo bench --no-run --features cuda -p mixlora-benches --bench moe_ffn 2>&1 | tee "$log2" >&2
grep -o '(target/release/deps/moe_ffn-[0-9a-f]*)' "$log2" | tr -d '()' | sort -u | tail -1 |
    while read -r exe; do cp "$exe" "$out/bench-moe_ffn"; done
rm -f "$log2"

# The trainer with the CUDA backend, for real runs (mixlora train --device cuda).
cargo build --release --features cuda -p mixlora-trainer --bin mixlora
cp target/release/mixlora "$out/mixlora"

# Symbols are not needed to run; stripping keeps the folder small enough to travel.
if command -v strip >/dev/null; then
    strip "$out"/* 2>/dev/null || true
else
    echo "strip not found: the binaries keep their symbols" >&2
fi
echo "built into $out/:" >&2
ls -l "$out" >&2
mkdir -p gpu-pack
tar -cf - "$out" | xz -T0 -6 >gpu-pack/gpu-bin.tar.xz
kib=$(du -sk gpu-pack/gpu-bin.tar.xz | cut -f1)
echo "gpu-pack/gpu-bin.tar.xz: $((kib / 1024)) MiB (limit 60 MiB); $out/ itself: $(du -sh "$out" | cut -f1)" >&2
if [ "$kib" -gt $((60 * 1024)) ]; then
    echo "build-gpu.sh: gpu-pack/gpu-bin.tar.xz is over 60 MiB and will not travel to the GPU machine" >&2
    exit 1
fi
