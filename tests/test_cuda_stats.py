"""CUDA weight-state counts against the CPU path: exact integer counts."""
import numpy as np
import pytest
from numba import cuda

from cudacheck import SMALL_SIZES, needs_cuda
from ternet.kernels.stats import state_counts

pytestmark = needs_cuda


@pytest.mark.parametrize("qmax", [1, 2, 4])
@pytest.mark.parametrize("n", SMALL_SIZES + [1000])
def test_state_counts(n, qmax):
    q = np.random.default_rng(n).integers(-qmax, qmax + 1, n).astype(np.int8)
    got = state_counts(cuda.to_device(q), qmax)
    np.testing.assert_array_equal(got, state_counts(q, qmax))
    assert got.dtype == np.int64 and got.sum() == n


def test_state_counts_nd():
    q = np.full((3, 3, 3, 5), 2, np.int8)
    np.testing.assert_array_equal(state_counts(cuda.to_device(q), 2), [0, 0, 0, 0, q.size])


@pytest.mark.parametrize("n", SMALL_SIZES + [70_001])
def test_sum_squares_identical_bits(n):
    """Fixed lanes and a fixed fold: the device sum is the CPU's to the bit, beyond LANES too."""
    from ternet.kernels.stats import sum_squares
    x = (np.random.default_rng(n).standard_normal(n) * 10.0 ** np.random.default_rng(n + 1).uniform(-3, 3, n))
    x = x.astype(np.float32)
    cpu, dev = np.zeros(1), cuda.to_device(np.zeros(3))
    sum_squares(x, cpu)
    sum_squares(cuda.to_device(x), dev[1:2])
    got = dev.copy_to_host()
    assert got[1] == cpu[0] and got[0] == got[2] == 0.0
    np.testing.assert_allclose(cpu[0], np.sum(x.astype(np.float64) ** 2), rtol=1e-13)
