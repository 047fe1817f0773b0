"""Compute kernels, one module per op family (conv, linear, batchnorm, activation, pool, loss,
elementwise, transitions, stats). Each module has the same sections, with banner comments:
CPU implementation (numpy + numba.njit), CUDA kernels (numba.cuda.jit, compiled lazily at the
first launch, so importing needs no GPU), and one launcher per op that checks shapes and dtypes,
picks the grid and dispatches on where its arrays live. Layers call launchers only.

CUDA conventions: every kernel runs on the default stream (launch order = execution order);
elementwise kernels are grid-stride loops launched with grid1d(n); reductions are deterministic
(fixed partition, fixed summation order, no floating-point atomics), so two runs with one seed
give the same bits. Under NUMBA_ENABLE_CUDASIM=1 the same kernels run in numba's simulator.
"""
import numpy as np

try:  # numba.cuda imports without a GPU; the simulator (NUMBA_ENABLE_CUDASIM=1) also works
    from numba import cuda
except ImportError:  # pragma: no cover - numba without its CUDA target
    cuda = None


_STREAM_THREADS = []     # set by configure_cpu_threads: threads for bandwidth-bound kernels


def configure_cpu_threads():
    """Threads for numba's parallel CPU kernels during training: TERNET_NUMBA_THREADS, default 1,
    and TERNET_STREAM_THREADS, default all numba threads (the cores), for the kernels launched
    through stream_threads().

    The GEMMs run on OpenBLAS's own threads; a second pool of numba workers on the same cores
    makes both wait for each other (LeNet step on 2 cores: 1,269 img/s with 2 numba threads,
    1,991 with 1, batch 100), and most kernels are too short to repay waking a sleeping worker.
    The streaming ones are not: im2col, col2im and max pooling move tens of MB at the bandwidth
    of one core. With them on two threads the LeNet step took 38.6 ms instead of 44.5 (batch
    100), 89 instead of 103 (batch 256), against 46 and 91 with two threads for every kernel
    (one process alternating the settings); max pooling added 2-4 ms, batch norm lost 2.
    """
    import os

    import numba
    top = numba.config.NUMBA_NUM_THREADS
    n = int(os.environ.get("TERNET_NUMBA_THREADS", "1"))
    numba.set_num_threads(max(1, min(n, top)))
    wide = int(os.environ.get("TERNET_STREAM_THREADS", str(top)))
    _STREAM_THREADS[:] = [max(1, min(wide, top))]


def stream_threads(kernel, *args):
    """kernel(*args) on the streaming threads (configure_cpu_threads), then back to the usual
    count; for numba kernels that move many MB (im2col, col2im, max pooling) and split their
    work by image, so the thread count changes no result. Unconfigured: a plain call."""
    if not _STREAM_THREADS:
        return kernel(*args)
    import numba
    n = numba.get_num_threads()
    numba.set_num_threads(_STREAM_THREADS[0])
    try:
        return kernel(*args)
    finally:
        numba.set_num_threads(n)


_DEVICE_TYPES = {}


def is_device_array(a):
    """A numba device array (or anything with __cuda_array_interface__; simulator arrays too).
    Decided once per class: asking an instance would build its interface dict on every call."""
    t = type(a)
    dev = _DEVICE_TYPES.get(t)
    if dev is None:
        dev = _DEVICE_TYPES[t] = (cuda is not None and not issubclass(t, np.ndarray)
                                  and (hasattr(t, "__cuda_array_interface__") or t.__name__ == "FakeCUDAArray"))
    return dev


def on_device(*arrays):
    """True when the arrays live on the GPU (all of them), False when all are host arrays."""
    flags = {is_device_array(a) for a in arrays if a is not None}
    if len(flags) > 1:
        raise TypeError("a launcher got a mix of host and device arrays; move them to one side first")
    return flags.pop() if flags else False


try:
    from numba import config as _config
    SIMULATOR = bool(_config.ENABLE_CUDASIM)
except ImportError:  # pragma: no cover
    SIMULATOR = False

# The simulator runs every CUDA thread as a Python thread and each block costs tens of
# milliseconds: there, blocks are small and grids at most two blocks wide (grid-stride loops do
# the rest), so tests on tiny shapes take seconds and still cross block, tile and loop edges.
THREADS = 64 if SIMULATOR else 256
MAX_BLOCKS = 2 if SIMULATOR else 132 * 32

if cuda is not None and not SIMULATOR:
    from numba.cuda import libdevice as _libdevice

    @cuda.jit(device=True, inline=True)
    def f32_bits(v):
        """The bits of float32 v as uint32 (a device function)."""
        return np.uint32(_libdevice.float_as_int(v))
