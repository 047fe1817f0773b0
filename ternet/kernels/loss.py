"""Losses on logits (N, K) with integer labels (N,): softmax cross-entropy and the squared hinge
loss of the GXNOR/BinaryNet reference code. Each returns (loss sum, correct count) and writes
d(mean loss)/d logits. Exercise: pytest tests/test_ops.py -k loss, tests/test_cuda_loss.py.
"""
import math

import numba
import numpy as np
from numba import cuda

from . import MAX_BLOCKS, SIMULATOR, THREADS, check, grid1d, on_device, scratch
from .scalar import sqhinge, xent_dlogit, xent_row_loss, xent_target


# ----------------------------------------------------------------------------------------------
# CPU implementation

@numba.njit(cache=True)
def _softmax_xent(logits, labels, dlogits, eps):
    n, k = logits.shape
    total = 0.0
    correct = 0
    inv_n = np.float32(1.0 / n)
    for i in range(n):
        mx = logits[i, 0]
        am = 0
        for j in range(1, k):
            if logits[i, j] > mx:
                mx = logits[i, j]
                am = j
        s = 0.0
        sz = 0.0
        for j in range(k):
            s += math.exp(logits[i, j] - mx)
            sz += logits[i, j] - mx
        y = labels[i]
        total += xent_row_loss(math.log(s), logits[i, y] - mx, sz, eps, k)
        correct += am == y
        for j in range(k):
            dlogits[i, j] = xent_dlogit(logits[i, j], mx, s, xent_target(j == y, eps, k), inv_n)
    return total, correct


@numba.njit(cache=True)
def _sq_hinge(logits, labels, dlogits):
    # loss = mean over samples and classes of max(0, 1 - t * y)^2 with t = +1 for the label, -1 else
    n, k = logits.shape
    total = 0.0
    correct = 0
    scale = np.float32(2.0 / (n * k))
    for i in range(n):
        am = 0
        for j in range(k):
            if logits[i, j] > logits[i, am]:
                am = j
            term, dlogits[i, j] = sqhinge(logits[i, j], j == labels[i], k, scale)
            total += term
        correct += am == labels[i]
    return total, correct


# ----------------------------------------------------------------------------------------------
# CUDA kernels
#
# One thread per sample (for cross-entropy: a block of 32 threads per sample, its sums by one of
# them) writes its row of dlogits and its loss and correctness (same per-logit math as the CPU,
# from kernels.scalar); then one block adds the per-sample values in a fixed
# tree order into acc, so the device accumulator needs no host round trip and no float atomics.

@cuda.jit(device=True)
def _xent_row(row, k, y, eps):
    """Row max, argmax (first), sum of exp(z - max) and of (z - max) (float64, in class order)
    and the row's loss, from the row's logits row[0 .. k-1]."""
    mx, am = row[0], 0
    for j in range(1, k):
        if row[j] > mx:
            mx, am = row[j], j
    s, sz = np.float64(0.0), np.float64(0.0)
    for j in range(k):
        s += np.float64(math.exp(row[j] - mx))
        sz += np.float64(row[j] - mx)
    return mx, am, s, xent_row_loss(math.log(s), np.float64(row[y] - mx), sz, eps, k)


@cuda.jit
def _xent_rows_cuda(logits, labels, inv_n, eps, dlogits, loss, hit):
    n, k = logits.shape
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        y = labels[i]
        mx, am, s, loss[i] = _xent_row(logits[i], k, y, eps)
        hit[i] = am == y
        for j in range(k):
            dlogits[i, j] = xent_dlogit(logits[i, j], mx, s, xent_target(j == y, eps, k), inv_n)


XENT_K = 1024      # classes _xent_warp_cuda takes (its row in shared memory)


@cuda.jit
def _xent_warp_cuda(logits, labels, inv_n, eps, dlogits, loss, hit):
    # _xent_rows_cuda with a block of 32 threads a row: the row copied to shared memory by all of
    # them (coalesced), its sums by one thread in the same order (the same bits), dlogits by all.
    # One thread a row reading its row from global memory took 0.45 ms for ResNet-18's 256 x 1000
    # on the H200 (sixteenth session): a dependent load a class, rows far apart.
    row = cuda.shared.array(XENT_K, numba.float32)
    st = cuda.shared.array(2, numba.float64)
    n, k = logits.shape
    t = cuda.threadIdx.x
    for i in range(cuda.blockIdx.x, n, cuda.gridDim.x):
        for j in range(t, k, cuda.blockDim.x):
            row[j] = logits[i, j]
        cuda.syncthreads()
        y = labels[i]
        if t == 0:
            mx, am, s, loss[i] = _xent_row(row, k, y, eps)
            hit[i] = am == y
            st[0], st[1] = np.float64(mx), s
        cuda.syncthreads()
        mx, s = np.float32(st[0]), st[1]
        for j in range(t, k, cuda.blockDim.x):
            dlogits[i, j] = xent_dlogit(row[j], mx, s, xent_target(j == y, eps, k), inv_n)
        cuda.syncthreads()


