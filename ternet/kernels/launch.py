"""Kernel launches without numba's per-call Python work.

`kernel[grid, block](*args)` in numba-cuda types every argument to pick the compiled overload,
builds a launch configuration object and marshals each argument into ctypes values, every call:
tens to a hundred microseconds of Python per launch. A training step launches a few hundred
kernels, so at the batch sizes people train with the GPU waits for the host (docs/performance.md,
"Trainer loop"). `install()` replaces `CUDADispatcher.__getitem__` with a launcher that does the
same work once per *plan* and then only packs numbers:

* each argument is described once per object: a device array by its numba type key (dtype, ndim,
  layout) and its flattened kernel ABI (meminfo, parent, nitems, itemsize, data, shape, strides),
  cached on the array; a scalar by its Python or numpy type;
* a plan, keyed by (kernel, argument type keys), holds the compiled kernel's handle and a packer
  of its flattened parameters into one 8-byte slot each, with the pointer array cuLaunchKernel
  reads them through;
* the launcher object of `kernel[grid, block]` is kept per (kernel, grid, block): a training
  step repeats the same few hundred launches (building one with its grid and block tuples takes
  2-3 us of host time, `bench/bench_host.py`);
* the first launch of a plan goes through numba unchanged (it compiles the kernel when needed),
  and the plan is kept only if numba's own marshalling of those arguments gives the same values
  (`_Plan.verify`). Anything else (explicit streams or shared memory, records, booleans, host
  arrays, debug or cooperative kernels, argument extensions) stays on numba's path.

The launch order, the stream (the legacy default stream, as numba's) and the kernels are the same,
so results are bit-identical with and without it. TERNET_FAST_LAUNCH=0 turns it off; under the
simulator it is never installed (its kernels are Python functions, not CUfunctions).
Exercise: tests/test_launch.py (the packer, on the CPU), tests/test_gpu_full.py (on a GPU: every
kernel of a training step with and without it, bit for bit), bench/bench_gpu.py --launch both.
"""
import ctypes
import os
import struct
import threading

import numpy as np

from . import _LAUNCH_ATTR

SLOT = 8                    # every flattened parameter gets one 8-byte slot in the buffer
_CODES = {"int64": "q", "uint64": "Q", "int32": "i", "uint32": "I", "int16": "h", "uint16": "H",
          "int8": "b", "uint8": "B", "float32": "f", "float64": "d"}
_SCALARS = {int, float, np.int64, np.int32, np.uint64, np.uint32, np.int16, np.uint16, np.int8,
            np.uint8, np.float32, np.float64}
_ATTR = _LAUNCH_ATTR        # where an array keeps its description (kernels.view writes it too)

_state = {"installed": False, "original": None}
_PLANS = {}
_tls = threading.local()
_capturing = None           # the ternet.cuda_graph.Graph being captured on this process, if any


def param_codes(argument_types):
    """struct codes of a kernel's flattened parameters, from numba's argument types; None when a
    type is not one the fast path packs (numba's own path handles those)."""
    from numba.core import types
    codes = []
    for ty in argument_types:
        if isinstance(ty, types.Array):
            codes += ["q", "q", "q", "q", "Q"] + ["q"] * (2 * ty.ndim)
        elif isinstance(ty, types.CPointer):
            codes.append("Q")
        elif isinstance(ty, (types.Integer, types.Float)) and str(ty) in _CODES:
            codes.append(_CODES[str(ty)])
        else:
            return None
    return codes


def slot_struct(codes):
    """A little-endian struct that puts parameter i at byte 8 * i (padding after short ones)."""
    return struct.Struct("<" + "".join(c + "x" * (SLOT - struct.calcsize("<" + c)) for c in codes))


