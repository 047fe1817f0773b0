"""Elementwise ops: residual add, fill, divide (the data-parallel mean over shards), and the
real-parameter optimizer updates (Adam, SGD-momentum) used by ternet.optim.
Exercise: pytest tests/test_ops.py -k add, tests/test_cuda_ops.py (CUDA against CPU).
"""
import math

import numba
import numpy as np
from numba import cuda

from . import flat, grid1d, on_device


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
def _div_cuda(a, d, out):
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        out[i] = a[i] / d


@cuda.jit
def _fill_cuda(out, value):
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        out[i] = value


@cuda.jit
def _adam_cuda(p, g, m, v, lr, b1, b2, c1, c2, eps):
    for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
        mi = b1 * m[i] + (1 - b1) * g[i]
        vi = b2 * v[i] + (1 - b2) * g[i] * g[i]
        m[i] = mi
        v[i] = vi
        p[i] -= lr * (mi / c1) / (math.sqrt(vi / c2) + eps)


@cuda.jit
def _sgd_cuda(p, g, buf, lr, mu):
    for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
        b = mu * buf[i] + g[i]
        buf[i] = b
        p[i] -= lr * b


# ----------------------------------------------------------------------------------------------
# launchers

def add_forward(out, a, b):
    """out = a + b (any dtypes, float32 out); overwrites out. Backward: both inputs get dout."""
    if on_device(out, a, b):
        _add_cuda[grid1d(out.size)](flat(a), flat(b), flat(out))
        return
    _add(a.reshape(-1), b.reshape(-1), out.reshape(-1))


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


def adam_update(p, g, m, v, lr, b1, b2, c1, c2, eps):
    """In place: Adam moments m, v advance with g; p -= lr * (m / c1) / (sqrt(v / c2) + eps)
    (c1, c2 the bias corrections). float32 arrays of one shape."""
    if on_device(p, g, m, v):
        _adam_cuda[grid1d(p.size)](p, g, m, v, lr, b1, b2, c1, c2, eps)
        return
    _adam(p, g, m, v, lr, b1, b2, c1, c2, eps)


def sgd_update(p, g, buf, lr, mu):
    """In place: buf = mu * buf + g; p -= lr * buf."""
    if on_device(p, g, buf):
        _sgd_cuda[grid1d(p.size)](p, g, buf, lr, mu)
        return
    _sgd(p, g, buf, lr, mu)
