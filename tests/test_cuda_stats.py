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
