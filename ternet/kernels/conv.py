"""2-D convolution, NHWC activations and (K, KH, KW, C) int8 ternary weights.

CPU: im2col (numba, parallel over images) + float32 GEMM (BLAS); ternary values are exact in
float32 and so are their int sums below 2^24. CUDA kernels sit beside them (issue: GPU path).
Exercise: pytest tests/test_conv.py.
"""
import numba
import numpy as np

from . import check, empty, on_device


def out_size(h, k, stride, pad):
    return (h + 2 * pad - k) // stride + 1


# ----------------------------------------------------------------------------------------------
# CPU implementation

@numba.njit(parallel=True, cache=True)
def _im2col(x, kh, kw, stride, pad, oh_n, ow_n, cols):
    # x (N, H, W, C) -> cols (N*OH*OW, KH*KW*C), column order (i, j, c) matches weight.reshape(K, -1).
    # For one kernel row i the in-bounds taps j are one contiguous run of x: copied as a block.
    n_img, h, w, c = x.shape
    xf = x.reshape(n_img, h * w * c)
    for n in numba.prange(n_img):
        for oh in range(oh_n):
            for ow in range(ow_n):
                row = (n * oh_n + oh) * ow_n + ow
                iw0 = ow * stride - pad
                j0, j1 = max(0, -iw0), min(kw, w - iw0)
                for i in range(kh):
                    ih = oh * stride - pad + i
                    base = i * kw * c
                    lo, hi = base + j0 * c, base + max(j1, j0) * c
                    if ih < 0 or ih >= h:
                        lo = hi = base + kw * c
                    for e in range(base, lo):
                        cols[row, e] = 0
                    src = (ih * w + iw0) * c - base
                    for e in range(lo, hi):
                        cols[row, e] = xf[n, src + e]
                    for e in range(hi, base + kw * c):
                        cols[row, e] = 0


@numba.njit(parallel=True, cache=True)
def _col2im(dcols, kh, kw, stride, pad, oh_n, ow_n, dx):
    # scatter-add dcols (N*OH*OW, KH*KW*C) back into dx (N, H, W, C); one image per thread: no races
    n_img, h, w, c = dx.shape
    dxf = dx.reshape(n_img, h * w * c)
    for n in numba.prange(n_img):
        dxf[n] = 0
        for oh in range(oh_n):
            for ow in range(ow_n):
                row = (n * oh_n + oh) * ow_n + ow
                iw0 = ow * stride - pad
                j0, j1 = max(0, -iw0), min(kw, w - iw0)
                for i in range(kh):
                    ih = oh * stride - pad + i
                    if ih < 0 or ih >= h:
                        continue
                    base = i * kw * c
                    dst = (ih * w + iw0) * c - base
                    for e in range(base + j0 * c, base + j1 * c):
                        dxf[n, dst + e] += dcols[row, e]


def _as_float_weight(weight, scale):
    # BLAS wants float operands: a transient float32 expansion of the int8 states (exact values)
    wf = weight.reshape(weight.shape[0], -1).astype(np.float32)
    if scale != 1.0:
        wf *= np.float32(scale)
    return wf


# ----------------------------------------------------------------------------------------------
# launchers

def conv2d_forward(out, inp, weight, scale, stride, pad, cols=None):
    """out = conv(inp, scale * weight); overwrites out.

    inp (N, H, W, C) float32, or int8 for ternary activations; weight (K, KH, KW, C) int8 states; out (N, OH, OW, K) float32.
    cols: optional (N*OH*OW, KH*KW*C) float32 buffer; when given it is left holding the im2col
    matrix, which conv2d_backward_weight can reuse.
    """
    n, h, w, c = inp.shape
    k, kh, kw, wc = weight.shape
    check(wc == c, f"conv2d: input has {c} channels, weight expects {wc}")
    oh, ow = out_size(h, kh, stride, pad), out_size(w, kw, stride, pad)
    check(out.shape == (n, oh, ow, k), f"conv2d: out shape {out.shape} != {(n, oh, ow, k)}")
    if on_device(out, inp, weight):
        from .conv_cuda import conv2d_forward_cuda
        return conv2d_forward_cuda(out, inp, weight, scale, stride, pad)
    if cols is None:
        cols = np.empty((n * oh * ow, kh * kw * c), np.float32)
    _im2col(inp, kh, kw, stride, pad, oh, ow, cols)
    np.matmul(cols, _as_float_weight(weight, scale).T, out=out.reshape(n * oh * ow, k))
    return cols


def conv2d_backward_input(dinp, dout, weight, scale, stride, pad):
    """dinp = conv_transpose(dout, scale * weight); overwrites dinp (N, H, W, C) float32."""
    n, oh, ow, k = dout.shape
    _, kh, kw, c = weight.shape
    check(dinp.shape[0] == n and dinp.shape[3] == c, "conv2d_backward_input: shape mismatch")
    if on_device(dinp, dout, weight):
        from .conv_cuda import conv2d_backward_input_cuda
        return conv2d_backward_input_cuda(dinp, dout, weight, scale, stride, pad)
    dcols = dout.reshape(n * oh * ow, k) @ _as_float_weight(weight, scale)
    _col2im(dcols, kh, kw, stride, pad, oh, ow, dinp)


def conv2d_backward_weight(dweight, dout, inp, stride, pad, cols=None):
    """dweight = d loss / d (weight value) = sum over positions of dout x patch; overwrites
    dweight (K, KH, KW, C) float32. inp may be float32 or int8 (ternary activations).

    cols: the im2col matrix left by conv2d_forward for this input (recomputed when None).
    """
    n, oh, ow, k = dout.shape
    _, kh, kw, c = dweight.shape
    if on_device(dweight, dout, inp):
        from .conv_cuda import conv2d_backward_weight_cuda
        return conv2d_backward_weight_cuda(dweight, dout, inp, stride, pad)
    if cols is None:
        cols = np.empty((n * oh * ow, kh * kw * c), np.float32)
        _im2col(inp, kh, kw, stride, pad, oh, ow, cols)
    dw = dweight.reshape(k, kh * kw * c)
    np.matmul(dout.reshape(n * oh * ow, k).T, cols, out=dw)
