"""The CUDA-graph step (ternet/cuda_graph.py) without a GPU: what StepGraph runs eagerly, captures
and replays; which arrays a graph holds; the launcher and the driver copies during a capture.
A real capture and its replays against the eager step, bit for bit, need a GPU:
tests/test_gpu_full.py::test_cuda_graph_replays_train_as_the_eager_steps."""
import warnings

import numpy as np
import pytest

from ternet import cuda_graph, cuda_memory
from ternet.kernels import _LAUNCH_ATTR, SIMULATOR, launch


class _Described:
    """Stands in for a device array: the launcher's description of it is all hold() reads."""

    def __init__(self, ptr, n=16):
        self.__dict__[_LAUNCH_ATTR] = ((np.dtype(np.float32), 1, "C"), (0, 0, n, 4, ptr, n, 4))


def test_a_graph_holds_the_arrays_from_outside_its_pool():
    """Arrays whose memory lies in a block of the graph's pool stay the pool's (they may be freed
    and reused within the step); any other array a captured launch passes is kept alive."""
    g = object.__new__(cuda_graph.Graph)
    g.pool, g.held, g._starts = cuda_memory.Pool(), [], None
    g.pool.spans += [(0x1000, 0x200), (0x4000, 0x1000)]
    inside = [_Described(0x1000), _Described(0x11FC), _Described(0x4800)]
    outside = [_Described(0x1200), _Described(0x3FFF), _Described(0x5000), _Described(0x10)]
    g.hold([*inside, *outside, 3, np.float32(1.0)])
    assert g.held == outside
    g.pool.spans.append((0x5000, 0x100))      # a block the pool allocates later in the capture
    g.hold([_Described(0x5010)])
    assert g.held == outside


class _Dispatcher:
    __name__ = "_some_kernel"


def test_during_a_capture_only_proven_plans_launch(monkeypatch):
    held, launched = [], []

    class Graph:
        def hold(self, args):
            held.append(args)

    class Plan:
        proven = True

        def launch(self, grid, block, vals):
            launched.append((grid, block, vals))

    monkeypatch.setattr(launch, "_capturing", Graph())
    d = _Dispatcher()
    a = _Described(0x2000, n=8)
    with pytest.raises(RuntimeError, match="_some_kernel has no proven planned launch"):
        launch._Launch(d, (4, 32))(a, 2)
    keys, vals = launch.flatten((a, 2))
    monkeypatch.setitem(launch._PLANS, (d, keys), Plan())
    launch._Launch(d, (4, 32))(a, 2)
    assert held == [(a, 2)] and launched == [((4, 1, 1), (32, 1, 1), vals)]
    monkeypatch.setitem(launch._PLANS, (d, keys), False)        # a signature left on numba's path
    with pytest.raises(RuntimeError, match="cannot be captured"):
        launch._Launch(d, (4, 32))(a, 2)


def test_driver_copies_refuse_to_run_during_a_capture():
    from numba.cuda.cudadrv import driver
    before = driver.host_to_device
    with cuda_graph._no_copies():
        for name in ("host_to_device", "device_to_host", "device_to_device", "device_memset"):
            with pytest.raises(cuda_graph.CaptureError, match="inside the captured step"):
                getattr(driver, name)(None, None, 0)
    assert driver.host_to_device is before


def test_pool_switch_sets_and_restores_every_manager():
    class Manager:
        pool = None
    managers = [Manager(), Manager()]
    saved = cuda_memory.STATS[:]
    cuda_memory.STATS[:] = managers
    try:
        pool = cuda_memory.Pool()
        with cuda_memory.use_pool(pool):
            assert all(m.pool is pool for m in managers)
        assert all(m.pool is None for m in managers)
    finally:
        cuda_memory.STATS[:] = saved


# -- StepGraph's course over a run, with a stand-in for the capture (the simulator's arrays) -------

cuda_only = pytest.mark.skipif(not SIMULATOR, reason="device arrays without a GPU: the simulator (NUMBA_ENABLE_CUDASIM=1)")


@cuda_only
def test_step_graph_warms_up_captures_once_replays_and_runs_odd_batches_eagerly(monkeypatch):
    from numba import cuda
    calls, made = [], []

    class FakeGraph:
        """Records the step once; launch() runs it again, as a replay would."""

        def __init__(self, fn, layout=None):
            made.append(self)
            self.fn, self.layout = fn, layout

        def launch(self):
            self.fn()

    monkeypatch.setattr(cuda_graph, "Graph", FakeGraph)

    def step(x, y):
        calls.append((x, y, x.copy_to_host().copy()))

    sg = cuda_graph.StepGraph(step, rows=4, warmup=1)
    batches = [cuda.to_device(np.full((4, 2), i, np.float32)) for i in range(4)]
    ys = cuda.to_device(np.zeros(4, np.int32))
    for x in batches[:3]:
        sg(x, ys)
    short = cuda.to_device(np.full((3, 2), 9, np.float32))
    sg(short, ys[:3])
    sg(batches[3], ys)
    assert len(made) == 1 and sg.calls == 4 and sg.failed is None and sg.status() == "replayed"
    # warm-up eager on the fixed buffer, capture + first replay, two more replays around the short
    # batch, which ran eagerly on its own arrays
    assert [c[0] is sg.x for c in calls] == [True, True, True, False, True]
    assert calls[3][0] is short
    np.testing.assert_array_equal([c[2][0, 0] for c in calls], [0, 1, 2, 9, 3])


@cuda_only
def test_a_failed_capture_warns_once_and_the_run_goes_on_eagerly(monkeypatch):
    from numba import cuda

    def refuse(fn, layout=None):
        raise cuda_graph.CaptureError("cuStreamBeginCapture failed: test")

    monkeypatch.setattr(cuda_graph, "Graph", refuse)
    ran = []
    sg = cuda_graph.StepGraph(lambda x, y: ran.append(x), rows=2, warmup=1)
    x, y = cuda.to_device(np.zeros((2, 1), np.float32)), cuda.to_device(np.zeros(2, np.int32))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for _ in range(4):
            sg(x, y)
    assert len(ran) == 4 and "cuStreamBeginCapture failed" in sg.failed
    assert sg.status().startswith("eager: cuStreamBeginCapture failed")
    assert sum("--cuda-graph" in str(m.message) for m in w) == 1
    assert ran[0] is sg.x and all(r is x for r in ran[2:])   # after the failure: the loader's own arrays


def test_linked_kernels_addresses_are_held_by_a_capture(monkeypatch):
    """The tensor-core kernels take raw device addresses; during a capture conv_tc._ptr hands each
    array to the graph (Graph.hold), as planned launches do with array arguments, so nothing the
    graph's kernels address is freed under it."""
    from ternet.kernels import conv_tc, launch
    held = []

    class Capture:
        def hold(self, args):
            held.extend(args)

    class Arr:
        __cuda_array_interface__ = {"data": (4096, False)}

    a = Arr()
    assert conv_tc._ptr(a) == 4096 and held == []
    monkeypatch.setattr(launch, "_capturing", Capture())
    assert conv_tc._ptr(a) == 4096 and held == [a]
