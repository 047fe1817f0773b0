"""Batch normalisation over all axes but the last (NHWC or (N, F)), train and eval modes, and
batch norm fused with the ternary activation (the block every conv / FC layer ends in).

Train: y = gamma * xhat + beta with xhat = (x - mean) / sqrt(var + eps), batch statistics
(biased variance; one pass: sums of x - k and (x - k)^2 about k = the channel's first value,
scalar.shifted_moments), written to `stats` (batch mean and
unbiased variance, (2, C)); the running statistics follow with momentum (batchnorm_update_running,
called by the train forward unless it is told to leave them: the data-parallel step updates them
once per step from the shards' mean statistics). Reductions sum a fixed partition of the rows in float64
in a fixed order on both paths, so results depend neither on the thread count nor on the run.
Exercise: pytest tests/test_ops.py -k batchnorm, tests/test_cuda_batchnorm.py, tests/test_cuda_batchnorm_bits.py.
"""
import functools
import math
import os
import warnings

import numba
import numpy as np
from numba import cuda

from . import (SIMULATOR, THREADS, check, device_constant, empty, f32_bits, flat, fresh, grid1d, on_device, scratch,
               view, zeros)
from .activation import ActSaved, num_words, pack_flags, ternary_forward
from .elementwise import copy
from .pool import PoolGrad, _advance, _digits, covering_table, pool_grad_at
from .scalar import (WINDOW_RECT, affine, bf16_bits, bn_dx, bn_eval_coeffs, bn_stats, ema, normalize,
                     int_shifted_sums, shifted_moments, ternarize, window_grad)

CHUNKS = 64                      # CPU: row chunks of a reduction
TILE_C, LANES = 32, (2 if SIMULATOR else 8)          # CUDA: a reduction block: 32 channels x row lanes
MIN_ROWS, MAX_CHUNKS = 64, (2 if SIMULATOR else 256)  # CUDA: rows per chunk at least / chunks at most
FINAL_LANES = 2 if SIMULATOR else 32                  # CUDA: threads a channel adding up the chunks


# ----------------------------------------------------------------------------------------------
# CPU implementation

@numba.njit(parallel=True, cache=True)
def _moments(x):
    # per column: sums of (x - k) and (x - k)^2 about k = the column's first value (float64)
    m, c = x.shape
    part = np.zeros((CHUNKS, 2, c), np.float64)
    step = (m + CHUNKS - 1) // CHUNKS
    for ch in numba.prange(CHUNKS):
        for i in range(ch * step, min(m, (ch + 1) * step)):
            for j in range(c):
                d = np.float64(x[i, j]) - np.float64(x[0, j])
                part[ch, 0, j] += d
                part[ch, 1, j] += d * d
    out = np.zeros((2, c), np.float64)
    for ch in range(CHUNKS):
        out += part[ch]
    return out


@numba.njit(cache=True)
def _finish_stats(x0, sums, m, eps, mean32, invstd, stats):
    for j in range(x0.size):
        mean, sqdev = shifted_moments(np.float64(x0[j]), sums[0, j], sums[1, j], m)
        mean32[j], invstd[j], stats[1, j] = bn_stats(mean, sqdev, m, eps)
        stats[0, j] = mean32[j]


@numba.njit(cache=True)
def _update_running(run_mean, run_var, stats, momentum):
    for j in range(run_mean.size):
        run_mean[j] = ema(run_mean[j], stats[0, j], momentum)
        run_var[j] = ema(run_var[j], stats[1, j], momentum)


@numba.njit(parallel=True, cache=True)
def _normalize(x, mean, invstd, gamma, beta, y, xhat):
    m, c = x.shape
    for i in numba.prange(m):
        for j in range(c):
            h = normalize(x[i, j], mean[j], invstd[j])
            xhat[i, j] = h
            y[i, j] = affine(h, gamma[j], beta[j])


@numba.njit(cache=True)
def _eval_coeffs(gamma, beta, run_mean, run_var, eps, scale, shift):
    for j in range(gamma.size):
        scale[j], shift[j] = bn_eval_coeffs(gamma[j], beta[j], run_mean[j], run_var[j], eps)


@numba.njit(parallel=True, cache=True)
def _affine(x, scale, shift, y):
    m, c = x.shape
    for i in numba.prange(m):
        for j in range(c):
            y[i, j] = affine(x[i, j], scale[j], shift[j])


@numba.njit(parallel=True, cache=True)
def _bn_bwd_sums(dy, xhat):
    m, c = dy.shape
    part = np.zeros((CHUNKS, 2, c), np.float64)
    step = (m + CHUNKS - 1) // CHUNKS
    for ch in numba.prange(CHUNKS):
        for i in range(ch * step, min(m, (ch + 1) * step)):
            for j in range(c):
                part[ch, 0, j] += dy[i, j]
                part[ch, 1, j] += dy[i, j] * xhat[i, j]
    out = np.zeros((2, c), np.float64)
    for ch in range(CHUNKS):
        out += part[ch]
    return out


@numba.njit(parallel=True, cache=True)
def _bn_bwd_dx(dy, xhat, gamma, invstd, sdy, sdyx, m, dx):
    for i in numba.prange(dy.shape[0]):
        for j in range(dy.shape[1]):
            dx[i, j] = bn_dx(dy[i, j], xhat[i, j], gamma[j], invstd[j], sdy[j], sdyx[j], m)


@numba.njit(parallel=True, cache=True)
def _bn_act_fwd(x, mean, invstd, gamma, beta, r, a, shape, out, xhat, deriv):
    # _normalize and the activation's forward in one pass (y never stored): the same float32
    # operations, so the same xhat, out and phi'(y) as the two kernels one after the other
    m, c = x.shape
    for i in numba.prange(m):
        for j in range(c):
            h = normalize(x[i, j], mean[j], invstd[j])
            xhat[i, j] = h
            y = affine(h, gamma[j], beta[j])
            out[i, j] = ternarize(y, r)
            deriv[i, j] = window_grad(y, r, a, shape)


@numba.njit(parallel=True, cache=True)
def _bn_act_bwd_sums(dout, deriv, xhat):
    # _bn_bwd_sums of dy = dout * phi' (the activation's backward), dy recomputed, never stored
    m, c = dout.shape
    part = np.zeros((CHUNKS, 2, c), np.float64)
    step = (m + CHUNKS - 1) // CHUNKS
    for ch in numba.prange(CHUNKS):
        for i in range(ch * step, min(m, (ch + 1) * step)):
            for j in range(c):
                dy = dout[i, j] * deriv[i, j]
                part[ch, 0, j] += dy
                part[ch, 1, j] += dy * xhat[i, j]
    out = np.zeros((2, c), np.float64)
    for ch in range(CHUNKS):
        out += part[ch]
    return out


@numba.njit(parallel=True, cache=True)
def _bn_act_bwd_dx(dout, deriv, xhat, gamma, invstd, sdy, sdyx, m, dx):
    for i in numba.prange(dout.shape[0]):
        for j in range(dout.shape[1]):
            dx[i, j] = bn_dx(dout[i, j] * deriv[i, j], xhat[i, j], gamma[j], invstd[j], sdy[j], sdyx[j], m)


def _no_rows(m):
    check(m > 0, "batchnorm: the batch has no elements (statistics of nothing); give it one sample or more")


def _cpu_stats(x, eps, stats):
    c, m = x.shape[1], x.shape[0]
    _no_rows(m)
    mean32, invstd = np.empty(c, np.float32), np.empty(c, np.float32)
    _finish_stats(x[0], _moments(x), np.float64(m), np.float64(eps), mean32, invstd, stats)
    return mean32, invstd


