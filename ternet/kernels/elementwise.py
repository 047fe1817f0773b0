"""Elementwise ops: residual add, fill, divide (the data-parallel mean over shards), and the
real-parameter optimizer updates (Adam, SGD-momentum) used by ternet.optim.
Exercise: pytest tests/test_ops.py -k add, tests/test_cuda_ops.py (CUDA against CPU).
"""
import math
from typing import NamedTuple

import numba
import numpy as np
from numba import cuda

from . import check, flat, grid1d, on_device


# ----------------------------------------------------------------------------------------------
# CPU implementation

@numba.njit(parallel=True, cache=True)
def _add(a, b, out):
    for i in numba.prange(a.size):
        out[i] = a[i] + b[i]


@numba.njit(cache=True)
def _adam(p, g, m, v, lr, b1, b2, c1, c2, eps):
    for i in range(p.size):
        m[i] = b1 * m[i] + (1 - b1) * g[i]
        v[i] = b2 * v[i] + (1 - b2) * g[i] * g[i]
        p[i] -= lr * (m[i] / c1) / (math.sqrt(v[i] / c2) + eps)


@numba.njit(cache=True)
def _sgd(p, g, buf, lr, mu):
    for i in range(p.size):
        buf[i] = mu * buf[i] + g[i]
        p[i] -= lr * buf[i]


# ----------------------------------------------------------------------------------------------
# CUDA kernels

@cuda.jit
def _add_cuda(a, b, out):
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        out[i] = a[i] + b[i]


@cuda.jit
def _copy_cuda(a, out):
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        out[i] = a[i]


@cuda.jit
def _div_cuda(a, d, out):
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        out[i] = a[i] / d


@cuda.jit
def _fill_cuda(out, value):
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        out[i] = value


@cuda.jit
def _adam_cuda(p, g, m, v, hp, b1, b2, eps):
    lr, c1, c2 = hp[0], hp[1], hp[2]       # this step's values (put_scalars), read on the device
    for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
        mi = b1 * m[i] + (1 - b1) * g[i]
        vi = b2 * v[i] + (1 - b2) * g[i] * g[i]
        m[i] = mi
        v[i] = vi
        p[i] -= lr * (mi / c1) / (math.sqrt(vi / c2) + eps)


@cuda.jit
def _sgd_cuda(p, g, buf, hp, mu):
    lr = hp[0]
    for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
        b = mu * buf[i] + g[i]
        buf[i] = b
        p[i] -= lr * b


@cuda.jit
def _put_cuda(out, n, v0, v1, v2, v3, v4, v5, v6, v7):
    if cuda.grid(1) == 0:
        if n > 0:
            out[0] = v0
        if n > 1:
            out[1] = v1
        if n > 2:
            out[2] = v2
        if n > 3:
            out[3] = v3
        if n > 4:
            out[4] = v4
        if n > 5:
            out[5] = v5
        if n > 6:
            out[6] = v6
        if n > 7:
            out[7] = v7


# ----------------------------------------------------------------------------------------------
# launchers

def add_forward(out, a, b):
    """out = a + b (any dtypes, float32 out); overwrites out. Backward: both inputs get dout."""
    if on_device(out, a, b):
        _add_cuda[grid1d(out.size)](flat(a), flat(b), flat(out))
        return
    _add(a.reshape(-1), b.reshape(-1), out.reshape(-1))


class GradSum(NamedTuple):
    """A gradient a + b not added yet (device arrays, float32, one shape; a the giver's own): what
    a ResNet block's backward hands the block before it (Residual.defer), whose activation's
    backward adds the two where it reads them (activation.ternary_backward's dout2): one pass over
    them fewer."""
    a: object
    b: object


def copy(out, a):
    """out[...] = a (one shape and dtype). On the GPU a kernel, not a driver copy: it queues like
    any launch, and a captured CUDA graph (ternet.cuda_graph) records it."""
    if on_device(out, a):
        _copy_cuda[grid1d(out.size)](flat(a), flat(out))
        return
    out[...] = a


def fill(out, value):
    """out[...] = value."""
    if on_device(out):
        _fill_cuda[grid1d(out.size)](flat(out), out.dtype.type(value))
        return
    out[...] = value


def divide(out, a, d):
    """out = a / d elementwise, d a scalar of out's dtype (IEEE division on both paths); overwrites out."""
    d = out.dtype.type(d)
    if on_device(out, a):
        _div_cuda[grid1d(out.size)](flat(a), d, flat(out))
        return
    np.divide(a, d, out=out)


def adam_update(p, g, m, v, lr, b1, b2, c1, c2, eps, hp=None):
    """In place: Adam moments m, v advance with g; p -= lr * (m / c1) / (sqrt(v / c2) + eps)
    (c1, c2 the bias corrections). float32 arrays of one shape. On the GPU the kernel reads
    (lr, c1, c2) from hp, a float32 device array the caller filled with put_scalars (None: filled
    here), so that a captured CUDA graph reads each step's values (ternet.cuda_graph)."""
    if on_device(p, g, m, v):
        hp = device_scalars(lr, c1, c2) if hp is None else hp
        _adam_cuda[grid1d(p.size)](p, g, m, v, hp, b1, b2, eps)
        return
    _adam(p, g, m, v, lr, b1, b2, c1, c2, eps)


def sgd_update(p, g, buf, lr, mu, hp=None):
    """In place: buf = mu * buf + g; p -= lr * buf. On the GPU lr is read from hp[0] (as adam_update)."""
    if on_device(p, g, buf):
        hp = device_scalars(lr) if hp is None else hp
        _sgd_cuda[grid1d(p.size)](p, g, buf, hp, mu)
        return
    _sgd(p, g, buf, lr, mu)


PUT_MAX = 8


def put_scalars(out, *values):
    """out[:len(values)] = values as float32 (at most PUT_MAX). On the GPU by a one-thread launch,
    queued in stream order like any kernel: how a step's per-step values (learning rate, Adam's
    bias corrections, a sampler's annealed settings) reach kernels that read them from device
    memory, without a host-to-device copy that would wait for the GPU."""
    check(len(values) <= PUT_MAX and len(values) <= out.size,
          f"put_scalars: {len(values)} values for {out.size} slots (at most {PUT_MAX})")
    vals = [np.float32(v) for v in values]
    if on_device(out):
        _put_cuda[1, 1](out, np.int64(len(vals)), *vals, *[np.float32(0)] * (PUT_MAX - len(vals)))
        return
    out[:len(vals)] = vals


def device_scalars(*values):
    """A new float32 device array holding values (put_scalars)."""
    out = cuda.device_array(max(1, len(values)), np.float32)
    put_scalars(out, *values)
    return out
