"""Type-check and lower the transition CUDA kernels (and the loader's cutout and mirror) for a real GPU
target (sm_90) without a GPU: run WITHOUT NUMBA_ENABLE_CUDASIM. On a machine without NVRTC/NVVM
the compile stops at the PTX step ("libnvrtc ... not found") -- which means typing and lowering
to LLVM IR, including the shared kernels.scalar functions inlined as device functions,
succeeded; any other error is real. With NVIDIA's NVRTC wheel it goes on to PTX ("PTX ok"):
`python -m pip install --target /tmp/cudatk nvidia-cuda-nvrtc-cu12`, then
`LD_LIBRARY_PATH=/tmp/cudatk/nvidia/cuda_nvrtc/lib python bench/check_cuda_lowering.py`.
Usage: python bench/check_cuda_lowering.py
"""
import pathlib
import sys

from numba import cuda, types

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from ternet import device_data as D   # noqa: E402
from ternet.kernels import conv as C   # noqa: E402
from ternet.kernels import elementwise as E   # noqa: E402
from ternet.kernels import pool as P   # noqa: E402
from ternet.kernels import transitions as T   # noqa: E402

f32, i64, u64, i8 = types.float32, types.int64, types.uint64, types.int8
SIGS = {
    "_dst_sgd_cuda": (i8[:], f32[:], f32[:], types.float64[:], i64, i64, u64[:], i64, i64[:]),
    "_dst_adam_cuda": (i8[:], f32[:], f32[:], f32[:], f32[:], f32, f32, f32, i64, u64[:], i64, i64[:]),
    "_step_keys_cuda": (u64[:], u64, u64),
    "_metropolis_cuda": (i8[:], f32[:], f32[:], f32[:], i64, *([f32] * 6), i64, f32, f32, i64, f32, f32,
                         u64, u64, u64, i64[:]),
    "_bop_cuda": (i8[:], f32[:], f32[:], f32[:], f32[:], f32, i64, i64, i64, i64[:]),
}
KERNELS = {name: (getattr(T, name), sig) for name, sig in SIGS.items()}
KERNELS["_put_cuda"] = (E._put_cuda, (f32[:], i64, *([f32] * 8)))
A2, A4 = types.Array(f32, 2, "C"), types.Array(f32, 4, "C")
KERNELS["_conv_fwd_cuda"] = (C._conv_fwd_cuda, (A4, types.Array(i8, 2, "C"), A2, f32, i64, i64, i64, i64, i64))
for name, x in (("_conv_fwd_direct_cuda", A2), ("_conv_fwd_direct_cuda[int8]", types.Array(i8, 2, "C"))):
    KERNELS[name] = (C._conv_fwd_direct_cuda, (x, types.Array(i8, 2, "C"), A2, f32, *([i64] * 10)))
KERNELS["_conv_dw_direct_cuda"] = (C._conv_dw_direct_cuda, (A2, A2, types.Array(f32, 3, "C"), *([i64] * 11)))
KERNELS["_conv_dx_cuda"] = (C._conv_dx_cuda, (A4, types.Array(i8, 4, "C"), types.Array(f32, 3, "C"), f32, *([i64] * 6)))
KERNELS["_conv_dw_cuda"] = (C._conv_dw_cuda, (A2, A4, types.Array(f32, 3, "C"), i64, i64, i64, i64, i64, i64))
from ternet.kernels import conv_tc as TC   # noqa: E402
KERNELS["_flip_weight_bf16"] = (TC._flip_weight_bf16, (types.Array(i8, 3, "C"), types.Array(types.uint16, 1, "C"),
                                                      types.Array(types.uint16, 3, "C")))
KERNELS["_cutout_cuda"] = (D._cutout_cuda, (i64[:], i64[:], i64, f32[:], types.Array(f32, 4, "C")))
KERNELS["_mirror_cuda"] = (D._mirror_cuda, (types.Array(f32, 4, "C"), types.Array(f32, 4, "C")))
F4, U4 = types.Array(f32, 4, "C"), types.Array(types.uint8, 4, "C")
F1R, U1 = types.Array(f32, 1, "C"), types.Array(types.uint8, 1, "C")
for name, x in (("_maxpool_fwd_cuda", F4), ("_maxpool_fwd_cuda[int8]", types.Array(i8, 4, "C"))):
    KERNELS[name] = (P._maxpool_fwd_cuda, (x, i64, i64, i64, x, U4))
    KERNELS[name.replace("fwd", "fwd_rows")] = (P._maxpool_fwd_rows_cuda, (x, i64, i64, i64, x, U4))
KERNELS["_maxpool_bwd_rows_cuda"] = (P._maxpool_bwd_rows_cuda, (F1R, U1, *([i64] * 8), F1R))
KERNELS["_maxpool_bwd_cuda"] = (P._maxpool_bwd_cuda, (F4, U4, i64, i64, i64, F4))
KERNELS["_maxpool_bwd_disjoint_cuda"] = (P._maxpool_bwd_disjoint_cuda, (F4, U4, i64, F4))
from ternet.kernels import batchnorm as BN   # noqa: E402
F1, F64, I16, U32 = f32[::1], types.float64[::1], types.int16[::1], types.uint32[::1]
BN_REC = (F1, F4, U4, types.Array(types.int32, 2, "C"), *([i64] * 5), I16, F1, f32, F1, F1, U32, f32, F1, F1, f32, f32,
          i64)   # dout, a pool's, a BNActSaved
