"""Pooling on NHWC: max pooling (argmax kept as the window position, uint8), average pooling
(padding counted as zeros, divisor k*k) and global average pooling.
Exercise: pytest tests/test_ops.py -k pool.
"""
import numba
import numpy as np

from . import check, on_device
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
    for n in numba.prange(n_img):
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
                                dx[n, ih, iw, ch] += dout[n, oh, ow, ch] * inv


# ----------------------------------------------------------------------------------------------
# launchers

def pool_out_shape(shape, k, stride, pad):
    n, h, w, c = shape
    return (n, out_size(h, k, stride, pad), out_size(w, k, stride, pad), c)


def maxpool_forward(out, arg, inp, k, stride, pad):
    """out = max over each window (same dtype as inp); arg (uint8) = window position of the max."""
    check(out.shape == pool_out_shape(inp.shape, k, stride, pad), "maxpool: bad out shape")
    check(pad < k, "maxpool: padding must be smaller than the window")
    if on_device(out, inp):
        from .pool_cuda import maxpool_forward_cuda
        return maxpool_forward_cuda(out, arg, inp, k, stride, pad)
    _maxpool_fwd(inp, k, stride, pad, out, arg)


def maxpool_backward(dinp, dout, arg, k, stride, pad):
    """dinp = scatter of dout to each window's argmax; overwrites dinp (float32)."""
    if on_device(dinp, dout, arg):
        from .pool_cuda import maxpool_backward_cuda
        return maxpool_backward_cuda(dinp, dout, arg, k, stride, pad)
    _maxpool_bwd(dout, arg, k, stride, pad, dinp)


def avgpool_forward(out, inp, k, stride, pad):
    """out = sum over each window / (k*k) (zero padding counted); overwrites out (float32)."""
    check(out.shape == pool_out_shape(inp.shape, k, stride, pad), "avgpool: bad out shape")
    if on_device(out, inp):
        from .pool_cuda import avgpool_forward_cuda
        return avgpool_forward_cuda(out, inp, k, stride, pad)
    _avgpool_fwd(inp, k, stride, pad, out)


def avgpool_backward(dinp, dout, k, stride, pad):
    """dinp = dout spread evenly over each window; overwrites dinp."""
    if on_device(dinp, dout):
        from .pool_cuda import avgpool_backward_cuda
        return avgpool_backward_cuda(dinp, dout, k, stride, pad)
    _avgpool_bwd(dout, k, stride, pad, dinp)


def global_avgpool_forward(out, inp):
    """out (N, C) = mean over H and W of inp (N, H, W, C); overwrites out."""
    n, h, w, c = inp.shape
    if on_device(out, inp):
        from .pool_cuda import global_avgpool_forward_cuda
        return global_avgpool_forward_cuda(out, inp)
    np.sum(inp.reshape(n, h * w, c), axis=1, dtype=np.float32, out=out)
    out *= np.float32(1.0 / (h * w))


def global_avgpool_backward(dinp, dout):
    """dinp (N, H, W, C) = dout (N, C) / (H*W) broadcast; overwrites dinp."""
    n, h, w, c = dinp.shape
    if on_device(dinp, dout):
        from .pool_cuda import global_avgpool_backward_cuda
        return global_avgpool_backward_cuda(dinp, dout)
    dinp[:] = (dout * np.float32(1.0 / (h * w)))[:, None, None, :]
