"""Fully connected layer: (N, F) activations times (K, F) int8 ternary weights.

CPU: float32 GEMM (BLAS) on the exact ternary values. CUDA: the convolution kernels on 1x1 images. Exercise: pytest tests/test_ops.py -k linear.
"""
import numpy as np

from . import check, on_device, view
from .conv import (_as_float_weight, _conv2d_backward_input_cuda, _conv2d_backward_weight_cuda,
                   _conv2d_forward_cuda)


def linear_forward(out, inp, weight, scale):
    """out = inp @ (scale * weight).T; overwrites out (N, K) float32. inp (N, F) float32 or int8."""
    n, f = inp.shape
    k, wf = weight.shape
    check(wf == f, f"linear: input has {f} features, weight expects {wf}")
    check(out.shape == (n, k), f"linear: out shape {out.shape} != {(n, k)}")
    if on_device(out, inp, weight):   # a 1x1 convolution on 1x1 images
        return _conv2d_forward_cuda(view(out, n, 1, 1, k), view(inp, n, 1, 1, f),
                                    view(weight, k, 1, 1, f), scale, 1, 0)
    np.matmul(inp.astype(np.float32, copy=False), _as_float_weight(weight, scale).T, out=out)


def linear_backward_input(dinp, dout, weight, scale):
    """dinp = dout @ (scale * weight); overwrites dinp (N, F) float32."""
    if on_device(dinp, dout, weight):
        n, k = dout.shape
        f = weight.shape[1]
        return _conv2d_backward_input_cuda(view(dinp, n, 1, 1, f), view(dout, n, 1, 1, k),
                                           view(weight, k, 1, 1, f), scale, 1, 0)
    np.matmul(dout, _as_float_weight(weight, scale), out=dinp)


def linear_backward_weight(dweight, dout, inp):
    """dweight = dout.T @ inp (gradient w.r.t. the weight value); overwrites dweight (K, F) float32."""
    if on_device(dweight, dout, inp):
        n, k = dout.shape
        f = inp.shape[1]
        return _conv2d_backward_weight_cuda(view(dweight, k, 1, 1, f), view(dout, n, 1, 1, k),
                                            view(inp, n, 1, 1, f), 1, 0)
    np.matmul(dout.T, inp.astype(np.float32, copy=False), out=dweight)
