"""Host time of the per-launch bookkeeping that a GPU training step repeats hundreds of times,
measured without a GPU: numba's real array classes over a stand-in allocation (no driver call is
timed). Per operation, the way the launchers did it before and the way they do it now:

* a reshape of a device array: numba's `reshape` and the planned launcher's description of the
  new array (`launch.describe`), against `kernels.view` building the view with its description,
  and against `kernels.view` returning the view it keeps on the array (weights and buffers that
  live across steps: every step after the first);
* the launcher object of `kernel[grid, block]`: built per launch (its grid and block tuples),
  against the one kept per (kernel, grid, block).

How many of each a step makes: `python bench/host_counts.py resnet18 --side 64` (launches, and
the reshapes still made per step: those not served by a kept view). Times here are this
machine's; the GPU host's are its own (docs/performance.md).

    python bench/bench_host.py [--n 20000]
"""
import argparse
import ctypes
import json
import os
import sys
import time

os.environ["NUMBA_ENABLE_CUDASIM"] = "0"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from ternet.kernels import _VIEWS, c_strides, launch, view  # noqa: E402


class _Mem:
    """Stands in for a device allocation: numba's array code only asks for its address."""
    device_ctypes_pointer = ctypes.c_size_t(0x7F00_0000_1000)


def _array(shape, dtype=np.float32):
    from numba.cuda.cudadrv.devicearray import DeviceNDArray
    return DeviceNDArray(shape, c_strides(shape, np.dtype(dtype).itemsize), dtype, gpu_data=_Mem())


def per_call_us(fn, n):
    best = float("inf")
    for _ in range(5):                       # best of 5 rounds of n calls
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n * 1e6)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20000)
    n = ap.parse_args().n
    a = _array((512, 16, 16, 64))
    shape = (512 * 16 * 16, 64)

    def numba_reshape():
        launch.describe(a.reshape(*shape))

    def view_built():
        a.__dict__.pop(_VIEWS, None)         # as for an array made this step: nothing kept yet
        view(a, *shape)

    def view_kept():
        view(a, *shape)

    class Dispatcher:
        pass
    k, cfg = Dispatcher(), ((132 * 32,), 256)
    launch._getitem(k, cfg)
    out = {
        "reshape_us": {"numba_reshape_and_describe": per_call_us(numba_reshape, n),
                       "view_built": per_call_us(view_built, n), "view_kept": per_call_us(view_kept, n)},
        "launcher_object_us": {"built_per_launch": per_call_us(lambda: launch._Launch(k, cfg), n),
                               "kept": per_call_us(lambda: launch._getitem(k, cfg), n)},
    }
    launch._LAUNCHES.clear()
    print(json.dumps({k: {m: round(v, 3) for m, v in d.items()} for k, d in out.items()}))


if __name__ == "__main__":
    main()