def describe(a):
    """(type key, flattened ABI values) of a numba device array, cached on the array; None for
    anything else. The layout follows DeviceNDArray._numba_type_ (C, then F, else A; broadcast
    arrays are A), so the key names exactly one numba array type."""
    d = a.__dict__.get(_ATTR)
    if d is not None:
        return d
    from numba.cuda.cudadrv.devicearray import DeviceNDArray
    if type(a) is not DeviceNDArray:
        return None
    broadcast = 0 in a.strides and a.size != 0
    flags = a.flags
    layout = "C" if flags["C_CONTIGUOUS"] and not broadcast else \
        "F" if flags["F_CONTIGUOUS"] and not broadcast else "A"
    ptr = a.device_ctypes_pointer.value or 0
    d = ((a.dtype, a.ndim, layout), (0, 0, a.size, a.dtype.itemsize, ptr) + tuple(a.shape) + tuple(a.strides))
    a.__dict__[_ATTR] = d
    return d


def flatten(args):
    """(type keys, flattened values) of a launch's arguments; None if one is not fast-path material."""
    keys, vals = [], []
    for a in args:
        t = type(a)
        if t in _SCALARS:
            keys.append(t)
            vals.append(a)
            continue
        d = describe(a) if hasattr(a, "__dict__") else None
        if d is None:
            return None
        keys.append(d[0])
        vals.extend(d[1])
    return tuple(keys), vals


class _Plan:
    """One compiled kernel with one argument signature: its handle, packer and parameter buffer."""

    def __init__(self, handle, codes, name):
        self.handle, self.name = handle, name
        self.st = slot_struct(codes)
        self.buf = ctypes.create_string_buffer(max(SLOT, self.st.size))
        base = ctypes.addressof(self.buf)
        self.ptrs = (ctypes.c_void_p * max(1, len(codes)))(*[base + SLOT * i for i in range(len(codes))])
        self.addr = ctypes.addressof(self.ptrs)
        self.lock = threading.Lock()
        self.proven = False

    @staticmethod
    def verify(kernel, args, vals):
        """True when numba's marshalling of args gives exactly our flattened values."""
        ref = []
        for ty, v in zip(kernel.argument_types, args):
            kernel._prepare_args(ty, v, 0, [], ref)
        ref = [getattr(r, "value", r) for r in ref]
        return len(ref) == len(vals) and all(r == v or (r is None and v == 0) for r, v in zip(ref, vals))

    def launch(self, grid, block, vals):
        from cuda.bindings import driver as drv
        with self.lock:            # one buffer per plan: the driver copies it before returning
            self.st.pack_into(self.buf, 0, *vals)
            err, = drv.cuLaunchKernel(self.handle, grid[0], grid[1], grid[2], block[0], block[1], block[2],
                                      0, _stream0(), self.addr, 0)
        if err != drv.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"cuLaunchKernel({self.name}, grid {grid}, block {block}) failed: {err!r}")


def _stream0():
    s = getattr(_tls, "stream", None)
    if s is None:              # first fast launch on this thread: make numba's context current here
        from numba import cuda
        from cuda.bindings import driver as drv
        cuda.current_context()
        s = _tls.stream = drv.CUstream(0)
    return s


def _dims(d):
    d = (d,) if isinstance(d, (int, np.integer)) else tuple(d)
    return tuple(int(x) for x in d) + (1,) * (3 - len(d))


def _make_plan(dispatcher, args, vals):
    """The plan for this launch's signature (after numba launched it), or False to keep numba's path."""
    try:
        if dispatcher.targetoptions.get("extensions") or dispatcher.targetoptions.get("debug"):
            return False
        if dispatcher.specialized:
            kernel = next(iter(dispatcher.overloads.values()))
        else:
            kernel = dispatcher.overloads[tuple(dispatcher.typeof_pyval(a) for a in args)]
        if kernel.debug or kernel.cooperative or kernel.extensions:
            return False
        codes = param_codes(kernel.argument_types)
        if codes is None or len(codes) != len(vals) or not _Plan.verify(kernel, args, vals):
            return False
        cufunc = kernel._codelibrary.get_cufunc()
        return _Plan(cufunc.handle, codes, cufunc.name)
    except Exception:          # an unfamiliar numba internals layout: stay on numba's path
        return False


