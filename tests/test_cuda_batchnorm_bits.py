"""The batch norm CUDA kernels against the kernels they replaced, bit for bit (the simulator on
machines without a GPU): same inputs, same grid, every output compared as raw bits, the packed
window bits and the int16 / float32 records included. The previous kernels are kept below as the
reference: the new ones walk channels without a per-element `%`, index with uint64 and load
several rows (or chunks) before summing them, with the same float operations in the same order,
so nothing may change. (The simulator runs cuda.fma as a * b + c, as the old kernel's acc + d * d;
on the GPU NVVM contracted that to the fma the new kernel writes out, checked in the PTX.)
Shapes: C below, above and off the simulator's 64-thread block and 32-channel tile, odd row
counts, grids forced small so the grid-stride loops wrap and the lanes run past ROWS rows.
"""
import math
from fractions import Fraction

import numba
import numpy as np
import pytest
from numba import cuda

from cudacheck import first_mismatches, needs_cuda
from ternet.kernels import SIMULATOR, THREADS, grid1d
from ternet.kernels import batchnorm as bn
from ternet.kernels.activation import bit_of, num_words, pack_tile
from ternet.kernels.scalar import (WINDOW_RECT, WINDOW_TRI, affine, bn_dx, bn_stats, normalize, shifted_moments,
                                   ternarize, window_grad)

pytestmark = needs_cuda
TILE_C, LANES = bn.TILE_C, bn.LANES


# ----------------------------------------------------------------------------------------------
# the previous kernels (ternet/kernels/batchnorm.py before the channel walk and the row unrolling)

@cuda.jit(device=True)
def _old_lanes_to_part(sh, acc, part, k, c):
    tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
    j = cuda.blockIdx.y * TILE_C + tx
    sh[ty, tx] = acc
    cuda.syncthreads()
    if ty == 0 and j < c:
        t = sh[0, tx]
        for lane in range(1, LANES):
            t += sh[lane, tx]
        part[cuda.blockIdx.x, k, j] = t
    cuda.syncthreads()


@cuda.jit(device=True)
def _old_from_int16(q, s):
    return np.float32(q) / s


@cuda.jit(device=True)
def _old_to_int16(v, s):
    return math.floor(v * s + np.float32(0.5))


@cuda.jit(device=True)
def _old_int16_exact(v, s):
    if not abs(v * s) <= np.float32(32767.0):
        return False
    return _old_from_int16(_old_to_int16(v, s), s) == v


@cuda.jit
def _old_normalize_cuda(x, mean, invstd, gamma, beta, y, xhat):
    c = mean.size
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        j = i % c
        h = normalize(x[i], mean[j], invstd[j])
        xhat[i] = h
        y[i] = affine(h, gamma[j], beta[j])


@cuda.jit
def _old_affine_cuda(x, scale, shift, y):
    c = scale.size
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        y[i] = affine(x[i], scale[i % c], shift[i % c])


@cuda.jit
def _old_affine_act_cuda(x, scale, shift, r, out):
    c = scale.size
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        out[i] = ternarize(affine(x[i], scale[i % c], shift[i % c]), r)


@cuda.jit
def _old_bwd_sums_cuda(dy, xhat, part):
    sh = cuda.shared.array((LANES, TILE_C), numba.float64)
    m, c = dy.shape
    j = cuda.blockIdx.y * TILE_C + cuda.threadIdx.x
    step = (m + cuda.gridDim.x - 1) // cuda.gridDim.x
    a0, a1 = np.float64(0.0), np.float64(0.0)
    if j < c:
        for i in range(cuda.blockIdx.x * step + cuda.threadIdx.y, min(m, (cuda.blockIdx.x + 1) * step), LANES):
            g = dy[i, j]
            a0 += np.float64(g)
            a1 += np.float64(g * xhat[i, j])
    _old_lanes_to_part(sh, a0, part, 0, c)
    _old_lanes_to_part(sh, a1, part, 1, c)


@cuda.jit
def _old_bwd_dx_cuda(dy, xhat, gamma, invstd, sdy, sdyx, m, dx):
    c = gamma.size
    for i in range(cuda.grid(1), dx.size, cuda.gridsize(1)):
        j = i % c
        dx[i] = bn_dx(dy[i], xhat[i], gamma[j], invstd[j], sdy[j], sdyx[j], m)


@cuda.jit
def _old_bn_act_fwd_cuda(x, mean, invstd, gamma, beta, r, a, shape, s, out, xq, xf, bits):
    flags = cuda.shared.array(THREADS, numba.uint8)
    tid, n, c = cuda.threadIdx.x, x.size, mean.size
    for base in range(cuda.blockIdx.x * THREADS, n, cuda.gridDim.x * THREADS):
        i = base + tid
        f = np.uint8(0)
        if i < n:
            j = i % c
            v = x[i]
            y = affine(normalize(v, mean[j], invstd[j]), gamma[j], beta[j])
            out[i] = ternarize(y, r)
            if window_grad(y, r, a, shape) != 0:
                f = np.uint8(1)
            if s > 0:
                xq[i] = np.int16(_old_to_int16(v, s))
            else:
                xf[i] = v
        flags[tid] = f
        cuda.syncthreads()
        if shape == WINDOW_RECT:
            pack_tile(flags, bits, base, n)
        cuda.syncthreads()


