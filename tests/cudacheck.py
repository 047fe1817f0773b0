"""Helpers for comparing a launcher's CUDA path with its CPU path on identical inputs.

both(launcher, outputs, inputs) runs launcher(*outputs, *inputs) once on host copies and once on
device copies and returns (cpu_outputs, gpu_outputs) as host arrays. With inplace=True the
`outputs` list holds arrays the launcher updates in place (all of them are compared).
Shapes on block edges (1, 15, 16, 17, 31, 32, 33, 127, 128, 129) catch tiling mistakes.
"""
import numpy as np
import pytest
from numba import cuda

SIZES = [1, 15, 16, 17, 31, 32, 33, 127, 128, 129]
SMALL_SIZES = [1, 15, 17, 33]          # for kernels that are slow in the simulator

needs_cuda = pytest.mark.skipif(not cuda.is_available(), reason="no CUDA device or simulator")


def both(launcher, outputs, inputs, inplace=False, extra=()):
    host_out = [np.array(o) for o in outputs]
    host_in = [np.array(i) if isinstance(i, np.ndarray) else i for i in inputs]
    launcher(*host_out, *host_in, *extra)
    dev_out = [cuda.to_device(np.array(o)) for o in outputs]
    dev_in = [cuda.to_device(np.array(i)) if isinstance(i, np.ndarray) else i for i in inputs]
    launcher(*dev_out, *dev_in, *extra)
    return host_out, [d.copy_to_host() for d in dev_out]


def first_mismatches(got, want, k=5):
    bad = np.argwhere(got != want)[:k]
    return "\n".join(f"  at {tuple(i)}: got {got[tuple(i)]}, want {want[tuple(i)]}" for i in bad)