# ----------------------------------------------------------------------------------------------
# CUDA kernels
#
# Column reductions: block (chunk, channel tile) of TILE_C x LANES threads; lane ty of channel j
# sums rows chunk_start + ty, + LANES, + 2 LANES, ... in float64, then lane 0 adds the LANES lane sums in
# order into part[chunk, k, j]; a one-thread-per-channel kernel adds the chunks in order. Warps
# read 32 consecutive channels of a row (coalesced). A thread loads ROWS rows
# before it adds them, in the same order: that many loads in flight, not one (not in
# the fused backward's sums: its rows take many registers, and fewer resident blocks lose more;
# measured again on the H200 with ROWS elements loaded ahead, fifteenth session: the fused
# backward's sums 1.72 -> 1.91 ms and its dx 2.30 -> 2.76 ms on ResNet-18's 224 px stem, where the
# fused forward gained, 1.50 -> 1.20 ms, so the forward loads ahead; bench/bn_kernels.py).
# Elementwise kernels use flat indices with channel j = i % C (NHWC: channels last), taken once
# per thread and then stepped along the grid stride (an int64 `%` per element is a long emulated
# division on the GPU). Per-element indices are uint64: numba adds a negative-index fix-up to
# every signed index, three integer operations per array access.

U64 = np.uint64
ROWS = 4      # ptxas -v: _colsum_cuda (now _moments_cuda) 34 registers (32 before), with 8 rows 46


@cuda.jit(device=True)
def _walk(n, c):
    """A grid-stride loop over n flat elements of c channels, unsigned: (i, step, n, j, dj, c),
    with i this thread's first element, j = i % c its channel and dj = step % c."""
    i, step, c = U64(cuda.grid(1)), U64(cuda.gridsize(1)), U64(c)
    return i, step, U64(n), i % c, step % c, c


@cuda.jit(device=True)
def _next_channel(j, dj, c):
    """(j + dj) % c for 0 <= j, dj < c (uint64): the channel of the loop's next element."""
    j += dj
    return j - c if j >= c else j


@cuda.jit(device=True)
def _lane_rows(m):
    """The first row of this thread's lane and the end of its block's chunk of m rows (uint64)."""
    step = (m + cuda.gridDim.x - 1) // cuda.gridDim.x
    return U64(cuda.blockIdx.x * step + cuda.threadIdx.y), U64(min(m, (cuda.blockIdx.x + 1) * step))


@cuda.jit(device=True)
def _lanes_to_part(sh, acc, part, k, c):
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
def _chunk_sum(part, k, sh):
    """The sum over chunks of part[:, k, j], j = blockIdx.x * TILE_C + threadIdx.x (float64), in a
    fixed order: lane ty (of FINAL_LANES) adds chunks ty, ty + FINAL_LANES, ... from 0.0, then the
    lane sums are added in lane order. Every thread of the (TILE_C, FINAL_LANES) block calls it
    (barriers) and gets the channel's sum. (One thread per channel adding the chunks in turn took
    ~30 us a launch on the H200, a load at a time: 1.8 ms of a ResNet-18 224 px step in 63
    launches, sixteenth session.)"""
    tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
    j = cuda.blockIdx.x * TILE_C + tx
    t = np.float64(0.0)
    if j < part.shape[2]:
        for z in range(ty, part.shape[0], FINAL_LANES):
            t += part[z, k, j]
    sh[ty, tx] = t
    cuda.syncthreads()
    t = sh[0, tx]
    for lane in range(1, FINAL_LANES):
        t += sh[lane, tx]
    cuda.syncthreads()
    return t


