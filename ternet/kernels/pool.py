"""Pooling on NHWC: max pooling (argmax kept as the window position, uint8), average pooling
(padding counted as zeros, divisor k*k) and global average pooling.
Exercise: pytest tests/test_ops.py -k pool, tests/test_cuda_pool.py; on a GPU, pytest -m gpu
tests/test_gpu_full.py -k pool (pool_vec.cu's kernels against the numba ones).
"""
import functools
import os
from typing import NamedTuple

import numba
import numpy as np

from numba import cuda, int32

from . import THREADS, check, empty, grid1d, on_device, stream_threads, view
from .conv import out_size


# ----------------------------------------------------------------------------------------------
# CPU implementation

@numba.njit(parallel=True, cache=True)
def _maxpool_fwd(x, k, stride, pad, out, arg):
    # window taps outermost, channels innermost (contiguous, vectorisable); first maximum wins
    n_img, h, w, c = x.shape
    _, oh_n, ow_n, _ = out.shape
    for n in numba.prange(n_img):
        for oh in range(oh_n):
            for ow in range(ow_n):
                o, a = out[n, oh, ow], arg[n, oh, ow]
                first = True
                for i in range(k):
                    ih = oh * stride - pad + i
                    if ih < 0 or ih >= h:
                        continue
                    for j in range(k):
                        iw = ow * stride - pad + j
                        if iw < 0 or iw >= w:
                            continue
                        v = x[n, ih, iw]
                        if first:
                            o[:] = v
                            a[:] = i * k + j
                            first = False
                            continue
                        for ch in range(c):
                            if v[ch] > o[ch]:
                                o[ch] = v[ch]
                                a[ch] = i * k + j


