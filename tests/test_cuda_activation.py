"""CUDA ternary activation against the CPU path (the simulator on machines without a GPU):
outputs and window masks exactly, the compact device record's size."""
import numpy as np
import pytest

from cudacheck import SIZES, both, first_mismatches, needs_cuda
from ternet.kernels.activation import num_words, ternary_backward, ternary_forward
from ternet.kernels.scalar import WINDOW_RECT, WINDOW_TRI

pytestmark = needs_cuda

R, A = 1.0, 0.5
EDGES = [1.0, -1.0, 0.5, -0.5, 1.5, -1.5, 0.0, 1.0000001, 0.49999997, 1.5000001]   # on and beside r, r - a, r + a


def inputs(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-2.5, 2.5, n).astype(np.float32)
    x[:min(n, len(EDGES))] = np.array(EDGES, np.float32)[:n]
    return x, rng.standard_normal(n).astype(np.float32)


def fwd_bwd(r, a, shape):
    def run(out, dx, x, dy):
        ternary_backward(dx, dy, ternary_forward(out, x, r, a, shape))
    return run


@pytest.mark.parametrize("shape", [WINDOW_RECT, WINDOW_TRI])
@pytest.mark.parametrize("n", SIZES + [300, 2053])   # 2053: several rounds of tiles under the simulator
def test_ternary_forward_backward(n, shape):
    x, dy = inputs(n, n)
    cpu, gpu = both(fwd_bwd(R, A, shape), [np.empty(n, np.int8), np.empty(n, np.float32)], [x, dy])
    np.testing.assert_array_equal(gpu[0], cpu[0], err_msg=first_mismatches(gpu[0], cpu[0]))
    # the same float32 product dout * phi'(x) on both sides (phi' from the shared window_grad)
    np.testing.assert_array_equal(gpu[1], cpu[1], err_msg=first_mismatches(gpu[1], cpu[1]))


def test_eval_and_nd_shapes():
    x, _ = inputs(2 * 3 * 5 * 7, 1)
    x = x.reshape(2, 3, 5, 7)
    cpu, gpu = both(lambda out, x: ternary_forward(out, x, R, A, WINDOW_RECT, train=False),
                    [np.empty(x.shape, np.int8)], [x])
    np.testing.assert_array_equal(gpu[0], cpu[0])
    cpu, gpu = both(fwd_bwd(0.7, 0.3, WINDOW_TRI), [np.empty(x.shape, np.int8), np.empty(x.shape, np.float32)],
                    [x, x * 3])
    np.testing.assert_array_equal(gpu[0], cpu[0])
    np.testing.assert_array_equal(gpu[1], cpu[1])


def test_device_record_is_a_bit_mask():
    from numba import cuda
    x, _ = inputs(100, 2)
    saved = ternary_forward(cuda.device_array(100, np.int8), cuda.to_device(x), R, A, WINDOW_RECT)
    assert saved.deriv is None and saved.nbytes == 4 * num_words(100)          # 1 bit per element
    bits = saved.bits.copy_to_host()
    mask = (bits[np.arange(100) // 32] >> (np.arange(100) % 32).astype(np.uint32)) & 1
    d = np.abs(np.abs(x) - np.float32(R))          # in float32, as window_grad (0.49999997 is inside)
    np.testing.assert_array_equal(mask, (d <= np.float32(A)).astype(np.uint32))
    cpu = ternary_forward(np.empty(100, np.int8), x, R, A, WINDOW_RECT)
    assert cpu.deriv is not None and cpu.nbytes == 400                          # float32 phi' on the CPU


@pytest.mark.parametrize("shape", [WINDOW_RECT, WINDOW_TRI])
def test_backward_of_a_sum_is_the_backward_of_the_added_gradient(shape):
    """ternary_backward(dinp, a, saved, b), a ResNet block's two input gradients added by the
    activation's kernel (the rectangular window's; the triangular's adds them first): the bits of
    add_forward then ternary_backward, dinp written over a as Residual's GradSum has it."""
    from numba import cuda
    from ternet.kernels.elementwise import add_forward
    n = 2053
    x, a = inputs(n, 7)
    b = np.random.default_rng(8).standard_normal(n).astype(np.float32)
    b[::5] = -a[::5]                       # sums of exactly zero, of both signs' parts
    out = cuda.device_array(n, np.int8)
    saved = ternary_forward(out, cuda.to_device(x), R, A, shape)
    s, want = cuda.to_device(a), cuda.device_array(n, np.float32)
    add_forward(s, s, cuda.to_device(b))
    ternary_backward(want, s, saved)
    got = cuda.to_device(a)
    ternary_backward(got, got, saved, cuda.to_device(b))
    np.testing.assert_array_equal(got.copy_to_host().view(np.uint32), want.copy_to_host().view(np.uint32))
    assert (want.copy_to_host() != 0).any()
