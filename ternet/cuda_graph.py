"""A training step captured once as a CUDA graph and replayed: one launch per step from the host.

At small batches the host's part of a GPU step (hundreds of kernel launches and allocations,
issued from Python) costs as much as the GPU's work or more: a vgg-gxnor step at batch 128 takes
7-10 ms of host time against 7.7 ms on the GPU, resnet18 at 64 px 19-20 against ~18
(docs/performance.md). `StepGraph` records the step's launches once (stream capture) and then
replays them with one `cuGraphLaunch`. What makes a replay the step it stands for:

* Every launch in the step is a planned launch (ternet.kernels.launch): during the capture they
  go to a capture stream of their own; a launch that would take numba's path, and every copy
  between host and device, raises instead (those would run once, outside the graph).
* Per-step values are not launch arguments (a graph freezes those): the kernels read them from a
  small device array (`hp`) that the caller refills before each replay with one launch
  (kernels.elementwise.put_scalars), and DST its transition keys from an array made on the device
  (kernels.transitions.step_keys); samplers that can do this say so (Sampler.GRAPH).
* The batch is copied into fixed input buffers before each replay (device to device, queued).
* The memory the graph uses stays the graph's: allocations during the capture come from a pool
  of their own (cuda_memory.Pool), whose blocks are reused within the step in stream order, as
  usual, and never handed to other work; arrays allocated before the capture that the captured
  kernels touch (weights, kept buffers) are held alive by the graph.

Replays run on the legacy default stream, so they are ordered with everything else ternet queues
(evaluation, checkpoint reads): the same kernels in the same order as the eager step, hence the
same bits (tests/test_gpu_full.py). GPU only; the simulator cannot capture.
Exercise: pytest -m gpu tests/test_gpu_full.py -k graph; bench/bench_graph.py.
"""
import bisect
import contextlib
import os

from . import cuda_memory
from .kernels import launch


# The capture places its allocations by a layout planned from the last warm-up step
# (cuda_memory.plan: about the step's peak of live bytes, where the pool's free lists of exact
# sizes reserve about twice that: bench/host_counts.py --pool; on the H200 with --save-memory 1.28
# -> 0.70, 0.72 -> 0.25, 4.31 -> 1.49 GiB for vgg-gxnor, resnet18 64 px and 224 px, at the same
# speed, fifteenth session). TERNET_GRAPH_POOL=exact: the free lists only, as before.
PLANNED = os.environ.get("TERNET_GRAPH_POOL", "planned") == "planned"


class CaptureError(RuntimeError):
    """The step could not be captured (the message says what in it stands in the way)."""


def _ok(res, what):
    """cuda-python's (err, *values) -> values; CaptureError on an error code."""
    from cuda.bindings import driver as drv
    err, *vals = res
    if err != drv.CUresult.CUDA_SUCCESS:
        raise CaptureError(f"{what} failed: {err!r}")
    return vals[0] if len(vals) == 1 else vals


_STREAM = []


def _capture_stream():
    """A non-blocking stream for captures (the legacy default stream cannot be captured)."""
    if not _STREAM:
        from cuda.bindings import driver as drv
        from numba import cuda
        cuda.current_context()
        _STREAM.append(_ok(drv.cuStreamCreate(drv.CUstream_flags.CU_STREAM_NON_BLOCKING.value),
                           "cuStreamCreate"))
    return _STREAM[0]


@contextlib.contextmanager
def _no_copies():
    """numba's host<->device copies and memsets raise while a capture runs: they would run on the
    legacy stream at capture time, once, instead of in every replay."""
    from numba.cuda.cudadrv import driver
    names = ("host_to_device", "device_to_host", "device_to_device", "device_memset")
    saved = {n: getattr(driver, n) for n in names}

    def refuse(name):
        def f(*args, **kwargs):
            raise CaptureError(f"a {name.replace('_', '-')} copy inside the captured step; the step must only "
                               "launch kernels (see ternet.cuda_graph)")
        return f
    for n in names:
        setattr(driver, n, refuse(n))
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(driver, n, f)


