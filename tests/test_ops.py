"""Every CPU op against a float64 reference: forwards compared directly, backwards against
central differences of the reference forward (float64, tiny shapes)."""
import math

import numba
import numpy as np
import pytest

import reference as ref
from ternet.kernels.activation import ternary_backward, ternary_forward
from ternet.kernels.batchnorm import batchnorm_backward, batchnorm_forward_eval, batchnorm_forward_train
from ternet.kernels.conv import conv2d_backward_input, conv2d_backward_weight, conv2d_forward
from ternet.kernels.linear import linear_backward_input, linear_backward_weight, linear_forward
from ternet.kernels.loss import loss_forward_backward
from ternet.kernels.pool import (avgpool_backward, avgpool_forward, global_avgpool_backward,
                                 global_avgpool_forward, maxpool_backward, maxpool_forward, pool_out_shape)
from ternet.kernels.scalar import ternarize, window_grad

RNG = np.random.default_rng(1234)


def tern(shape, qmax=1):
    return RNG.integers(-qmax, qmax + 1, size=shape).astype(np.int8)


CONV_CASES = [  # (N, H, W, C, K, k, stride, pad)
    (2, 5, 5, 3, 4, 3, 1, 1), (1, 7, 6, 2, 3, 3, 2, 1), (2, 6, 6, 1, 2, 5, 1, 0), (1, 5, 5, 2, 2, 1, 2, 0),
    (1, 9, 9, 3, 2, 7, 2, 3), (2, 6, 5, 8, 3, 3, 1, 1), (1, 7, 7, 16, 2, 3, 2, 1),
]   # kw * C below 8 takes the tap-major im2col, 8 and more the slice copies


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_forward_exact_and_backward_fd(case):
    n, h, w, c, k, kk, s, p = case
    x = tern((n, h, w, c))
    wq = tern((k, kk, kk, c))
    oh, ow = (h + 2 * p - kk) // s + 1, (w + 2 * p - kk) // s + 1
    out = np.empty((n, oh, ow, k), np.float32)
    conv2d_forward(out, x, wq, 1.0, s, p)
    # ternary x ternary accumulates exactly
    np.testing.assert_array_equal(out, ref.conv2d(x, wq, s, p))
    dy = RNG.standard_normal(out.shape)
    dx = np.empty(x.shape, np.float32)
    conv2d_backward_input(dx, dy.astype(np.float32), wq, 1.0, s, p)
    fd = ref.central_diff(lambda xx: (ref.conv2d(xx, wq, s, p) * dy).sum(), x.astype(np.float64))
    ref.assert_close(dx, fd, 1e-4, 1e-4, "conv dx")  # float32 accumulation of float64 dy
    dw = np.empty(wq.shape, np.float32)
    conv2d_backward_weight(dw, dy.astype(np.float32), x, s, p)
    fd = ref.central_diff(lambda ww: (ref.conv2d(x, ww, s, p) * dy).sum(), wq.astype(np.float64))
    ref.assert_close(dw, fd, 1e-4, 1e-4, "conv dw")


def test_same_bits_on_stream_threads():
    """configure_cpu_threads runs im2col, col2im and max pooling on more threads than the rest:
    one image per thread, so the results must not change by a bit."""
    import numba

    from ternet import kernels
    x, wq = tern((5, 9, 8, 8)), tern((6, 3, 3, 8))
    dy = RNG.standard_normal((5, 9, 8, 6)).astype(np.float32)
    runs = []
    saved, before = list(kernels._STREAM_THREADS), numba.get_num_threads()
    try:
        for wide in ([], [numba.config.NUMBA_NUM_THREADS]):
            kernels._STREAM_THREADS[:] = wide
            numba.set_num_threads(1 if wide else before)
            out, dx, dw = np.empty(dy.shape, np.float32), np.empty(x.shape, np.float32), np.empty(wq.shape, np.float32)
            conv2d_forward(out, x, wq, 1.0, 1, 1)
            conv2d_backward_input(dx, dy, wq, 1.0, 1, 1)
            conv2d_backward_weight(dw, dy, x, 1, 1)
            shape = pool_out_shape(out.shape, 2, 2, 0)
            py, arg, dp = np.empty(shape, np.float32), np.empty(shape, np.uint8), np.empty(out.shape, np.float32)
            maxpool_forward(py, arg, out, 2, 2, 0)
            maxpool_backward(dp, py, arg, 2, 2, 0)
            runs.append((out, dx, dw, py, arg, dp))
            assert numba.get_num_threads() == (1 if wide else before)
    finally:
        kernels._STREAM_THREADS[:] = saved
        numba.set_num_threads(before)
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


