"""Layer composition: the backward of whole networks (conv, pooling, batch norm, residual blocks,
flatten, linear) against central differences, with the ternary activations swapped for the
identity so the network is differentiable. The ops themselves are checked in float64 in
test_ops.py; here forward and loss run in float32, hence h = 1e-2 and a 2e-3 tolerance."""
import numpy as np
import pytest

from ternet.kernels.loss import loss_forward_backward
from ternet.layers import BatchNorm, BNAct, Layer, TernaryAct, walk
from ternet.model import Model


class Identity(Layer):
    def forward(self, x, train):
        return x.astype(np.float32)

    def backward(self, dy):
        return dy


def differentiable(arch, shape, classes):
    m = Model(arch, shape, classes, seed=3)
    for layer in walk(m.net):
        for attr in ("layers",):
            seq = getattr(layer, attr, None)
            if seq:
                for i, l in enumerate(seq):
                    if isinstance(l, TernaryAct):
                        seq[i] = Identity()
                    elif isinstance(l, BNAct):   # the fused block without its activation
                        seq[i] = BatchNorm(l.name, l.c)
        if hasattr(layer, "act") and isinstance(layer.act, TernaryAct):
            layer.act = Identity()
    first = next(l for l in walk(m.net) if hasattr(l, "needs_dinput"))
    first.needs_dinput = True
    return m


def loss_of(m, x, y):
    logits = m.forward(x, train=True)
    d = np.empty_like(logits)
    total, _ = loss_forward_backward(d, logits, y, "xent")
    return total / len(y), d


@pytest.mark.parametrize("arch,shape", [("4C3-MP2-6C3p0-AP2-8FC-3", (8, 8, 2)),
                                        ("4C3s2-RB4-RB6s2-GAP-3", (8, 8, 2))])
def test_network_backward_matches_central_differences(arch, shape):
    m = differentiable(arch, shape, 3)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5,) + shape).astype(np.float32)
    y = rng.integers(0, 3, 5).astype(np.int32)
    _, d = loss_of(m, x, y)
    # capture the input gradient flowing out of the first layer
    dx = m.net.backward(d)
    params = m.rparams()
    analytic = {p.name: p.grad.copy() for p in params}
    h = 1e-2
    for p in params[:: max(1, len(params) // 6)]:
        for i in range(min(3, p.value.size)):
            old = p.value[i]
            p.value[i] = old + h
            fp, _ = loss_of(m, x, y)
            p.value[i] = old - h
            fm, _ = loss_of(m, x, y)
            p.value[i] = old
            fd = (fp - fm) / (2 * h)
            assert abs(analytic[p.name][i] - fd) <= 2e-3 + 2e-2 * abs(fd), (p.name, i, analytic[p.name][i], fd)
    for idx in [(0, 0, 0, 0), (1, 3, 4, 1), (4, 7, 7, 0)]:
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        fd = (loss_of(m, xp, y)[0] - loss_of(m, xm, y)[0]) / (2 * h)
        assert abs(dx[idx] - fd) <= 2e-3 + 2e-2 * abs(fd), (idx, dx[idx], fd)


def test_weight_gradient_is_dloss_dvalue():
    # d loss / d w for a discrete weight: perturbing the value of one weight (through the scale
    # of a single-weight layer) matches the gradient the backward leaves in TernaryParam.grad
    m = differentiable("2C3-3", (4, 4, 1), 3)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 4, 4, 1)).astype(np.float32)
    y = rng.integers(0, 3, 4).astype(np.int32)
    _, d = loss_of(m, x, y)
    m.net.backward(d)
    conv = m.tparams()[0]
    g = conv.grad.copy()
    from ternet.kernels import conv as convmod
    real = conv.q.astype(np.float32)
    orig = convmod._as_float_weight

    def patched(weight, scale):
        return real.reshape(real.shape[0], -1) * np.float32(scale) if weight is conv.q else orig(weight, scale)

    convmod._as_float_weight = patched
    try:
        h = 1e-2
        for idx in [(0, 0, 0, 0), (1, 2, 1, 0)]:
            real[idx] += h
            fp = loss_of(m, x, y)[0]
            real[idx] -= 2 * h
            fm = loss_of(m, x, y)[0]
            real[idx] += h
            fd = (fp - fm) / (2 * h)
            assert abs(g[idx] - fd) <= 2e-3 + 2e-2 * abs(fd), (idx, g[idx], fd)
    finally:
        convmod._as_float_weight = orig