@cuda.jit(device=True)
def _old_bn_act_point(i, j, dout, xq, xf, s, mean, invstd, bits, height, cg, cb, r, a, shape):
    v = _old_from_int16(xq[i], s) if s > 0 else xf[i]
    h = normalize(v, mean[j], invstd[j])
    if shape == WINDOW_RECT:
        w = height if bit_of(bits, i) else np.float32(0.0)
    else:
        w = window_grad(affine(h, cg[j], cb[j]), r, a, shape)
    return dout[i] * w, h


@cuda.jit
def _old_bn_act_bwd_sums_cuda(dout, xq, xf, s, mean, invstd, bits, height, cg, cb, r, a, shape, part):
    sh = cuda.shared.array((LANES, TILE_C), numba.float64)
    c = mean.size
    m = dout.size // c
    j = cuda.blockIdx.y * TILE_C + cuda.threadIdx.x
    step = (m + cuda.gridDim.x - 1) // cuda.gridDim.x
    a0, a1 = np.float64(0.0), np.float64(0.0)
    if j < c:
        for i in range(cuda.blockIdx.x * step + cuda.threadIdx.y, min(m, (cuda.blockIdx.x + 1) * step), LANES):
            g, h = _old_bn_act_point(i * c + j, j, dout, xq, xf, s, mean, invstd, bits, height, cg, cb, r, a, shape)
            a0 += np.float64(g)
            a1 += np.float64(g * h)
    _old_lanes_to_part(sh, a0, part, 0, c)
    _old_lanes_to_part(sh, a1, part, 1, c)


@cuda.jit
def _old_bn_act_bwd_dx_cuda(dout, xq, xf, s, mean, invstd, bits, height, cg, cb, r, a, shape, gamma, sdy, sdyx,
                            m, dx):
    c = mean.size
    for i in range(cuda.grid(1), dx.size, cuda.gridsize(1)):
        j = i % c
        g, h = _old_bn_act_point(i, j, dout, xq, xf, s, mean, invstd, bits, height, cg, cb, r, a, shape)
        dx[i] = bn_dx(g, h, gamma[j], invstd[j], sdy[j], sdyx[j], m)


# ----------------------------------------------------------------------------------------------
# harness

# (rows, C): C below the 32-channel tile, off it, and above the simulator's 64-thread block
SHAPES = [(37, 5), (13, 70), (9, 33)]


def same(new, old, grid, inputs, outputs, new_inputs=None):
    """Launch both kernels on copies of the same inputs (or new on new_inputs) and outputs (outputs
    pre-filled alike); assert every output is equal bit for bit."""
    dev = lambda args: [cuda.to_device(a) if isinstance(a, np.ndarray) else a for a in args]
    dev_in = dev(inputs)
    got = [cuda.to_device(o) for o in outputs]
    want = [cuda.to_device(o) for o in outputs]
    new[grid](*(dev_in if new_inputs is None else dev(new_inputs)), *got)
    old[grid](*dev_in, *want)
    for k, (g, w) in enumerate(zip(got, want)):
        g, w = g.copy_to_host(), w.copy_to_host()
        gb, wb = g.view(f"u{g.dtype.itemsize}"), w.view(f"u{w.dtype.itemsize}")
        np.testing.assert_array_equal(gb, wb, err_msg=f"output {k}\n{first_mismatches(g, w)}")
    return [g.copy_to_host() for g in got]


def grids1d(n):
    """The launcher's grid (the simulator's: at most 2 blocks) and 3 blocks (another stride)."""
    return [grid1d(n), (3, THREADS)]


def reduce_grids(m, c):
    """One chunk (what the launcher picks for under 128 rows: lanes run past ROWS rows) and
    three."""
    grid, block = bn._reduce_grid(m, c)
    return [((1, grid[1]), block), ((3, grid[1]), block)]


def channel_data(m, c, seed, int_scale=0):
    """x (m, C) float32 (multiples of 1/int_scale when int_scale > 0), its per-channel mean and
    invstd, gamma, beta: y = gamma * xhat + beta spans the window (r=1, a=0.5) and beyond."""
    rng = np.random.default_rng(seed)
    if int_scale:
        x = (rng.integers(-40, 41, (m, c)) / int_scale).astype(np.float32)
    else:
        x = (rng.standard_normal((m, c)) * 2 + 0.3).astype(np.float32)
    mean = x.mean(0).astype(np.float32)
    invstd = (1 / np.sqrt(x.var(0) + 1e-4)).astype(np.float32)
    gamma = rng.uniform(0.5, 1.5, c).astype(np.float32)
    beta = (rng.standard_normal(c) * 0.3).astype(np.float32)
    return x, mean, invstd, gamma, beta


# ----------------------------------------------------------------------------------------------
# fused batch norm + ternary activation

# (rows, C), int_scale, window: each record kind with each window; C = 64 divides the grid
# strides (the usual case on the GPU: a thread keeps its channel)
CASES = [((37, 5), 0, WINDOW_RECT), ((13, 70), 4, WINDOW_RECT), ((9, 33), 4, WINDOW_TRI), ((13, 70), 0, WINDOW_TRI),
         ((5, 64), 2, WINDOW_RECT)]


