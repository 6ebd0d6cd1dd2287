#!/usr/bin/env python3
"""Writes a copy of a GGUF file with its metadata (the tokenizer among it) and no tensors.

`mixlora bench recipe --shape S --model FILE` reads only the tokenizer of FILE, so this small file
(1.7 MB for SmolLM2-135M, against 98 MB) serves the shape benchmarks where copying the whole model
costs time, e.g. to a GPU machine.

    scripts/dev/gguf-metadata-only.py MODEL.gguf OUT.gguf
"""
import struct
import sys

# Byte sizes of the GGUF scalar value types (8: string and 9: array are read apart).
SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def main(src: str, dst: str) -> None:
    data = open(src, "rb").read()
    if data[:4] != b"GGUF":
        sys.exit(f"{src}: not a GGUF file (no GGUF magic)")
    pos = 4

    def read(fmt: str):
        nonlocal pos
        (value,) = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return value

    def skip_string() -> None:
        nonlocal pos
        length = read("Q")
        pos += length

    def skip_value(kind: int) -> None:
        nonlocal pos
        if kind == 8:
            skip_string()
        elif kind == 9:
            item = read("I")
            count = read("Q")
            if item == 8:
                for _ in range(count):
                    skip_string()
            else:
                pos += SIZES[item] * count
        else:
            pos += SIZES[kind]

    version = read("I")
    n_tensors = read("Q")
    n_kv = read("Q")
    start = pos
    try:
        for _ in range(n_kv):
            skip_string()
            skip_value(read("I"))
    except (KeyError, struct.error) as e:
        sys.exit(f"{src}: malformed metadata ({e})")
    out = b"GGUF" + struct.pack("<IQQ", version, 0, n_kv) + data[start:pos]
    with open(dst, "wb") as f:
        f.write(out)
    print(f"{dst}: {len(out)} bytes, {n_kv} metadata entries, {n_tensors} tensors left out")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
