"""CUDA convolution and linear kernels against the CPU path: integer results exactly equal,
gradients to float32 rounding (the two paths sum in different orders)."""
import numpy as np
import pytest

from cudacheck import both, first_mismatches, needs_cuda
from reference import assert_close
from ternet.kernels.conv import (conv2d_backward_input, conv2d_backward_weight, conv2d_forward, out_size)
from ternet.kernels.linear import linear_backward_input, linear_backward_weight, linear_forward

pytestmark = needs_cuda

CASES = [  # (N, H, W, C, K, k, stride, pad): edges of the 64 x 64 x 16 tiles, strides, padding
    (1, 3, 3, 1, 1, 1, 1, 0), (2, 5, 5, 3, 17, 3, 1, 1), (1, 7, 6, 17, 3, 3, 2, 1), (2, 4, 4, 2, 65, 1, 2, 0),
    (1, 9, 9, 3, 2, 7, 2, 3), (1, 9, 8, 16, 5, 5, 1, 0),
]


@pytest.mark.parametrize("case", CASES)
def test_conv_cuda_matches_cpu(case):
    n, h, w, c, k, kk, s, p = case
    rng = np.random.default_rng(sum(case))
    x = rng.integers(-1, 2, (n, h, w, c)).astype(np.int8)
    wq = rng.integers(-1, 2, (k, kk, kk, c)).astype(np.int8)
    oh, ow = out_size(h, kk, s, p), out_size(w, kk, s, p)
    cpu, gpu = both(lambda out, x, wq: conv2d_forward(out, x, wq, 1.0, s, p), [np.empty((n, oh, ow, k), np.float32)], [x, wq])
    assert (cpu[0] == gpu[0]).all(), first_mismatches(gpu[0], cpu[0])   # exact integer sums
    dy = rng.standard_normal((n, oh, ow, k)).astype(np.float32)
    cpu, gpu = both(lambda dx, dy, wq: conv2d_backward_input(dx, dy, wq, 1.0, s, p), [np.empty(x.shape, np.float32)], [dy, wq])
    assert_close(gpu[0], cpu[0], 1e-5, 1e-5, "dx")        # float32, different summation order
    cpu, gpu = both(lambda dw, dy, x: conv2d_backward_weight(dw, dy, x, s, p), [np.empty(wq.shape, np.float32)], [dy, x])
    assert_close(gpu[0], cpu[0], 1e-5, 1e-5, "dw")


def test_conv_cuda_real_input_and_scale():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 6, 6, 3)).astype(np.float32)
    wq = rng.integers(-2, 3, (4, 3, 3, 3)).astype(np.int8)
    cpu, gpu = both(lambda out, x, wq: conv2d_forward(out, x, wq, 0.5, 1, 1), [np.empty((2, 6, 6, 4), np.float32)], [x, wq])
    assert_close(gpu[0], cpu[0], 1e-5, 1e-5, "real-input conv")


@pytest.mark.parametrize("n,f,k", [(1, 1, 1), (3, 17, 65), (5, 33, 10)])
def test_linear_cuda_matches_cpu(n, f, k):
    rng = np.random.default_rng(n * f * k)
    x = rng.integers(-1, 2, (n, f)).astype(np.int8)
    wq = rng.integers(-1, 2, (k, f)).astype(np.int8)
    cpu, gpu = both(lambda out, x, wq: linear_forward(out, x, wq, 1.0), [np.empty((n, k), np.float32)], [x, wq])
    np.testing.assert_array_equal(gpu[0], cpu[0])
    dy = rng.standard_normal((n, k)).astype(np.float32)
    cpu, gpu = both(lambda dx, dy, wq: linear_backward_input(dx, dy, wq, 1.0), [np.empty((n, f), np.float32)], [dy, wq])
    assert_close(gpu[0], cpu[0], 1e-5, 1e-5, "linear dx")
    cpu, gpu = both(lambda dw, dy, x: linear_backward_weight(dw, dy, x), [np.empty((k, f), np.float32)], [dy, x])
    assert_close(gpu[0], cpu[0], 1e-5, 1e-5, "linear dw")


FIRST_LAYER = [(2, 7, 5, 3, 5, 3, 1, 1), (3, 9, 9, 3, 4, 7, 2, 3), (2, 5, 6, 2, 3, 3, 2, 0),
               (1, 20, 35, 1, 66, 3, 1, 1)]     # last: 3 x 3 tiles of the direct kernels, K over 64


@pytest.mark.parametrize("case,path", [(c, "direct") for c in FIRST_LAYER] + [(c, "tiled") for c in FIRST_LAYER[:3]])
def test_conv_cuda_first_layer_kernels_exact(case, path, monkeypatch):
    """The pure-numba kernels a 3-channel first layer runs: the direct kernels (patch in shared
    memory) and the tiled ones (for longer reductions), whose rows and columns are stepped from
    tile to tile; the weight gradients are split into chunks of rows (tiles) whose starts fall
    anywhere in an image. With small-integer inputs every sum is exact, so the results must equal
    the CPU's exactly, whatever the order."""
    from ternet.kernels import conv
    monkeypatch.setattr(conv, "DW_CHUNK", 16)      # many splits on a tiny shape
    monkeypatch.setattr(conv, "DW_SPLITS", 3)
    monkeypatch.setattr(conv, "DW_TILE_SPLITS", 2)
    monkeypatch.setattr(conv, "DW_DIRECT_MIN_R", 0)
    if path == "tiled":
        monkeypatch.setattr(conv, "DR_MAX", 0)
    n, h, w, c, k, kk, s, p = case
    rng = np.random.default_rng(sum(case))
    x = rng.integers(-3, 4, (n, h, w, c)).astype(np.float32 if n > 1 else np.int8)
    wq = rng.integers(-1, 2, (k, kk, kk, c)).astype(np.int8)
    oh, ow = out_size(h, kk, s, p), out_size(w, kk, s, p)
    cpu, gpu = both(lambda out, x, wq: conv2d_forward(out, x, wq, 1.0, s, p), [np.empty((n, oh, ow, k), np.float32)], [x, wq])
    assert (cpu[0] == gpu[0]).all(), first_mismatches(gpu[0], cpu[0])
    dy = rng.integers(-4, 5, (n, oh, ow, k)).astype(np.float32)
    cpu, gpu = both(lambda dw, dy, x: conv2d_backward_weight(dw, dy, x, s, p), [np.empty(wq.shape, np.float32)], [dy, x])
    assert (cpu[0] == gpu[0]).all(), first_mismatches(gpu[0], cpu[0])


@pytest.mark.parametrize("shape", [(3, 3, 3, 5), (33, 1, 1, 40), (2, 7, 7, 3)])
def test_flip_weight_bf16_tiles(shape):
    """The input gradient's weight operand: bf16 bits of scale * w, taps flipped, K and C swapped
    (tiles of 32 x 32 with edges in both directions)."""
    from numba import cuda

    from ternet.kernels.conv_tc import flip_weight_bf16
    rng = np.random.default_rng(sum(shape))
    w = rng.integers(-1, 2, shape).astype(np.int8)
    got = flip_weight_bf16(cuda.to_device(w), 0.5).copy_to_host()
    want = (w.transpose(3, 1, 2, 0)[:, ::-1, ::-1, :].astype(np.float32) * np.float32(0.5)).view(np.uint32) >> 16
    np.testing.assert_array_equal(got, want.astype(np.uint16))
