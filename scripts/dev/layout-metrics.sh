#!/usr/bin/env bash
# Prints the layout figures the engine's structure is judged by, for the checkout it runs in:
#   - methods of the core backend trait (`BackendStorage` in engine/src/backend/mod.rs);
#   - library files (engine, model, trainer, kernels sources) over 600 lines;
#   - environment variables read by the libraries (engine/src, model/src, trainer/src but main.rs);
#   - for a few ops, the source files that name the op and how many carry the op's stem in their
#     path (`git ls-files | grep STEM` finds those).
# Repeated code is counted by a separate tool, not here.
#
#   scripts/dev/layout-metrics.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

echo "== methods of BackendStorage"
python3 - <<'EOF'
import re
s = open("engine/src/backend/mod.rs").read()
i = s.index("pub trait BackendStorage")
j = s.index("{", i)
depth, k = 1, j + 1
while depth:
    depth += {"{": 1, "}": -1}.get(s[k], 0)
    k += 1
print(len(re.findall(r"\n    fn (\w+)", s[j:k])))
EOF

echo "== library files over 600 lines"
git ls-files 'engine/src/*' 'model/src/*' 'trainer/src/*' 'kernels/src/*' |
    xargs wc -l | awk '$2 != "total" && $1 > 600 { print "  " $1, $2; n++ } END { print "  " n + 0, "files" }'

echo "== environment variables read by the libraries"
vars=$(git ls-files 'engine/src/*.rs' 'model/src/*.rs' 'trainer/src/*.rs' |
    grep -v '^trainer/src/main.rs$' |
    xargs grep -hoE 'env::var(_os)?\("[A-Z_]+"\)|from_env\("[A-Z_]+"' |
    grep -oE '"[A-Z_]+"' | sort -u | tr -d '"' || true)
echo "${vars:-none}" | sed 's/^/  /'

# stem: the op's stem; names: the functions, kernels and trait methods of the op (a regex).
ops=(
    "rms_norm|rms_norm\w*"
    "softmax|(log_)?softmax\w*|causal_softmax\w*|causal_masked_softmax"
    "rope|rope(_\w+)?"
    "moe_ffn|moe_ffn\w*|moe_fused\w*|(moe_)?tiles_\w+|(moe_)?swiglu_\w+|(moe_)?block_codes\w*|(moe_)?gather_codes\w*|(moe_)?expand_codes\w*"
)
echo "== files that define an op's code or tests (a fn, kernel or test named after it), and"
echo "   how many of them carry the op's stem in their path (git ls-files | grep STEM)"
for entry in "${ops[@]}"; do
    stem=${entry%%|*}
    names=${entry#*|}
    # `fn NAME`, a kernel `void NAME` / `NAME##_` macro, or a test fn containing the name.
    re="(fn ($names)\b|void ($names)\b|[( ]($names)_##|fn \w*($names)\w*\()"
    files=$(git ls-files 'engine/*.rs' 'kernels/*' 'tests/*.rs' | xargs grep -lP "$re" || true)
    n=$(printf '%s\n' "$files" | grep -c . || true)
    named=$(printf '%s\n' "$files" | grep -c "$stem" || true)
    dirs=$(printf '%s\n' "$files" | xargs -r -n1 dirname | sort -u | grep -c . || true)
    echo "  $stem: $n files in $dirs folders, $named with the stem in their path"
    printf '%s\n' "$files" | grep -v "$stem" | sed 's/^/      other: /'
done
