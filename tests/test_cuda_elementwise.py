"""CUDA elementwise kernels against the CPU path (the simulator on machines without a GPU)."""
import numpy as np
import pytest

from cudacheck import SIZES, both, needs_cuda
from ternet.kernels.elementwise import adam_update, add_forward, fill, sgd_update

pytestmark = needs_cuda


@pytest.mark.parametrize("n", SIZES)
def test_add_and_fill(n):
    rng = np.random.default_rng(n)
    a, b = rng.standard_normal(n).astype(np.float32), rng.integers(-1, 2, n).astype(np.int8)
    cpu, gpu = both(add_forward, [np.empty(n, np.float32)], [a, b])
    np.testing.assert_array_equal(cpu[0], gpu[0])
    cpu, gpu = both(lambda out: fill(out, 3), [np.empty(n, np.float32)], [])
    np.testing.assert_array_equal(gpu[0], np.full(n, 3, np.float32))


@pytest.mark.parametrize("n", [1, 33])
def test_optimizer_updates(n):
    rng = np.random.default_rng(n)
    p, g = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    m, v = rng.standard_normal(n).astype(np.float32) * 0.1, rng.uniform(0, 1, n).astype(np.float32)
    f32 = np.float32
    args = (f32(0.01), f32(0.9), f32(0.999), f32(0.19), f32(0.002), f32(1e-8))
    cpu, gpu = both(lambda p, g, m, v: adam_update(p, g, m, v, *args), [p, g, m, v], [], inplace=True)
    for c, d in zip(cpu, gpu):   # same float32 operations in the same order; only sqrt/div rounding may differ
        np.testing.assert_allclose(c, d, rtol=1e-6, atol=1e-7)
    cpu, gpu = both(lambda p, g, b: sgd_update(p, g, b, f32(0.1), f32(0.9)), [p, g, m], [], inplace=True)
    for c, d in zip(cpu, gpu):
        np.testing.assert_allclose(c, d, rtol=1e-6, atol=1e-7)
