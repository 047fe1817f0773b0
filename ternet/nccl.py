"""The NCCL collective: one process per GPU; gradients are all-reduced on the device through
cupy's NCCL bindings, fed numba device arrays by their __cuda_array_interface__ pointers, on the
legacy default stream every ternet kernel runs on -- no host copy, no extra synchronisation.

NOT RUN YET: written on a machine without GPUs and without cupy; none of this module has executed.
docs/distributed.md ("What has not run") lists what to check on the first multi-GPU host.
Summation order: NCCL picks ring or tree algorithms (and their chunking) by size and topology, so
the float sum is not added in rank order; every rank still receives the same bits (each chunk is
reduced once, then distributed), which is what keeps replicas identical. 1 GPU against K GPUs
agree only up to float rounding.
"""
import json
import os
import time

import numpy as np

from .distributed import Collective
from .kernels import c_strides

# nccl.h: ncclDataType_t and ncclRedOp_t (values stable since NCCL 2.0)
NCCL_TYPES = {np.dtype(np.int8): 0, np.dtype(np.int32): 2, np.dtype(np.int64): 4, np.dtype(np.float32): 7,
              np.dtype(np.float64): 8}
NCCL_SUM = 0
STREAM = 0      # the legacy default stream (numba launches ternet's kernels there; see kernels/__init__.py)


class NcclCollective(Collective):
    """Rank `rank` of `world` GPU processes; this process uses GPU `local_rank` of its host."""
    device = True

    def __init__(self, rank, world, id_file, local_rank=0, local_world=None, timeout=600.0):
        try:
            import cupy
            from cupy.cuda import nccl
        except ImportError as e:
            raise RuntimeError("multi-GPU training needs cupy with NCCL (e.g. pip install cupy-cuda12x; "
                               f"`python -c 'from cupy.cuda import nccl'` must work): {e}") from None
        from numba import cuda

        from . import cuda_memory
        cuda_memory.install()                 # before the context exists (select_device creates it)
        gpus = len(cuda.gpus)
        if local_rank >= gpus:
            raise RuntimeError(f"rank {rank} wants GPU {local_rank}, but this host shows {gpus} GPU(s)")
        self.rank, self.world, self.local_world = rank, world, local_world or min(world, gpus)
        cuda.select_device(local_rank)
        cupy.cuda.Device(local_rank).use()    # numba and cupy share the device's primary context
        self._nccl, self._cuda = nccl, cuda
        # NVLink SHARP (multicast) stays off unless asked for: on shared hosts a program using it can
        # put every GPU of the host out of service; gradients of ternet's size do not need it
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        uid = _rendezvous(id_file, rank, nccl.get_unique_id, timeout)
        self.comm = nccl.NcclCommunicator(world, uid, rank)   # returns once every rank has joined
        if rank == 0:
            try:
                os.unlink(id_file)
            except FileNotFoundError:
                pass
        self._one = cuda.to_device(np.zeros(1, np.float32))

    def allreduce_sum(self, arrays):
        self._nccl.groupStart()               # one fused launch for all the tensors of a step
        try:
            for a in arrays:
                ptr, n, kind = _buffer(a)
                self.comm.allReduce(ptr, ptr, n, kind, NCCL_SUM, STREAM)
        finally:
            self._nccl.groupEnd()

    def broadcast(self, arrays, root=0):
        self._nccl.groupStart()
        try:
            for a in arrays:
                ptr, n, kind = _buffer(a)
                self.comm.bcast(ptr, n, kind, root, STREAM)
        finally:
            self._nccl.groupEnd()

    def barrier(self):
        self.allreduce_sum([self._one])
        self._cuda.synchronize()

    def close(self):
        if getattr(self, "comm", None) is not None:
            self._cuda.synchronize()
            self.comm.destroy()
            self.comm = None


def _buffer(a):
    """(device pointer, element count, NCCL type) of a C-contiguous device array."""
    cai = getattr(a, "__cuda_array_interface__", None)
    if cai is None:
        raise TypeError("the nccl collective reduces device arrays; got a host array")
    dt = np.dtype(cai["typestr"])
    if dt not in NCCL_TYPES:
        raise TypeError(f"nccl: no NCCL type for {dt}")
    shape = tuple(cai["shape"])
    if cai.get("strides") is not None and tuple(cai["strides"]) != c_strides(shape, dt.itemsize):
        raise ValueError("nccl: arrays must be C-contiguous")
    return cai["data"][0], int(np.prod(shape)), NCCL_TYPES[dt]


def _rendezvous(path, rank, make_id, timeout):
    """Rank 0 makes the NCCL unique id and writes it to `path` (atomically); the others wait for it."""
    if rank == 0:
        uid = make_id()
        data = {"bytes": bytes(uid).hex()} if isinstance(uid, (bytes, bytearray)) else {"tuple": list(uid)}
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
        return uid
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(path) as f:
                data = json.load(f)
            break
        except (FileNotFoundError, json.JSONDecodeError):
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank {rank}: no NCCL id appeared in {path} within {timeout:.0f} s; is rank 0 "
                                   "running, and do all hosts see that path?") from None
            time.sleep(0.1)
    return bytes.fromhex(data["bytes"]) if "bytes" in data else tuple(data["tuple"])
