"""The discrete state transition: transition rates against tau = tanh(m |nu| / dz) (binomial
confidence intervals), states never leaving Z_N, the Adam step source, determinism."""
import math

import numpy as np
import pytest

from ternet.kernels.stats import state_counts
from ternet.kernels.transitions import dst_adam, dst_sgd
from ternet.rng import stream_key

N_DRAWS = 200_000


def expected(q, dw, qmax, m):
    """(base state, extra-step state, probability of the extra step) from the paper's formulas."""
    dz = 1.0 / qmax
    w = q * dz
    rho = min(max(dw, -1 - w), 1 - w)
    kappa = math.trunc(rho / dz)
    nu = rho - kappa * dz
    tau = math.tanh(m * abs(nu) / dz)
    base = q + kappa
    extra = base + (1 if rho > 0 else -1)
    return base, max(-qmax, min(qmax, extra)), tau


CASES = [  # (N bits, q, dW, m)
    (1, 0, 0.2, 3.0), (1, 0, -0.05, 3.0), (1, 1, -0.7, 3.0), (1, -1, 1.3, 3.0), (1, 1, 0.4, 3.0),
    (1, 0, 0.1, 1.0), (2, 1, 0.3, 3.0), (2, -2, -0.9, 3.0), (2, 0, -0.8, 2.0), (3, 3, 0.11, 3.0),
    (3, -1, -0.37, 5.0), (3, 4, -2.5, 3.0),
]


@pytest.mark.parametrize("bits,q0,dw,m", CASES)
def test_transition_rate_in_binomial_interval(bits, q0, dw, m):
    qmax = 2 ** (bits - 1)
    q = np.full(N_DRAWS, q0, np.int8)
    lr = 0.5
    g = np.full(N_DRAWS, -dw / lr, np.float32)          # dW = -lr * g
    counts = np.zeros(1, np.int64)
    dst_sgd(q, g, lr, qmax, m, stream_key(7, "test", bits, q0), counts)
    base, extra, tau = expected(q0, float(np.float32(-lr * g[0])), qmax, m)
    values = set(np.unique(q).tolist())
    assert values <= {base, extra}, f"states {values} outside {{{base}, {extra}}}"
    k = int((q == extra).sum()) if extra != base else N_DRAWS
    p = tau if extra != base else 1.0
    sigma = math.sqrt(N_DRAWS * p * (1 - p))
    assert abs(k - N_DRAWS * p) <= 5 * sigma + 1, f"extra steps {k}, expected {N_DRAWS * p:.0f} +- {5 * sigma:.0f}"
    assert counts[0] == int((q != q0).sum())


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_states_never_leave_z_n(bits):
    qmax = 2 ** (bits - 1)
    rng = np.random.default_rng(bits)
    q = rng.integers(-qmax, qmax + 1, 50_000).astype(np.int8)
    counts = np.zeros(1, np.int64)
    for t in range(5):
        g = (rng.standard_normal(q.size) * 10 ** rng.uniform(-3, 3, q.size)).astype(np.float32)
        dst_sgd(q, g, 1.0, qmax, 3.0, stream_key(1, "test", t), counts)
        assert q.dtype == np.int8 and q.min() >= -qmax and q.max() <= qmax
    assert state_counts(q, qmax).sum() == q.size


def test_same_key_same_moves_and_new_key_new_moves():
    rng = np.random.default_rng(0)
    q0 = rng.integers(-1, 2, 10_000).astype(np.int8)
    g = rng.standard_normal(q0.size).astype(np.float32)
    runs = []
    for key in (stream_key(3, "transition", 5, 0), stream_key(3, "transition", 5, 0), stream_key(3, "transition", 6, 0)):
        q = q0.copy()
        dst_sgd(q, g, 0.2, 1, 3.0, key, np.zeros(1, np.int64))
        runs.append(q)
    np.testing.assert_array_equal(runs[0], runs[1])
    assert (runs[0] != runs[2]).any()


def test_adam_source_moves_by_the_adam_step():
    rng = np.random.default_rng(1)
    n = 50_000
    q = np.zeros(n, np.int8)
    g = rng.standard_normal(n).astype(np.float32)
    mom, vel = np.zeros(n, np.float32), np.zeros(n, np.float32)
    lr, b1, b2, eps = 0.05, 0.9, 0.999, 1e-8
    dst_adam(q, g, mom, vel, lr, 1, 1, 3.0, stream_key(0, "t"), np.zeros(1, np.int64), b1, b2, eps)
    f32 = np.float32   # the kernel computes (1 - b) in float32: compare with the same rounding
    np.testing.assert_allclose(mom, (f32(1) - f32(b1)) * g, rtol=1e-6)
    np.testing.assert_allclose(vel, (f32(1) - f32(b2)) * g * g, rtol=1e-6)
    # first Adam step is -lr * sign(g) (bias-corrected): tau = tanh(3 * 0.05) for every weight
    moved = (q != 0)
    assert set(np.unique(q[moved] * -np.sign(g[moved])).tolist()) <= {1}
    p = math.tanh(3 * lr)
    assert abs(moved.sum() - n * p) <= 5 * math.sqrt(n * p * (1 - p))


