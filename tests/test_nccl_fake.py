"""ternet/nccl.py's own logic against a FAKE cupy (recorded calls, no NCCL, no GPU): the NCCL-id
rendezvous through a file, one grouped call per tensor with the right pointer, count and type,
and the argument checks. It says nothing about real NCCL; see docs/distributed.md.
Run: python -m pytest tests/test_nccl_fake.py
"""
import sys
import threading
import types

import numpy as np
import pytest


class _Comm:
    joined = threading.Barrier(2)     # like ncclCommInitRank: returns once both ranks have joined

    def __init__(self, world, uid, rank):
        self.joined.wait(30)
        self.world, self.uid, self.rank, self.calls = world, uid, rank, []

    def allReduce(self, send, recv, count, kind, op, stream):
        self.calls.append(("allReduce", send, recv, count, kind, op, stream))

    def bcast(self, ptr, count, kind, root, stream):
        self.calls.append(("bcast", ptr, count, kind, root, stream))

    def destroy(self):
        self.calls.append(("destroy",))


@pytest.fixture
def fake_cupy(monkeypatch):
    events = []
    nccl = types.SimpleNamespace(get_unique_id=lambda: tuple(range(128)), NcclCommunicator=_Comm,
                                 groupStart=lambda: events.append("start"), groupEnd=lambda: events.append("end"))
    dev = types.SimpleNamespace(use=lambda: None)
    cuda = types.SimpleNamespace(nccl=nccl, Device=lambda i: dev)
    cupy = types.SimpleNamespace(cuda=cuda)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setitem(sys.modules, "cupy.cuda", cuda)
    monkeypatch.setitem(sys.modules, "cupy.cuda.nccl", nccl)
    return events


class _DeviceArray:
    def __init__(self, ptr, shape, typestr, strides=None):
        self.__cuda_array_interface__ = {"data": (ptr, False), "shape": shape, "typestr": typestr,
                                         "strides": strides, "version": 3}


def test_rendezvous_and_grouped_calls(fake_cupy, tmp_path):
    from numba import cuda
    if not cuda.is_available():
        pytest.skip("needs numba.cuda (the simulator will do)")
    from ternet.nccl import NcclCollective
    id_file = tmp_path / "nccl.id"
    got = {}
    waiter = threading.Thread(target=lambda: got.setdefault(1, NcclCollective(1, 2, str(id_file))))
    waiter.start()                                     # rank 1 waits for the file rank 0 writes
    rank0 = NcclCollective(0, 2, str(id_file))
    waiter.join(30)
    rank1 = got[1]
    assert rank0.comm.uid == rank1.comm.uid == tuple(range(128)) and rank1.comm.rank == 1
    assert not id_file.exists()                        # rank 0 removes it once the communicator is up
    a, b = _DeviceArray(1000, (2, 3), "<f4"), _DeviceArray(2000, (5,), "<f8")
    rank0.allreduce_sum([a, b])
    rank0.broadcast([_DeviceArray(3000, (4,), "|i1")], root=0)
    assert rank0.comm.calls == [("allReduce", 1000, 1000, 6, 7, 0, 0), ("allReduce", 2000, 2000, 5, 8, 0, 0),
                                ("bcast", 3000, 4, 0, 0, 0)]
    assert fake_cupy == ["start", "end", "start", "end"]
    with pytest.raises(ValueError, match="C-contiguous"):
        rank0.allreduce_sum([_DeviceArray(1000, (2, 3), "<f4", strides=(4, 8))])
    with pytest.raises(TypeError, match="device arrays"):
        rank0.allreduce_sum([np.zeros(3, np.float32)])
    rank0.close()
    assert rank0.comm is None


def test_missing_cupy_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    from ternet.nccl import NcclCollective
    with pytest.raises(RuntimeError, match="cupy"):
        NcclCollective(0, 2, "unused")