@pytest.mark.parametrize("shape,int_scale,window", CASES)
def test_bn_act_fwd_bits(shape, int_scale, window):
    m, c = shape
    x, mean, invstd, gamma, beta = channel_data(m, c, m + c, int_scale)
    n, s = x.size, np.float32(int_scale)
    outs = [np.full(n, 7, np.int8), np.full(n, 7, np.int16), np.full(n, 7, np.float32),
            np.full(num_words(n), 0xA5A5A5A5, np.uint32)]
    args = [x.reshape(-1), mean, invstd, gamma, beta, np.float32(1.0), np.float32(0.5), window, s]
    fwd = bn.bn_act_kernels(window == WINDOW_RECT, int_scale > 0)[0]
    for grid in grids1d(n):
        out, xq, xf, bits = same(fwd, _old_bn_act_fwd_cuda, grid, args, outs)
    assert {-1, 0, 1} <= set(out.tolist())                      # a test that bites
    if window == WINDOW_RECT:
        flags = np.unpackbits(bits.view(np.uint8), bitorder="little")[:n]
        assert 0 < flags.sum() < n
    record = xq / np.float32(int_scale) if int_scale else xf
    assert (record == x.reshape(-1)).all()


def bwd_inputs(m, c, int_scale, seed):
    rng = np.random.default_rng(seed)
    x, mean, invstd, cg, cb = channel_data(m, c, seed, int_scale)
    n = x.size
    dout = rng.standard_normal(n).astype(np.float32)
    dout[::11] = -0.0
    xq = np.round(x.reshape(-1) * int_scale).astype(np.int16) if int_scale else np.zeros(1, np.int16)
    xf = np.zeros(1, np.float32) if int_scale else x.reshape(-1).copy()
    bits = rng.integers(0, 2**32, num_words(n), dtype=np.uint64).astype(np.uint32)
    height = np.float32(1.0)
    return [dout, xq, xf, np.float32(int_scale), mean, invstd, bits, height, cg, cb, np.float32(1.0),
            np.float32(0.5)]


NO_D16 = np.zeros(1, np.uint16)       # the dx kernels' bf16 output when not wanted (a placeholder)


def bf16_reference(a):
    """bf16 bits of float32 a, rounded to nearest even (NaN kept quiet), in numpy."""
    u = a.view(np.uint32).astype(np.uint64)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    r = np.where(nan, u | 0x00400000, u + 0x7FFF + ((u >> 16) & 1))
    return ((r >> 16) & 0xFFFF).astype(np.uint16)


# the dx kernels' max-pool arguments when dout is the gradient itself (pk = 0: not read)
NO_POOL = [np.zeros((1, 1, 1, 1), np.float32), np.zeros((1, 1, 1, 1), np.uint8), np.zeros((1, 2), np.int32),
           np.int64(0), np.int64(0), 0, 0, 0]


@pytest.mark.parametrize("shape,int_scale,window", CASES)
def test_bn_act_bwd_bits(shape, int_scale, window):
    m, c = shape
    args = bwd_inputs(m, c, int_scale, 3 * m + c) + [window]
    new = args[:1] + NO_POOL + args[1:]
    n = m * c
    _, bwd_sums, bwd_dx = bn.bn_act_kernels(window == WINDOW_RECT, int_scale > 0)
    for grid in reduce_grids(m, c):
        part = np.full((grid[0][0], 2, c), np.nan, np.float64)
        sums = same(bwd_sums, _old_bn_act_bwd_sums_cuda, grid, args, [part])[0]
    assert (sums != 0).any()
    rng = np.random.default_rng(c)
    gamma = rng.uniform(0.5, 1.5, c).astype(np.float32)
    sdy, sdyx = sums.sum(0).astype(np.float32)
    tail = [gamma, sdy, sdyx, np.float64(m)]
    for grid in grids1d(n):
        dx = same(bwd_dx, _old_bn_act_bwd_dx_cuda, grid, args + tail,
                  [np.full(n, np.nan, np.float32)], new + tail + [NO_D16])[0]
    assert np.isfinite(dx).all() and (dx != 0).any()
    # and with the bf16 copy: the same dx, its bf16 bits beside it
    bwd_dx16 = bn.bn_act_kernels(window == WINDOW_RECT, int_scale > 0, to16=True)[2]
    d16, dx2 = cuda.to_device(np.zeros(n, np.uint16)), cuda.to_device(np.full(n, np.nan, np.float32))
    dev = [cuda.to_device(a) if isinstance(a, np.ndarray) else a for a in new + tail]
    bwd_dx16[grids1d(n)[1]](*dev, d16, dx2)
    np.testing.assert_array_equal(dx2.copy_to_host().view(np.uint32), dx.view(np.uint32))
    np.testing.assert_array_equal(d16.copy_to_host(), bf16_reference(dx))
    # the bf16 copy alone (to32=False: dx a placeholder, not written)
    only16 = bn.bn_act_kernels(window == WINDOW_RECT, int_scale > 0, to16=True, to32=False)[2]
    d16b, none = cuda.to_device(np.zeros(n, np.uint16)), cuda.to_device(np.full(1, np.nan, np.float32))
    only16[grids1d(n)[1]](*dev, d16b, none)
    np.testing.assert_array_equal(d16b.copy_to_host(), d16.copy_to_host())
    assert np.isnan(none.copy_to_host()).all()