class _Launch:
    __slots__ = ("dispatcher", "grid", "block", "cfg")

    def __init__(self, dispatcher, cfg):
        self.dispatcher, self.cfg = dispatcher, cfg
        self.grid, self.block = _dims(cfg[0]), _dims(cfg[1])

    def __call__(self, *args):
        flat = flatten(args)
        if _capturing is not None:
            return self._captured(args, flat)
        if flat is not None:
            keys, vals = flat
            plan = _PLANS.get((self.dispatcher, keys))
            if plan:
                if plan.proven:
                    return plan.launch(self.grid, self.block, vals)
                try:               # a plan's first launch: if the driver call itself is refused,
                    plan.launch(self.grid, self.block, vals)   # nothing ran; use numba's path from now on
                    plan.proven = True
                    return None
                except Exception:
                    _PLANS[(self.dispatcher, keys)] = False
            if plan is None:       # first launch of this signature: numba's way, then plan it
                _state["original"](self.dispatcher, self.cfg)(*args)
                _PLANS[(self.dispatcher, keys)] = _make_plan(self.dispatcher, args, vals)
                return None
        return _state["original"](self.dispatcher, self.cfg)(*args)

    def _captured(self, args, flat):
        """A launch while a CUDA graph is captured: only a proven plan may run (it launches on the
        capture stream, _stream0); numba's own path would launch on the legacy default stream,
        outside the graph, so it is refused. The graph keeps the arrays it reads alive."""
        plan = _PLANS.get((self.dispatcher, flat[0])) if flat is not None else None
        if not (plan and plan.proven):
            raise RuntimeError(f"kernel {getattr(self.dispatcher, '__name__', self.dispatcher)} has no proven "
                               "planned launch for these arguments; it cannot be captured into a CUDA graph")
        _capturing.hold(args)
        return plan.launch(self.grid, self.block, flat[1])


class capturing:
    """with capturing(stream, graph): planned launches go to `stream` (a CUstream being captured)
    and report their arguments to graph.hold(args); any other launch raises."""

    def __init__(self, stream, graph):
        self.stream, self.graph = stream, graph

    def __enter__(self):
        global _capturing
        if _capturing is not None:
            raise RuntimeError("a CUDA graph is already being captured")
        _stream0()
        self.saved, _tls.stream, _capturing = _tls.stream, self.stream, self.graph

    def __exit__(self, *exc):
        global _capturing
        _tls.stream, _capturing = self.saved, None


_LAUNCHES = {}      # (dispatcher, launch configuration) -> _Launch: a step repeats the same few hundred


def _getitem(self, cfg):
    if len(cfg) != 2:
        return _state["original"](self, cfg)
    try:
        return _LAUNCHES[self, cfg]
    except KeyError:
        pass
    except TypeError:          # an unhashable configuration (lists): build it each time
        return _Launch(self, cfg)
    if len(_LAUNCHES) >= 1 << 14:
        _LAUNCHES.clear()
    launch = _LAUNCHES[self, cfg] = _Launch(self, cfg)
    return launch


def install():
    """Route `kernel[grid, block](...)` through the planned launcher (idempotent). Returns whether
    it is active: not under the simulator, and not with TERNET_FAST_LAUNCH=0 or numba's
    per-thread default stream (the plans launch on the legacy default stream)."""
    if _state["installed"]:
        return True
    from numba import config
    if config.ENABLE_CUDASIM or os.environ.get("TERNET_FAST_LAUNCH", "1") == "0":
        return False
    from numba.cuda import dispatcher as nd
    if getattr(config, "CUDA_PER_THREAD_DEFAULT_STREAM", False):
        return False
    _state["original"] = nd.CUDADispatcher.__getitem__
    nd.CUDADispatcher.__getitem__ = _getitem
    _state["installed"] = True
    return True


def uninstall():
    """numba's own launches again (benchmarks compare both in one process)."""
    if _state["installed"]:
        from numba.cuda import dispatcher as nd
        nd.CUDADispatcher.__getitem__ = _state["original"]
        _state["installed"] = False
        _PLANS.clear()
        _LAUNCHES.clear()


def stats():
    """How many signatures run planned and how many stay on numba's path (for the benchmarks)."""
    return {"planned": sum(1 for p in _PLANS.values() if p), "numba": sum(1 for p in _PLANS.values() if not p)}
