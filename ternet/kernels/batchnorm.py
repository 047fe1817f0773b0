"""Batch normalisation over all axes but the last (NHWC or (N, F)), train and eval modes.

Train: y = gamma * xhat + beta with xhat = (x - mean) / sqrt(var + eps), batch statistics
(biased variance), running statistics updated with momentum (unbiased variance, as PyTorch).
Reductions use a fixed number of chunks summed in a fixed order: results do not depend on the
thread count. Exercise: pytest tests/test_ops.py -k batchnorm.
"""
import numba
import numpy as np

from . import check, on_device
from .activation import ternary_backward, ternary_forward

CHUNKS = 64


# ----------------------------------------------------------------------------------------------
# CPU implementation

@numba.njit(parallel=True, cache=True)
def _colsum(x, shift, sq):
    # per-column sum of (x - shift) (sq=False) or (x - shift)^2 (sq=True), float64 accumulators
    m, c = x.shape
    part = np.zeros((CHUNKS, c), np.float64)
    step = (m + CHUNKS - 1) // CHUNKS
    for ch in numba.prange(CHUNKS):
        for i in range(ch * step, min(m, (ch + 1) * step)):
            for j in range(c):
                d = np.float64(x[i, j]) - shift[j]
                part[ch, j] += d * d if sq else d
    out = np.zeros(c, np.float64)
    for ch in range(CHUNKS):
        out += part[ch]
    return out


@numba.njit(parallel=True, cache=True)
def _normalize(x, mean, invstd, gamma, beta, y, xhat):
    m, c = x.shape
    for i in numba.prange(m):
        for j in range(c):
            h = (x[i, j] - mean[j]) * invstd[j]
            xhat[i, j] = h
            y[i, j] = gamma[j] * h + beta[j]


@numba.njit(parallel=True, cache=True)
def _affine(x, scale, shift, y):
    m, c = x.shape
    for i in numba.prange(m):
        for j in range(c):
            y[i, j] = x[i, j] * scale[j] + shift[j]


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
def _bn_bwd_dx(dy, xhat, gamma, invstd, sdy, sdyx, dx):
    m, c = dy.shape
    for i in numba.prange(m):
        for j in range(c):
            dx[i, j] = gamma[j] * invstd[j] * (dy[i, j] - (sdy[j] + xhat[i, j] * sdyx[j]) / m)


# ----------------------------------------------------------------------------------------------
# launchers

def _flat(a):
    return a.reshape(-1, a.shape[-1])


def batchnorm_forward_train(out, xhat, inp, gamma, beta, running_mean, running_var, momentum, eps):
    """Batch-statistics forward; overwrites out and xhat (same shape as inp, float32), updates the
    running statistics in place. Returns invstd (C,) float32, needed by the backward."""
    c = inp.shape[-1]
    check(gamma.shape == (c,) and out.shape == inp.shape, "batchnorm: shape mismatch")
    if on_device(out, inp, gamma):
        from .batchnorm_cuda import batchnorm_forward_train_cuda
        return batchnorm_forward_train_cuda(out, xhat, inp, gamma, beta, running_mean, running_var, momentum, eps)
    x = _flat(inp)
    m = x.shape[0]
    mean = _colsum(x, np.zeros(c, np.float64), False) / m
    var = _colsum(x, mean, True) / m
    invstd = (1.0 / np.sqrt(var + eps)).astype(np.float32)
    _normalize(x, mean.astype(np.float32), invstd, gamma, beta, _flat(out), _flat(xhat))
    running_mean += np.float32(momentum) * (mean.astype(np.float32) - running_mean)
    unbiased = var * m / max(m - 1, 1)
    running_var += np.float32(momentum) * (unbiased.astype(np.float32) - running_var)
    return invstd