# (N, H, W, C) of the batch norm's input, the max pool after it (k, stride, pad), int_scale, window
POOLED = [((2, 7, 6, 5), (3, 2, 1), 0, WINDOW_RECT), ((2, 6, 8, 70), (3, 2, 1), 4, WINDOW_TRI),
          ((3, 4, 6, 33), (2, 2, 0), 0, WINDOW_TRI), ((2, 5, 5, 64), (2, 2, 0), 2, WINDOW_RECT)]


def host_point(e, j, d, xq, xf, s, mean, invstd, bits, height, cg, cb, r, a, shape):
    """(g, xhat) at flat element e (channel j) for incoming gradient d, in numpy float32: the
    fused backward's per-element values (_old_bn_act_point)."""
    v = np.float32(xq[e]) / s if s > 0 else xf[e]
    h = (v - mean[j]) * invstd[j]
    if shape == WINDOW_RECT:
        w = height if (int(bits[e >> 5]) >> (e & 31)) & 1 else np.float32(0.0)
    else:
        w = window_grad(affine(h, cg[j], cb[j]), r, a, shape)
    return np.float32(d * w), np.float32(h)


def pooled_sums_order(pdout, parg, shape, pool, rec, chunks):
    """bn_act_pool_sums' part (chunks, 2, C) written out: the pool's output rows (n, oh, ow) in
    chunks of ceil(rows / chunks), lane l of LANES its rows l, l + LANES, ...; each row's window
    gradient at its argmax element e (g, xhat there), sums of g and g * xhat from 0.0 in float64,
    the lane sums added in lane order."""
    n, h, w, c = shape
    k, st, pd = pool
    _, oh, ow, _ = pdout.shape
    rows = n * oh * ow
    step = -(-rows // chunks)
    part = np.zeros((chunks, 2, c))
    for z in range(chunks):
        for j in range(c):
            lanes = np.zeros((LANES, 2))
            for lane in range(LANES):
                a0 = a1 = 0.0
                for row in range(z * step + lane, min(rows, (z + 1) * step), LANES):
                    b, rem = divmod(row, oh * ow)
                    y, x = divmod(rem, ow)
                    t = int(parg[b, y, x, j])
                    e = ((b * h + y * st - pd + t // k) * w + x * st - pd + t % k) * c + j
                    g, hh = host_point(e, j, pdout[b, y, x, j], *rec)
                    a0 += float(g)
                    a1 += float(np.float32(g * hh))
                lanes[lane] = a0, a1
            for q in range(2):
                tot = lanes[0, q]
                for lane in range(1, LANES):
                    tot += lanes[lane, q]
                part[z, q, j] = tot
    return part


@pytest.mark.parametrize("shape,pool,int_scale,window", POOLED)
def test_bn_act_bwd_pooled_bits(shape, pool, int_scale, window):
    """A fused batch norm with a max pool after it (ResNet's stem): the sums taken from the pool's
    side (bn_act_pool_sums) against their order written out in Python; dx with the pool's
    gradient gathered (bn_act_kernels(..., gather=True)) against the kernel reading the gradient
    maxpool_backward stored, overlapping (3/2, padded) and disjoint (2/2) windows, bit for bit, and
    dx once more written over the float32 record it reads."""
    from ternet.kernels.pool import covering_table, maxpool_backward, maxpool_forward, pool_out_shape
    n, h, w, c = shape
    k, st, pd = pool
    m = n * h * w
    args = bwd_inputs(m, c, int_scale, m + c) + [window]
    rng = np.random.default_rng(c)
    oshape = pool_out_shape(shape, k, st, pd)
    pout, parg = np.empty(oshape, np.float32), np.empty(oshape, np.uint8)
    maxpool_forward(pout, parg, rng.standard_normal(shape).astype(np.float32), k, st, pd)   # a real argmax
    pdout = rng.standard_normal(oshape).astype(np.float32)
    pdout[..., ::3] = -0.0
    dy = cuda.device_array(shape, np.float32)
    maxpool_backward(dy, cuda.to_device(pdout), cuda.to_device(parg), k, st, pd)
    dy = dy.copy_to_host().reshape(-1)
    assert (dy != 0).any() and (dy == 0).any()
    taps = np.array([(t // k, t % k) for t in range(k * k)], np.int32)
    pooled = bn.bn_act_pool_sums(window == WINDOW_RECT, int_scale > 0)
    for grid, block in reduce_grids(n * oshape[1] * oshape[2], c):
        part = cuda.to_device(np.full((grid[0], 2, c), np.nan, np.float64))
        dev = [cuda.to_device(v) if isinstance(v, np.ndarray) else v for v in args[1:]]
        pooled[grid, block](cuda.to_device(pdout), cuda.to_device(parg), cuda.to_device(taps), np.int64(h),
                            np.int64(w), np.int64(st), np.int64(pd), *dev, part)
        sums = part.copy_to_host()
        want = pooled_sums_order(pdout, parg, shape, pool, args[1:], grid[0])
        np.testing.assert_array_equal(sums.view(np.uint64), want.view(np.uint64))
    assert (sums != 0).any()
    # the same sums as those over the stored gradient, up to rounding: the order of the additions,
    # and where windows overlap, the float32 sum of their gradients there (float32 rounding)
    np.testing.assert_allclose(sums.sum(0), pooled_sums_order_flat(dy, args[1:], m, c), rtol=1e-6, atol=1e-6)
    ref = [dy] + NO_POOL + args[1:]
    fused = [np.zeros(1, np.float32), pdout, parg, covering_table(h, w, k, st, pd), np.int64(h), np.int64(w), k, st,
             pd] + args[1:]
    _, _, dx_read = bn.bn_act_kernels(window == WINDOW_RECT, int_scale > 0)
    _, _, dx_gather = bn.bn_act_kernels(window == WINDOW_RECT, int_scale > 0, gather=True)
    gamma = rng.uniform(0.5, 1.5, c).astype(np.float32)
    sdy, sdyx = sums.sum(0).astype(np.float32)
    tail = [gamma, sdy, sdyx, np.float64(m)]
    for grid in grids1d(m * c):
        dx = same(dx_gather, dx_read, grid, ref + tail + [NO_D16], [np.full(m * c, np.nan, np.float32)],
                  fused + tail + [NO_D16])[0]
    assert np.isfinite(dx).all() and (dx != 0).any()
    if int_scale == 0:          # dx over the float32 record xf (fused[10]), as BNAct.backward writes it
        dev = [cuda.to_device(a) if isinstance(a, np.ndarray) else a for a in fused + tail + [NO_D16]]
        dx_gather[grid1d(m * c)](*dev, dev[10])
        np.testing.assert_array_equal(dev[10].copy_to_host().view(np.uint32), dx.view(np.uint32))


def pooled_sums_order_flat(dy, rec, m, c):
    """(2, C): the sums of g and g * xhat over the stored gradient dy (m * C, flat), in float64."""
    out = np.zeros((2, c))
    for e in range(m * c):
        g, hh = host_point(e, e % c, dy[e], *rec)
        out[0, e % c] += float(g)
        out[1, e % c] += float(np.float32(g * hh))
    return out


# ----------------------------------------------------------------------------------------------
# batch statistics and plain batch norm

def fma(a, b, c):
    """a * b + c rounded once (float64), as cuda.fma on a GPU (numba's simulator rounds twice)."""
    if SIMULATOR:
        return a * b + c
    return float(Fraction(a) * Fraction(b) + Fraction(c))


def moments_order(x, chunks):
    """_moments_cuda's part (chunks, 2, C) written out: chunk z takes rows [z step, (z+1) step),
    lane l of LANES its rows l, l + LANES, ... in order (sums of d and, fused, d^2 from 0.0,
    d = x - x[0]), the lane sums added in lane order."""
    m, c = x.shape
    step = -(-m // chunks)
    part = np.zeros((chunks, 2, c))
    for z in range(chunks):
        for j in range(c):
            k = float(x[0, j])
            lanes = []
            for lane in range(LANES):
                a0 = a1 = 0.0
                for i in range(z * step + lane, min(m, (z + 1) * step), LANES):
                    d = float(x[i, j]) - k
                    a0, a1 = a0 + d, fma(d, d, a1)
                lanes.append((a0, a1))
            t0, t1 = lanes[0]
            for a0, a1 in lanes[1:]:
                t0, t1 = t0 + a0, t1 + a1
            part[z, :, j] = t0, t1
    return part


@pytest.mark.parametrize("m,c", SHAPES[::2])
def test_moments_bits(m, c):
    """The one-pass statistics' partial sums against their order written out in Python, and the
    int16 check's flag."""
    x, _, _, _, _ = channel_data(m, c, m * c, int_scale=2)
    x[m // 2, c // 2] = 0.3                # not a multiple of 1/2: the int16 check must flag it
    for grid in reduce_grids(m, c):
        want = moments_order(x, grid[0][0])
        for s in [np.float32(2), np.float32(0)]:
            part, flag = cuda.to_device(np.full((grid[0][0], 2, c), np.nan)), cuda.to_device(np.zeros(1, np.int32))
            bn._moments_cuda[grid](cuda.to_device(x), s, flag, part)
            np.testing.assert_array_equal(part.copy_to_host(), want)
            assert flag.copy_to_host()[0] == (s > 0)


def chunk_order_sum(col, lanes):
    """Sum of col (float64, one entry per chunk) in _chunk_sum's order: lane l adds entries l,
    l + lanes, ... from 0.0, then the lane sums are added in lane order."""
    lane_sums = []
    for lane in range(lanes):
        t = np.float64(0.0)
        for v in col[lane::lanes]:
            t += v
        lane_sums.append(t)
    t = lane_sums[0]
    for v in lane_sums[1:]:
        t += v
    return t


@pytest.mark.parametrize("chunks", [3, 16, 35])
def test_chunk_sums_bits(chunks):
    """The per-channel sums over the chunks' partial sums, for several chunk counts (the
    simulator's reduction grids have at most 2), against their order written out in Python: the
    backward's dgamma, dbeta bit for bit, and the statistics from them as the scalar functions
    make them."""
    rng = np.random.default_rng(chunks)
    c, m = 70, np.float64(50 * chunks)
    part = rng.standard_normal((chunks, 2, c)) * 10.0 ** rng.integers(-8, 9, (chunks, 2, c))
    part[:, 1] = np.abs(part[:, 1]) + part[:, 0] ** 2        # sums of squares about a shift
    sums = np.array([[chunk_order_sum(part[:, k, j], bn.FINAL_LANES) for j in range(c)] for k in range(2)])
    grid = bn._final_grid(c)
    dev = lambda *a: [cuda.to_device(v) for v in a]
    x = rng.standard_normal((3, c)).astype(np.float32) * 10          # the shift: x[0]
    mean32, invstd, stats = dev(np.zeros(c, np.float32), np.zeros(c, np.float32), np.zeros((2, c), np.float32))
    bn._stats_cuda[grid](cuda.to_device(part), m, cuda.to_device(x), np.float64(1e-4), mean32, invstd, stats)
    want = [bn_stats(*shifted_moments(np.float64(x[0, j]), sums[0, j], sums[1, j], m), m, np.float64(1e-4))
            for j in range(c)]
    want = np.array(want, np.float32)             # (mean, invstd, unbiased variance) per channel
    np.testing.assert_allclose(mean32.copy_to_host(), want[:, 0], rtol=1e-6)   # s2 - s1 d: contracted or not
    np.testing.assert_allclose(invstd.copy_to_host(), want[:, 1], rtol=1e-6)
    np.testing.assert_allclose(stats.copy_to_host(), np.stack([want[:, 0], want[:, 2]]), rtol=1e-6)
    dgamma, dbeta = dev(np.zeros(c, np.float32), np.zeros(c, np.float32))
    bn._bwd_final_cuda[grid](cuda.to_device(part), dgamma, dbeta)
    np.testing.assert_array_equal(dbeta.copy_to_host(), sums[0].astype(np.float32))
    np.testing.assert_array_equal(dgamma.copy_to_host(), sums[1].astype(np.float32))


class Reordered:
    """kernel[grid](*args) called as Reordered(kernel, f)[grid](*args) = f(kernel[grid], *args): the
    old kernels' argument lists on kernels that since took more arguments."""

    def __init__(self, kernel, f):
        self.kernel, self.f = kernel, f

    def __getitem__(self, grid):
        return lambda *args: self.f(self.kernel[grid], *args)


@pytest.mark.parametrize("m,c", SHAPES[::2])
def test_plain_batchnorm_bits(m, c):
    """The plain batch norm's kernels keeping xhat (float32, s = 0) against the old ones; their
    int16-record path (s > 0) is checked against this one in test_plain_batchnorm_int16_record."""
    x, mean, invstd, gamma, beta = channel_data(m, c, 7 * m + c)
    rng = np.random.default_rng(c)
    n = x.size
    dy, xhat = rng.standard_normal((m, c)).astype(np.float32), rng.standard_normal((m, c)).astype(np.float32)
    s0, q1, q2 = np.float32(0), cuda.to_device(np.zeros(1, np.int16)), cuda.to_device(np.zeros((1, 1), np.int16))
    dmean, dinv = cuda.to_device(mean), cuda.to_device(invstd)
    sums = Reordered(bn._bwd_sums_cuda, lambda k, dy, xh, part: k(dy, xh, s0, q2, dmean, dinv, part))
    norm = Reordered(bn._normalize_cuda, lambda k, *a: k(*a, s0, q1))
    dx = Reordered(bn._bwd_dx_cuda, lambda k, dy, xh, g, inv, sdy, sdyx, m, out: k(dy, xh, s0, q1, dmean, g, inv,
                                                                                  sdy, sdyx, m, NO_D16, out))
    for grid in reduce_grids(m, c):
        part = np.full((grid[0][0], 2, c), np.nan, np.float64)
        same(sums, _old_bwd_sums_cuda, grid, [dy, xhat], [part])
    flat = [x.reshape(-1), mean, invstd, gamma, beta]
    for grid in grids1d(n):
        same(norm, _old_normalize_cuda, grid, flat, [np.zeros(n, np.float32), np.zeros(n, np.float32)])
        same(bn._affine_cuda, _old_affine_cuda, grid, [x.reshape(-1), gamma, beta], [np.zeros(n, np.float32)])
        same(bn._affine_act_cuda, _old_affine_act_cuda, grid, [x.reshape(-1), gamma, beta, np.float32(0.8)],
             [np.zeros(n, np.int8)])
        same(dx, _old_bwd_dx_cuda, grid,
             [dy.reshape(-1), xhat.reshape(-1), gamma, invstd, beta, mean, np.float64(m)], [np.zeros(n, np.float32)])


@pytest.mark.parametrize("m,c", SHAPES[::2])
def test_plain_batchnorm_int16_record(m, c):
    """batchnorm_forward_train_int16 / batchnorm_backward_int16 (ternet train --save-memory) against
    batchnorm_forward_train / batchnorm_backward on the same inputs (multiples of 1/4): the same bits
    in the output, the statistics, dx, dgamma and dbeta, with an int16 record of 2 bytes per element
    and no xhat."""
    x, _, _, gamma, beta = channel_data(m, c, 5 * m + c, int_scale=4)
    dy = np.random.default_rng(m).standard_normal((m, c)).astype(np.float32)
    xd, g_, b_, dyd = (cuda.to_device(a) for a in (x, gamma, beta, dy))
    runs = {}
    for kind in ("xhat", "int16"):
        y, stats = cuda.device_array((m, c), np.float32), cuda.device_array((2, c), np.float32)
        dx, dg, db = cuda.device_array((m, c), np.float32), cuda.device_array(c, np.float32), cuda.device_array(c, np.float32)
        if kind == "xhat":
            xhat = cuda.device_array((m, c), np.float32)
            invstd = bn.batchnorm_forward_train(y, xhat, xd, g_, b_, None, None, 0.1, 1e-4, stats)
            bn.batchnorm_backward(dx, dg, db, dyd, xhat, g_, invstd)
        else:
            record = bn.batchnorm_forward_train_int16(y, xd, g_, b_, None, None, 0.1, 1e-4, 4, stats)
            assert record[1] == 4 and record[2].dtype == np.int16 and record[2].size == m * c and record[0].size == 1
            dx16 = cuda.device_array((m, c), np.uint16)        # and dx's bf16 copy
            bn.batchnorm_backward_int16(dx, dg, db, dyd, record, g_, dx16)
        runs[kind] = [a.copy_to_host() for a in (y, stats, dx, dg, db)]
    for name, got, want in zip(("y", "stats", "dx", "dgamma", "dbeta"), runs["int16"], runs["xhat"]):
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=name)
    np.testing.assert_array_equal(dx16.copy_to_host(), bf16_reference(runs["int16"][2]))
    only16 = cuda.device_array((m, c), np.uint16)           # the bf16 copy alone (no float32 dx)
    bn.batchnorm_backward_int16(None, dg, db, dyd, record, g_, only16)
    np.testing.assert_array_equal(only16.copy_to_host(), dx16.copy_to_host())
    from ternet.kernels import conv_tc
    if conv_tc.available():                 # a GPU: the same bits as the conversion kernel's
        np.testing.assert_array_equal(conv_tc.bf16(dx).copy_to_host(), dx16.copy_to_host())


@pytest.mark.parametrize("m,c,int_scale,res_type", [(37, 33, 0, np.int8), (37, 33, 4, np.float32), (9, 64, 2, np.int8),
                                                    (5, 7, 0, np.float32)])
def test_bn_add_act_forward_bits(m, c, int_scale, res_type):
    """ResNet's block end as one kernel (bn_add_act_forward_train) against the plain batch norm's
    forward, elementwise.add_forward and activation.ternary_forward one after the other: the
    output, the window bits, the batch norm's record and statistics bit for bit (37 x 33: several
    rounds of tiles under the simulator)."""
    from ternet.kernels.activation import ternary_forward
    from ternet.kernels.elementwise import add_forward
    x, _, _, gamma, beta = channel_data(m, c, 11 * m + c, int_scale=int_scale or 4)
    rng = np.random.default_rng(c)
    res = rng.integers(-1, 2, (m, c)).astype(res_type) if res_type == np.int8 else \
        (rng.standard_normal((m, c)) * 0.7).astype(np.float32)
    xd, rd, g_, b_ = (cuda.to_device(a) for a in (x, res, gamma, beta))
    runs = {}
    for fused in (False, True):
        out, stats = cuda.device_array((m, c), np.int8), cuda.device_array((2, c), np.float32)
        rm, rv = cuda.to_device(np.zeros(c, np.float32)), cuda.to_device(np.ones(c, np.float32))
        if fused:
            record, bits = bn.bn_add_act_forward_train(out, xd, rd, g_, b_, rm, rv, 0.1, 1e-4, 1.0, 0.5, int_scale, stats)
        else:
            y = cuda.device_array((m, c), np.float32)
            if int_scale:
                record = bn.batchnorm_forward_train_int16(y, xd, g_, b_, rm, rv, 0.1, 1e-4, int_scale, stats)
            else:
                xhat = cuda.device_array((m, c), np.float32)
                record = (xhat, bn.batchnorm_forward_train(y, xhat, xd, g_, b_, rm, rv, 0.1, 1e-4, stats))
            summed = cuda.device_array((m, c), np.float32)
            add_forward(summed, y, rd)
            bits = ternary_forward(out, summed, 1.0, 0.5, WINDOW_RECT).bits
        kept = [record[2] if int_scale else record[0], record[-1]]      # the int16 record or xhat, invstd
        runs[fused] = [a.copy_to_host() for a in [out, bits, stats, rm, rv] + kept]
    for name, got, want in zip(["out", "bits", "stats", "running_mean", "running_var", "record", "invstd"],
                               runs[True], runs[False]):
        np.testing.assert_array_equal(got.view(f"u{got.dtype.itemsize}"), want.view(f"u{want.dtype.itemsize}"),
                                      err_msg=name)
    out = runs[True][0]
    assert {-1, 0, 1} <= set(out.ravel().tolist()) and 0 < np.unpackbits(runs[True][1].view(np.uint8)).sum()


@pytest.mark.parametrize("m,c,scale,spread", [(37, 5, 1.0, 40), (300, 33, 0.5, 1000), (600, 3, 1.0, 30000)])
def test_stats_from_conv_sums_bits(m, c, scale, spread):
    """The statistics from an integer convolution's per-block sums (conv_tc.ConvSums, as its
    epilogue leaves them: blocks of 128 rows) against the pass over x, bit for bit: both are exact
    sums there (scalar.int_shifted_sums). Channels far from zero, of one sign and of both."""
    from ternet.kernels.conv_tc import ConvSums
    rng = np.random.default_rng(m + c)
    a = rng.integers(-spread, spread + 1, (m, c)) + rng.integers(-3 * spread, 3 * spread + 1, c)
    x = (a * scale).astype(np.float32)
    assert np.array_equal(x / np.float32(scale), a)       # a * scale exact: the kernel's premise
    blocks = -(-m // 128)
    part = np.zeros((2, c, blocks), np.int64)
    for b in range(blocks):
        rows = a[128 * b:128 * (b + 1)].astype(np.int64)
        part[0, :, b], part[1, :, b] = rows.sum(0), (rows * rows).sum(0)
    xd = cuda.to_device(x)
    for s in [np.float32(0), np.float32(1 / scale)]:
        got = [cuda.to_device(np.zeros((2, c), np.float32))]
        want = [cuda.to_device(np.zeros((2, c), np.float32))]
        sums = ConvSums(cuda.to_device(part), scale, m)
        mean, invstd, exact = bn._cuda_stats(xd, 1e-4, got[0], s, sums=sums)
        mean0, invstd0, exact0 = bn._cuda_stats(xd, 1e-4, want[0], s)
        assert exact == exact0 == (s > 0)
        for g, w in [(mean, mean0), (invstd, invstd0), (got[0], want[0])]:
            np.testing.assert_array_equal(g.copy_to_host().view(np.uint32), w.copy_to_host().view(np.uint32))
    off = part.copy()
    off[0, 0, 0] += 10 * m                 # channel 0's mean 10 higher: read from part, not from x
    mean = bn._cuda_stats(xd, 1e-4, cuda.to_device(np.zeros((2, c), np.float32)),
                          sums=ConvSums(cuda.to_device(off), scale, m))[0].copy_to_host()
    assert mean[0] == np.float32(a[:, 0].mean() * scale + 10 * scale) and np.array_equal(mean[1:], mean0.copy_to_host()[1:])


def block_sums_order(row):
    """_block_sums' total of one channel's per-block sums (a list of numbers): thread t of
    SUM_THREADS adds blocks t, t + SUM_THREADS, ... from zero, then a tree halves the threads."""
    n = bn.SUM_THREADS
    sh = [sum_in_order(row[t::n]) for t in range(n)]
    w = n // 2
    while w > 0:
        for t in range(w):
            sh[t] += sh[t + w]
        w //= 2
    return sh[0]


def sum_in_order(values):
    t = 0.0
    for v in values:
        t += v
    return t


@pytest.mark.parametrize("c,blocks", [(5, 3), (33, 40)])
def test_stats_from_first_layer_sums_bits(c, blocks):
    """The statistics from the first layer's float64 per-block sums of x and x^2 (conv_tc.ConvSums
    with a float64 part, as conv_fwd_first's epilogue leaves them) against their order written
    out: the blocks' totals (block_sums_order), then shifted_moments about 0 and bn_stats, bit for
    bit; and within float32 rounding of the pass over x that they stand for."""
    from ternet.kernels.conv_tc import ConvSums
    rng = np.random.default_rng(c + blocks)
    rows = rng.integers(1, 40, blocks)
    xs = [(rng.standard_normal((r, c)) * 2 + 0.5).astype(np.float32) for r in rows]
    x = np.concatenate(xs)
    m = x.shape[0]
    part = np.zeros((2, c, blocks))
    for b, xb in enumerate(xs):
        d = xb.astype(np.float64)
        part[0, :, b], part[1, :, b] = d.sum(0), (d * d).sum(0)
    stats = cuda.to_device(np.zeros((2, c), np.float32))
    mean, invstd, exact = bn._cuda_stats(cuda.to_device(x), 1e-4, stats, sums=ConvSums(cuda.to_device(part), 0.0, m))
    assert not exact
    for j in range(c):
        mu, sq = shifted_moments(0.0, block_sums_order(part[0, j]), block_sums_order(part[1, j]), np.float64(m))
        want = bn_stats(mu, sq, np.float64(m), 1e-4)
        got = (mean.copy_to_host()[j], invstd.copy_to_host()[j], stats.copy_to_host()[1, j])
        np.testing.assert_array_equal(np.array(got, np.float32).view(np.uint32),
                                      np.array([want[0], want[1], want[2]], np.float32).view(np.uint32))
    pass_stats = cuda.to_device(np.zeros((2, c), np.float32))
    mean0, invstd0, _ = bn._cuda_stats(cuda.to_device(x), 1e-4, pass_stats)
    np.testing.assert_allclose(mean.copy_to_host(), mean0.copy_to_host(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(invstd.copy_to_host(), invstd0.copy_to_host(), rtol=1e-6)


def test_stale_conv_sums_are_not_read():
    """Sums whose scratch buffer a later convolution took are not used: the statistics then come
    from the pass over x (a poisoned part would show)."""
    from ternet.kernels.conv_tc import ConvSums
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    old = ConvSums(cuda.to_device(np.full((2, 2, 1), 10 ** 9, np.int64)), 1.0, 6)
    ConvSums(cuda.to_device(np.zeros((2, 2, 1), np.int64)), 1.0, 6)      # the next convolution's
    assert not old.current()
    got, want = cuda.to_device(np.zeros((2, 2), np.float32)), cuda.to_device(np.zeros((2, 2), np.float32))
    bn._cuda_stats(cuda.to_device(x), 1e-4, got, sums=old)
    bn._cuda_stats(cuda.to_device(x), 1e-4, want)
    np.testing.assert_array_equal(got.copy_to_host(), want.copy_to_host())