@cuda.jit
def _sqhinge_rows_cuda(logits, labels, scale, dlogits, loss, hit):
    n, k = logits.shape
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        am, t = 0, np.float64(0.0)
        for j in range(k):
            if logits[i, j] > logits[i, am]:
                am = j
            term, g = sqhinge(logits[i, j], j == labels[i], k, scale)
            dlogits[i, j] = g
            t += term
        loss[i] = t
        hit[i] = am == labels[i]


@cuda.jit
def _sum_into_cuda(loss, hit, acc):
    # one block: thread t sums samples t, t + THREADS, ...; then a fixed tree over the threads
    sl = cuda.shared.array(THREADS, numba.float64)
    sh = cuda.shared.array(THREADS, numba.int64)
    t = cuda.threadIdx.x
    a, b = np.float64(0.0), 0
    for i in range(t, loss.size, THREADS):
        a += loss[i]
        b += hit[i]
    sl[t], sh[t] = a, b
    cuda.syncthreads()
    half = THREADS // 2
    while half > 0:
        if t < half:
            sl[t] += sl[t + half]
            sh[t] += sh[t + half]
        cuda.syncthreads()
        half //= 2
    if t == 0:
        acc[0] += sl[0]
        acc[1] += np.float64(sh[0])


# ----------------------------------------------------------------------------------------------
# launchers

LOSSES = ("xent", "sqhinge")


def loss_forward_backward(dlogits, logits, labels, kind, acc=None, smoothing=0.0):
    """Overwrites dlogits with the gradient of the batch-mean loss; adds the sum of per-sample
    losses to acc[0] and the number of correct argmax predictions to acc[1] (acc float64 (2,),
    on the logits' side, so a GPU step needs no host round trip; the device adds the per-sample
    values in a fixed order, so equal inputs give equal bits). logits float32 (N, K), labels
    int32 (N,). smoothing eps (xent only): the target of a sample is (1 - eps) one-hot + eps / K.
    Returns (loss sum, correct) on the host path, None on the device path."""
    check(kind in LOSSES, f"unknown loss {kind!r}; choose one of {LOSSES}")
    check(0.0 <= smoothing < 1.0 and (kind == "xent" or smoothing == 0.0),
          f"label smoothing {smoothing}: needs 0 <= eps < 1 and the xent loss")
    eps = np.float64(smoothing)
    check(dlogits.shape == logits.shape and labels.shape == (logits.shape[0],), "loss: shape mismatch")
    if on_device(dlogits, logits, labels, acc):
        n, k = logits.shape
        loss, hit = scratch("loss.rows", n, np.float64), scratch("loss.hit", n, np.int32)
        if kind == "xent":
            # a block a row on a GPU; in the simulator, whose barriers cost ~60 ms a row, one thread
            # a row (tests/test_cuda_loss.py compares the two kernels there on a few rows)
            block = k <= XENT_K and not SIMULATOR
            rows = _xent_warp_cuda[max(1, min(n, MAX_BLOCKS)), 32] if block else _xent_rows_cuda[grid1d(n)]
            rows(logits, labels, np.float32(1.0 / n), eps, dlogits, loss, hit)
        else:
            _sqhinge_rows_cuda[grid1d(n)](logits, labels, np.float32(2.0 / (n * k)), dlogits, loss, hit)
        if acc is not None:
            _sum_into_cuda[1, THREADS](loss, hit, acc)
        return None
    if kind == "xent":
        total, correct = _softmax_xent(logits, labels, dlogits, eps)
    else:
        total, correct = _sq_hinge(logits, labels, dlogits)
    if acc is not None:
        acc[0] += total
        acc[1] += correct
    return float(total), int(correct)


def predict(logits):
    """argmax per row (host or device logits); first maximum wins."""
    if on_device(logits):
        logits = logits.copy_to_host()
    return np.argmax(logits, axis=1)
