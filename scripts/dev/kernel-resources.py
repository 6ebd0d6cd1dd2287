#!/usr/bin/env python3
"""Compiles one kernel module (kernels/src/common.cuh + kernels/src/<module>.cu) with NVRTC to PTX
for sm_90, assembles it with ptxas -v, and prints each kernel's registers, spill stores/loads
and local memory (stack frame): what a kernel costs in occupancy, read without a GPU.

    scripts/dev/kernel-resources.py MODULE [FILTER]

MODULE may join several files with '+' (moe_ffn+moe_ffn_tiles: the moe_ffn module is both).
$MIXLORA_NVRTC_OPTIONS adds options as the engine does (e.g. -DLM_CODES_UNROLL=2). The GPU
driver assembles the PTX itself, so its register counts may differ from this ptxas's.

NVRTC comes from target/nvrtc-py (scripts/ci-nvrtc.sh installs it); ptxas from $PTXAS, else
PATH, else a pip install of nvidia-cuda-nvcc (13.0.*) into target/ptxas-py.
"""
import ctypes, glob, os, re, shutil, subprocess, sys, tempfile

root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if len(sys.argv) < 2:
    sys.exit(__doc__)
module, filt = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "")
src = "\n".join(open(f"{root}/kernels/src/{f}").read() for f in ["common.cuh"] + [m + ".cu" for m in module.split("+")])

libs = glob.glob(f"{root}/target/nvrtc-py/nvidia/*/lib/libnvrtc.so.*")
libs = [l for l in libs if "alt" not in l and "builtins" not in l]
if not libs:
    sys.exit("no libnvrtc under target/nvrtc-py: run scripts/ci-nvrtc.sh once")
inc = os.path.dirname(glob.glob(f"{root}/target/nvrtc-py/**/cuda_bf16.h", recursive=True)[0])
# libnvrtc loads its builtins from the same folder by name.
ctypes.CDLL(glob.glob(os.path.dirname(libs[0]) + "/libnvrtc-builtins.so.*")[0], mode=ctypes.RTLD_GLOBAL)
nvrtc = ctypes.CDLL(libs[0])
prog = ctypes.c_void_p()
assert nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), f"{module}.cu".encode(), 0, None, None) == 0
opts = [b"--gpu-architecture=compute_90", b"--std=c++17", f"--include-path={inc}".encode()]
# The options of MIXLORA_NVRTC_OPTIONS, as the engine adds them (e.g. -D tuning values).
opts += [o.encode() for o in os.environ.get("MIXLORA_NVRTC_OPTIONS", "").split()]
arr = (ctypes.c_char_p * len(opts))(*opts)
rc = nvrtc.nvrtcCompileProgram(prog, len(opts), arr)
size = ctypes.c_size_t()
nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
log = ctypes.create_string_buffer(size.value)
nvrtc.nvrtcGetProgramLog(prog, log)
if rc != 0:
    sys.exit(log.value.decode())
nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(size))
ptx = ctypes.create_string_buffer(size.value)
nvrtc.nvrtcGetPTX(prog, ptx)

ptxas = os.environ.get("PTXAS") or shutil.which("ptxas")
if not ptxas:
    d = f"{root}/target/ptxas-py"
    found = glob.glob(f"{d}/**/bin/ptxas", recursive=True)
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", d,
                        "nvidia-cuda-nvcc==13.0.*"], check=True)
        found = glob.glob(f"{d}/**/bin/ptxas", recursive=True)
    ptxas = found[0]
with tempfile.TemporaryDirectory() as tmp:
    p = f"{tmp}/{module}.ptx"
    open(p, "wb").write(ptx.value)
    out = subprocess.run([ptxas, "-arch=sm_90", "-v", p, "-o", f"{tmp}/out.cubin"],
                         capture_output=True, text=True)
if out.returncode != 0:
    sys.exit(out.stderr)
name = None
for line in out.stderr.splitlines():
    m = re.search(r"Compiling entry function '(\w+)'", line)
    if m:
        name = m.group(1)
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m and name and filt in name:
        frame, st, ld = m.groups()
    m2 = re.search(r"Used (\d+) registers", line)
    if m2 and name and filt in name:
        print(f"{name:48} regs {m2.group(1):>4}  stack {frame:>5}  spill st {st:>5} ld {ld:>5}")