def _final_grid(c):
    """The launch of the one-block-per-TILE_C-channels kernels that call _chunk_sum."""
    return ((c + TILE_C - 1) // TILE_C,), (TILE_C, FINAL_LANES)


@cuda.jit(device=True)
def _from_int16(q, s):
    """The float32 value an int16 record q stands for (x = q / int_scale)."""
    return np.float32(q) / s


@cuda.jit(device=True)
def _to_int16(v, s):
    """round(v * s) (as int64; the forward stores it as int16 once _int16_exact has passed)."""
    return math.floor(v * s + np.float32(0.5))


@cuda.jit(device=True)
def _int16_exact(v, s):
    """Whether v * s is an integer in int16 range that _from_int16 turns back into v exactly."""
    if not abs(v * s) <= np.float32(32767.0):      # also False for NaN
        return False
    return _from_int16(_to_int16(v, s), s) == v


@cuda.jit
def _moments_cuda(x, s, flag, part):
    # part[chunk, 0, j], part[chunk, 1, j] = chunk sums of d and d^2, d = x - x[0, j] (float64);
    # with s > 0 also flag[0] = 1 where x * s is not an exact int16 (every writer stores 1: no race
    # on the result)
    sh = cuda.shared.array((LANES, TILE_C), numba.float64)
    buf = cuda.local.array(ROWS, numba.float32)
    m, c = x.shape
    j = cuda.blockIdx.y * TILE_C + cuda.threadIdx.x
    a0, a1 = np.float64(0.0), np.float64(0.0)
    if j < c:
        i, end = _lane_rows(m)
        ju = U64(j)
        k = np.float64(x[0, ju])
        while i < end:
            for u in range(ROWS):
                if i + U64(u * LANES) < end:
                    buf[u] = x[i + U64(u * LANES), ju]
            for u in range(ROWS):
                if i + U64(u * LANES) < end:
                    d = np.float64(buf[u]) - k
                    a0 += d
                    a1 = cuda.fma(d, d, a1)    # a1 + d * d, as NVVM contracts it (fma=1)
            if s > 0:
                for u in range(ROWS):
                    if i + U64(u * LANES) < end and not _int16_exact(buf[u], s):
                        flag[0] = 1
            i += U64(ROWS * LANES)
    _lanes_to_part(sh, a0, part, 0, c)
    _lanes_to_part(sh, a1, part, 1, c)


@cuda.jit(device=True, inline=True)
def _put_stats(j, k, s1, s2, m, eps, mean32, invstd, stats):
    """Channel j's statistics from its sums s1, s2 about k (float64; m rows, float64)."""
    mean, sqdev = shifted_moments(k, s1, s2, m)
    mu, inv, unbiased = bn_stats(mean, sqdev, m, eps)
    mean32[j], invstd[j], stats[0, j], stats[1, j] = mu, inv, mu, unbiased


@cuda.jit
def _stats_cuda(part, m, x, eps, mean32, invstd, stats):
    # from _moments_cuda's sums about x[0, j]
    sh = cuda.shared.array((FINAL_LANES, TILE_C), numba.float64)
    s1 = _chunk_sum(part, 0, sh)
    s2 = _chunk_sum(part, 1, sh)
    j = cuda.blockIdx.x * TILE_C + cuda.threadIdx.x
    if cuda.threadIdx.y == 0 and j < mean32.size:
        _put_stats(j, np.float64(x[0, j]), s1, s2, m, eps, mean32, invstd, stats)


SUM_THREADS = 8 if SIMULATOR else 256   # CUDA: threads a channel adding up the sums


@cuda.jit(device=True, inline=True)
def _block_sums(part, j, sh):
    """Channel j's totals of part[0, j, :] and part[1, j, :] (a ConvSums part) left in sh[0, 0],
    sh[1, 0] by the block's SUM_THREADS threads: strided sums, then a tree (a fixed order)."""
    t = cuda.threadIdx.x
    t1, t2 = part[0, j, 0] * 0, part[1, j, 0] * 0       # zeros of the part's type
    for b in range(t, part.shape[2], SUM_THREADS):
        t1 += part[0, j, b]
        t2 += part[1, j, b]
    sh[0, t], sh[1, t] = t1, t2
    cuda.syncthreads()
    w = SUM_THREADS // 2
    while w > 0:
        if t < w:
            sh[0, t] += sh[0, t + w]
            sh[1, t] += sh[1, t + w]
        cuda.syncthreads()
        w //= 2


@cuda.jit
def _stats_from_sums_cuda(part, m, x, eps, scale, mean32, invstd, stats):
    # _stats_cuda's statistics from the integer convolution's sums (conv_tc.ConvSums: part (2, C,
    # blocks) int64), one block a channel: the same bits (scalar.int_shifted_sums; integers: any
    # order gives the same sums), no pass over x
    sh = cuda.shared.array((2, SUM_THREADS), numba.int64)
    j = cuda.blockIdx.x
    _block_sums(part, j, sh)
    if cuda.threadIdx.x == 0:
        k = np.float64(x[0, j])
        s1, s2 = int_shifted_sums(sh[0, 0], sh[1, 0], k, m, scale)
        _put_stats(j, k, s1, s2, np.float64(m), eps, mean32, invstd, stats)


@cuda.jit
def _stats_from_fsums_cuda(part, m, eps, mean32, invstd, stats):
    # the statistics from the first layer's float64 sums of x and x^2 (conv_tc.ConvSums with a
    # float64 part, about 0: shifted_moments with k = 0, whose cancellation costs (mean / std)^2
    # units of float64 rounding, far below float32's for a first layer's outputs), one block a
    # channel, in a fixed order; no pass over x
    sh = cuda.shared.array((2, SUM_THREADS), numba.float64)
    j = cuda.blockIdx.x
    _block_sums(part, j, sh)
    if cuda.threadIdx.x == 0:
        _put_stats(j, np.float64(0.0), sh[0, 0], sh[1, 0], np.float64(m), eps, mean32, invstd, stats)


@cuda.jit
def _update_running_cuda(run_mean, run_var, stats, momentum):
    j = cuda.grid(1)
    if j < run_mean.size:
        run_mean[j] = ema(run_mean[j], stats[0, j], momentum)
        run_var[j] = ema(run_var[j], stats[1, j], momentum)


@cuda.jit
def _normalize_cuda(x, mean, invstd, gamma, beta, y, xhat, s, xq):
    # s > 0: the record kept for the backward is the input as int16 (x * s, exact) in xq, else xhat
    i, step, n, j, dj, c = _walk(x.size, mean.size)
    while i < n:
        v = x[i]
        h = normalize(v, mean[j], invstd[j])
        if s > 0:
            xq[i] = np.int16(_to_int16(v, s))
        else:
            xhat[i] = h
        y[i] = affine(h, gamma[j], beta[j])
        i, j = i + step, _next_channel(j, dj, c)


@cuda.jit
def _bn_add_act_cuda(x, mean, invstd, gamma, beta, res, r, a, s, xhat, xq, out, bits):
    # _normalize_cuda, elementwise.add_forward of res and activation.ternary_forward (rectangular
    # window) in one pass: out = phi_r(y + res) and its window bits, y never stored; the record for
    # the backward as _normalize_cuda keeps it. The same float32 operations: the same bits. Tiles
    # and loads ahead as bn_act_kernels' forward.
    flags = cuda.shared.array(THREADS, numba.uint8)
    vl = cuda.local.array(ROWS, numba.float32)
    rl = cuda.local.array(ROWS, numba.float32)
    tid, n, c = U64(cuda.threadIdx.x), U64(x.size), U64(mean.size)
    base, stride = U64(cuda.blockIdx.x * THREADS), U64(cuda.gridDim.x * THREADS)
    j, dj = (base + tid) % c, stride % c
    while base < n:
        b = base
        for u in range(ROWS):
            if b + tid < n:
                vl[u], rl[u] = x[b + tid], np.float32(res[b + tid])
            b += stride
        for u in range(ROWS):
            if base < n:                        # the same for the whole block (pack_flags)
                i = base + tid
                f = np.uint8(0)
                if i < n:
                    v = vl[u]
                    h = normalize(v, mean[j], invstd[j])
                    if s > 0:
                        xq[i] = np.int16(_to_int16(v, s))     # exact: checked by _moments_cuda
                    else:
                        xhat[i] = h
                    y = affine(h, gamma[j], beta[j]) + rl[u]
                    out[i] = ternarize(y, r)
                    if window_grad(y, r, a, WINDOW_RECT) != 0:
                        f = np.uint8(1)
                pack_flags(flags, f, bits, base, n)
            base, j = base + stride, _next_channel(j, dj, c)


@cuda.jit(device=True, inline=True)
def _xhat_at(xhat, xq, s, mean_j, invstd_j, at):
    # xhat at index `at` (flat, or (row, channel)) from the record _normalize_cuda kept: the same
    # float32 value it computed there
    if s > 0:
        return normalize(_from_int16(xq[at], s), mean_j, invstd_j)
    return xhat[at]


@cuda.jit
def _eval_coeffs_cuda(gamma, beta, run_mean, run_var, eps, scale, shift):
    j = cuda.grid(1)
    if j < gamma.size:
        sc, sh = bn_eval_coeffs(gamma[j], beta[j], run_mean[j], run_var[j], eps)
        scale[j], shift[j] = sc, sh


@cuda.jit
def _affine_cuda(x, scale, shift, y):
    i, step, n, j, dj, c = _walk(x.size, scale.size)
    while i < n:
        y[i] = affine(x[i], scale[j], shift[j])
        i, j = i + step, _next_channel(j, dj, c)


@cuda.jit
def _affine_act_cuda(x, scale, shift, r, out):
    i, step, n, j, dj, c = _walk(x.size, scale.size)
    while i < n:
        out[i] = ternarize(affine(x[i], scale[j], shift[j]), r)
        i, j = i + step, _next_channel(j, dj, c)


@cuda.jit
def _bwd_sums_cuda(dy, xhat, s, xq, mean, invstd, part):
    # part[chunk, 0, j] = chunk sum of dy, part[chunk, 1, j] = of dy * xhat (dy, xhat (M, C); with
    # s > 0 xhat is recomputed from the int16 record xq (M, C))
    sh = cuda.shared.array((LANES, TILE_C), numba.float64)
    bd = cuda.local.array(ROWS, numba.float32)
    bx = cuda.local.array(ROWS, numba.float32)
    m, c = dy.shape
    j = cuda.blockIdx.y * TILE_C + cuda.threadIdx.x
    a0, a1 = np.float64(0.0), np.float64(0.0)
    if j < c:
        i, end = _lane_rows(m)
        ju = U64(j)
        mean_j, invstd_j = mean[j], invstd[j]
        while i < end:
            for u in range(ROWS):
                if i + U64(u * LANES) < end:
                    row = i + U64(u * LANES)
                    bd[u], bx[u] = dy[row, ju], _xhat_at(xhat, xq, s, mean_j, invstd_j, (row, ju))
            for u in range(ROWS):
                if i + U64(u * LANES) < end:
                    g = bd[u]
                    a0 += np.float64(g)
                    a1 += np.float64(g * bx[u])      # float32 product, as the CPU path
            i += U64(ROWS * LANES)
    _lanes_to_part(sh, a0, part, 0, c)
    _lanes_to_part(sh, a1, part, 1, c)


@cuda.jit
def _bwd_final_cuda(part, dgamma, dbeta):
    sh = cuda.shared.array((FINAL_LANES, TILE_C), numba.float64)
    s0 = _chunk_sum(part, 0, sh)
    s1 = _chunk_sum(part, 1, sh)
    j = cuda.blockIdx.x * TILE_C + cuda.threadIdx.x
    if cuda.threadIdx.y == 0 and j < dgamma.size:
        dbeta[j], dgamma[j] = np.float32(s0), np.float32(s1)


@cuda.jit
def _bwd_dx_cuda(dy, xhat, s, xq, mean, gamma, invstd, sdy, sdyx, m, d16, dx):
    # dx and its bf16 copy d16, each written where it has dy's size (else a placeholder)
    i, step, n, j, dj, c = _walk(dy.size, gamma.size)
    to16, to32 = d16.size == n, dx.size == n
    while i < n:
        v = bn_dx(dy[i], _xhat_at(xhat, xq, s, mean[j], invstd[j], i), gamma[j], invstd[j], sdy[j], sdyx[j], m)
        if to32:
            dx[i] = v
        if to16:
            d16[i] = bf16_bits(f32_bits(v))
        i, j = i + step, _next_channel(j, dj, c)


# fused batch norm + ternary activation: one pass writes out (int8), the window bits and the
# compact copy of the input; the backward recomputes xhat (and y, for the triangular window)

@cuda.jit(device=True)
def _bn_act_load(e, xq, xf, s, bits, shape):
    """The record's loads of flat element e (uint64) for the backward: (int16 record, float32
    record, the word of its window bit), of the records only the one kept (s) and the word only
    for the rectangular window."""
    q, v, w = np.int16(0), np.float32(0.0), np.uint32(0)
    if s > 0:
        q = xq[e]
    else:
        v = xf[e]
    if shape == WINDOW_RECT:
        w = bits[e >> U64(5)]                   # bit_of(bits, e), unsigned
    return q, v, w


@cuda.jit(device=True, inline=True)
def _dout_at(e, at, j, dout, pd, pa, cov, ph, pk, ps, pp):
    """The gradient arriving at flat element e (channel j, uint64): dout[e], or with pk > 0 the
    input gradient of the max pool after this layer at pixel at = (n, y, x, _), gathered from its
    output gradient pd and argmax pa (pool.pool_grad_at: the bits maxpool_backward would have
    stored), its covering windows looked up in cov (pool.covering_table, ph rows)."""
    if pk == 0:
        return dout[e]
    n, y, x, _ = at
    return pool_grad_at(pd, pa, n, y, x, np.int64(j), pk, ps, pp, cov[y, 0], cov[y, 1], cov[ph + x, 0],
                        cov[ph + x, 1])


@cuda.jit(device=True, inline=True)
def _pixel_walk(o, by, ph, pw, c, pk):
    """Digits (n, y, x, channel) of flat index o and of the step `by` (int64), for kernels that
    step through a pooled gradient's pixels with pool._advance (no division per element); zeros
    when there is no pool (pk == 0)."""
    if pk == 0:
        z = (np.int64(0), np.int64(0), np.int64(0), np.int64(0))
        return z, z
    return _digits(np.int64(o), ph, pw, c), _digits(np.int64(by), ph, pw, c)


@cuda.jit(device=True)
def _bn_act_point(e, j, d, q, v, w, s, mean_j, invstd_j, height, cg, cb, r, a, shape):
    """(dy, xhat) at flat element e of channel j from its loads (_bn_act_load): dy = dout * phi'(y),
    with y recomputed from the record."""
    if s > 0:
        v = _from_int16(q, s)
    h = normalize(v, mean_j, invstd_j)
    if shape == WINDOW_RECT:
        g = height if (w >> np.uint32(e & U64(31))) & np.uint32(1) else np.float32(0.0)
    else:
        g = window_grad(affine(h, cg[j], cb[j]), r, a, shape)
    return d * g, h


# The backward's incoming gradient is dout, or (pk > 0: a max pool right after the layer, as
# ResNet's stem pooling) the max pool's (pd, pa, cov = its covering table, ph = H, pw = W, window
# pk, ps, pp): the input-sized gradient is never stored. The sums then come from the pool's side
# (bn_act_pool_sums: each window's gradient at its argmax), and the dx kernel gathers each element's
# gradient where it reads it (_dout_at; on a GPU pool_vec.cu's bn_act_pool_dx, four channels a
# thread, the same bits); dx may be written over the float32 record xf (each element read before it
# is written). The numba kernel steps an element's pixel along with it (_pixel_walk, pool._advance)
# and looks its covering windows up: no 64-bit division per element.

@cuda.jit(device=True, inline=True)
def _fixed(shape, s, rect, int16):
    """(shape, s) with what a specialised kernel was compiled for folded in: the rectangular
    window, or no int16 record (s = 0)."""
    return (WINDOW_RECT if rect else shape), (s if int16 else np.float32(0.0))


@functools.cache
def bn_act_kernels(rect, int16, gather=False, to16=False, to32=True, copy=True):
    """The fused kernels (forward, backward sums, backward dx) for one kind of record: rectangular
    window or not, int16 record or float32, the max pool's gradient gathered or read (the
    backward dx's; the sums of a pooled gradient are bn_act_pool_sums'), a bf16 copy of dx written
    or not, dx itself (float32) written or not (the backward dx's: to16 without to32 for a
    convolution that reads its dy in bf16 alone), a float32 input copied into the record or not
    (the forward's: not where the record is the input array itself). The same code and arguments
    for every kind, each compiled with these as constants, so the others' branches are dropped.
    Registers a thread (ptxas -v for sm_90 on numba's PTX, sixteenth session): the backward kernels
    unspecialised 96 (the gather's 4-D indexing; a quarter of the threads an SM holds), without the
    gather 32-39."""

    @cuda.jit
    def fwd(x, mean, invstd, gamma, beta, r, a, shape, s, out, xq, xf, bits):
        # a tile of THREADS elements per block and step, its window bits packed by
        # activation.pack_flags; a thread loads its elements of ROWS tiles before it computes any
        # (1.50 -> 1.20 ms on ResNet-18's 224 px stem at batch 256, bench/bn_kernels.py, fifteenth
        # session)
        shape, s = _fixed(shape, s, rect, int16)
        flags = cuda.shared.array(THREADS, numba.uint8)
        vl = cuda.local.array(ROWS, numba.float32)
        tid, n, c = U64(cuda.threadIdx.x), U64(x.size), U64(mean.size)
        base, stride = U64(cuda.blockIdx.x * THREADS), U64(cuda.gridDim.x * THREADS)
        j, dj = (base + tid) % c, stride % c
        while base < n:
            b = base
            for u in range(ROWS):
                if b + tid < n:
                    vl[u] = x[b + tid]
                b += stride
            for u in range(ROWS):
                if base < n:                        # the same for the whole block (pack_flags)
                    i = base + tid
                    f = np.uint8(0)
                    if i < n:
                        v = vl[u]
                        y = affine(normalize(v, mean[j], invstd[j]), gamma[j], beta[j])
                        out[i] = ternarize(y, r)
                        if window_grad(y, r, a, shape) != 0:
                            f = np.uint8(1)
                        if s > 0:
                            xq[i] = np.int16(_to_int16(v, s))     # exact: checked by _moments_cuda
                        elif copy:
                            xf[i] = v
                    if shape == WINDOW_RECT:
                        pack_flags(flags, f, bits, base, n)
                base, j = base + stride, _next_channel(j, dj, c)

    @cuda.jit
    def bwd_sums(dout, xq, xf, s, mean, invstd, bits, height, cg, cb, r, a, shape, part):
        # (a pooled gradient's sums are bn_act_pool_sums')
        shape, s = _fixed(shape, s, rect, int16)
        sh = cuda.shared.array((LANES, TILE_C), numba.float64)
        c = mean.size
        m = xf.size // c if s == 0 else xq.size // c
        j = cuda.blockIdx.y * TILE_C + cuda.threadIdx.x
        a0, a1 = np.float64(0.0), np.float64(0.0)
        if j < c:
            i, end = _lane_rows(m)
            ju, cu = U64(j), U64(c)
            e, de, e_end = i * cu + ju, U64(LANES) * cu, end * cu     # flat: row i, the lane step, the end
            mean_j, invstd_j = mean[j], invstd[j]
            while e < e_end:
                q, v, w = _bn_act_load(e, xq, xf, s, bits, shape)
                g, h = _bn_act_point(e, ju, dout[e], q, v, w, s, mean_j, invstd_j, height, cg, cb, r, a, shape)
                a0 += np.float64(g)
                a1 += np.float64(g * h)
                e += de
        _lanes_to_part(sh, a0, part, 0, c)
        _lanes_to_part(sh, a1, part, 1, c)

    @cuda.jit
    def bwd_dx(dout, pd, pa, cov, ph, pw, pk, ps, pp, xq, xf, s, mean, invstd, bits, height, cg, cb, r, a,
               shape, gamma, sdy, sdyx, m, d16, dx):
        # with to16 also dx's bf16 copy in d16, with to32 dx (else placeholders)
        shape, s = _fixed(shape, s, rect, int16)
        pk = pk if gather else 0
        i, step, n, j, dj, c = _walk(xf.size if s == 0 else xq.size, mean.size)
        at, by = _pixel_walk(i, step, ph, pw, np.int64(c), pk)
        while i < n:
            d = _dout_at(i, at, j, dout, pd, pa, cov, ph, pk, ps, pp)
            q, v, w = _bn_act_load(i, xq, xf, s, bits, shape)
            g, h = _bn_act_point(i, j, d, q, v, w, s, mean[j], invstd[j], height, cg, cb, r, a, shape)
            v = bn_dx(g, h, gamma[j], invstd[j], sdy[j], sdyx[j], m)
            if to32:
                dx[i] = v
            if to16:
                d16[i] = bf16_bits(f32_bits(v))
            i, j = i + step, _next_channel(j, dj, c)
            if pk > 0:
                at = _advance(at, by, ph, pw, np.int64(c))

    return fwd, bwd_sums, bwd_dx


@functools.cache
def bn_act_pool_sums(rect, int16):
    """The fused backward's sums (dbeta = sum of g, dgamma = sum of g * xhat per channel) where a
    max pool follows the layer, taken from the pool's side: g at an element is the pool's input
    gradient there (the douts of the windows whose argmax it is) times the window derivative, so
    the sums are those of dout * phi'(y) and dout * phi'(y) * xhat over the pool's output, each at
    its window's argmax. One read of the pool's output gradient and argmax and one gather of the
    record per pooled output (a 3x3 stride-2 pool: a quarter of the elements) instead of a pass over
    a stored input-sized gradient and the record. Their order: the pool's output rows (n, oh, ow)
    in chunks, LANES lanes a chunk, as bwd_sums takes its rows (part (chunks, 2, C), then
    _bwd_final_cuda); the same sums as bwd_sums over the stored gradient up to that order.
    taps: (k * k, 2) int32, the (i, j) of each window position (no division per element)."""

    @cuda.jit
    def sums(pd, pa, taps, h, w, ps, pp, xq, xf, s, mean, invstd, bits, height, cg, cb, r, a, shape, part):
        # (loading ROWS rows ahead, as bwd_sums does, measured slower here: 0.48 -> 0.72 ms on
        # ResNet-18's 224 px stem at batch 256, 72 registers instead of 56; 1024 chunks instead of
        # 256: 0.52 ms, eighteenth session)
        shape, s = _fixed(shape, s, rect, int16)
        sh = cuda.shared.array((LANES, TILE_C), numba.float64)
        _, oh_n, ow_n, c = pd.shape
        j = cuda.blockIdx.y * TILE_C + cuda.threadIdx.x
        a0, a1 = np.float64(0.0), np.float64(0.0)
        if j < c:
            i, end = _lane_rows(pd.size // c)
            ju = U64(j)
            mean_j, invstd_j = mean[j], invstd[j]
            at, by = _digits(np.int64(i), oh_n, ow_n, 1), _digits(np.int64(LANES), oh_n, ow_n, 1)
            while i < end:
                n, oh, ow, _ = at
                t = np.int64(pa[n, oh, ow, j])
                ih, iw = oh * ps - pp + taps[t, 0], ow * ps - pp + taps[t, 1]
                e = U64(((n * h + ih) * w + iw) * c) + ju
                q, v, wd = _bn_act_load(e, xq, xf, s, bits, shape)
                g, hh = _bn_act_point(e, ju, pd[n, oh, ow, j], q, v, wd, s, mean_j, invstd_j, height, cg, cb, r,
                                      a, shape)
                a0 += np.float64(g)
                a1 += np.float64(g * hh)
                i += U64(LANES)
                at = _advance(at, by, oh_n, ow_n, 1)
        _lanes_to_part(sh, a0, part, 0, c)
        _lanes_to_part(sh, a1, part, 1, c)

    return sums


def _pool_taps(k):
    """(k * k, 2) int32 on the device: the (i, j) of window position i * k + j."""
    return device_constant(("pool taps", k), lambda: np.array([(t // k, t % k) for t in range(k * k)], np.int32))


@functools.cache
def _pool_dx_kernels():
    """pool_vec.cu's bn_act_pool_dx (four channels a thread) linked into numba kernels, by the
    record's type: 'float32' (xf) and 'int16' (xq and its scale)."""
    from numba import types
    from .pool import VEC_SRC
    f32p, u8p, u32p, i32p = (types.CPointer(t) for t in (types.float32, types.uint8, types.uint32, types.int32))
    i16p, f32, f64 = types.CPointer(types.int16), types.float32, types.float64
    sig32 = (f32p, u8p, f32p, u32p) + (f32p,) * 5 + (f64, f32, f32p, i32p)
    sig16 = (f32p, u8p, i16p, f32, u32p) + (f32p,) * 5 + (f64, f32, f32p, i32p)
    fn32 = cuda.declare_device("bn_act_pool_dx_f32", types.int32(*sig32), link=VEC_SRC)
    fn16 = cuda.declare_device("bn_act_pool_dx_s16", types.int32(*sig16), link=VEC_SRC)

    @cuda.jit(types.void(*sig32), link=[VEC_SRC])
    def k32(pd, pa, xf, bits, mean, invstd, gamma, sdy, sdyx, m, height, dx, geom):
        fn32(pd, pa, xf, bits, mean, invstd, gamma, sdy, sdyx, m, height, dx, geom)

    @cuda.jit(types.void(*sig16), link=[VEC_SRC])
    def k16(pd, pa, xq, s, bits, mean, invstd, gamma, sdy, sdyx, m, height, dx, geom):
        fn16(pd, pa, xq, s, bits, mean, invstd, gamma, sdy, sdyx, m, height, dx, geom)

    return {"float32": k32, "int16": k16}


def _bn_act_pool_dx_vec(dinp, dout, t, gamma, sdy, sdyx, m):
    """dinp from the pool's gradient dout (pool.PoolGrad) by pool_vec.cu's kernel, where it runs:
    a GPU (not the simulator), the rectangular window, four-channel groups; returns whether it ran."""
    from .conv_tc import _ptr
    from .pool import _vec_fits, _vec_geom
    if t.shape != WINDOW_RECT or dinp is None or not _vec_fits(dinp.shape, dinp.size // 4):
        return False
    rec = (_ptr(t.xq), t.s) if t.s > 0 else (_ptr(t.xf),)
    geom = _vec_geom(dinp.shape, dout.dout.shape, dout.k, dout.stride, dout.pad)
    _pool_dx_kernels()["int16" if t.s > 0 else "float32"][grid1d(dinp.size // 4)](
        _ptr(dout.dout), _ptr(dout.arg), *rec, _ptr(t.bits), _ptr(t.mean), _ptr(t.invstd), _ptr(gamma), _ptr(sdy),
        _ptr(sdyx), np.float64(m), t.height, _ptr(dinp), geom)
    return True


CHECK_INT16 = os.environ.get("TERNET_CHECK_INT16") == "1"


def _reduce_grid(m, c):
    chunks = max(1, min(MAX_CHUNKS, m // MIN_ROWS))
    return (chunks, (c + TILE_C - 1) // TILE_C), (TILE_C, LANES)


def _cuda_stats(x, eps, stats, s=np.float32(0), buffers=fresh, sums=None):
    """Batch statistics of x (M, C) on the device: (mean, invstd) float32 (C,) from `buffers`,
    stats (2, C) = mean and unbiased variance overwritten; with s > 0 also whether x * s is an
    exact int16 everywhere (checked on the device and read back only with TERNET_CHECK_INT16=1).
    sums: x's conv_tc.ConvSums, from the convolution that wrote it: the same statistics without
    reading x but for its first row (unless another convolution's sums have taken their buffer
    since, or with TERNET_CHECK_INT16=1, whose check reads all of x)."""
    m, c = x.shape
    _no_rows(m)
    if sums is not None and sums.current() and not CHECK_INT16:
        check(sums.m == m and sums.part.shape[1] == c, "batchnorm: the convolution's sums are not this input's")
        mean32, invstd = buffers("bn.mean", c, np.float32), buffers("bn.invstd", c, np.float32)
        if sums.part.dtype == np.float64:
            _stats_from_fsums_cuda[c, SUM_THREADS](sums.part, m, np.float64(eps), mean32, invstd, stats)
        else:
            _stats_from_sums_cuda[c, SUM_THREADS](sums.part, m, x, np.float64(eps), sums.scale, mean32, invstd,
                                                  stats)
        return mean32, invstd, s > 0
    grid, block = _reduce_grid(m, c)
    part = scratch("bn.part", (grid[0], 2, c), np.float64)
    mean32, invstd = buffers("bn.mean", c, np.float32), buffers("bn.invstd", c, np.float32)
    flag = zeros((1,), np.int32, True) if s > 0 and CHECK_INT16 else scratch("bn.flag", 1, np.int32)
    # (the check costs a division per element: skipped where its flag would not be read)
    _moments_cuda[grid, block](x, s if CHECK_INT16 else np.float32(0), flag, part)
    _stats_cuda[_final_grid(c)](part, np.float64(m), x, np.float64(eps), mean32, invstd, stats)
    # reading the flag back would make the host wait for every queued kernel, once per layer and
    # step: the model builder guarantees int_scale (see BNAct), so only TERNET_CHECK_INT16=1 reads it
    exact = s > 0 and (not CHECK_INT16 or int(flag.copy_to_host()[0]) == 0)
    return mean32, invstd, exact


def _cuda_eval_coeffs(gamma, beta, running_mean, running_var, eps):
    c = gamma.size
    scale, shift = empty(c, np.float32, True), empty(c, np.float32, True)
    _eval_coeffs_cuda[grid1d(c)](gamma, beta, running_mean, running_var, np.float64(eps), scale, shift)
    return scale, shift


# ----------------------------------------------------------------------------------------------
# launchers

def _channels(a):
    return tuple(a.shape)[-1]      # (the simulator's device shapes refuse negative indices)


def _rows(a):
    """a as (rows, channels): one row per pixel, channels last."""
    return view(a, -1, _channels(a))


def _stats_out(stats, c, dev):
    if stats is None:
        return empty((2, c), np.float32, dev)
    check(tuple(stats.shape) == (2, c) and stats.dtype == np.float32, "batchnorm: stats must be float32 (2, C)")
    return stats


def batchnorm_update_running(running_mean, running_var, stats, momentum):
    """In place: running_mean += momentum * (stats[0] - running_mean), and running_var likewise
    with stats[1] (the batch mean and unbiased variance, float32 (2, C), as the train forwards
    write them)."""
    check(tuple(stats.shape) == (2, running_mean.size), "batchnorm_update_running: stats must be (2, C)")
    if on_device(running_mean, running_var, stats):
        _update_running_cuda[grid1d(running_mean.size)](running_mean, running_var, stats, np.float32(momentum))
        return
    _update_running(running_mean, running_var, stats, np.float32(momentum))


def batchnorm_forward_train(out, xhat, inp, gamma, beta, running_mean, running_var, momentum, eps, stats=None,
                            buffers=fresh, sums=None):
    """Batch-statistics forward; overwrites out and xhat (same shape as inp, float32) and stats
    (float32 (2, C): batch mean, unbiased variance; allocated when None), then updates the running
    statistics in place from them (skipped when running_mean is None). Returns invstd (C,)
    float32 (on inp's side), for the backward; on the device taken from `buffers(role, shape,
    dtype)` (a layer's StepBuffers, or `fresh`). sums: inp's conv_tc.ConvSums (device; see
    _cuda_stats)."""
    c = _channels(inp)
    check(gamma.shape == (c,) and out.shape == inp.shape, "batchnorm: shape mismatch")
    dev = on_device(out, inp, gamma)
    stats = _stats_out(stats, c, dev)
    if dev:
        mean, invstd, _ = _cuda_stats(_rows(inp), eps, stats, buffers=buffers, sums=sums)
        q = buffers("bn.xq", 1, np.int16)
        _normalize_cuda[grid1d(inp.size)](flat(inp), mean, invstd, gamma, beta, flat(out), flat(xhat), np.float32(0), q)
    else:
        x = _rows(inp)
        mean, invstd = _cpu_stats(x, eps, stats)
        _normalize(x, mean, invstd, gamma, beta, _rows(out), _rows(xhat))
    if running_mean is not None:
        batchnorm_update_running(running_mean, running_var, stats, momentum)
    return invstd


def batchnorm_forward_eval(out, inp, gamma, beta, running_mean, running_var, eps):
    """Running-statistics forward; overwrites out."""
    if on_device(out, inp, gamma):
        scale, shift = _cuda_eval_coeffs(gamma, beta, running_mean, running_var, eps)
        _affine_cuda[grid1d(inp.size)](flat(inp), scale, shift, flat(out))
        return
    c = gamma.size
    scale, shift = np.empty(c, np.float32), np.empty(c, np.float32)
    _eval_coeffs(gamma, beta, running_mean, running_var, np.float64(eps), scale, shift)
    _affine(_rows(inp), scale, shift, _rows(out))


def batchnorm_backward(dinp, dgamma, dbeta, dout, xhat, gamma, invstd, dinp16=None):
    """Backward of the train-mode forward; overwrites dinp, dgamma and dbeta.

    dgamma = sum(dout * xhat), dbeta = sum(dout),
    dinp = gamma * invstd * (dout - (dbeta + xhat * dgamma) / M), M = elements per channel.
    dinp16 (GPU, uint16 of dinp's size, or None): also dinp's bf16 bits there (_bf16_out); with
    dinp None (GPU) only those.
    """
    dy, xh = _rows(dout), _rows(xhat)
    m = np.float64(dy.shape[0])
    check(dinp is not None or (dinp16 is not None and on_device(dout)), "batchnorm_backward: nothing to write")
    if on_device(dout, xhat):
        q = scratch("bn.xq", 1, np.int16)         # (no int16 record: its placeholder)
        _bn_backward_cuda(dinp, dgamma, dbeta, dout, xhat, np.float32(0), q, invstd, gamma, invstd, dinp16)
        return
    sums = _bn_bwd_sums(dy, xh)
    dbeta[:] = sums[0]
    dgamma[:] = sums[1]
    _bn_bwd_dx(dy, xh, gamma, invstd, dbeta, dgamma, m, _rows(dinp))


def _bf16_out(d16):
    """A dx kernel's bf16 output: d16 (flat), or a placeholder (not written)."""
    return flat(d16) if d16 is not None else scratch("bn.d16", 1, np.uint16)


def _f32_out(dx):
    """A dx kernel's float32 output: dx (flat), or None for a placeholder (not written: its bf16
    copy alone is wanted)."""
    return flat(dx) if dx is not None else scratch("bn.d32", 1, np.float32)


def _bn_backward_cuda(dinp, dgamma, dbeta, dout, xhat, s, xq, mean, gamma, invstd, dinp16=None):
    # s > 0: xhat is a placeholder and xq the int16 record, else the other way round
    dy = _rows(dout)
    m, c = dy.shape
    grid, block = _reduce_grid(m, c)
    part = scratch("bn.part", (grid[0], 2, c), np.float64)
    xh2, xq2 = (view(xhat, 1, 1), view(xq, m, c)) if s > 0 else (_rows(xhat), view(xq, 1, 1))
    _bwd_sums_cuda[grid, block](dy, xh2, s, xq2, mean, invstd, part)
    _bwd_final_cuda[_final_grid(c)](part, dgamma, dbeta)
    _bwd_dx_cuda[grid1d(dout.size)](flat(dout), flat(xhat), s, xq, mean, gamma, invstd, dbeta, dgamma,
                                    np.float64(m), _bf16_out(dinp16), _f32_out(dinp))


def batchnorm_forward_train_int16(out, inp, gamma, beta, running_mean, running_var, momentum, eps, int_scale,
                                  stats, buffers=fresh, sums=None):
    """GPU only: batchnorm_forward_train keeping, instead of xhat (float32), the input as exact
    int16 inp * int_scale (2 bytes per element; int_scale as BNAct's: the builder's promise that
    inp * int_scale holds integers, checked with TERNET_CHECK_INT16=1, xhat kept where it fails).
    Returns the record for batchnorm_backward_int16."""
    c = _channels(inp)
    check(gamma.shape == (c,) and out.shape == inp.shape and on_device(out, inp, gamma), "batchnorm_int16: "
          "device arrays of one shape expected")
    stats, mean, invstd, s, xq, xhat = _stats_and_record(inp, eps, stats, int_scale, buffers, sums)
    _normalize_cuda[grid1d(inp.size)](flat(inp), mean, invstd, gamma, beta, flat(out), flat(xhat), s, xq)
    if running_mean is not None:
        batchnorm_update_running(running_mean, running_var, stats, momentum)
    return xhat, s, xq, mean, invstd


def _stats_and_record(inp, eps, stats, int_scale, buffers, sums=None):
    """The plain batch norm's train forward on the device, up to its normalising kernel: (stats,
    mean, invstd, s, xq, xhat) with the record to keep allocated, the int16 one (s = int_scale)
    where int_scale > 0 and inp * int_scale passes the check, else xhat (s = 0)."""
    stats = _stats_out(stats, _channels(inp), True)
    s = np.float32(max(int_scale, 0))
    mean, invstd, exact = _cuda_stats(_rows(inp), eps, stats, s, buffers, sums)
    if s > 0 and not exact:
        warnings.warn("batchnorm: inp * int_scale is not an exact int16 everywhere; keeping xhat (float32)")
        s = np.float32(0)
    xq = empty(inp.size, np.int16, True) if s > 0 else buffers("bn.xq", 1, np.int16)
    xhat = buffers("bn.xhat", 1, np.float32) if s > 0 else empty(inp.shape, np.float32, True)
    return stats, mean, invstd, s, xq, xhat


def bn_add_act_forward_train(out, inp, res, gamma, beta, running_mean, running_var, momentum, eps, r, a,
                             int_scale=0, stats=None, buffers=fresh, sums=None):
    """GPU only: out (int8) = phi_r(BN(inp) + res) with the rectangular window and batch statistics:
    batchnorm_forward_train (or, int_scale > 0, batchnorm_forward_train_int16), the residual add
    (res int8 or float32, inp's shape) and activation.ternary_forward in one pass over the elements
    (ResNet's block ends: layers.Residual). Returns (record, bits): the batch norm's record, as
    the forward it stands for returns it ((xhat, invstd), or the int16 one), and the activation's
    window bits. The same bits as the three forwards one after the other; running statistics as
    batchnorm_forward_train."""
    c = _channels(inp)
    check(gamma.shape == (c,) and out.shape == inp.shape == res.shape and on_device(out, inp, res, gamma),
          "bn_add_act: device arrays of one shape expected")
    stats, mean, invstd, s, xq, xhat = _stats_and_record(inp, eps, stats, int_scale, buffers, sums)
    n = inp.size
    bits = empty(num_words(n), np.uint32, True)
    _bn_add_act_cuda[grid1d(n)](flat(inp), mean, invstd, gamma, beta, flat(res), np.float32(r), np.float32(a), s,
                                flat(xhat), xq, flat(out), bits)
    if running_mean is not None:
        batchnorm_update_running(running_mean, running_var, stats, momentum)
    record = (xhat, s, xq, mean, invstd) if int_scale > 0 else (xhat, invstd)
    return record, bits


def batchnorm_backward_int16(dinp, dgamma, dbeta, dout, record, gamma, dinp16=None):
    """Backward of batchnorm_forward_train_int16 (its record); overwrites dinp, dgamma, dbeta (and
    dinp16, as batchnorm_backward). The same values as batchnorm_backward: xhat is recomputed from
    the int16 input bit for bit."""
    xhat, s, xq, mean, invstd = record
    _bn_backward_cuda(dinp, dgamma, dbeta, dout, xhat, s, xq, mean, gamma, invstd, dinp16)


# ----------------------------------------------------------------------------------------------
# fused batch norm + ternary activation

class BNActSaved:
    """bn_act_forward_train's record on the device; callers only pass it to bn_act_backward.

    Per element: the BN input, as exact int16 x * int_scale (2 bytes) when int_scale > 0 and
    every value passes the check, else as float32 (4 bytes); for the rectangular window one mask
    bit (1/8 byte). The triangular window keeps no per-element window state: the backward
    recomputes y = gamma * xhat + beta bit for bit from copies of gamma and beta. Per channel:
    mean and invstd (and those copies). So 2.125 bytes per element (int16, rect), 2 (int16,
    tri), 4.125 / 4 (float32); the CPU path keeps 8 (xhat and phi' as float32). A float32 input
    not kept (keep_input=False) leaves xf None: the caller recomputes it for the backward.
    """
    __slots__ = ("xq", "xf", "s", "mean", "invstd", "bits", "height", "cg", "cb", "r", "a", "shape")

    def __init__(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)

    @property
    def nbytes(self):
        """Bytes of per-element state kept for the backward (the 1-element placeholders excluded)."""
        kept = [self.xq if self.s > 0 else self.xf] + ([self.bits] if self.shape == WINDOW_RECT else [])
        return sum(int(a.size) * a.dtype.itemsize for a in kept if a is not None)


def _bn_act_forward_train_cuda(out, inp, gamma, beta, stats, eps, r, a, shape, int_scale, buffers, keep_input,
                               sums=None, borrow=False):
    n, s = inp.size, np.float32(max(int_scale, 0))
    mean, invstd, exact = _cuda_stats(_rows(inp), eps, stats, s, buffers, sums)
    if s > 0 and not exact:
        warnings.warn("bn_act: inp * int_scale is not an exact int16 everywhere (non-integers, or values beyond "
                      "32767); keeping the input as float32 for the backward (4 bytes per element, not 2)")
        s = np.float32(0)
    rect = shape == WINDOW_RECT
    # per-element records are allocated per call (StepBuffers says why), 1-element placeholders kept
    xq = empty(n, np.int16, True) if s > 0 else buffers("bn_act.xq", 1, np.int16)
    copy_in = s == 0 and keep_input and not borrow        # else the record is inp itself, or not kept
    xf = buffers("bn_act.xf", 1, np.float32) if s > 0 else empty(n, np.float32, True) if copy_in else flat(inp)
    bits = empty(num_words(n), np.uint32, True) if rect else buffers("bn_act.bits", 1, np.uint32)
    cg, cb = gamma, beta
    if not rect:   # the backward needs this step's gamma, beta, even if an optimizer updates them first
        cg, cb = buffers("bn_act.gamma", gamma.size, np.float32), buffers("bn_act.beta", beta.size, np.float32)
        copy(cg, gamma)
        copy(cb, beta)
    r32, a32 = np.float32(r), np.float32(a)
    fwd = bn_act_kernels(bool(rect), bool(s > 0), copy=copy_in)[0]
    fwd[grid1d(n)](flat(inp), mean, invstd, gamma, beta, r32, a32, shape, s, flat(out), xq, xf, bits)
    xf = xf if s > 0 or keep_input else None
    return BNActSaved(xq=xq, xf=xf, s=s, mean=mean, invstd=invstd, bits=bits, cg=cg, cb=cb, r=r32, a=a32,
                      shape=shape, height=np.float32(window_grad(r32, r32, a32, WINDOW_RECT)))


def _bn_act_backward_cuda(dinp, dgamma, dbeta, dout, saved, gamma, dinp16=None):
    c = gamma.size
    n = (dinp if dinp is not None else dinp16).size
    m = n // c
    t = saved
    args = (t.xq, t.xf, t.s, t.mean, t.invstd, t.bits, t.height, t.cg, t.cb, t.r, t.a, t.shape)
    rect, int16, gather = bool(t.shape == WINDOW_RECT), bool(t.s > 0), isinstance(dout, PoolGrad)
    _, sums, dx = bn_act_kernels(rect, int16, gather, dinp16 is not None, dinp is not None)
    if gather:
        _, h, w, _ = dout.shape
        cov = device_constant(("pool covering", h, w, dout.k, dout.stride, dout.pad),
                              lambda: covering_table(h, w, dout.k, dout.stride, dout.pad))
        pool = (dout.dout, dout.arg, cov, np.int64(h), np.int64(w), dout.k, dout.stride, dout.pad)
        d = scratch("bn_act.dout", 1, np.float32)             # (placeholders, not read)
        grid, block = _reduce_grid(dout.dout.size // c, c)
        part = scratch("bn.part", (grid[0], 2, c), np.float64)
        bn_act_pool_sums(rect, int16)[grid, block](dout.dout, dout.arg, _pool_taps(dout.k), np.int64(h), np.int64(w),
                                                   np.int64(dout.stride), np.int64(dout.pad), *args, part)
    else:
        pool = (scratch("bn_act.pd", (1, 1, 1, 1), np.float32), scratch("bn_act.pa", (1, 1, 1, 1), np.uint8),
                scratch("bn_act.cov", (1, 2), np.int32), np.int64(0), np.int64(0), 0, 0, 0)
        d = flat(dout)
        grid, block = _reduce_grid(m, c)
        part = scratch("bn.part", (grid[0], 2, c), np.float64)
        sums[grid, block](d, *args, part)
    _bwd_final_cuda[_final_grid(c)](part, dgamma, dbeta)
    if gather and dinp16 is None and _bn_act_pool_dx_vec(dinp, dout, t, gamma, dbeta, dgamma, m):
        return
    if gather and dout.store:       # the numba gather is slow (4-D indexing): the pool's kernels store it
        d = flat(dout.materialize())
        dx = bn_act_kernels(rect, int16, False, dinp16 is not None, dinp is not None)[2]
    dx[grid1d(n)](d, *pool, *args, gamma, dbeta, dgamma, np.float64(m), _bf16_out(dinp16), _f32_out(dinp))


def bn_act_forward_train(out, inp, gamma, beta, running_mean, running_var, momentum, eps, r, a, shape,
                         int_scale=0, stats=None, buffers=fresh, keep_input=True, sums=None, borrow=False):
    """out (int8) = phi_r(gamma * xhat + beta), batch statistics; overwrites out and stats (as
    batchnorm_forward_train), updates the running statistics in place unless running_mean is None.

    Returns `saved`, an opaque record for bn_act_backward: on the CPU the tuple (xhat, invstd,
    ActSaved); on the GPU a BNActSaved (see there for the bytes kept per element). int_scale > 0
    promises that inp * int_scale holds integers (a ternary conv's accumulators); the GPU then keeps
    the input as int16, after checking that every value round-trips exactly (the one host read
    of the forward: 4 bytes); it falls back to float32, with a warning, where not. The GPU's
    per-channel arrays and placeholders come from `buffers(role, shape, dtype)` (a layer's
    StepBuffers, or `fresh`). keep_input=False (GPU): a float32 input is not kept; the record's xf
    is None and the caller puts the same values there before the backward (BNAct.source). borrow
    (GPU): a float32 input kept is inp itself, not a copy (the caller leaves its values as they
    are until the backward, which may write the input gradient over them). sums: inp's
    conv_tc.ConvSums (GPU; see _cuda_stats).
    """
    check(out.shape == inp.shape and gamma.shape == (_channels(inp),), "bn_act: shape mismatch")
    if on_device(out, inp, gamma):
        stats = _stats_out(stats, _channels(inp), True)
        saved = _bn_act_forward_train_cuda(out, inp, gamma, beta, stats, eps, r, a, shape, int_scale, buffers,
                                           keep_input, sums, borrow)
        if running_mean is not None:
            batchnorm_update_running(running_mean, running_var, stats, momentum)
        return saved
    c = gamma.size
    stats = _stats_out(stats, c, False)
    x = _rows(inp)
    mean, invstd = _cpu_stats(x, eps, stats)
    xhat, deriv = np.empty(x.shape, np.float32), np.empty(x.shape, np.float32)
    _bn_act_fwd(x, mean, invstd, gamma, beta, np.float32(r), np.float32(a), shape, _rows(out), xhat, deriv)
    if running_mean is not None:
        batchnorm_update_running(running_mean, running_var, stats, momentum)
    return xhat, invstd, ActSaved(x.size, deriv=view(deriv, -1))


def bn_act_forward_eval(out, inp, gamma, beta, running_mean, running_var, eps, r):
    """out (int8) = phi_r(BN(inp)) with the running statistics; overwrites out."""
    if on_device(out, inp, gamma):
        scale, shift = _cuda_eval_coeffs(gamma, beta, running_mean, running_var, eps)
        _affine_act_cuda[grid1d(inp.size)](flat(inp), scale, shift, np.float32(r), flat(out))
        return
    y = np.empty(inp.shape, np.float32)
    batchnorm_forward_eval(y, inp, gamma, beta, running_mean, running_var, eps)
    ternary_forward(out, y, r, 0.5, WINDOW_RECT, train=False)


def bn_act_backward(dinp, dgamma, dbeta, dout, saved, gamma, dinp16=None):
    """Backward of bn_act_forward_train: the window derivative, then batch norm's backward.
    Overwrites dinp (float32, inp's shape), dgamma and dbeta. dout may be a pool.PoolGrad (the
    gradient of a max pool after this layer, not computed yet): on the device the sums are taken
    from the pool's side (bn_act_pool_sums) and dx's elements gathered where the kernels read them
    (or, where pool_vec.cu's kernel does not run and dout.store, from the gradient stored first),
    and dinp may then be the float32 input record itself (the record's xf, as a view of inp's
    shape); on the host it is computed first (the sums then in bwd's order). dinp16 (GPU,
    uint16 of dinp's size, or None): also dinp's bf16 bits there, as batchnorm_backward; with
    dinp None (GPU) only those."""
    if isinstance(dout, PoolGrad) and not on_device(dout.dout):
        dout = dout.materialize()
    check(dinp is not None or (dinp16 is not None and on_device(gamma)), "bn_act_backward: nothing to write")
    if on_device(gamma):
        return _bn_act_backward_cuda(dinp, dgamma, dbeta, dout, saved, gamma, dinp16)
    xhat, invstd, act = saved
    dy, deriv = _rows(dout), view(act.deriv, tuple(xhat.shape))
    sums = _bn_act_bwd_sums(dy, deriv, xhat)
    dbeta[:] = sums[0]
    dgamma[:] = sums[1]
    _bn_act_bwd_dx(dy, deriv, xhat, gamma, invstd, dbeta, dgamma, np.float64(dy.shape[0]), _rows(dinp))