def batchnorm_forward_eval(out, inp, gamma, beta, running_mean, running_var, eps):
    """Running-statistics forward; overwrites out."""
    if on_device(out, inp, gamma):
        from .batchnorm_cuda import batchnorm_forward_eval_cuda
        return batchnorm_forward_eval_cuda(out, inp, gamma, beta, running_mean, running_var, eps)
    scale = (gamma / np.sqrt(running_var.astype(np.float64) + eps)).astype(np.float32)
    shift = (beta - running_mean * scale).astype(np.float32)
    _affine(_flat(inp), scale, shift, _flat(out))


def batchnorm_backward(dinp, dgamma, dbeta, dout, xhat, gamma, invstd):
    """Backward of the train-mode forward; overwrites dinp, dgamma and dbeta.

    dgamma = sum(dout * xhat), dbeta = sum(dout),
    dinp = gamma * invstd * (dout - (dbeta + xhat * dgamma) / M), M = elements per channel.
    """
    if on_device(dinp, dout, xhat):
        from .batchnorm_cuda import batchnorm_backward_cuda
        return batchnorm_backward_cuda(dinp, dgamma, dbeta, dout, xhat, gamma, invstd)
    dy, xh = _flat(dout), _flat(xhat)
    sums = _bn_bwd_sums(dy, xh)
    dbeta[:] = sums[0]
    dgamma[:] = sums[1]
    _bn_bwd_dx(dy, xh, gamma, invstd, sums[0].astype(np.float32), sums[1].astype(np.float32), _flat(dinp))


# ----------------------------------------------------------------------------------------------
# fused batch norm + ternary activation (the block every conv / FC layer ends in)

def bn_act_forward_train(out, inp, gamma, beta, running_mean, running_var, momentum, eps, r, a, shape,
                         int_scale=0):
    """out (int8) = phi_r(gamma * xhat + beta), batch statistics; updates the running statistics.

    Returns `saved`, an opaque record for bn_act_backward. int_scale > 0 promises that
    inp * int_scale holds integers (a ternary conv's accumulators), so a device path may keep
    the input as exact int16 instead of float32 for the backward.
    """
    if on_device(out, inp, gamma):
        from .batchnorm_cuda import bn_act_forward_train_cuda
        return bn_act_forward_train_cuda(out, inp, gamma, beta, running_mean, running_var, momentum, eps,
                                         r, a, shape, int_scale)
    y, xhat = np.empty(inp.shape, np.float32), np.empty(inp.shape, np.float32)
    invstd = batchnorm_forward_train(y, xhat, inp, gamma, beta, running_mean, running_var, momentum, eps)
    deriv = np.empty(inp.shape, np.float32)
    ternary_forward(out, deriv, y, r, a, shape)
    return xhat, invstd, deriv


def bn_act_forward_eval(out, inp, gamma, beta, running_mean, running_var, eps, r):
    """out (int8) = phi_r(BN(inp)) with the running statistics."""
    if on_device(out, inp, gamma):
        from .batchnorm_cuda import bn_act_forward_eval_cuda
        return bn_act_forward_eval_cuda(out, inp, gamma, beta, running_mean, running_var, eps, r)
    y = np.empty(inp.shape, np.float32)
    batchnorm_forward_eval(y, inp, gamma, beta, running_mean, running_var, eps)
    ternary_forward(out, None, y, r, 0.5, 0)


def bn_act_backward(dinp, dgamma, dbeta, dout, saved, gamma):
    """Backward of bn_act_forward_train: the window derivative, then batch norm's backward.
    Overwrites dinp (float32, inp's shape), dgamma and dbeta."""
    if on_device(dinp, dout, gamma):
        from .batchnorm_cuda import bn_act_backward_cuda
        return bn_act_backward_cuda(dinp, dgamma, dbeta, dout, saved, gamma)
    xhat, invstd, deriv = saved
    dy = np.empty(dout.shape, np.float32)
    ternary_backward(dy, dout, deriv)
    batchnorm_backward(dinp, dgamma, dbeta, dy, xhat, gamma, invstd)
