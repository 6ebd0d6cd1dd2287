#!/usr/bin/env bash
# The GPU benchmarks of the MixLoRA FFN and the paper's Table 6, with per-kernel profiles, run on
# the GPU machine from the repository root after scripts/dev/build-gpu.sh. Writes into OUTDIR:
#   table6.json / .md                 LoRA and MixLoRA fused, LLaMA-2-7B shape, batch 8x512
#   table6-checkpointing.json / .md   the same with gradient checkpointing
#   profile-lora.txt, profile-fused.txt  MIXLORA_PROFILE=1 per-kernel times of one 4-layer step
#                                     (every launch between two synchronisations: where the time
#                                     goes, not how long a step takes)
#   gpuprofile-lora.txt, gpuprofile-fused.txt  MIXLORA_PROFILE=gpu: the same step timed with CUDA
#                                     events (the kernels' own GPU time, no waits), and the GPU
#                                     span of the step: span − busy is time the GPU waited on the
#                                     host
#   moe_ffn.json / .md                the FFN block alone, naive / paper / grouped / fused
#   moe_ffn-chunk{N}.json             the fused block alone with token chunks of N = 1024, 2048,
#                                     4096 (its latency / activation-peak trade-off; part `chunks`,
#                                     not in the default set)
#   multi-adapter.json / -*.json, .md 1, 2 and 4 LoRA / fused MixLoRA adapters trained together on
#                                     one base against single runs, without and with gradient
#                                     checkpointing (scripts/dev/gpu-multi-adapter.sh; part
#                                     `multi`, not in the default set)
#
#   scripts/dev/bench-gpu.sh OUTDIR [PART...]
#       PART: table6 checkpointing profile gpuprofile moe_ffn chunks multi (default: all but
#       chunks and multi)
#
# MIXLORA_BIN (default gpu-bin/mixlora) and MOE_FFN_BIN (gpu-bin/bench-moe_ffn) name the binaries.
set -uo pipefail
cd "$(dirname "$0")/../.."
[ $# -ge 1 ] || {
    sed -n '2,26p' "$0" >&2
    exit 2
}
out=$1
shift
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(table6 checkpointing profile gpuprofile moe_ffn)
. scripts/dev/gpu-unpack.sh
bin=${MIXLORA_BIN:-gpu-bin/mixlora}
moe_ffn=${MOE_FFN_BIN:-gpu-bin/bench-moe_ffn}
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export MIXLORA_CUDA_INCLUDE=${MIXLORA_CUDA_INCLUDE:-/usr/local/cuda/include}
mkdir -p "$out"
status=0
for part in "${parts[@]}"; do
    echo "===== $part" >&2
    case "$part" in
        table6)
            "$bin" bench table6 --variants lora,mixlora-fused --json "$out/table6.json" \
                | tee "$out/table6.md"
            ;;
        checkpointing)
            "$bin" bench table6 --variants lora,mixlora-fused --gradient-checkpointing \
                --json "$out/table6-checkpointing.json" | tee "$out/table6-checkpointing.md"
            ;;
        profile)
            for v in lora mixlora-fused; do
                MIXLORA_PROFILE=1 "$bin" bench table6 --variants "$v" --layers 4 --warmup 1 \
                    --steps 1 >"$out/profile-${v#mixlora-}.txt"
            done
            ;;
        gpuprofile)
            for v in lora mixlora-fused; do
                MIXLORA_PROFILE=gpu MIXLORA_PROFILE_ROWS=80 "$bin" bench table6 --variants "$v" \
                    --layers 4 --warmup 1 --steps 1 >"$out/gpuprofile-${v#mixlora-}.txt"
            done
            ;;
        moe_ffn)
            MIXLORA_MOE_FFN_JSON="$out/moe_ffn.json" "$moe_ffn" --bench nomatch | tee "$out/moe_ffn.md"
            ;;
        multi)
            scripts/dev/gpu-multi-adapter.sh "$bin" "$out"
            ;;
        chunks)
            crc=0
            for c in 1024 2048 4096; do
                MIXLORA_MOE_FFN_IMPLS=fused MIXLORA_MOE_CHUNK_TOKENS=$c \
                    MIXLORA_MOE_FFN_JSON="$out/moe_ffn-chunk$c.json" "$moe_ffn" --bench nomatch || {
                    crc=1
                    break
                }
            done
            (exit $crc)
            ;;
        *)
            echo "unknown part: $part" >&2
            false
            ;;
    esac
    rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || {
        echo "$part: exit $rc" >&2
        status=1
    }
done
exit $status
