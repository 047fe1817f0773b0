"""kernels.scalar: properties the shared per-weight math relies on."""
import math

import numba
import numpy as np

from ternet.kernels.scalar import F32, TANH_BOUND, dst_may_move, dst_target, uniform


@numba.njit
def _tanh_exceeds(ys, bound):
    bad = 0
    for y in ys:
        if math.tanh(y) > y * bound:
            bad += 1
    return bad


@numba.njit
def _dst_target_plain(q, dw, qmax, m, u):
    """dst_target without its shortcut: the paper's test u < tanh(m |nu|) for every draw."""
    w = F32(q) / F32(qmax)
    rho = min(max(dw, F32(-1.0) - w), F32(1.0) - w)
    s = rho * F32(qmax)
    kappa = math.trunc(s)
    nu = s - kappa
    step = int(kappa)
    if u < math.tanh(m * abs(nu)):
        step += 1 if s > 0 else -1
    return min(max(q + step, -qmax), qmax)


@numba.njit
def _compare(q, dw, qmax, m, key):
    diff = 0
    for i in range(q.size):
        u = uniform(key, i)
        if dst_target(q[i], dw[i], qmax, m, u) != _dst_target_plain(q[i], dw[i], qmax, m, u):
            diff += 1
    return diff


def test_float32_tanh_stays_below_the_bound():
    """dst_target skips the tanh when u >= y * TANH_BOUND: exact only if float32 tanh(y) never
    exceeds that. It does exceed y itself (by an ulp, near 3e-8), hence the margin."""
    ys = np.concatenate([np.logspace(-40, 1.5, 400_000), np.linspace(0, 4, 400_000),
                         np.random.default_rng(1).uniform(0, 1e-6, 400_000)]).astype(np.float32)
    assert _tanh_exceeds(ys, TANH_BOUND) == 0


def test_dst_target_shortcut_makes_the_same_moves():
    rng = np.random.default_rng(0)
    n = 300_000
    for qmax in (1, 2, 4):
        q = rng.integers(-qmax, qmax + 1, n).astype(np.int8)
        dw = (rng.standard_normal(n) * 10.0 ** rng.uniform(-9, 0.5, n)).astype(np.float32)
        assert _compare(q, dw, qmax, F32(3.0), np.uint64(12345 + qmax)) == 0


@numba.njit
def _screen_misses(q, dw, qmax, m, key):
    """Weights that dst_may_move rules out but dst_target moves (must be none), and how many it passes."""
    missed, passed = 0, 0
    for i in range(q.size):
        u = uniform(key, i)
        if dst_may_move(q[i], dw[i], qmax, m, u):
            passed += 1
        elif dst_target(q[i], dw[i], qmax, m, u) != q[i]:
            missed += 1
    return missed, passed


def test_dst_screen_never_rules_out_a_move():
    """The CPU DST kernel runs dst_target only where dst_may_move is true: that must lose no
    move, at any step size (whole steps, remainders near 0 and 1, clipping at the ends)."""
    rng = np.random.default_rng(2)
    n = 300_000
    for qmax in (1, 2, 4):
        q = rng.integers(-qmax, qmax + 1, n).astype(np.int8)
        dw = (rng.standard_normal(n) * 10.0 ** rng.uniform(-9, 0.7, n)).astype(np.float32)
        dw[:1000] = np.float32(1.0) / qmax * rng.choice([-1, 1], 1000)     # exactly one state
        missed, passed = _screen_misses(q, dw, qmax, F32(3.0), np.uint64(777 + qmax))
        assert missed == 0
        assert passed < n          # it does screen something out