def test_conv2d_real_input_and_scale():
    x = RNG.standard_normal((2, 6, 6, 3)).astype(np.float32)
    wq = tern((4, 3, 3, 3), qmax=4)
    out = np.empty((2, 6, 6, 4), np.float32)
    conv2d_forward(out, x, wq, 0.25, 1, 1)
    ref.assert_close(out, ref.conv2d(x, wq * 0.25, 1, 1), 1e-5, 1e-5, "conv real input")


def test_conv2d_adjoint():
    # <conv(x), dy> == <x, conv_backward_input(dy)>
    x = RNG.standard_normal((2, 8, 7, 3)).astype(np.float32)
    wq = tern((5, 3, 3, 3))
    out = np.empty((2, 4, 4, 5), np.float32)
    conv2d_forward(out, x, wq, 1.0, 2, 1)
    dy = RNG.standard_normal(out.shape).astype(np.float32)
    dx = np.empty_like(x)
    conv2d_backward_input(dx, dy, wq, 1.0, 2, 1)
    lhs, rhs = np.vdot(out.astype(np.float64), dy), np.vdot(x.astype(np.float64), dx)
    assert abs(lhs - rhs) <= 1e-4 * abs(lhs) + 1e-4


def test_linear_exact_and_fd():
    x, wq = tern((3, 7)), tern((4, 7))
    out = np.empty((3, 4), np.float32)
    linear_forward(out, x, wq, 1.0)
    np.testing.assert_array_equal(out, x.astype(np.int32) @ wq.T.astype(np.int32))
    dy = RNG.standard_normal(out.shape)
    dx, dw = np.empty((3, 7), np.float32), np.empty((4, 7), np.float32)
    linear_backward_input(dx, dy.astype(np.float32), wq, 1.0)
    linear_backward_weight(dw, dy.astype(np.float32), x)
    ref.assert_close(dx, ref.central_diff(lambda xx: ((xx @ wq.T) * dy).sum(), x), 1e-5, 1e-5, "linear dx")
    ref.assert_close(dw, ref.central_diff(lambda ww: ((x @ ww.T) * dy).sum(), wq), 1e-5, 1e-5, "linear dw")


@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 3, 5), (1, 4, 4, 2)])
def test_batchnorm_train_fd(shape):
    x = RNG.standard_normal(shape).astype(np.float32) * 2 + 0.5
    c = shape[-1]
    gamma = RNG.uniform(0.5, 1.5, c).astype(np.float32)
    beta = RNG.standard_normal(c).astype(np.float32)
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    y, xhat = np.empty_like(x), np.empty_like(x)
    invstd = batchnorm_forward_train(y, xhat, x, gamma, beta, rm, rv, 0.1, 1e-4)
    ref.assert_close(y.reshape(-1, c), ref.batchnorm_train(x, gamma, beta, 1e-4), 1e-5, 1e-4, "bn fwd")
    xf = x.reshape(-1, c).astype(np.float64)
    ref.assert_close(rm, 0.1 * xf.mean(0), 1e-6, 1e-5, "running mean")
    ref.assert_close(rv, 0.9 + 0.1 * xf.var(0, ddof=1), 1e-6, 1e-5, "running var")
    dy = RNG.standard_normal(shape)
    dx, dg, db = np.empty_like(x), np.empty(c, np.float32), np.empty(c, np.float32)
    batchnorm_backward(dx, dg, db, dy.astype(np.float32), xhat, gamma, invstd)
    f = lambda xx: (ref.batchnorm_train(xx, gamma, beta, 1e-4) * dy.reshape(-1, c)).sum()
    ref.assert_close(dx, ref.central_diff(f, x, 1e-3), 1e-3, 1e-3, "bn dx")  # float32 stats, h=1e-3
    fg = lambda g: (ref.batchnorm_train(x, g, beta, 1e-4) * dy.reshape(-1, c)).sum()
    ref.assert_close(dg, ref.central_diff(fg, gamma), 1e-4, 1e-4, "bn dgamma")
    fb = lambda b: (ref.batchnorm_train(x, gamma, b, 1e-4) * dy.reshape(-1, c)).sum()
    ref.assert_close(db, ref.central_diff(fb, beta), 1e-4, 1e-4, "bn dbeta")


def test_batchnorm_eval_uses_running_stats():
    x = RNG.standard_normal((3, 2, 2, 4)).astype(np.float32)
    g, b = RNG.uniform(0.5, 2, 4).astype(np.float32), RNG.standard_normal(4).astype(np.float32)
    rm, rv = RNG.standard_normal(4).astype(np.float32), RNG.uniform(0.5, 2, 4).astype(np.float32)
    y = np.empty_like(x)
    batchnorm_forward_eval(y, x, g, b, rm, rv, 1e-4)
    ref.assert_close(y, g * (x - rm) / np.sqrt(rv.astype(np.float64) + 1e-4) + b, 1e-5, 1e-5, "bn eval")


