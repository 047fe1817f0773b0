"""The tensor-core path of the convolution family: the implicit-GEMM kernels of conv_mma.cu
(int8 mma for ternary x ternary forwards, bf16 mma with fp32 accumulation for the gradients, and
for first layers on float32 images direct kernels whose forward splits each value into three
exact bf16 parts),
linked into numba kernels with cuda.declare_device. Real GPUs of compute capability >= 8.0 only:
the simulator cannot run linked code, so conv.py's pure-numba kernels stay the reference (and the
fallback for shapes these kernels do not take). Exercise: bench/mma_check.py, pytest -m gpu.
"""
import functools
import os

import numpy as np
from numba import cuda, types

from . import MAX_BLOCKS, device_constant, launch, scratch, view

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conv_mma.cu")
GEOM = ("n", "h", "w", "c", "k", "kh", "kw", "oh", "ow", "stride", "pad", "m", "r", "chunk", "dil")
DW_CHUNK = 4096


def available():
    """True on a real CUDA GPU of compute capability >= 8.0 (unless TERNET_NO_TC=1)."""
    if os.environ.get("TERNET_NO_TC") == "1":
        return False
    try:
        from numba import config
        if config.ENABLE_CUDASIM or not cuda.is_available():
            return False
        return cuda.get_current_device().compute_capability >= (8, 0)
    except Exception:   # pragma: no cover - broken CUDA installs
        return False


def _wrapper(fn, sig):
    @cuda.jit(sig, link=[SRC], launch_bounds=256)
    def k(x, w, out, geom, scale):
        fn(x, w, out, geom, scale)

    return k


def _sums_wrapper(fn, sig):
    @cuda.jit(sig, link=[SRC], launch_bounds=256)
    def k_sums(x, w, out, geom, scale, sums):
        fn(x, w, out, geom, scale, sums)

    return k_sums


def _dw_wrapper(fn, sig):
    @cuda.jit(sig, link=[SRC], launch_bounds=256)
    def k_dw(dy, x, part, geom):
        fn(dy, x, part, geom)

    return k_dw


@functools.lru_cache(maxsize=None)
def _kernels():
    """Compile the numba wrappers once (needs a GPU: done at first use, never at import)."""
    i8p, u16p, f32p, i32p = (types.CPointer(t) for t in (types.int8, types.uint16, types.float32, types.int32))
    out = {}
    i64p = types.CPointer(types.int64)
    for name in ("conv_fwd_s8_128", "conv_fwd_s8_64"):
        fn = cuda.declare_device(name, types.int32(i8p, i8p, f32p, i32p, types.float32, i64p), link=SRC)
        out[name] = _sums_wrapper(fn, types.void(i8p, i8p, f32p, i32p, types.float32, i64p))
    for name in ("conv_fwd_bf16_128", "conv_fwd_bf16_64"):
        fn = cuda.declare_device(name, types.int32(u16p, u16p, f32p, i32p, types.float32), link=SRC)
        out[name] = _wrapper(fn, types.void(u16p, u16p, f32p, i32p, types.float32))
    for name in ("conv_dw_bf16", "conv_dw_bf16_64"):
        out[name] = _dw_wrapper(cuda.declare_device(name, types.int32(u16p, i8p, f32p, i32p), link=SRC),
                                types.void(u16p, i8p, f32p, i32p))
    fn = cuda.declare_device("conv_fwd_first_f32", types.int32(f32p, i8p, f32p, i32p, types.float32), link=SRC)
    out["conv_fwd_first_f32"] = _wrapper(fn, types.void(f32p, i8p, f32p, i32p, types.float32))
    f64p = types.CPointer(types.float64)
    fn = cuda.declare_device("conv_fwd_first_f32_sums", types.int32(f32p, i8p, f32p, i32p, types.float32, f64p),
                             link=SRC)
    out["conv_fwd_first_f32_sums"] = _sums_wrapper(fn, types.void(f32p, i8p, f32p, i32p, types.float32, f64p))
    fn = cuda.declare_device("conv_dw_first_f32", types.int32(f32p, f32p, f32p, i32p), link=SRC)
    out["conv_dw_first_f32"] = _dw_wrapper(fn, types.void(f32p, f32p, f32p, i32p))

    cvt = cuda.declare_device("to_bf16", types.int32(f32p, u16p, types.int64), link=SRC)

    @cuda.jit(types.void(f32p, u16p, types.int64), link=[SRC])
    def k_cvt(src, dst, n):
        cvt(src, dst, n)

    out["to_bf16"] = k_cvt
    return out


