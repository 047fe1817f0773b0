"""CUDA batch norm and fused batch norm + ternary activation against the CPU path (the simulator
on machines without a GPU). Ternary outputs exactly; float results to a tight tolerance: batch
statistics are float64 sums over another partition (same formulas, from kernels.scalar), so they
round to float32 alike in practice but are not guaranteed to."""
import warnings

import numpy as np
import pytest

import reference as ref
from cudacheck import both, first_mismatches, needs_cuda
from ternet.kernels.batchnorm import (batchnorm_backward, batchnorm_forward_eval, batchnorm_forward_train,
                                      bn_act_backward, bn_act_forward_eval, bn_act_forward_train)
from ternet.kernels.scalar import WINDOW_RECT, WINDOW_TRI

pytestmark = needs_cuda

# (N, H, W, C): 1, 18, 126 and 162 rows per channel (two row chunks on the device), channels on
# both sides of the 32-channel tile
SHAPES = [(1, 1, 1, 17), (2, 3, 3, 33), (2, 9, 7, 1), (2, 9, 9, 3)]
TOL = dict(atol=1e-6, rtol=1e-6)       # float32 results of float64 statistics (see above)


def close(got, want, what, atol=TOL["atol"], rtol=TOL["rtol"]):
    ref.assert_close(got, want, atol, rtol, what)


def params(c, seed):
    rng = np.random.default_rng(seed)
    return (rng.uniform(0.5, 1.5, c).astype(np.float32), rng.standard_normal(c).astype(np.float32),
            (rng.standard_normal(c) * 0.1).astype(np.float32), rng.uniform(0.5, 2, c).astype(np.float32))


@pytest.mark.parametrize("shape", SHAPES)
def test_batchnorm_train_forward_backward(shape):
    rng = np.random.default_rng(sum(shape))
    c = shape[-1]
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    g, b, rm, rv = params(c, 1)

    invstd = {}

    def run(y, xhat, dx, dg, db, rm, rv, x, g, b, dy):
        inv = batchnorm_forward_train(y, xhat, x, g, b, rm, rv, 0.1, 1e-4)
        invstd["cpu" if isinstance(y, np.ndarray) else "gpu"] = np.array(inv) if isinstance(inv, np.ndarray) \
            else inv.copy_to_host()
        batchnorm_backward(dx, dg, db, dy, xhat, g, inv)

    outs = [np.empty(shape, np.float32), np.empty(shape, np.float32), np.empty(shape, np.float32),
            np.empty(c, np.float32), np.empty(c, np.float32), rm, rv]
    cpu, gpu = both(run, outs, [x, g, b, dy])
    close(invstd["gpu"], invstd["cpu"], "invstd")
    for name, c_, g_ in zip(["y", "xhat", "dx", "dgamma", "dbeta", "running_mean", "running_var"], cpu, gpu):
        # dx: dy - (sdy + xhat sdyx) / M cancels, so it gets a looser absolute tolerance
        close(g_, c_, name, atol=1e-5 if name == "dx" else TOL["atol"])


@pytest.mark.parametrize("shape", SHAPES[1:3])
def test_batchnorm_eval(shape):
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    g, b, rm, rv = params(shape[-1], 4)
    cpu, gpu = both(lambda y, *a: batchnorm_forward_eval(y, *a, 1e-4), [np.empty(shape, np.float32)],
                    [x, g, b, rm, rv])
    # per-channel coefficients and one rounding per element, computed alike: equal bits
    np.testing.assert_array_equal(gpu[0], cpu[0])


def bn_act_run(r, a, window, int_scale, records):
    """fwd + bwd of the fused op; records[side] gets the forward's saved record."""
    def run(out, dx, dg, db, rm, rv, x, g, b, dy):
        saved = bn_act_forward_train(out, x, g, b, rm, rv, 0.1, 1e-4, r, a, window, int_scale)
        records[isinstance(out, np.ndarray)] = saved
        bn_act_backward(dx, dg, db, dy, saved, g)
    return run


def check_bn_act(x, window, int_scale, seed=0, r=1.0, a=0.5):
    rng = np.random.default_rng(seed)
    shape, c = x.shape, x.shape[-1]
    g, b, rm, rv = params(c, seed + 1)
    dy = rng.standard_normal(shape).astype(np.float32)
    records = {}
    outs = [np.empty(shape, np.int8), np.empty(shape, np.float32), np.empty(c, np.float32), np.empty(c, np.float32),
            rm, rv]
    cpu, gpu = both(bn_act_run(r, a, window, int_scale, records), outs, [x, g, b, dy])
    np.testing.assert_array_equal(gpu[0], cpu[0], err_msg=first_mismatches(gpu[0], cpu[0]))
    assert (cpu[0] != 0).any() and (cpu[0] == 0).any() and (cpu[1] != 0).any()    # a test that bites
    for name, c_, g_ in zip(["dx", "dgamma", "dbeta", "running_mean", "running_var"], cpu[1:], gpu[1:]):
        close(g_, c_, f"bn_act {name}", atol=1e-5 if name == "dx" else TOL["atol"])
    return records[False]


@pytest.mark.parametrize("window", [WINDOW_RECT, WINDOW_TRI])
@pytest.mark.parametrize("shape,int_scale", [((2, 9, 9, 3), 1), ((2, 3, 3, 33), 2), ((1, 5, 4, 17), 4),
                                             ((2, 9, 7, 1), 0)])
def test_bn_act_matches_cpu_composition(shape, int_scale, window):
    rng = np.random.default_rng(int_scale + 10 * window)
    if int_scale:      # a ternary conv's outputs: multiples of 1 / int_scale
        x = (rng.integers(-30, 31, shape) / int_scale).astype(np.float32)
    else:
        x = (rng.standard_normal(shape) * 3).astype(np.float32)
    saved = check_bn_act(x, window, int_scale, seed=int_scale)
    n = x.size
    words = 4 * ((n + 31) // 32) if window == WINDOW_RECT else 0
    # bytes kept per element: int16 input (2) or float32 (4), plus 1 bit for the rectangular window
    assert saved.nbytes == (2 if int_scale else 4) * n + words
    assert saved.s == int_scale and (saved.xq if int_scale else saved.xf).size == n


def test_bn_act_falls_back_to_float32(monkeypatch):
    # int_scale promises integers; with the check on (TERNET_CHECK_INT16=1: a host read per
    # layer, so off by default) a non-integer value, or one beyond int16, keeps float32
    import ternet.kernels.batchnorm as bn
    monkeypatch.setattr(bn, "CHECK_INT16", True)
    rng = np.random.default_rng(5)
    x = (rng.integers(-30, 31, (2, 3, 3, 5)) / 2).astype(np.float32)
    for bad in (0.3, 20000.0):
        y = x.copy()
        y[1, 2, 0, 3] = bad
        with pytest.warns(UserWarning, match="float32"):
            saved = check_bn_act(y, WINDOW_RECT, 2)
        assert saved.s == 0 and saved.nbytes == 4 * y.size + 4 * ((y.size + 31) // 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_bn_act(x, WINDOW_RECT, 2).s == 2


def test_bn_act_eval():
    x = (np.random.default_rng(6).standard_normal((2, 4, 5, 17)) * 2).astype(np.float32)
    g, b, rm, rv = params(17, 7)
    cpu, gpu = both(lambda out, *a: bn_act_forward_eval(out, *a, 1e-4, 0.8), [np.empty(x.shape, np.int8)],
                    [x, g, b, rm, rv])
    np.testing.assert_array_equal(gpu[0], cpu[0])
    assert (cpu[0] == 1).any() and (cpu[0] == -1).any()