def test_batchnorm_statistics_one_pass_far_from_zero():
    """The one-pass statistics (sums about each channel's first value) on data whose mean is 10^4
    standard deviations from zero, and whose first row is an outlier: the mean and variance of
    the two-pass float64 computation, to float32's precision."""
    x = (1e4 + RNG.standard_normal((257, 3))).astype(np.float32)
    x[0] += np.float32(40.0)
    stats = np.empty((2, 3), np.float32)
    y, xhat = np.empty_like(x), np.empty_like(x)
    batchnorm_forward_train(y, xhat, x, np.ones(3, np.float32), np.zeros(3, np.float32), None, None, 0.1, 1e-4, stats)
    xd = x.astype(np.float64)
    ref.assert_close(stats[0], xd.mean(0), 0, 1e-7, "mean")
    ref.assert_close(stats[1], xd.var(0, ddof=1), 0, 1e-6, "unbiased variance")


def test_batchnorm_refuses_an_empty_batch():
    x = np.zeros((0, 4), np.float32)
    with pytest.raises(ValueError, match="no elements"):
        batchnorm_forward_train(x.copy(), x.copy(), x, np.ones(4, np.float32), np.zeros(4, np.float32), None, None,
                                0.1, 1e-4)


@pytest.mark.parametrize("window", [0, 1])
def test_ternary_activation(window):
    x = np.concatenate([RNG.uniform(-2.5, 2.5, 500), [1.0, -1.0, 0.5, 1.5, -0.5, -1.5, 0.0]]).astype(np.float32)
    out = np.empty(x.shape, np.int8)
    saved = ternary_forward(out, x, 1.0, 0.5, window)
    deriv = saved.deriv                  # the CPU path keeps phi'(x) as float32
    np.testing.assert_array_equal(out, np.where(x > 1, 1, np.where(x < -1, -1, 0)))
    d = np.abs(np.abs(x.astype(np.float64)) - 1.0)
    want = np.where(d <= 0.5, 1.0 if window == 0 else 2.0 * (1 - d / 0.5), 0.0)
    ref.assert_close(deriv, want, 1e-6, 1e-6, "window")
    dy = RNG.standard_normal(x.shape).astype(np.float32)
    dx = np.empty_like(dy)
    ternary_backward(dx, dy, saved)
    np.testing.assert_array_equal(dx, dy * deriv)


def test_scalar_window_area_is_one():
    xs = np.linspace(0, 3, 300001)
    for shape in (0, 1):
        area = np.trapezoid([window_grad(np.float32(v), np.float32(1.0), np.float32(0.5), shape) for v in xs], xs)
        assert abs(area - 1.0) < 1e-3
    assert ternarize(np.float32(1.0), np.float32(1.0)) == 0 and ternarize(np.float32(1.01), np.float32(1.0)) == 1


@pytest.mark.parametrize("k,s,p", [(2, 2, 0), (3, 2, 1), (3, 1, 1), (2, 1, 0)])
def test_maxpool(k, s, p):
    x = RNG.standard_normal((2, 6, 5, 3)).astype(np.float32)
    shape = pool_out_shape(x.shape, k, s, p)
    y, arg = np.empty(shape, np.float32), np.empty(shape, np.uint8)
    maxpool_forward(y, arg, x, k, s, p)
    np.testing.assert_array_equal(y, ref.maxpool(x, k, s, p))
    dy = RNG.standard_normal(shape)
    dx = np.empty_like(x)
    maxpool_backward(dx, dy.astype(np.float32), arg, k, s, p)
    fd = ref.central_diff(lambda xx: (ref.maxpool(xx, k, s, p) * dy).sum(), x, 1e-4)
    ref.assert_close(dx, fd, 1e-4, 1e-4, "maxpool dx")


def test_maxpool_ties_take_first_and_int8():
    x = tern((2, 4, 4, 3))
    y, arg = np.empty((2, 2, 2, 3), np.int8), np.empty((2, 2, 2, 3), np.uint8)
    maxpool_forward(y, arg, x, 2, 2, 0)
    np.testing.assert_array_equal(y, ref.maxpool(x, 2, 2, 0))
    win = x.reshape(2, 2, 2, 2, 2, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 2, 2, 4, 3)
    np.testing.assert_array_equal(arg, np.argmax(win, axis=3))


