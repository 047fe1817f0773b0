"""CUDA elementwise kernels against the CPU path (the simulator on machines without a GPU)."""
import numpy as np
import pytest

from cudacheck import SIZES, both, needs_cuda
from ternet.kernels.elementwise import adam_update, add_forward, copy, fill, put_scalars, sgd_update

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


def test_put_scalars_and_copy():
    """put_scalars writes float32 values into the front of an array (one launch on the GPU); copy
    is a kernel copy, both on either side alike."""
    vals = (0.1, -2.5, 3.0, 1e-8, 7.0)
    cpu, gpu = both(lambda out: put_scalars(out, *vals), [np.full(8, 9, np.float32)], [])
    np.testing.assert_array_equal(cpu[0], gpu[0])
    np.testing.assert_array_equal(gpu[0], np.array(vals + (9, 9, 9), np.float32))
    with pytest.raises(ValueError, match="9 values for 9 slots"):
        put_scalars(np.zeros(9, np.float32), *range(9))
    a = np.arange(70, dtype=np.float32)
    cpu, gpu = both(copy, [np.zeros(70, np.float32)], [a])
    np.testing.assert_array_equal(gpu[0], a)


def test_updates_read_their_per_step_values_from_hp():
    """adam_update, sgd_update with hp: the kernels take lr (and the bias corrections) from the
    device array, not from the arguments (what a replayed CUDA graph relies on)."""
    from numba import cuda
    f32 = np.float32
    rng = np.random.default_rng(3)
    p, g = rng.standard_normal(40).astype(np.float32), rng.standard_normal(40).astype(np.float32)
    ref = [a.copy() for a in (p, g, np.zeros(40, np.float32), np.ones(40, np.float32))]
    adam_update(*ref, f32(0.01), f32(0.9), f32(0.999), f32(0.19), f32(0.002), f32(1e-8))
    dev = [cuda.to_device(a) for a in (p, g, np.zeros(40, np.float32), np.ones(40, np.float32))]
    hp = cuda.to_device(np.array([0.01, 0.19, 0.002], np.float32))
    adam_update(*dev, f32(5.0), f32(0.9), f32(0.999), f32(5.0), f32(5.0), f32(1e-8), hp=hp)   # ignored: hp rules
    np.testing.assert_allclose(dev[0].copy_to_host(), ref[0], rtol=1e-6, atol=1e-7)
    ref = [p.copy(), g, np.zeros(40, np.float32)]
    sgd_update(*ref, f32(0.1), f32(0.9))
    dev = [cuda.to_device(a) for a in (p, g, np.zeros(40, np.float32))]
    sgd_update(*dev, f32(7.0), f32(0.9), hp=cuda.to_device(np.array([0.1], np.float32)))
    np.testing.assert_allclose(dev[0].copy_to_host(), ref[0], rtol=1e-6, atol=1e-7)


def test_scratch_grows_shares_and_is_released():
    """scratch: one buffer per name, grown to the largest request, its views reused per shape;
    release_scratch lets it go, so a later (smaller) configuration gets a buffer of its own size."""
    from ternet.kernels import _SCRATCH_BUF, release_scratch, scratch
    buffer = lambda: _SCRATCH_BUF["test.part", np.dtype(np.float32).str]
    release_scratch()
    a = scratch("test.part", (4, 8), np.float32)
    assert scratch("test.part", (4, 8), np.float32) is a and buffer().size == 32
    assert scratch("test.part", 100, np.float32).size == 100 and buffer().size == 100
    assert scratch("test.part", (4, 8), np.float32) is not a          # a view of the grown buffer
    assert scratch("test.part", 10, np.float32).size == 10 and buffer().size == 100
    release_scratch()
    assert scratch("test.part", 10, np.float32).size == 10 and buffer().size == 10
    release_scratch()
