"""Static look at the tensor-core kernels without a GPU: compile kernels/conv_mma.cu for sm_90 with
NVRTC and ptxas, disassemble with cuobjdump, and print per entry point its registers and spills and,
for each loop holding mma instructions, its SASS instruction count and mma count (the main loop's
instructions per mma are what the loader costs: docs/performance.md, fourteenth session).

Needs NVIDIA's compiler wheels, not the project's dependencies:
    python -m pip install --target /tmp/cudatk nvidia-cuda-nvrtc-cu12 nvidia-cuda-nvcc-cu12 nvidia-cuda-cuobjdump
    python bench/sass_count.py [--tools /tmp/cudatk] [--src ternet/kernels/conv_mma.cu]
Registers are those of a __global__ wrapper (launch bounds 256) that inlines the entry point; the
numba kernels link it as a separate function instead, so the figures are a guide, not the deployed
kernels' exact counts (numba's `kernel.get_regs_per_thread()` on a GPU gives those). Not every
regression shows here: in the seventeenth session one shared array for the forward's two tiles
cost ~0.9 ms a step on the H200; a wrapper compiled whole (NVRTC without -rdc, ptxas without -c)
showed it (the bf16 forward 126 -> 157 registers), this script did not (168 both times).
"""
import argparse
import ctypes
import glob
import os
import re
import subprocess
import tempfile

ENTRIES = {  # entry point -> its C parameter list and call
    "conv_fwd_s8_128": "const signed char* x, const signed char* w, float* o, const int* g",
    "conv_fwd_s8_64": "const signed char* x, const signed char* w, float* o, const int* g",
    "conv_fwd_bf16_128": "const bf16_t* x, const bf16_t* w, float* o, const int* g",
    "conv_fwd_bf16_64": "const bf16_t* x, const bf16_t* w, float* o, const int* g",
    "conv_dw_bf16": "const bf16_t* x, const signed char* w, float* o, const int* g",
    "conv_dw_bf16_64": "const bf16_t* x, const signed char* w, float* o, const int* g",
    "conv_fwd_first_f32": "const float* x, const signed char* w, float* o, const int* g",
    "conv_fwd_first_f32_sums": "const float* x, const signed char* w, float* o, const int* g",
    "conv_dw_first_f32": "const float* x, const float* w, float* o, const int* g",
}


def find(tools, pattern):
    hits = glob.glob(os.path.join(tools, "**", pattern), recursive=True)
    if not hits:
        raise SystemExit(f"{pattern} not found under {tools}: install the wheels named in this file's docstring")
    return hits[0]


def nvrtc_ptx(lib, src):
    nv = ctypes.CDLL(lib)
    prog = ctypes.c_void_p()
    assert nv.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"conv_mma.cu", 0, None, None) == 0
    opts = [b"-arch=compute_90", b"-rdc=true", b"-std=c++17"]
    rc = nv.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    n = ctypes.c_size_t()
    nv.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    nv.nvrtcGetProgramLog(prog, log)
    if rc:
        raise SystemExit(log.value.decode())
    nv.nvrtcGetPTXSize(prog, ctypes.byref(n))
    ptx = ctypes.create_string_buffer(n.value)
    nv.nvrtcGetPTX(prog, ptx)
    return ptx.value


def loops(sass, fn):
    """(instructions, mma instructions) of each backward-branch loop of fn that holds mma."""
    body = [p for p in re.split(r"\n\s*Function : ", sass) if p.startswith(fn + "\n")][0]
    ins = [(int(a, 16), op) for a, op in re.findall(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", body)]
    name = lambda op: (op.split()[1] if op.startswith("@") else op.split()[0]).split(".")[0]
    out = []
    for addr, op in ins:
        m = re.search(r"BRA\s+`?\(?0x([0-9a-f]+)", op)
        if m and int(m.group(1), 16) < addr:
            inside = [name(o) for a, o in ins if int(m.group(1), 16) <= a <= addr]
            mma = sum(1 for o in inside if o in ("HMMA", "IMMA"))
            if mma:
                out.append((len(inside), mma))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tools", default="/tmp/cudatk")
    ap.add_argument("--src", default=os.path.join(os.path.dirname(__file__), "..", "ternet", "kernels", "conv_mma.cu"))
    a = ap.parse_args()
    src = open(a.src).read()
    entries = {fn: p for fn, p in ENTRIES.items() if f" {fn}(" in src}     # (an older file may lack some)
    for fn, params in entries.items():
        # the scale and the sums pointer as kernel parameters, as numba passes them (constants here
        # would fold branches away that the deployed kernels keep)
        sm = ", long long* sm" if "s8" in fn else ", double* sm" if fn.endswith("_sums") else ""
        extra = (", float s" if "fwd" in fn else "") + sm
        call = "x, w, o, g" + (", s" if "fwd" in fn else "") + (", sm" if sm else "")
        src += (f'\nextern "C" __global__ void __launch_bounds__(256) k_{fn}({params}{extra}) '
                f"{{ int r; {fn}(&r, {call}); }}\n")
    ptx = nvrtc_ptx(find(a.tools, "libnvrtc.so*"), src)
    with tempfile.TemporaryDirectory() as d:
        open(os.path.join(d, "k.ptx"), "wb").write(ptx)
        info = subprocess.run([find(a.tools, "ptxas"), "-arch=sm_90", "-c", "-v", "k.ptx", "-o", "k.o"], cwd=d,
                              capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([find(a.tools, "cuobjdump"), "-sass", "k.o"], cwd=d, capture_output=True,
                              text=True, check=True).stdout
    regs = dict(re.findall(r"Compiling entry function 'k_(\w+)'.*?Used (\d+) registers", info, re.S))
    for fn in entries:
        print(f"{fn:24s} registers {regs.get(fn, '?'):>4s}  main loops (instructions, mma): {loops(sass, 'k_' + fn)}")


if __name__ == "__main__":
    main()
