"""CUDA pooling against the CPU path (the simulator on machines without a GPU). Everything is
exact: max pooling picks the same first maximum, and the backwards gather the CPU's float32
sums in the CPU's order (overlapping windows included)."""
import numpy as np
import pytest

from cudacheck import both, first_mismatches, needs_cuda
from ternet.kernels.pool import (avgpool_backward, avgpool_forward, global_avgpool_backward,
                                 global_avgpool_forward, maxpool_backward, maxpool_forward, pool_out_shape)

pytestmark = needs_cuda

WINDOWS = [(2, 2, 0), (3, 2, 1), (3, 1, 1), (2, 1, 0)]      # (k, stride, pad); 3/2/1 overlaps (ResNet stem)
SHAPES = [(2, 7, 6, 3), (1, 9, 9, 17), (1, 5, 8, 1)]


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