elif cuda is not None:
    @cuda.jit(device=True)
    def f32_bits(v):
        """The bits of float32 v as uint32 (the simulator's: numpy, as libdevice has none there)."""
        return np.uint32(np.float32(v).view(np.uint32))


def grid1d(n, threads=THREADS, max_blocks=MAX_BLOCKS):
    """(blocks, threads) for a grid-stride loop over n elements."""
    return max(1, min(max_blocks, (n + threads - 1) // threads)), threads


def check(cond, msg):
    """Raise ValueError(msg) when a launcher's argument check fails."""
    if not cond:
        raise ValueError(msg)


_VIEWS = "_ternet_views"        # on a device array: {shape: view} of the views made of it
_LAUNCH_ATTR = "_ternet_launch"  # where kernels.launch keeps an array's launch description
_REAL = []                       # numba's DeviceNDArray class and dummyarray module, once imported


def view(a, *shape):
    """a.reshape(*shape) in C order, without a copy: the same array under another shape.

    A training step reshapes hundreds of device arrays, most of them a layer's weights and
    buffers that live across steps (docs/performance.md). So a device array keeps its views: the
    next call with the same shape returns the same view object (a dict lookup). A C-contiguous
    numba device array's view is built directly, with the planned launcher's description of it
    (`bench/bench_host.py` on the development machine: numba's reshape through its dummy-array
    machinery plus that description ~8 us of host time, a view built here ~5, a kept one ~0.5).
    Simulator arrays take their own reshape and keep it when it cannot be a copy (a C-contiguous
    array), so the tests run the same caching. Host arrays: numpy's reshape. A view refers to
    `a`'s memory, not to `a`, so the cache keeps nothing alive beyond `a` itself."""
    if len(shape) == 1 and isinstance(shape[0], tuple):
        shape = shape[0]
    if type(a) is np.ndarray or not is_device_array(a):
        return a.reshape(shape)
    cache = a.__dict__.get(_VIEWS)
    if cache is None:
        cache = a.__dict__[_VIEWS] = {}
    v = cache.get(shape)
    if v is None:
        v, keep = _make_view(a, shape)
        if keep and v is not a:        # (a in its own cache would be a reference cycle)
            cache[shape] = v
    return v


def c_strides(shape, itemsize):
    """Byte strides of a C-contiguous array of this shape."""
    strides, step = [], itemsize
    for d in reversed(shape):
        strides.append(step)
        step *= d
    return tuple(reversed(strides))


def flat(a):
    """a as one dimension (a view, see view): what elementwise kernels index."""
    return view(a, a.size)


def _make_view(a, shape):
    """(view, whether it may be kept)."""
    if SIMULATOR:
        return a.reshape(shape), a.is_c_contiguous()
    if not _REAL:
        from numba.cuda.cudadrv import devicearray, dummyarray
        _REAL[:] = [devicearray.DeviceNDArray, dummyarray]
    if type(a) is not _REAL[0]:
        return a.reshape(shape), False
    shape = tuple(int(d) for d in shape)
    if shape.count(-1) == 1 and a.size:
        known = 1
        for d in shape:
            known *= d if d != -1 else 1
        if known > 0 and a.size % known == 0:
            shape = tuple(a.size // known if d == -1 else d for d in shape)
    n = 1
    for d in shape:
        n *= d
    if (n != a.size or not a.size or min(shape, default=1) < 0 or 0 in a.strides
            or not a.flags["C_CONTIGUOUS"]):
        return a.reshape(shape), True  # numba's answer (a view, never a copy), or its error
    if shape == tuple(a.shape):
        return a, False
    itemsize = a.dtype.itemsize
    dummy = _REAL[1].Array.from_desc(0, shape, c_strides(shape, itemsize), itemsize)
    v = object.__new__(_REAL[0])       # what DeviceNDArray.__init__ sets, given gpu_data
    v.__dict__.update(ndim=len(shape), _dummy=dummy, shape=dummy.shape, strides=dummy.strides,
                      dtype=a.dtype, size=a.size, alloc_size=a.alloc_size, gpu_data=a.gpu_data, stream=0)
    d = a.__dict__.get(_LAUNCH_ATTR)          # the launcher's description, as launch.describe gives it
    head = d[1][:5] if d is not None else (0, 0, a.size, itemsize, a.device_ctypes_pointer.value or 0)
    v.__dict__[_LAUNCH_ATTR] = ((a.dtype, len(shape), "C"), head + dummy.shape + dummy.strides)
    return v, True


def empty(shape, dtype, device):
    """Uninitialised array on the host (device=False) or the GPU (device=True)."""
    if device:
        return cuda.device_array(shape, dtype=dtype)
    return np.empty(shape, dtype=dtype)


_WORKSPACE = {}


def workspace(owner, name, shape, dtype):
    """A host scratch array kept between calls for (owner, name, shape, dtype): for temporaries a
    launcher fills and consumes within one call (im2col matrices). Allocating tens of MB afresh
    each step costs page faults on every first touch (glibc returns large blocks to the OS)."""
    key = (id(owner), name, tuple(shape), np.dtype(dtype).str)
    a = _WORKSPACE.get(key)
    if a is None:
        a = _WORKSPACE[key] = np.empty(shape, dtype)
    return a


_SCRATCH = {}        # (name, shape, dtype) -> view of the name's buffer
_SCRATCH_BUF = {}    # (name, dtype) -> flat device buffer, as large as the largest request so far


def scratch(name, shape, dtype):
    """A device array for temporaries a launcher writes and reads within its own kernels (partial
    sums, per-row values), never for what it returns: a view of one flat buffer per (name, dtype),
    grown to the largest request, so memory stays at one buffer's worth however many layer shapes
    use it. Every kernel runs on the default stream, so the next call's writes queue behind this
    call's reads; reusing the buffer saves an allocation (tens of microseconds of host time) per use."""
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(int(d) for d in shape)
    dtype = np.dtype(dtype)
    key = (name, shape, dtype.str)
    a = _SCRATCH.get(key)
    if a is None:
        n = max(1, int(np.prod(shape)))
        buf = _SCRATCH_BUF.get((name, dtype.str))
        if buf is None or buf.size < n:
            buf = _SCRATCH_BUF[name, dtype.str] = cuda.device_array(n, dtype=dtype)
            for k in [k for k in _SCRATCH if k[0] == name and k[2] == dtype.str]:
                del _SCRATCH[k]      # views of the old buffer: it goes back to the allocator
        a = _SCRATCH[key] = buf[:n].reshape(shape)
    return a


_CONSTANTS = {}      # key -> small device array of values fixed by the key (geometries, tables)


def device_constant(key, make):
    """A small device array made once per key from make()'s host array: a host-to-device copy
    inside the step would make the host wait for every queued kernel, and a captured step cannot
    make one. key names what the values depend on (it must say which table it is)."""
    if key not in _CONSTANTS:
        _CONSTANTS[key] = cuda.to_device(make())
    return _CONSTANTS[key]


def release_scratch():
    """Let every scratch buffer go back to the allocator (the next use makes one again, sized to
    its own requests): bench/bench_gpu.py does this between configurations in one process, whose
    peaks would otherwise count the buffers a larger earlier one left."""
    _SCRATCH.clear()
    _SCRATCH_BUF.clear()


def fresh(role, shape, dtype):
    """A new device array on every call: the allocator a launcher's `buffers` argument defaults to."""
    return cuda.device_array(shape, dtype=dtype)


class StepBuffers:
    """Device arrays one layer keeps from one training step to the next: one per role, allocated
    again only when the role's shape or dtype changes. Called like `fresh`: (role, shape, dtype).

    For arrays a layer saves for its own backward whose size does not grow with the batch
    (per-channel statistics, copies of gamma and beta, 1-element placeholders): each kept array
    saves an allocation per step (~28 us of host time on the GPU) and the launch description
    cached on it, at no cost in peak memory. Safe because a layer asks for a role once per train
    forward and reads it in the backward that follows, before its next train forward (with
    --grad-shards too: each shard's backward runs before the next shard's forward), and every
    kernel runs on the default stream, so the next write queues behind the last read. Not for
    outputs read by other layers or returned to a caller, nor for eval batches; and not for
    per-element records (xhat, int16 inputs, window bits, max-pool indices): the backward frees
    those layer by layer, and kept they would stay held through it and raise the step's peak
    (bench/host_counts.py at batch 512: with xhat kept resnet18-64's peak goes 516 -> 625 MB;
    with the window bits and pool indices kept vgg-gxnor's goes 1,008 -> 1,048 MB).
    """

    def __init__(self):
        self.arrays = {}

    def __call__(self, role, shape, dtype):
        shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(int(d) for d in shape)
        a = self.arrays.get(role)
        if a is None or tuple(a.shape) != shape or a.dtype != np.dtype(dtype):
            a = self.arrays[role] = cuda.device_array(shape, dtype=dtype)
        return a


def to_host(a, copy=False):
    """A numpy array holding a: a device array's copy_to_host(); a host array itself, or with
    copy=True a copy of it (for snapshots that must not change with the live array)."""
    if isinstance(a, np.ndarray):
        return np.array(a) if copy else a
    return a.copy_to_host()


def zeros(shape, dtype, device):
    """Zero-filled array on the host or the GPU."""
    if device:
        from .elementwise import fill
        a = cuda.device_array(shape, dtype=dtype)
        fill(a, 0)
        return a
    return np.zeros(shape, dtype=dtype)
