"""Weight-state statistics: how many weights sit in each of the 2^N + 1 states of a layer.
Exercise: pytest tests/test_dst.py -k counts."""
import numpy as np

from . import on_device


def state_counts(q, qmax):
    """Counts of states -qmax..qmax (length 2*qmax + 1, int64) for int8 states q."""
    if on_device(q):
        from .stats_cuda import state_counts_cuda
        return state_counts_cuda(q, qmax)
    return np.bincount(q.reshape(-1).astype(np.int64) + qmax, minlength=2 * qmax + 1)
