"""CUDA pooling against the CPU path (the simulator on machines without a GPU). Everything is
exact: max pooling picks the same first maximum, and the backwards gather the CPU's float32
sums in the CPU's order (overlapping windows included)."""
import numpy as np
import pytest

from numba import cuda

from cudacheck import both, first_mismatches, needs_cuda
from ternet.kernels import grid1d
from ternet.kernels import pool
from ternet.kernels.pool import (_advance, _digits, _maxpool_bwd_cuda, _maxpool_bwd_disjoint_cuda, _maxpool_bwd_rows,
                                 _maxpool_fwd_cuda, _maxpool_fwd_rows, avgpool_backward, avgpool_forward,
                                 global_avgpool_backward, global_avgpool_forward, maxpool_backward, maxpool_forward,
                                 pool_out_shape)

pytestmark = needs_cuda

WINDOWS = [(2, 2, 0), (3, 2, 1), (3, 1, 1), (2, 1, 0)]      # (k, stride, pad); 3/2/1 overlaps (ResNet stem)
SHAPES = [(2, 7, 6, 3), (1, 9, 9, 17), (1, 5, 8, 1), (1, 3, 4, 70)]    # 70: more channels than threads


def data(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    if dtype == np.int8:       # ternary activations: ties everywhere, first maximum must win
        return rng.integers(-1, 2, shape).astype(np.int8)
    return rng.standard_normal(shape).astype(np.float32)


def assert_equal(got, want, what):
    np.testing.assert_array_equal(got, want, err_msg=f"{what}\n{first_mismatches(got, want)}")


@pytest.mark.parametrize("dtype", [np.int8, np.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k,s,p", WINDOWS)
def test_maxpool(k, s, p, shape, dtype):
    x = data(shape, dtype, k * 10 + s)
    out = pool_out_shape(shape, k, s, p)
    dy = data(out, np.float32, 1)

    def run(y, arg, dx, x, dy):
        maxpool_forward(y, arg, x, k, s, p)
        maxpool_backward(dx, dy, arg, k, s, p)

    cpu, gpu = both(run, [np.empty(out, dtype), np.empty(out, np.uint8), np.empty(shape, np.float32)], [x, dy])
    for name, c, g in zip(["out", "argmax", "dx"], cpu, gpu):
        assert_equal(g, c, name)


# disjoint windows (k == stride, pad 0) take _maxpool_bwd_disjoint_cuda: rows and columns no window
# covers (7 % 2, 8 % 3), batches, channel counts off the warp, a grid-stride loop that wraps
# (more windows than the simulator's 2 x 64 threads), and h < k (no windows: dx all zeros)
DISJOINT = [(2, (3, 7, 9, 5)), (3, (2, 7, 8, 3)), (2, (2, 4, 6, 33)), (3, (2, 2, 5, 2))]


@pytest.mark.parametrize("dtype", [np.int8, np.float32])
@pytest.mark.parametrize("k,shape", DISJOINT)
def test_maxpool_disjoint(k, shape, dtype):
    x = data(shape, dtype, k)
    if dtype == np.float32:    # ties, +0.0 against -0.0, and NaN: the first of them must win
        x = np.round(x)
        x.flat[::7] = np.nan
    out = pool_out_shape(shape, k, k, 0)
    dy = data(out, np.float32, 5)

    def run(y, arg, dx, x, dy):
        maxpool_forward(y, arg, x, k, k, 0)
        maxpool_backward(dx, dy, arg, k, k, 0)

    cpu, gpu = both(run, [np.empty(out, dtype), np.empty(out, np.uint8), np.full(shape, np.nan, np.float32)],
                    [x, dy])
    for name, c, g in zip(["out", "argmax", "dx"], cpu, gpu):
        assert_equal(g, c, name)
    assert_equal(gpu[0].view(np.uint8), cpu[0].view(np.uint8), "out bits")


@pytest.mark.parametrize("k,shape", DISJOINT[:3])
def test_maxpool_disjoint_matches_general_bits(k, shape):
    """The one-thread-per-window kernel against the gather kernel, bit for bit: -0.0 and NaN in
    dout, every tap of each window (ties in int8 input send many argmaxes to tap 0)."""
    out = pool_out_shape(shape, k, k, 0)
    rng = np.random.default_rng(k)
    dy = data(out, np.float32, 6)
    dy[rng.random(out) < 0.2] = -0.0
    dy[rng.random(out) < 0.05] = np.nan
    arg = rng.integers(0, k * k, out).astype(np.uint8)
    dev_dy, dev_arg = cuda.to_device(dy), cuda.to_device(arg)
    got, want = cuda.to_device(np.full(shape, 7, np.float32)), cuda.to_device(np.full(shape, 7, np.float32))
    _maxpool_bwd_disjoint_cuda[grid1d(dy.size)](dev_dy, dev_arg, k, got)
    _maxpool_bwd_cuda[grid1d(want.size)](dev_dy, dev_arg, k, k, 0, want)
    got, want = got.copy_to_host().view(np.uint32), want.copy_to_host().view(np.uint32)
    assert_equal(got, want, "dx bits")


# the row kernels (what maxpool_forward/backward launch for rows up to ROW_MAX wide) against the
# per-element kernels, bit for bit: overlapping and disjoint windows, -0.0 and NaN in x and dout,
# every tap; channel counts below, at and above the simulator's 64 threads; more rows than blocks
ROWS = [((3, 2, 1), (2, 7, 6, 3)), ((3, 1, 1), (1, 5, 4, 64)), ((2, 1, 0), (1, 4, 3, 65)),
        ((2, 2, 0), (2, 5, 7, 130)), ((3, 2, 1), (3, 9, 2, 1))]


@pytest.mark.parametrize("window,shape", ROWS)
def test_maxpool_row_kernels_match_element_kernels_bits(window, shape):
    k, s, p = window
    out = pool_out_shape(shape, k, s, p)
    rng = np.random.default_rng(sum(shape))
    x = np.round(data(shape, np.float32, 7))
    x.flat[::5] = -0.0
    x.flat[::11] = np.nan
    dy = data(out, np.float32, 8)
    dy[rng.random(out) < 0.2] = -0.0
    dy[rng.random(out) < 0.05] = np.nan
    arg = rng.integers(0, k * k, out).astype(np.uint8)
    dx, ya, yb = cuda.to_device(x), cuda.device_array(out, np.float32), cuda.device_array(out, np.float32)
    aa, ab = cuda.device_array(out, np.uint8), cuda.device_array(out, np.uint8)
    _maxpool_fwd_rows(ya, aa, dx, k, s, p)
    _maxpool_fwd_cuda[grid1d(ya.size)](dx, k, s, p, yb, ab)
    assert_equal(ya.copy_to_host().view(np.uint32), yb.copy_to_host().view(np.uint32), "out bits")
    assert_equal(aa.copy_to_host(), ab.copy_to_host(), "argmax")
    dev_dy, dev_arg = cuda.to_device(dy), cuda.to_device(arg)
    got, want = cuda.to_device(np.full(shape, 7, np.float32)), cuda.to_device(np.full(shape, 7, np.float32))
    _maxpool_bwd_rows(got, dev_dy, dev_arg, k, s, p)
    _maxpool_bwd_cuda[grid1d(want.size)](dev_dy, dev_arg, k, s, p, want)
    assert_equal(got.copy_to_host().view(np.uint32), want.copy_to_host().view(np.uint32), "dx bits")


def test_maxpool_rows_wider_than_the_table_take_the_element_kernels(monkeypatch):
    """Rows wider than ROW_MAX fall back to the per-element kernels (same results as the CPU)."""
    monkeypatch.setattr(pool, "ROW_MAX", 4)
    test_maxpool(3, 2, 1, (2, 7, 6, 3), np.float32)


@pytest.mark.parametrize("rows,cols,c", [(1, 1, 1), (3, 4, 5), (7, 1, 3), (2, 9, 64), (5, 6, 1)])
def test_digits_advance(rows, cols, c):
    """Grid-stride stepping by digit addition lands where dividing the flat index would."""
    size = 4 * rows * cols * c
    for step in {1, 2, 3, c, cols * c, rows * cols * c + 1, 128, 4224 * 256, size - 1, size + 5} - {0}:
        for start in {0, 1, step // 2, step - 1}:
            at, by = _digits(start, rows, cols, c), _digits(step, rows, cols, c)
            for o in range(start, size, step):
                assert at == _digits(o, rows, cols, c), (o, step)
                at = _advance(at, by, rows, cols, c)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k,s,p", WINDOWS)
def test_avgpool(k, s, p, shape):
    x = data(shape, np.int8 if k == 2 else np.float32, k + s)
    out = pool_out_shape(shape, k, s, p)
    dy = data(out, np.float32, 2)

    def run(y, dx, x, dy):
        avgpool_forward(y, x, k, s, p)
        avgpool_backward(dx, dy, k, s, p)

    cpu, gpu = both(run, [np.empty(out, np.float32), np.empty(shape, np.float32)], [x, dy])
    assert_equal(gpu[0], cpu[0], "out")
    assert_equal(gpu[1], cpu[1], "dx")


@pytest.mark.parametrize("dtype", [np.int8, np.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_global_avgpool(shape, dtype):
    x = data(shape, dtype, 3)
    dy = data((shape[0], shape[3]), np.float32, 4)

    def run(y, dx, x, dy):
        global_avgpool_forward(y, x)
        global_avgpool_backward(dx, dy)

    cpu, gpu = both(run, [np.empty((shape[0], shape[3]), np.float32), np.empty(shape, np.float32)], [x, dy])
    assert_equal(gpu[0], cpu[0], "out")
    assert_equal(gpu[1], cpu[1], "dx")
