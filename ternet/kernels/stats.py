"""Weight-state statistics: how many weights sit in each of the 2^N + 1 states of a layer.
Exercise: pytest tests/test_dst.py -k counts, tests/test_cuda_stats.py."""
import numba
import numpy as np
from numba import cuda

from . import check, grid1d, on_device, zeros

MAX_STATES = 16      # shared histogram size of the CUDA kernel (2 * qmax + 1 <= 9 for N <= 3 bits)


# ----------------------------------------------------------------------------------------------
# CUDA kernels
#
# Each thread counts its grid-stride share in registers / local memory (a handful of states, so
# per-element shared atomics would all collide), the block adds those into a shared histogram
# and then into the int64 counts: integer atomics, exact whatever their order.

@cuda.jit
def _state_counts_cuda(q, qmax, counts):
    hist = cuda.shared.array(MAX_STATES, numba.int32)
    mine = cuda.local.array(MAX_STATES, numba.int32)
    t, k = cuda.threadIdx.x, counts.size
    for s in range(k):
        mine[s] = 0
    if t < MAX_STATES:
        hist[t] = 0
    cuda.syncthreads()
    for i in range(cuda.grid(1), q.size, cuda.gridsize(1)):
        mine[q[i] + qmax] += 1
    for s in range(k):
        if mine[s]:
            cuda.atomic.add(hist, s, mine[s])
    cuda.syncthreads()
    if t < k:
        cuda.atomic.add(counts, t, np.int64(hist[t]))


# ----------------------------------------------------------------------------------------------
# launchers

def state_counts(q, qmax):
    """Counts of states -qmax..qmax (length 2*qmax + 1, int64) for int8 states q, returned as a
    host array on both paths (the device path reads back 2*qmax + 1 counts)."""
    if on_device(q):
        check(2 * qmax + 1 <= MAX_STATES, f"state_counts: at most {MAX_STATES} states on the device")
        counts = zeros((2 * qmax + 1,), np.int64, True)
        _state_counts_cuda[grid1d(q.size)](q.reshape(q.size), qmax, counts)
        return counts.copy_to_host()
    return np.bincount(q.reshape(-1).astype(np.int64) + qmax, minlength=2 * qmax + 1)