BN_SIGS = {
    "_moments_cuda": (types.Array(f32, 2, "C"), f32, types.int32[::1], types.Array(types.float64, 3, "C")),
    "_stats_cuda": (types.Array(types.float64, 3, "C"), types.float64, types.Array(f32, 2, "C"), types.float64, F1, F1,
                    types.Array(f32, 2, "C")),
    "_bwd_final_cuda": (types.Array(types.float64, 3, "C"), F1, F1),
    "_normalize_cuda": (F1, F1, F1, F1, F1, F1, F1, f32, I16),
    "_bwd_sums_cuda": (types.Array(f32, 2, "C"), types.Array(f32, 2, "C"), f32, types.Array(types.int16, 2, "C"),
                       F1, F1, types.Array(types.float64, 3, "C")),
    "_bwd_dx_cuda": (F1, F1, f32, I16, F1, F1, F1, F1, F1, types.float64, types.uint16[::1], F1),
    "_stats_from_sums_cuda": (types.Array(types.int64, 3, "C"), i64, types.Array(f32, 2, "C"), types.float64,
                              types.float64, F1, F1, types.Array(f32, 2, "C")),
    "_stats_from_fsums_cuda": (types.Array(types.float64, 3, "C"), i64, types.float64, F1, F1,
                               types.Array(f32, 2, "C")),
}
KERNELS.update({name: (getattr(BN, name), sig) for name, sig in BN_SIGS.items()})
for rect, int16, gather, to16, to32 in ((True, True, False, True, True), (True, False, True, False, True),
                                        (False, True, False, False, True), (False, False, True, True, True),
                                        (True, True, False, True, False)):
    fwd, sums, dx = BN.bn_act_kernels(rect, int16, gather, to16, to32)
    kind = f"[rect={rect}, int16={int16}, gather={gather}, to16={to16}, to32={to32}]"
    KERNELS["bn_act fwd" + kind] = (fwd, (F1, F1, F1, F1, F1, f32, f32, i64, f32, i8[::1], I16, F1, U32))
    KERNELS["bn_act bwd_sums" + kind] = (sums, (BN_REC[0], *BN_REC[9:], types.Array(types.float64, 3, "C")))
    KERNELS["bn_act bwd_dx" + kind] = (dx, (*BN_REC, F1, F1, F1, types.float64, types.uint16[::1], F1))
KERNELS["bn_act fwd[rect=True, int16=False, copy=False]"] = (
    BN.bn_act_kernels(True, False, copy=False)[0], (F1, F1, F1, F1, F1, f32, f32, i64, f32, i8[::1], I16, F1, U32))
for rect, int16 in ((True, False), (False, True)):
    KERNELS[f"bn_act_pool_sums[rect={rect}, int16={int16}]"] = (
        BN.bn_act_pool_sums(rect, int16), (F4, U4, types.Array(types.int32, 2, "C"), *([i64] * 4), *BN_REC[9:],
                                           types.Array(types.float64, 3, "C")))
from ternet.kernels import activation as ACT   # noqa: E402
KERNELS["_ternary_fwd_bits_cuda"] = (ACT._ternary_fwd_bits_cuda, (F1, f32, f32, i8[::1], U32))
KERNELS["_ternary_bwd_bits_sum_cuda"] = (ACT._ternary_bwd_bits_sum_cuda, (F1, F1, U32, f32, F1))
from ternet.kernels import loss as L   # noqa: E402
KERNELS["_xent_rows_cuda"] = (L._xent_rows_cuda, (types.Array(f32, 2, "C"), types.int32[::1], f32, types.float64,
                                                  types.Array(f32, 2, "C"), F64, types.int32[::1]))
KERNELS["_xent_warp_cuda"] = (L._xent_warp_cuda, (types.Array(f32, 2, "C"), types.int32[::1], f32, types.float64,
                                                  types.Array(f32, 2, "C"), F64, types.int32[::1]))
if not cuda.is_available():   # cuda.jit device functions (batchnorm's) are typed for the current device's cc
    import numba.cuda.dispatcher as _dispatcher
    _dispatcher.get_current_device = lambda: type("Device", (), {"compute_capability": (9, 0)})
for name, (kernel, sig) in KERNELS.items():
    try:
        cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0))
        print(f"{name}: PTX ok")
    except Exception as e:  # noqa: BLE001 - report and go on
        msg = str(e).splitlines()[0][:200]
        ok = "nvrtc" in msg.lower() or "nvvm" in msg.lower()
        print(f"{name}: {'lowered to LLVM IR (no NVRTC here for PTX)' if ok else 'FAILED'}: {type(e).__name__}: {msg}")