def _ptr(a):
    """a's device address, for the linked kernels' pointer arguments. While a CUDA graph is being
    captured, a is also handed to it (Graph.hold keeps alive what the graph's kernels address and
    its pool does not own): planned launches do that for array arguments, raw addresses hide them."""
    if launch._capturing is not None:
        launch._capturing.hold((a,))
    return a.__cuda_array_interface__["data"][0]


def device_ints(key):
    """A small int32 device array holding the tuple key (a layer's geometry), made once per key."""
    return device_constant(("ints",) + tuple(key), lambda: np.array(key, np.int32))


def _geom(**kw):
    kw.setdefault("dil", 1)
    return device_ints(tuple(kw.get(k, 0) for k in GEOM))


_LAST = [None, None]     # (weakref to the float32 source, its bf16 copy)


def bf16(a):
    """A bf16 (uint16 bits) device copy of a float32 device array. The input and weight gradients
    of one layer both need dy in bf16: a second call on the same array reuses the first copy."""
    import weakref
    src = _LAST[0]() if _LAST[0] is not None else None
    if src is a:
        return _LAST[1]
    out = cuda.device_array(a.shape, np.uint16)
    n = a.size
    _kernels()["to_bf16"][min(4096, (n + 255) // 256), 256](_ptr(a), _ptr(out), n)
    _LAST[0], _LAST[1] = weakref.ref(a), out
    return out


# A batch norm or max pool right before a convolution that reads its dy in bf16 alone writes only
# the bf16 copy (Bf16Grad): no float32 gradient is stored or read (resnet18 224 px: 1.7 GB of
# writes a step). TERNET_BF16_GRADS=0 keeps the float32 copies (the same bits either way:
# tests/test_gpu_full.py).
BF16_GRADS = os.environ.get("TERNET_BF16_GRADS", "1") != "0"


class Bf16Grad:
    """A gradient held only as bf16 bits (`bits`, uint16 device array of `shape`): what a layer
    hands the convolution before it when takes_bf16_grad said that convolution reads nothing else."""

    def __init__(self, bits):
        self.bits, self.shape = bits, tuple(bits.shape)


def grad_array(a):
    """a, or a Bf16Grad's bits: the device array behind a gradient, for device checks."""
    return a.bits if isinstance(a, Bf16Grad) else a


def takes_bf16_grad(x, k, stride):
    """Whether a convolution with input x (k output channels, this stride) reads its output's
    gradient in bf16 alone on this device: both its input gradient (backward_input: K % 32 == 0,
    stride <= 2) and its weight gradient (backward_weight_partials: int8 x, C % 16 == 0) run on
    tensor cores from dy16."""
    return (BF16_GRADS and x.dtype == np.int8 and x.shape[3] % 16 == 0 and k % 32 == 0 and stride <= 2
            and available())


def adopt_bf16(a, a16):
    """Take a16 (uint16 bits, a's shape) as a's bf16 copy for the next bf16(a): the kernel that
    wrote a (batch norm's backward, given the buffer) wrote a16 with to_bf16's rounding, so the
    conversion's launch and its read of a are saved."""
    import weakref
    _LAST[0], _LAST[1] = weakref.ref(a), a16


def _bf16_table(scale):
    """bf16 bits of q * scale for q = -4..4 (the weight values of Z_1..Z_3), on the device."""
    return device_constant(("bf16 weights", scale), lambda: np.array(
        [int(np.float32(q * scale).view(np.uint32) >> 16) for q in range(-4, 5)], np.uint16))


@cuda.jit
def _flip_weight_bf16(w, scale_bits, out):
    # w (K, S, C) int8 (S = kh * kw taps), out (C, S, K) uint16: out[c, S-1-s, k] = bf16(w[k, s, c])
    # (the taps flipped, K and C swapped). A 32 x 32 tile of (k, c) per block and tap, through
    # shared memory, so reads and writes both run along the last axis; w holds small integers:
    # a table lookup.
    tile = cuda.shared.array((32, 33), types.uint16)
    k_n, s_n, c_n = w.shape
    c0, k0, s = cuda.blockIdx.x * 32, cuda.blockIdx.y * 32, cuda.blockIdx.z
    tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
    for row in range(ty, 32, 8):
        if k0 + row < k_n and c0 + tx < c_n:
            tile[row, tx] = scale_bits[w[k0 + row, s, c0 + tx] + 4]
    cuda.syncthreads()
    for row in range(ty, 32, 8):
        if c0 + row < c_n and k0 + tx < k_n:
            out[c0 + row, s_n - 1 - s, k0 + tx] = tile[tx, row]


def flip_weight_bf16(w, scale):
    """(C, KH, KW, K) uint16: bf16(scale * w) with the taps flipped and K and C swapped, the
    weight operand of the input gradient as a forward convolution."""
    k, kh, kw, c = w.shape
    wf = cuda.device_array((c, kh, kw, k), np.uint16)
    _flip_weight_bf16[((c + 31) // 32, (k + 31) // 32, kh * kw), (32, 8)](
        view(w, k, kh * kw, c), _bf16_table(float(scale)), view(wf, c, kh * kw, k))
    return wf


# first layers (float32 images, conv_mma.cu's conv_fwd_first / conv_dw_first): tiles of FL_DH x FL_DW
# output positions, the reduction R = KH*KW*C at most FL_R, a tile's input patch at most FL_PATCH
# floats, K a multiple of 8; the weight gradient in at most FL_SPLITS blocks of consecutive tiles
FL_DH, FL_DW, FL_R, FL_PATCH, FL_SPLITS = 8, 16, 160, 2336, 512


def _first_fits(x, k, kh, kw, stride):
    c = x.shape[3]
    patch = ((FL_DH - 1) * stride + kh) * ((FL_DW - 1) * stride + kw) * c
    return x.dtype == np.float32 and kh * kw * c <= FL_R and patch <= FL_PATCH and k % 8 == 0 and available()


def _first_tiles(n, oh, ow):
    return n * -(-oh // FL_DH) * -(-ow // FL_DW)


# The batch norm after an integer convolution takes its statistics from sums the forward's
# epilogue adds up (conv_mma.cu's channel_sums) instead of reading the output once more (resnet18
# 224 px at batch 256: the statistics 2.1 -> 0.8 ms a step, for 0.2 ms more in the int8 forwards;
# docs/performance.md). TERNET_CONV_SUMS=0 turns it off (the statistics are the same bits either
# way: tests/test_gpu_full.py).
SUMS = os.environ.get("TERNET_CONV_SUMS", "1") != "0"
# The first layer's forward (float32 images) adds up its output's sums too, in float64 (not
# exact: a fixed order, conv_mma.cu's conv_fwd_first; the statistics within float64 rounding of
# the pass's, not its bits). TERNET_FIRST_SUMS=0 turns that off.
FIRST_SUMS = os.environ.get("TERNET_FIRST_SUMS", "1") != "0"


class ConvSums:
    """Per-channel sums of a forward's output, for the batch norm right after it: part (2, K,
    blocks), part[0, k, b] = sum over the rows of block b of channel k's values, part[1, k, b] =
    of their squares; m rows. int64 from an integer forward: sums of the accumulators a, out = a *
    scale (a power of two); exact, the same whatever the order (kernels.batchnorm.
    _stats_from_sums_cuda). float64 from the first layer's (scale 0): sums of out itself, in the
    kernel's fixed order (kernels.batchnorm._stats_from_fsums_cuda)."""

    def __init__(self, part, scale, m):
        self.part, self.scale, self.m = part, np.float64(scale), m
        _SUMS_LAST[0] = self

    def current(self):
        """Whether part still holds these sums: it is a scratch buffer, which the next
        convolution's sums overwrite (callers then read the output itself)."""
        return _SUMS_LAST[0] is self


_SUMS_LAST = [None]


def _sums_fit(m, r, scale):
    """Whether ConvSums' statistics are exact (scalar.int_shifted_sums): scale a power of two and
    4 m max|a|^2 <= 2^53, |a| <= r / scale (ternary inputs, states within +-1/scale) <= 32767
    (the epilogue's 32-bit sums of four squares)."""
    mant, _ = np.frexp(np.float64(scale))
    return SUMS and scale > 0 and mant == 0.5 and r / scale <= 32767 and 4 * m * (r / scale) ** 2 <= 2.0 ** 53


def forward(out, x, w, scale, stride, pad, sums=False):
    """conv2d_forward on tensor cores when the shapes allow; returns False otherwise. sums=True (a
    batch norm comes right after, Conv2d.emit_sums): returns the output's ConvSums where the int8
    kernel ran and they are exact (_sums_fit), or the first-layer kernel ran (FIRST_SUMS), else
    True."""
    n, h, wd, c = x.shape
    k, kh, kw, _ = w.shape
    if _first_fits(x, k, kh, kw, stride):
        _, oh, ow, _ = out.shape
        g = _geom(n=n, h=h, w=wd, c=c, k=k, kh=kh, kw=kw, oh=oh, ow=ow, stride=stride, pad=pad, r=kh * kw * c)
        blocks = min(_first_tiles(n, oh, ow), MAX_BLOCKS)
        grid = (blocks, (k + 63) // 64)
        if sums and FIRST_SUMS:
            res = ConvSums(scratch("conv.fsums", (2, k, blocks), np.float64), 0.0, n * oh * ow)
            _kernels()["conv_fwd_first_f32_sums"][grid, 256](_ptr(x), _ptr(w), _ptr(out), _ptr(g), np.float32(scale),
                                                             _ptr(res.part))
            return res
        _kernels()["conv_fwd_first_f32"][grid, 256](_ptr(x), _ptr(w), _ptr(out), _ptr(g), np.float32(scale))
        return True
    if x.dtype != np.int8 or c % 64 or not available():
        return False
    _, oh, ow, _ = out.shape
    g = _geom(n=n, h=h, w=wd, c=c, k=k, kh=kh, kw=kw, oh=oh, ow=ow, stride=stride, pad=pad, m=n * oh * ow,
              r=kh * kw * c)
    bn = 64 if k <= 64 else 128
    kern = _kernels()[f"conv_fwd_s8_{bn}"]
    m, blocks = n * oh * ow, (n * oh * ow + 127) // 128
    res = ConvSums(scratch("conv.sums", (2, k, blocks), np.int64), scale, m) \
        if sums and _sums_fit(m, kh * kw * c, scale) else None
    kern[(blocks, (k + bn - 1) // bn), 256](_ptr(x), _ptr(w), _ptr(out), _ptr(g), np.float32(scale),
                                            _ptr(res.part) if res is not None else 0)
    return res if res is not None else True


def backward_input(dx, dy, w, scale, stride, pad, dy16=None):
    """dx = transposed conv of dy: a stride-1 bf16 convolution of dy, dilated by the stride
    (zeros skipped by the loader, not stored), with the flipped, transposed weights; returns
    False when the shapes do not fit. Stride 2: one grid layer (z) per parity of dx's (y, x),
    each running only the taps that reach it."""
    n, h, wd, c = dx.shape
    k, kh, kw, _ = w.shape
    _, oh, ow, _ = dy.shape
    if k % 32 or stride > 2 or not available():     # the kernel's dilation is 1 or 2
        return False
    dy16 = bf16(dy) if dy16 is None else dy16
    wf = flip_weight_bf16(w, scale)
    g = _geom(n=n, h=oh, w=ow, c=k, k=c, kh=kh, kw=kw, oh=h, ow=wd, stride=1, pad=kh - 1 - pad, m=n * h * wd,
              r=kh * kw * k, dil=stride)
    bn = 64 if c <= 64 else 128
    kern = _kernels()[f"conv_fwd_bf16_{bn}"]
    rows, z = (n * h * wd, 1) if stride == 1 else (n * ((h + 1) // 2) * ((wd + 1) // 2), 4)   # the largest parity
    kern[((rows + 127) // 128, (c + bn - 1) // bn, z), 256](_ptr(dy16), _ptr(wf), _ptr(dx), _ptr(g), np.float32(1.0))
    return True


def backward_weight_partials(dy, x, stride, pad, kh, kw, dy16=None):
    """(splits, K, R) float32 partial sums of the weight gradient, or None when shapes do not fit."""
    n, h, wd, c = x.shape
    _, oh, ow, k = dy.shape
    if _first_fits(x, k, kh, kw, stride):
        tiles = _first_tiles(n, oh, ow)
        chunk = -(-tiles // FL_SPLITS)
        splits = -(-tiles // chunk)
        part = scratch("conv.dw_part", (splits, k, kh * kw * c), np.float32)
        g = _geom(n=n, h=h, w=wd, c=c, k=k, kh=kh, kw=kw, oh=oh, ow=ow, stride=stride, pad=pad, r=kh * kw * c,
                  chunk=chunk)
        _kernels()["conv_dw_first_f32"][(1, (k + 63) // 64, splits), 256](_ptr(dy), _ptr(x), _ptr(part), _ptr(g))
        return part
    if x.dtype != np.int8 or c % 16 or k % 8 or not available():
        return None
    dy16 = bf16(dy) if dy16 is None else dy16
    m, r = n * oh * ow, kh * kw * c
    splits = (m + DW_CHUNK - 1) // DW_CHUNK
    part = scratch("conv.dw_part", (splits, k, r), np.float32)     # summed by the caller, then free
    g = _geom(n=n, h=h, w=wd, c=c, k=k, kh=kh, kw=kw, oh=oh, ow=ow, stride=stride, pad=pad, m=m, r=r, chunk=DW_CHUNK)
    bm = 64 if k <= 64 else 128     # output channels per block
    _kernels()["conv_dw_bf16" if bm == 128 else "conv_dw_bf16_64"][((k + bm - 1) // bm, (r + 127) // 128, splits), 256](
        _ptr(dy16), _ptr(x), _ptr(part), _ptr(g))
    return part