def test_state_counts():
    q = np.array([-1, 0, 0, 1, 1, 1], np.int8)
    np.testing.assert_array_equal(state_counts(q, 1), [1, 2, 3])
    np.testing.assert_array_equal(state_counts(np.array([-2, 2, 0], np.int8), 2), [1, 0, 1, 0, 1])


def test_rms_normalised_step():
    """norm=rms: the step is -lr g / rms(g) with rms from the layer's sum of squares. Moves equal
    plain DST at that learning rate (one float32 rounding), and a gradient scaled by a power of
    two (the rms scales exactly) makes the very same moves."""
    from ternet.kernels.stats import sum_squares
    rng = np.random.default_rng(5)
    q0 = rng.integers(-1, 2, 5000).astype(np.int8)
    g = (rng.standard_normal(5000) * 1e-3).astype(np.float32)
    key = stream_key(1, "transition", 7, 0)
    ss = np.zeros(1)
    sum_squares(g, ss)
    np.testing.assert_allclose(ss[0], np.sum(g.astype(np.float64) ** 2), rtol=1e-12)
    normed, plain, scaled = q0.copy(), q0.copy(), q0.copy()
    c = np.zeros(1, np.int64)
    dst_sgd(normed, g, 0.3, 1, 3.0, key, c, ss=ss)
    dst_sgd(plain, g, np.float32(0.3 / np.sqrt(ss[0] / g.size)), 1, 3.0, key, c)
    np.testing.assert_array_equal(normed, plain)
    g2, ss2 = g * np.float32(1024.0), np.zeros(1)
    sum_squares(g2, ss2)
    dst_sgd(scaled, g2, 0.3, 1, 3.0, key, c, ss=ss2)
    np.testing.assert_array_equal(scaled, normed)
    flips = int((normed != q0).sum())
    assert 0.05 * q0.size < flips < 0.6 * q0.size     # an rms-sized step at lr 0.3 moves many weights
    zero = q0.copy()
    dst_sgd(zero, np.zeros_like(g), 0.3, 1, 3.0, key, c, ss=np.zeros(1))   # no gradient, no move
    np.testing.assert_array_equal(zero, q0)


@pytest.mark.parametrize("bits,decay,lr", [(1, 0.1, 0.5), (2, 0.05, 0.5), (1, 0.02, 0.3)])
def test_decay_pulls_toward_zero(bits, decay, lr):
    """--set decay: with no gradient a weight at value w steps toward 0 with DST's probability for
    dW = -decay w (binomial interval), a weight at 0 stays; with a gradient the decay adds to the
    step (a gradient that cancels it moves nothing)."""
    qmax = 2 ** (bits - 1)
    key = stream_key(3, "test", bits)
    for q0 in (qmax, -qmax, 1, 0):
        q = np.full(N_DRAWS, q0, np.int8)
        counts = np.zeros(1, np.int64)
        dst_sgd(q, np.zeros(N_DRAWS, np.float32), lr, qmax, 3.0, key, counts, decay=decay)
        if q0 == 0:
            assert counts[0] == 0 and (q == 0).all()
            continue
        w = q0 / qmax
        base, extra, tau = expected(q0, float(np.float32(-decay * w)), qmax, 3.0)
        assert base == q0 and abs(extra) == abs(q0) - 1, (base, extra)
        assert set(np.unique(q).tolist()) <= {base, extra}
        k = int((q == extra).sum())
        sigma = math.sqrt(N_DRAWS * tau * (1 - tau))
        assert abs(k - N_DRAWS * tau) <= 5 * sigma + 1, f"q0 {q0}: {k} moves, expected {N_DRAWS * tau:.0f}"
        assert counts[0] == k
    # a gradient step that cancels the decay at w = 1 (to float32 rounding: tau ~ 1e-8) moves nothing
    q = np.full(1000, qmax, np.int8)
    dst_sgd(q, np.full(1000, -decay / lr, np.float32), lr, qmax, 3.0, key, np.zeros(1, np.int64), decay=decay)
    np.testing.assert_array_equal(q, qmax)


def test_rms_norm_options():
    from ternet.config import Config
    from ternet.samplers import make_sampler
    from ternet.schedules import Schedule
    s = Schedule("constant", 0.1, 0.1, 10)
    with pytest.raises(ValueError, match="norm=rms normalises the sgd step"):
        make_sampler("dst", seed=0, lr=s, m=s, source="adam", norm="rms")
    with pytest.raises(ValueError, match="choose none or rms"):
        make_sampler("dst", seed=0, lr=s, m=s, norm="l2")
    with pytest.raises(ValueError, match="decay adds to the sgd step"):
        make_sampler("dst", seed=0, lr=s, m=s, source="adam", decay=0.5)
    with pytest.raises(ValueError, match="decay=-1.0; use a finite value >= 0"):
        make_sampler("dst", seed=0, lr=s, m=s, decay="-1")
    assert Config(sampler="dst", extra=(("norm", "rms"),)).resolve().lr == 0.03
    assert Config(sampler="dst").resolve().lr == 20.0