class Graph:
    """fn() captured once; launch() replays it on the default stream. layout: where the capture's
    allocations go (cuda_memory.plan of a recorded step), or None for the pool's free lists."""

    def __init__(self, fn, layout=None):
        from cuda.bindings import driver as drv
        if not cuda_memory.active():
            # without it the capture's temporaries come from cuMemAlloc and go back with cuMemFree
            # after the capture, while the graph's kernels keep their addresses
            raise CaptureError("the caching allocator is not in effect in this CUDA context (call "
                               "ternet.cuda_memory.install() before capturing)")
        self.pool = cuda_memory.Pool(layout)
        self.held, self._starts = [], None
        stream = _capture_stream()
        mode = drv.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_RELAXED
        with _no_copies(), cuda_memory.use_pool(self.pool), launch.capturing(stream, self):
            _ok(drv.cuStreamBeginCapture(stream, mode), "cuStreamBeginCapture")
            try:
                fn()
            except BaseException:
                res = drv.cuStreamEndCapture(stream)
                if res[0] == drv.CUresult.CUDA_SUCCESS and res[1] is not None:
                    drv.cuGraphDestroy(res[1])
                raise
            graph = _ok(drv.cuStreamEndCapture(stream), "cuStreamEndCapture")
        try:
            self.exec = _ok(drv.cuGraphInstantiate(graph, 0), "cuGraphInstantiate")
        finally:
            drv.cuGraphDestroy(graph)
        self._default = drv.CUstream(0)

    def hold(self, args):
        """Keep alive the arrays a captured launch passes that did not come from the pool."""
        if self._starts is None or len(self._starts) != len(self.pool.spans):
            self._spans = sorted(self.pool.spans)
            self._starts = [s for s, _ in self._spans]
        for a in args:
            d = launch.describe(a) if hasattr(a, "__dict__") else None
            if d is None:
                continue
            ptr = d[1][4]
            i = bisect.bisect_right(self._starts, ptr) - 1
            if not (i >= 0 and ptr < self._spans[i][0] + self._spans[i][1]):
                self.held.append(a)

    def launch(self):
        from cuda.bindings import driver as drv
        _ok((drv.cuGraphLaunch(self.exec, self._default)[0],), "cuGraphLaunch")


class StepGraph:
    """A training step replayed from a graph for batches of one shape.

    step(x, y): the eager step on device arrays x, y (it must read its per-step values from
    device memory the caller refreshes before each call). The first `warmup` calls with the
    graph's batch shape run eagerly on the fixed input buffers (they compile kernels and plan
    launches), the next captures the step and replays it, every later one replays it. Two
    warm-up steps by default: a launch signature is planned at its first launch and proven at its
    second (kernels/launch.py), and only proven plans may be captured, so a kernel the step
    launches once (a first layer's convolution) needs two eager steps. Batches of
    another shape (a short last batch) run eagerly. A capture that fails warns once and leaves
    every later step eager: the run goes on, only slower."""

    def __init__(self, step, rows, warmup=2):
        self.step, self.rows, self.warmup = step, rows, warmup
        self.x = self.y = self.graph = self.layout = None
        self.calls = 0
        self.failed = None      # why the capture failed, if it did

    def status(self):
        """'replayed', 'eager: <why the capture failed>' or 'warming up' (for the run's records)."""
        return ("replayed" if self.graph is not None else f"eager: {self.failed}" if self.failed is not None
                else "warming up")

    def __call__(self, x, y):
        if self.failed is not None or len(y) != self.rows:
            return self.step(x, y)
        if self.x is None:
            from numba import cuda
            self.x = cuda.device_array(x.shape, x.dtype)
            self.y = cuda.device_array(y.shape, y.dtype)
        self.x.copy_to_device(x)         # device to device, queued on the default stream
        self.y.copy_to_device(y)
        self.calls += 1
        if self.calls <= self.warmup:
            if self.calls < self.warmup or not PLANNED:
                return self.step(self.x, self.y)
            with cuda_memory.record() as rec:      # the step the capture will repeat
                out = self.step(self.x, self.y)
            self.layout = cuda_memory.plan(rec.events)
            return out
        if self.graph is None:
            try:
                self.graph = Graph(lambda: self.step(self.x, self.y), self.layout)
            except Exception as e:     # noqa: BLE001 - whatever stopped it, the eager step is correct
                import warnings
                self.failed = str(e)
                warnings.warn(f"--cuda-graph: the training step could not be captured ({e}); every step runs "
                              "eagerly instead (same results, more host time)")
                return self.step(self.x, self.y)
        self.graph.launch()
