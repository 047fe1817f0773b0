"""Per-weight transition kernels for discrete weights: the GXNOR discrete state transition (DST)
with its two step sources (plain gradient step, Adam step). The transition rule itself is
kernels.scalar.dst_target, shared with the CUDA kernels. States are int8 values q in
[-qmax, qmax] (weight value q / qmax); updates happen in place. Exercise: pytest tests/test_dst.py.
"""
import math

import numba
import numpy as np

from . import check, on_device
from .scalar import dst_target, uniform

CHUNKS = 64


# ----------------------------------------------------------------------------------------------
# CPU implementation

@numba.njit(parallel=True, cache=True)
def _dst_sgd(q, g, lr, qmax, m, key):
    n = q.size
    part = np.zeros(CHUNKS, np.int64)
    step = (n + CHUNKS - 1) // CHUNKS
    for ch in numba.prange(CHUNKS):
        flips = 0
        for i in range(ch * step, min(n, (ch + 1) * step)):
            old = q[i]
            new = dst_target(old, -lr * g[i], qmax, m, uniform(key, i))
            if new != old:
                q[i] = new
                flips += 1
        part[ch] = flips
    return part.sum()


@numba.njit(parallel=True, cache=True)
def _dst_adam(q, g, mom, vel, lr, b1, b2, c1, c2, eps, qmax, m, key):
    n = q.size
    part = np.zeros(CHUNKS, np.int64)
    step = (n + CHUNKS - 1) // CHUNKS
    for ch in numba.prange(CHUNKS):
        flips = 0
        for i in range(ch * step, min(n, (ch + 1) * step)):
            mo = b1 * mom[i] + (1 - b1) * g[i]
            ve = b2 * vel[i] + (1 - b2) * g[i] * g[i]
            mom[i] = mo
            vel[i] = ve
            dw = -lr * (mo / c1) / (math.sqrt(ve / c2) + eps)
            old = q[i]
            new = dst_target(old, dw, qmax, m, uniform(key, i))
            if new != old:
                q[i] = new
                flips += 1
        part[ch] = flips
    return part.sum()


# ----------------------------------------------------------------------------------------------
# launchers

def dst_sgd(q, g, lr, qmax, m, key, counts):
    """In place: q <- DST(q, dW = -lr * g). q int8 (any shape), g float32 (same shape).
    Accumulates the number of weights whose state changed into counts[0] (int64, same side)."""
    check(q.shape == g.shape and q.dtype == np.int8, "dst_sgd: q must be int8 with g's shape")
    if on_device(q, g, counts):
        from .transitions_cuda import dst_sgd_cuda
        return dst_sgd_cuda(q, g, lr, qmax, m, key, counts)
    counts[0] += _dst_sgd(q.reshape(-1), g.reshape(-1), np.float32(lr), qmax, np.float32(m), key)


def dst_adam(q, g, mom, vel, lr, t, qmax, m, key, counts, b1=0.9, b2=0.999, eps=1e-8):
    """In place: Adam moments (mom, vel, float32) advance with g, then q <- DST(q, dW = Adam step
    at bias-correction step t >= 1). Accumulates the number of state changes into counts[0]."""
    check(q.shape == g.shape == mom.shape == vel.shape, "dst_adam: shape mismatch")
    c1, c2 = 1 - b1 ** t, 1 - b2 ** t
    args = (np.float32(lr), np.float32(b1), np.float32(b2), np.float32(c1), np.float32(c2),
            np.float32(eps), qmax, np.float32(m), key)
    if on_device(q, g, mom, vel, counts):
        from .transitions_cuda import dst_adam_cuda
        return dst_adam_cuda(q, g, mom, vel, *args, counts)
    counts[0] += _dst_adam(q.reshape(-1), g.reshape(-1), mom.reshape(-1), vel.reshape(-1), *args)
