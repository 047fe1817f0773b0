"""Statistics of a layer's arrays: how many weights sit in each of the 2^N + 1 states, and the
sum of squares of a gradient (for steps normalised by its root mean square).
Exercise: pytest tests/test_dst.py -k counts, tests/test_cuda_stats.py."""
import numba
import numpy as np
from numba import cuda

from . import check, empty, grid1d, on_device, view, workspace, zeros

MAX_STATES = 16      # shared histogram size of the CUDA kernel (2 * qmax + 1 <= 9 for N <= 3 bits)

# sum_squares: a fixed partition, the same on both paths whatever the launch configuration.
# Element i belongs to lane i % min(LANES, n); each lane sums its elements in increasing i; then
# FOLD partial sums, partial t = lanes t, t + FOLD, ... in order, combined by a halving tree.
# Squares of float32 values are exact in float64 (so an FMA changes nothing), and the order is
# fixed, so the CPU and every GPU run give the same bits.
LANES = 65536
FOLD = 128


@numba.njit(cache=True)
def _sum_squares(x, lanes):
    n, nl = x.size, lanes.size
    lanes[:] = 0.0
    j = 0
    for i in range(n):      # in memory order; each lane still adds its elements in increasing i
        v = np.float64(x[i])
        lanes[j] += v * v
        j += 1
        if j == nl:
            j = 0
    part = np.zeros(FOLD, np.float64)
    for t in range(FOLD):
        acc = 0.0
        for j in range(t, nl, FOLD):
            acc += lanes[j]
        part[t] = acc
    half = FOLD // 2
    while half > 0:
        for t in range(half):
            part[t] += part[t + half]
        half //= 2
    return part[0]


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


@cuda.jit
def _lane_squares_cuda(x, lanes):
    n, nl = x.size, lanes.size
    for j in range(cuda.grid(1), nl, cuda.gridsize(1)):
        acc = 0.0
        for i in range(j, n, nl):
            v = numba.float64(x[i])
            acc += v * v
        lanes[j] = acc


@cuda.jit
def _fold_lanes_cuda(lanes, out):
    part = cuda.shared.array(FOLD, numba.float64)
    t, nl = cuda.threadIdx.x, lanes.size
    acc = 0.0
    for j in range(t, nl, FOLD):
        acc += lanes[j]
    part[t] = acc
    cuda.syncthreads()
    half = FOLD // 2
    while half > 0:
        if t < half:
            part[t] += part[t + half]
        cuda.syncthreads()
        half //= 2
    if t == 0:
        out[0] = part[0]


# ----------------------------------------------------------------------------------------------
# launchers

def state_counts(q, qmax):
    """Counts of states -qmax..qmax (length 2*qmax + 1, int64) for int8 states q, returned as a
    host array on both paths (the device path reads back 2*qmax + 1 counts)."""
    if on_device(q):
        check(2 * qmax + 1 <= MAX_STATES, f"state_counts: at most {MAX_STATES} states on the device")
        counts = zeros((2 * qmax + 1,), np.int64, True)
        _state_counts_cuda[grid1d(q.size)](view(q, q.size), qmax, counts)
        return counts.copy_to_host()
    return np.bincount(q.reshape(-1).astype(np.int64) + qmax, minlength=2 * qmax + 1)


def sum_squares(x, out):
    """out[0] <- the sum of x[i]^2 over all of float32 x, in float64, in a fixed order (identical
    bits on the CPU and the GPU). out: a float64 array of one element on x's side, so a device
    step needs no read-back."""
    check(x.dtype == np.float32 and out.dtype == np.float64 and out.size >= 1,
          "sum_squares: x float32, out float64 with one element")
    nl = max(1, min(LANES, x.size))
    if on_device(x, out):       # every lane is written: no fill needed
        lanes = empty((nl,), np.float64, True)
        _lane_squares_cuda[grid1d(nl)](view(x, x.size), lanes)
        _fold_lanes_cuda[1, FOLD](lanes, out)
        return
    out[0] = _sum_squares(x.reshape(-1), workspace(sum_squares, "lanes", (nl,), np.float64))