@numba.njit(parallel=True, cache=True)
def _maxpool_bwd(dout, arg, k, stride, pad, dx):
    n_img, oh_n, ow_n, c = dout.shape
    _, h, w, _ = dx.shape
    for n in numba.prange(n_img):
        if stride == k and pad == 0:
            # disjoint windows: each input element gets its window's dout or 0, written once in
            # memory order (no zero pass, no scattered adds: ~3x faster than the general loop)
            dx[n, oh_n * k:] = 0
            dx[n, :, ow_n * k:] = 0
            for oh in range(oh_n):
                for i in range(k):
                    for ow in range(ow_n):
                        a, g = arg[n, oh, ow], dout[n, oh, ow]
                        for j in range(k):
                            d = dx[n, oh * k + i, ow * k + j]
                            for ch in range(c):
                                d[ch] = g[ch] if a[ch] == i * k + j else np.float32(0.0)
            continue
        dx[n] = 0
        for oh in range(oh_n):
            for ow in range(ow_n):
                for ch in range(c):
                    p = arg[n, oh, ow, ch]
                    dx[n, oh * stride - pad + p // k, ow * stride - pad + p % k, ch] += dout[n, oh, ow, ch]


@numba.njit(parallel=True, cache=True)
def _avgpool_fwd(x, k, stride, pad, out):
    n_img, h, w, c = x.shape
    _, oh_n, ow_n, _ = out.shape
    inv = np.float32(1.0 / (k * k))
    for n in numba.prange(n_img):
        for oh in range(oh_n):
            for ow in range(ow_n):
                for ch in range(c):
                    s = np.float32(0.0)
                    for i in range(k):
                        ih = oh * stride - pad + i
                        for j in range(k):
                            iw = ow * stride - pad + j
                            if 0 <= ih < h and 0 <= iw < w:
                                s += x[n, ih, iw, ch]
                    out[n, oh, ow, ch] = s * inv


@numba.njit(parallel=True, cache=True)
def _avgpool_bwd(dout, k, stride, pad, dx):
    # each input element sums the dout of the windows covering it, in (oh, ow) order, then scales
    # once: the GPU gathers the same sums in the same order, so the paths agree to the bit
    n_img, oh_n, ow_n, c = dout.shape
    _, h, w, _ = dx.shape
    inv = np.float32(1.0 / (k * k))
    for n in numba.prange(n_img):
        dx[n] = 0
        for oh in range(oh_n):
            for ow in range(ow_n):
                for i in range(k):
                    ih = oh * stride - pad + i
                    for j in range(k):
                        iw = ow * stride - pad + j
                        if 0 <= ih < h and 0 <= iw < w:
                            for ch in range(c):
                                dx[n, ih, iw, ch] += dout[n, oh, ow, ch]
        dx[n] *= inv


@numba.njit(parallel=True, cache=True)
def _gap_fwd(x, out):
    # float32 sums over (h, w) in row-major order, as the GPU kernel
    n_img, h, w, c = x.shape
    inv = np.float32(1.0 / (h * w))
    for n in numba.prange(n_img):
        out[n] = 0
        for ih in range(h):
            for iw in range(w):
                out[n] += x[n, ih, iw]
        out[n] *= inv


# ----------------------------------------------------------------------------------------------
# CUDA kernels
#
# One thread per output element in the forwards. The backwards gather instead of scattering:
# one thread per INPUT element visits the output windows that cover it (overlapping windows
# included) in (oh, ow) order, so no two threads write one element, no atomics are needed, and
# the float32 sums are the CPU's, in the CPU's order. Disjoint windows (k == stride, pad 0, the
# usual 2x2/2) take a kernel with one thread per window instead, which writes its k*k inputs.
#
# Index arithmetic is int64 in numba, and a 64-bit `//` or `%` is a long emulated sequence on the
# GPU: the max-pool backwards split their flat index into (n, row, col, ch) once per thread
# (_digits) and step it by the grid size with adds and carries (_advance), not per element. (The
# forward stepped alike measured slower on the H200, so it still divides per element.)

@numba.njit(inline="always")
def _unravel(o, b, c):
    """(n, row, col, ch) of flat index o into an NHWC array with b columns and c channels."""
    ch = o % c
    t = o // c
    col = t % b
    t = t // b
    return t, col, ch


@numba.njit(inline="always")
def _digits(o, rows, cols, c):
    """(n, row, col, ch) of flat index o >= 0 into an NHWC array of (rows, cols, c) per image."""
    t = o // c
    u = t // cols
    n = u // rows
    return n, u - n * rows, t - u * cols, o - t * c


@numba.njit(inline="always")
def _advance(at, by, rows, cols, c):
    """Digits of the flat index `at` + `by` (both (n, row, col, ch) tuples from _digits), added
    with carries: each digit of `by` is below its radix, so one compare-and-subtract per digit."""
    n, row, col, ch = at
    ch += by[3]
    col += by[2]
    if ch >= c:
        ch -= c
        col += 1
    row += by[1]
    if col >= cols:
        col -= cols
        row += 1
    n += by[0]
    if row >= rows:
        row -= rows
        n += 1
    return n, row, col, ch


@numba.njit(inline="always")
def _covering(i, k, stride, pad, n_out):
    """range(lo, hi) of the output positions whose window (k, stride, pad) covers input i."""
    top = i + pad - k + 1                      # first window start that still reaches i
    lo = 0 if top <= 0 else (top + stride - 1) // stride
    hi = min(n_out, (i + pad) // stride + 1)
    return lo, hi


@cuda.jit(device=True, inline=True)
def _window_max(x, n, oh, ow, ch, k, stride, pad, h, w):
    """(max, i * k + j of its first position) over the window of output (oh, ow), channel ch."""
    best, pos, first = x[n, 0, 0, ch], 0, True
    for i in range(k):
        ih = oh * stride - pad + i
        if ih < 0 or ih >= h:
            continue
        for j in range(k):
            iw = ow * stride - pad + j
            if iw < 0 or iw >= w:
                continue
            v = x[n, ih, iw, ch]
            if first or v > best:              # first maximum wins, as the CPU path
                best, pos, first = v, i * k + j, False
    return best, pos


@cuda.jit
def _maxpool_fwd_cuda(x, k, stride, pad, out, arg):
    # (divides per element: the stepped version measured slower on the H200, 0.68 -> 0.81 ms on
    # vgg-gxnor's first pooling at batch 512, ninth session)
    _, h, w, c = x.shape
    _, oh_n, ow_n, _ = out.shape
    for o in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        t, ow, ch = _unravel(o, ow_n, c)
        n, oh = t // oh_n, t % oh_n
        best, pos = _window_max(x, n, oh, ow, ch, k, stride, pad, h, w)
        out[n, oh, ow, ch] = best
        arg[n, oh, ow, ch] = pos


def covering_table(h, w, k, stride, pad):
    """(H + W, 2) int32: (lo, hi) of _covering for each input row, then for each input column: the
    windows covering an input element, looked up instead of divided out where a kernel gathers
    a max pool's gradient element by element (batchnorm's --save-memory stem)."""
    oh, ow = out_size(h, k, stride, pad), out_size(w, k, stride, pad)
    return np.array([_covering(i, k, stride, pad, oh) for i in range(h)] +
                    [_covering(i, k, stride, pad, ow) for i in range(w)], np.int32).reshape(h + w, 2)


@cuda.jit(device=True, inline=True)
def pool_grad_at(dout, arg, n, ih, iw, ch, k, stride, pad, oh0, oh1, ow0, ow1):
    """The max pool's input gradient at (n, ih, iw, ch) (int64 indices), whose covering windows
    are rows [oh0, oh1) x columns [ow0, ow1) (_covering): the douts of the windows whose argmax is
    that input, summed in window order from 0.0, as every backward kernel here sums them (the row
    kernel and the disjoint one give the same bits)."""
    s = np.float32(0.0)
    for oh in range(oh0, oh1):
        for ow in range(ow0, ow1):
            if arg[n, oh, ow, ch] == (ih - oh * stride + pad) * k + (iw - ow * stride + pad):
                s += dout[n, oh, ow, ch]
    return s


@cuda.jit
def _maxpool_bwd_cuda(dout, arg, k, stride, pad, dx):
    _, h, w, c = dx.shape
    at, by = _digits(cuda.grid(1), h, w, c), _digits(cuda.gridsize(1), h, w, c)
    _, oh_n, ow_n, _ = dout.shape
    for _e in range(cuda.grid(1), dx.size, cuda.gridsize(1)):
        n, ih, iw, ch = at
        oh0, oh1 = _covering(ih, k, stride, pad, oh_n)
        ow0, ow1 = _covering(iw, k, stride, pad, ow_n)
        dx[n, ih, iw, ch] = pool_grad_at(dout, arg, n, ih, iw, ch, k, stride, pad, oh0, oh1, ow0, ow1)
        at = _advance(at, by, h, w, c)


ROW_MAX = 1024     # widest input row the row kernels take (their covering table is in shared memory)


@cuda.jit
def _maxpool_fwd_rows_cuda(x, k, stride, pad, out, arg):
    # one block per output row (n, oh), striding over rows; its threads step through the row's
    # (ow, ch) elements with adds and a carry, so no element pays a 64-bit division. (Addressing
    # flat arrays from per-row bases instead, as the backward does, measured slower here: 1.35 ->
    # 1.72 ms on ResNet-18's 224 px stem pooling at batch 256, thirteenth session.)
    n_img, h, w, c = x.shape
    _, oh_n, ow_n, _ = out.shape
    tid, nt = cuda.threadIdx.x, cuda.blockDim.x
    t_ow, t_ch, d_ow, d_ch = tid // c, tid % c, nt // c, nt % c
    for row in range(cuda.blockIdx.x, n_img * oh_n, cuda.gridDim.x):
        n = row // oh_n
        oh = row - n * oh_n
        ow, ch = t_ow, t_ch
        while ow < ow_n:
            best, pos = _window_max(x, n, oh, ow, ch, k, stride, pad, h, w)
            out[n, oh, ow, ch] = best
            arg[n, oh, ow, ch] = pos
            ch += d_ch
            ow += d_ow
            if ch >= c:
                ch -= c
                ow += 1


@cuda.jit
def _maxpool_bwd_rows_cuda(dout, arg, h, w, c, k, stride, pad, oh_n, ow_n, dx):
    # the gather of _maxpool_bwd_cuda (same sums, same order) on flat arrays, one block per input
    # row (n, ih), striding over rows: the output rows covering ih are found once per row, the
    # output columns covering each iw once per block (a table in shared memory), and the threads
    # step through the row's (iw, ch) elements with adds: no division per element
    lo = cuda.shared.array(ROW_MAX, int32)
    hi = cuda.shared.array(ROW_MAX, int32)
    tid, nt = cuda.threadIdx.x, cuda.blockDim.x
    for iw in range(tid, w, nt):
        lo[iw], hi[iw] = _covering(iw, k, stride, pad, ow_n)
    cuda.syncthreads()
    run, orun = w * c, ow_n * c
    t_iw, t_ch, d_iw, d_ch = tid // c, tid % c, nt // c, nt % c
    for row in range(cuda.blockIdx.x, dx.size // run, cuda.gridDim.x):
        n = row // h
        ih = row - n * h
        oh0, oh1 = _covering(ih, k, stride, pad, oh_n)
        iw, ch = t_iw, t_ch
        for e in range(tid, run, nt):
            s = np.float32(0.0)
            for oh in range(oh0, oh1):
                base = (n * oh_n + oh) * orun + ch
                tap = (ih - oh * stride + pad) * k + iw + pad     # minus ow * stride: the window's tap
                for ow in range(lo[iw], hi[iw]):
                    g = dout[base + ow * c]                # loaded with the argmax, not after it
                    if arg[base + ow * c] == tap - ow * stride:
                        s += g
            dx[row * run + e] = s
            ch += d_ch
            iw += d_iw
            if ch >= c:
                ch -= c
                iw += 1


def _maxpool_fwd_rows(out, arg, inp, k, stride, pad):
    _maxpool_fwd_rows_cuda[grid1d(out.shape[0] * out.shape[1] * THREADS)](inp, k, stride, pad, out, arg)


def _maxpool_bwd_rows(dinp, dout, arg, k, stride, pad):
    n, h, w, c = dinp.shape
    _, oh, ow, _ = dout.shape
    _maxpool_bwd_rows_cuda[grid1d(n * h * THREADS)](view(dout, dout.size), view(arg, arg.size), h, w, c, k, stride,
                                                    pad, oh, ow, view(dinp, dinp.size))


@cuda.jit
def _maxpool_bwd_disjoint_cuda(dout, arg, k, dx):
    # k == stride, pad 0: one thread per window writes its k*k inputs, dout at the argmax and 0
    # elsewhere; the thread of a last window in a row (column) also zeroes the columns (rows)
    # that no window covers. Consecutive threads hold consecutive channels: coalesced.
    _, h, w, c = dx.shape
    _, oh_n, ow_n, _ = dout.shape
    at, by = _digits(cuda.grid(1), oh_n, ow_n, c), _digits(cuda.gridsize(1), oh_n, ow_n, c)
    for _o in range(cuda.grid(1), dout.size, cuda.gridsize(1)):
        n, oh, ow, ch = at
        g = np.float32(0.0) + dout[n, oh, ow, ch]   # the gather's 0 + dout, to the bit (-0 -> +0)
        tap = arg[n, oh, ow, ch]
        ih0, iw0 = oh * k, ow * k
        rows = k if oh < oh_n - 1 else h - ih0
        cols = k if ow < ow_n - 1 else w - iw0
        for i in range(rows):
            for j in range(cols):
                # i >= k gives i * k + j > any tap; j >= k would alias the next row's taps
                dx[n, ih0 + i, iw0 + j, ch] = g if j < k and i * k + j == tap else np.float32(0.0)
        at = _advance(at, by, oh_n, ow_n, c)


@cuda.jit
def _avgpool_fwd_cuda(x, k, stride, pad, inv, out):
    _, h, w, c = x.shape
    _, oh_n, ow_n, _ = out.shape
    for o in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        t, ow, ch = _unravel(o, ow_n, c)
        n, oh = t // oh_n, t % oh_n
        s = np.float32(0.0)
        for i in range(k):
            ih = oh * stride - pad + i
            for j in range(k):
                iw = ow * stride - pad + j
                if 0 <= ih < h and 0 <= iw < w:
                    s += np.float32(x[n, ih, iw, ch])
        out[n, oh, ow, ch] = s * inv


@cuda.jit
def _avgpool_bwd_cuda(dout, k, stride, pad, inv, dx):
    _, h, w, c = dx.shape
    _, oh_n, ow_n, _ = dout.shape
    for e in range(cuda.grid(1), dx.size, cuda.gridsize(1)):
        t, iw, ch = _unravel(e, w, c)
        n, ih = t // h, t % h
        oh0, oh1 = _covering(ih, k, stride, pad, oh_n)
        ow0, ow1 = _covering(iw, k, stride, pad, ow_n)
        s = np.float32(0.0)
        for oh in range(oh0, oh1):
            for ow in range(ow0, ow1):
                s += dout[n, oh, ow, ch]
        dx[n, ih, iw, ch] = s * inv


@cuda.jit
def _gap_fwd_cuda(x, inv, out):
    n_img, h, w, c = x.shape
    for o in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        n, ch = o // c, o % c
        s = np.float32(0.0)
        for ih in range(h):
            for iw in range(w):
                s += np.float32(x[n, ih, iw, ch])
        out[n, ch] = s * inv


@cuda.jit
def _gap_bwd_cuda(dout, inv, hwc, dx):
    # dx flat (N * H * W * C,)
    c = dout.shape[1]
    for e in range(cuda.grid(1), dx.size, cuda.gridsize(1)):
        dx[e] = dout[e // hwc, e % c] * inv


# ----------------------------------------------------------------------------------------------
# launchers

def pool_out_shape(shape, k, stride, pad):
    n, h, w, c = shape
    return (n, out_size(h, k, stride, pad), out_size(w, k, stride, pad), c)


# ----------------------------------------------------------------------------------------------
# four channels per thread: pool_vec.cu's kernels, linked (real GPUs only: conv_tc.available();
# the numba kernels above are the reference and the simulator's path). Same bits.

VEC_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pool_vec.cu")
POOL_GEOM = ("n", "h", "w", "c", "oh", "ow", "k", "stride", "pad")


@functools.lru_cache(maxsize=None)
def _vec_kernels():
    from numba import types
    i8p, u8p, f32p, i32p = (types.CPointer(t) for t in (types.int8, types.uint8, types.float32, types.int32))

    def fwd(name, t):
        fn = cuda.declare_device(name, types.int32(t, t, u8p, i32p), link=VEC_SRC)

        @cuda.jit(types.void(t, t, u8p, i32p), link=[VEC_SRC])
        def k_fwd(x, out, arg, g):
            fn(x, out, arg, g)
        return k_fwd

    bwd = cuda.declare_device("maxpool_bwd_x4", types.int32(f32p, u8p, f32p, i32p), link=VEC_SRC)

    @cuda.jit(types.void(f32p, u8p, f32p, i32p), link=[VEC_SRC])
    def k_bwd(dout, arg, dx, g):
        bwd(dout, arg, dx, g)

    u16p = types.CPointer(types.uint16)
    bwd16 = cuda.declare_device("maxpool_bwd_x4_bf16", types.int32(f32p, u8p, f32p, u16p, i32p), link=VEC_SRC)

    @cuda.jit(types.void(f32p, u8p, f32p, u16p, i32p), link=[VEC_SRC])
    def k_bwd16(dout, arg, dx, dx16, g):
        bwd16(dout, arg, dx, dx16, g)

    return {"int8": fwd("maxpool_fwd_s8x4", i8p), "float32": fwd("maxpool_fwd_f32x4", f32p), "bwd": k_bwd,
            "bwd_bf16": k_bwd16}


def _vec_geom(inp_shape, out_shape, k, stride, pad):
    from .conv_tc import _ptr, device_ints
    n, h, w, c = inp_shape
    values = dict(n=n, h=h, w=w, c=c, oh=out_shape[1], ow=out_shape[2], k=k, stride=stride, pad=pad)
    return _ptr(device_ints(tuple(values[f] for f in POOL_GEOM)))


def _vec_fits(shape, groups):
    from .conv_tc import available
    return shape[3] % 4 == 0 and 0 < groups < 2 ** 31 and available()


def _maxpool_fwd_vec(out, arg, inp, k, stride, pad):
    from .conv_tc import _ptr
    if inp.dtype not in (np.int8, np.float32) or not _vec_fits(inp.shape, out.size // 4):
        return False
    geom = _vec_geom(inp.shape, out.shape, k, stride, pad)
    _vec_kernels()[str(inp.dtype)][grid1d(out.size // 4)](_ptr(inp), _ptr(out), _ptr(arg), geom)
    return True


def _maxpool_bwd_vec(dinp, dout, arg, k, stride, pad, dinp16=None):
    # dinp None: dinp16 alone (the kernel's float32 output pointer null)
    from .conv_tc import _ptr
    into = dinp if dinp is not None else dinp16
    if not _vec_fits(into.shape, into.size // 4):
        return False
    geom = _vec_geom(into.shape, dout.shape, k, stride, pad)
    grid = grid1d(into.size // 4)
    dx = _ptr(dinp) if dinp is not None else 0
    if dinp16 is None:
        _vec_kernels()["bwd"][grid](_ptr(dout), _ptr(arg), dx, geom)
    else:
        _vec_kernels()["bwd_bf16"][grid](_ptr(dout), _ptr(arg), dx, _ptr(dinp16), geom)
    return True


def maxpool_backward_bf16(dinp16, dout, arg, k, stride, pad):
    """maxpool_backward's bf16 bits alone into dinp16 (uint16, the input's shape; no float32
    gradient written), where the four-channel kernel runs (GPU); returns whether it ran."""
    check(dout.shape == pool_out_shape(dinp16.shape, k, stride, pad) and arg.shape == dout.shape,
          "maxpool_backward_bf16: bad dout or arg shape")
    return _maxpool_bwd_vec(None, dout, arg, k, stride, pad, dinp16)


def maxpool_forward(out, arg, inp, k, stride, pad):
    """out = max over each window (same dtype as inp: int8 or float32); arg (uint8) = window
    position i * k + j of the first maximum. Overwrites out and arg."""
    check(out.shape == pool_out_shape(inp.shape, k, stride, pad), "maxpool: bad out shape")
    check(pad < k, "maxpool: padding must be smaller than the window")
    check(k * k <= 256, "maxpool: window positions must fit in uint8")
    if on_device(out, inp):
        if _maxpool_fwd_vec(out, arg, inp, k, stride, pad):
            return
        if out.size and inp.shape[2] <= ROW_MAX:
            _maxpool_fwd_rows(out, arg, inp, k, stride, pad)
        elif out.size:
            _maxpool_fwd_cuda[grid1d(out.size)](inp, k, stride, pad, out, arg)
        return
    stream_threads(_maxpool_fwd, inp, k, stride, pad, out, arg)


class PoolGrad(NamedTuple):
    """A max pool's input gradient not yet computed: its output gradient, argmax and window, and
    the input's shape. What MaxPool.backward hands a fused batch norm before it on the GPU
    (kernels.batchnorm takes its sums from the pool's side and gathers each element of its dx
    where it reads it, so the input-sized float32 gradient is not stored); store: whether it may
    be stored where the fast gather does not run (not under --save-memory). materialize() computes
    it as maxpool_backward would."""
    dout: object
    arg: object
    k: int
    stride: int
    pad: int
    shape: tuple
    store: bool = True

    def materialize(self):
        dx = empty(self.shape, np.float32, on_device(self.dout))
        maxpool_backward(dx, self.dout, self.arg, self.k, self.stride, self.pad)
        return dx


def maxpool_backward(dinp, dout, arg, k, stride, pad, dinp16=None):
    """dinp = each window's dout routed to its argmax (summed where windows overlap); overwrites
    dinp (float32). dinp16 (GPU, uint16 of dinp's size): also dinp's bf16 bits there, where the
    four-channel kernel runs; returns whether it wrote them."""
    check(dout.shape == pool_out_shape(dinp.shape, k, stride, pad) and arg.shape == dout.shape,
          "maxpool_backward: bad dout or arg shape")
    if on_device(dinp, dout, arg):
        if _maxpool_bwd_vec(dinp, dout, arg, k, stride, pad, dinp16):
            return dinp16 is not None
        if k == stride and pad == 0 and dout.size:
            _maxpool_bwd_disjoint_cuda[grid1d(dout.size)](dout, arg, k, dinp)
        elif dinp.size and dinp.shape[2] <= ROW_MAX:
            _maxpool_bwd_rows(dinp, dout, arg, k, stride, pad)
        elif dinp.size:
            _maxpool_bwd_cuda[grid1d(dinp.size)](dout, arg, k, stride, pad, dinp)
        return False
    stream_threads(_maxpool_bwd, dout, arg, k, stride, pad, dinp)
    return False


def avgpool_forward(out, inp, k, stride, pad):
    """out = sum over each window / (k*k) (zero padding counted); overwrites out (float32)."""
    check(out.shape == pool_out_shape(inp.shape, k, stride, pad), "avgpool: bad out shape")
    if on_device(out, inp):
        _avgpool_fwd_cuda[grid1d(out.size)](inp, k, stride, pad, np.float32(1.0 / (k * k)), out)
        return
    _avgpool_fwd(inp, k, stride, pad, out)


def avgpool_backward(dinp, dout, k, stride, pad):
    """dinp = dout spread evenly over each window; overwrites dinp."""
    if on_device(dinp, dout):
        _avgpool_bwd_cuda[grid1d(dinp.size)](dout, k, stride, pad, np.float32(1.0 / (k * k)), dinp)
        return
    _avgpool_bwd(dout, k, stride, pad, dinp)


def global_avgpool_forward(out, inp):
    """out (N, C) = mean over H and W of inp (N, H, W, C); overwrites out."""
    n, h, w, c = inp.shape
    check(tuple(out.shape) == (n, c), "global_avgpool: bad out shape")
    if on_device(out, inp):
        _gap_fwd_cuda[grid1d(out.size)](inp, np.float32(1.0 / (h * w)), out)
        return
    _gap_fwd(inp, out)


def global_avgpool_backward(dinp, dout):
    """dinp (N, H, W, C) = dout (N, C) / (H*W) broadcast; overwrites dinp."""
    n, h, w, c = dinp.shape
    if on_device(dinp, dout):
        _gap_bwd_cuda[grid1d(dinp.size)](dout, np.float32(1.0 / (h * w)), h * w * c, view(dinp, dinp.size))
        return
    dinp[:] = (dout * np.float32(1.0 / (h * w)))[:, None, None, :]