@pytest.mark.parametrize("k,s,p", [(2, 2, 0), (3, 1, 1)])
def test_avgpool(k, s, p):
    x = RNG.standard_normal((2, 5, 5, 2)).astype(np.float32)
    shape = pool_out_shape(x.shape, k, s, p)
    y = np.empty(shape, np.float32)
    avgpool_forward(y, x, k, s, p)
    ref.assert_close(y, ref.avgpool(x, k, s, p), 1e-6, 1e-5, "avgpool")
    dy = RNG.standard_normal(shape)
    dx = np.empty_like(x)
    avgpool_backward(dx, dy.astype(np.float32), k, s, p)
    ref.assert_close(dx, ref.central_diff(lambda xx: (ref.avgpool(xx, k, s, p) * dy).sum(), x), 1e-5, 1e-4, "avg dx")


def test_global_avgpool():
    x = RNG.standard_normal((3, 4, 5, 6)).astype(np.float32)
    y = np.empty((3, 6), np.float32)
    global_avgpool_forward(y, x)
    ref.assert_close(y, x.astype(np.float64).mean((1, 2)), 1e-6, 1e-5, "gap")
    dy = RNG.standard_normal((3, 6))
    dx = np.empty_like(x)
    global_avgpool_backward(dx, dy.astype(np.float32))
    ref.assert_close(dx, ref.central_diff(lambda xx: (xx.mean((1, 2)) * dy).sum(), x), 1e-5, 1e-4, "gap dx")


@pytest.mark.parametrize("eps", [0.1, 0.5])
def test_xent_with_label_smoothing(eps):
    logits = (RNG.standard_normal((6, 5)) * 2).astype(np.float32)
    labels = RNG.integers(0, 5, 6).astype(np.int32)
    d = np.empty_like(logits)
    total, correct = loss_forward_backward(d, logits, labels, "xent", smoothing=eps)
    assert abs(total / 6 - ref.softmax_xent(logits, labels, eps)) < 1e-5
    assert abs(total / 6 - ref.softmax_xent(logits, labels)) > 1e-3      # it is not the plain loss
    assert correct == int((logits.argmax(1) == labels).sum())
    ref.assert_close(d, ref.central_diff(lambda z: ref.softmax_xent(z, labels, eps), logits), 1e-5, 1e-4,
                     "smoothed xent dlogits")


@numba.njit
def _xent_before_smoothing(logits, labels, dlogits):
    # ternet.kernels.loss._softmax_xent as it was before label smoothing (xent_dlogit inlined)
    n, k = logits.shape
    total = 0.0
    correct = 0
    inv_n = np.float32(1.0 / n)
    for i in range(n):
        mx = logits[i, 0]
        am = 0
        for j in range(1, k):
            if logits[i, j] > mx:
                mx = logits[i, j]
                am = j
        s = 0.0
        for j in range(k):
            s += math.exp(logits[i, j] - mx)
        y = labels[i]
        total += math.log(s) - (logits[i, y] - mx)
        correct += am == y
        for j in range(k):
            p = math.exp(logits[i, j] - mx) / s
            dlogits[i, j] = np.float32((p - (1.0 if j == y else 0.0)) * inv_n)
    return total, correct


def test_label_smoothing_zero_is_the_plain_loss_bit_for_bit():
    logits = (RNG.standard_normal((9, 7)) * 3).astype(np.float32)
    labels = RNG.integers(0, 7, 9).astype(np.int32)
    d0, d1 = np.empty_like(logits), np.empty_like(logits)
    assert loss_forward_backward(d0, logits, labels, "xent", smoothing=0.0) == _xent_before_smoothing(logits, labels, d1)
    assert np.array_equal(d0, d1)


def test_label_smoothing_needs_xent():
    d = np.empty((2, 3), np.float32)
    logits, labels = np.zeros((2, 3), np.float32), np.zeros(2, np.int32)
    with pytest.raises(ValueError, match="label smoothing"):
        loss_forward_backward(d, logits, labels, "sqhinge", smoothing=0.1)
    with pytest.raises(ValueError, match="label smoothing"):
        loss_forward_backward(d, logits, labels, "xent", smoothing=1.0)


@pytest.mark.parametrize("kind,fn", [("xent", ref.softmax_xent), ("sqhinge", ref.sq_hinge)])
def test_losses(kind, fn):
    logits = (RNG.standard_normal((6, 5)) * 2).astype(np.float32)
    labels = RNG.integers(0, 5, 6).astype(np.int32)
    d = np.empty_like(logits)
    total, correct = loss_forward_backward(d, logits, labels, kind)
    assert abs(total / 6 - fn(logits, labels)) < 1e-5
    assert correct == int((logits.argmax(1) == labels).sum())
    ref.assert_close(d, ref.central_diff(lambda z: fn(z, labels), logits), 1e-5, 1e-4, f"{kind} dlogits")
