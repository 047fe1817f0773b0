"""CUDA losses against the CPU path (the simulator on machines without a GPU): dlogits, and the
loss sum and correct count added into the device accumulator."""
import numpy as np
import pytest
from numba import cuda

import reference as ref
from cudacheck import SMALL_SIZES, needs_cuda
from ternet.kernels.loss import loss_forward_backward

pytestmark = needs_cuda


@pytest.mark.parametrize("kind,eps", [("xent", 0.0), ("xent", 0.1), ("sqhinge", 0.0)])
@pytest.mark.parametrize("k", [1, 3, 10, 40])     # 40: more classes than the row block has threads
@pytest.mark.parametrize("n", SMALL_SIZES + [129])     # 129: more samples than a block has threads
def test_loss_forward_backward(n, k, kind, eps):
    rng = np.random.default_rng(n * k)
    logits = (rng.standard_normal((n, k)) * 2).astype(np.float32)
    logits[0, :] = 0.5                              # a tied row: the first maximum is the prediction
    labels = rng.integers(0, k, n).astype(np.int32)
    d_cpu, acc_cpu = np.empty_like(logits), np.array([1.5, 2.0])
    total, correct = loss_forward_backward(d_cpu, logits, labels, kind, acc_cpu, smoothing=eps)
    d_gpu, acc = cuda.device_array_like(logits), cuda.to_device(np.array([1.5, 2.0]))
    assert loss_forward_backward(d_gpu, cuda.to_device(logits), cuda.to_device(labels), kind, acc,
                                 smoothing=eps) is None
    got = acc.copy_to_host()
    assert got[1] == acc_cpu[1]                     # correct counts: exact
    # loss sums: float64, summed in another order (a tree over samples); xent also uses expf,
    # whose last bit may differ between the CPU's libm and the GPU's libdevice
    ref.assert_close(got[0], acc_cpu[0], 1e-9, 1e-6, "loss sum")
    if kind == "sqhinge":      # no transcendental functions, FMA-proof: same bits
        np.testing.assert_array_equal(d_gpu.copy_to_host(), d_cpu)
    else:                      # expf may differ in the last bit
        ref.assert_close(d_gpu.copy_to_host(), d_cpu, 1e-7, 1e-5, "xent dlogits")


def test_accumulator_adds_up_over_steps():
    rng = np.random.default_rng(0)
    acc = cuda.to_device(np.zeros(2))
    want = np.zeros(2)
    for step in range(3):
        logits = rng.standard_normal((17, 5)).astype(np.float32)
        labels = rng.integers(0, 5, 17).astype(np.int32)
        loss_forward_backward(np.empty_like(logits), logits, labels, "xent", want)
        loss_forward_backward(cuda.device_array_like(logits), cuda.to_device(logits), cuda.to_device(labels),
                              "xent", acc)
    got = acc.copy_to_host()
    assert got[1] == want[1]
    ref.assert_close(got[0], want[0], 1e-9, 1e-6, "loss sum")


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_xent_row_block_kernel_gives_the_one_thread_kernels_bits(eps):
    """Cross-entropy with a block of 32 threads a row (up to XENT_K classes) against one thread a
    row (the kernel kept for more classes): dlogits, per-sample losses and hits bit for bit."""
    from ternet.kernels import loss as L
    rng = np.random.default_rng(3)
    n, k = 7, 75
    logits = (rng.standard_normal((n, k)) * 3).astype(np.float32)
    logits[2, 10:20] = logits[2].max() + 1           # a tie: the first maximum wins
    labels = rng.integers(0, k, n).astype(np.int32)
    x, lab = cuda.to_device(logits), cuda.to_device(labels)
    out = {}
    for name, launch in (("rows", L._xent_rows_cuda[1, 32]), ("warp", L._xent_warp_cuda[2, 32])):
        d, loss, hit = cuda.device_array((n, k), np.float32), cuda.device_array(n), cuda.device_array(n, np.int32)
        launch(x, lab, np.float32(1 / n), np.float64(eps), d, loss, hit)
        out[name] = [a.copy_to_host() for a in (d, loss, hit)]
    for got, want in zip(out["warp"], out["rows"]):
        np.testing.assert_array_equal(got, want)
    assert out["warp"][2][2] == (labels[2] == 10)
