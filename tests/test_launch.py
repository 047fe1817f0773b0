"""The planned kernel launcher (ternet/kernels/launch.py) on the CPU: argument descriptions against
numba's own typing and marshalling, and the parameter packer. Launches themselves need a GPU
(tests/test_gpu_full.py::test_planned_launches_give_the_same_bits)."""
import ctypes
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from ternet.kernels import launch

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
# numba's real CUDA classes (not the simulator's) are needed, but no GPU: under the simulator
# this module runs again in a subprocess with it off (test_against_real_numba)
real_numba = pytest.mark.skipif(SIMULATOR, reason="run by test_against_real_numba in a subprocess")


@pytest.mark.skipif(not SIMULATOR, reason="numba's real CUDA classes are loaded in this process")
def test_against_real_numba():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "failed" not in r.stdout


class _Mem:
    """Stands in for a device allocation: numba's array code only asks for its address."""
    device_ctypes_pointer = ctypes.c_size_t(0x7F00_0000_1000)


def _array(shape, strides, dtype=np.float32):
    from numba.cuda.cudadrv.devicearray import DeviceNDArray
    return DeviceNDArray(shape, strides, dtype, gpu_data=_Mem())


ARRAYS = [((4, 3), (12, 4), np.float32), ((4, 3), (4, 16), np.float32), ((4, 3), (0, 4), np.float32),
          ((5,), (2,), np.int16), ((2, 3, 4), (96, 8, 48), np.int8), ((2, 2), (8, 4), np.int32)]


@real_numba
@pytest.mark.parametrize("shape,strides,dtype", ARRAYS)
def test_array_keys_name_numbas_type(shape, strides, dtype):
    from numba.core import types
    from numba.np import numpy_support
    a = _array(shape, strides, dtype)
    (dt, ndim, layout), _ = launch.describe(a)
    assert types.Array(numpy_support.from_dtype(dt), ndim, layout) == a._numba_type_


class _Kernel:
    """The two attributes of numba's compiled kernel that its marshalling reads."""
    extensions = []

    def __init__(self, argument_types):
        self.argument_types = argument_types

    def _prepare_args(self, *a):
        from numba.cuda.dispatcher import _Kernel as K
        return K._prepare_args(self, *a)


@real_numba
def test_flattened_values_are_numbas_marshalling():
    from numba.core import types
    a, b = _array((4, 3), (4, 16)), _array((6,), (1,), np.int8)
    args = (a, 7, np.float32(0.1), b, np.int32(-3), 2.5)
    keys, vals = launch.flatten(args)
    tys = [a._numba_type_, types.int64, types.float32, b._numba_type_, types.int32, types.float64]
    kern = _Kernel(tys)
    assert launch._Plan.verify(kern, args, vals)
    assert not launch._Plan.verify(kern, args, vals[:-1] + [2.0])       # a value numba would pass differently
    codes = launch.param_codes(tys)
    assert len(codes) == len(vals)


def test_packer_puts_each_parameter_in_its_own_slot():
    codes = ["q", "Q", "i", "f", "d", "h", "B", "b", "H", "I"]
    vals = [-5, 2 ** 63 + 9, -7, 0.25, -1.5, -300, 200, -100, 65000, 4_000_000_000]
    st = launch.slot_struct(codes)
    assert st.size == launch.SLOT * len(codes)
    buf = st.pack(*vals)
    for i, (c, v) in enumerate(zip(codes, vals)):
        assert struct.unpack_from("<" + c, buf, launch.SLOT * i)[0] == v


@real_numba
def test_what_stays_on_numbas_path():
    from numba.core import types
    assert launch.flatten((np.zeros(3, np.float32),)) is None        # host arrays: numba copies them
    assert launch.flatten((True,)) is None                           # booleans
    assert launch.flatten(((1, 2),)) is None                         # tuples
    assert launch.param_codes([types.boolean]) is None
    assert launch.param_codes([types.complex64]) is None


def test_not_installed_under_the_simulator():
    from numba import config
    if not config.ENABLE_CUDASIM:
        pytest.skip("a real CUDA driver: the GPU tests cover the installed launcher")
    assert launch.install() is False          # the simulator's kernels are Python, not CUfunctions
    assert launch.stats() == {"planned": 0, "numba": 0}


# kernels.view: the launchers' reshape of device arrays, built directly and kept on the array

def _c_array(shape, dtype=np.float32):
    from ternet.kernels import c_strides
    return _array(shape, c_strides(shape, np.dtype(dtype).itemsize), dtype)


RESHAPES = [((8, 4, 4, 3), (128, 3)), ((8, 4, 4, 3), (-1, 3)), ((8, 4, 4, 3), (384,)), ((384,), (8, 1, 1, 48)),
            ((6, 5), (1, 30)), ((6, 5), (30, 1)), ((1, 7), (7,)), ((12,), (2, -1, 3)), ((2, 3), (2, 3))]


@real_numba
@pytest.mark.parametrize("described", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.int8])
@pytest.mark.parametrize("base,shape", RESHAPES)
def test_view_is_numbas_reshape(base, shape, dtype, described):
    from ternet.kernels import view
    a = _c_array(base, dtype)
    if described:                       # a launch saw `a` first: the view inherits its description
        launch.describe(a)
    v, ref = view(a, *shape), a.reshape(*shape)
    assert type(v) is type(ref) and v.gpu_data is a.gpu_data
    assert (v.shape, v.strides, v.dtype, v.size, v.alloc_size, v.stream) == \
           (ref.shape, ref.strides, ref.dtype, ref.size, ref.alloc_size, ref.stream)
    assert vars(v._dummy) == vars(ref._dummy) and v.flags == ref.flags
    assert v._numba_type_ == ref._numba_type_
    assert launch.describe(v) == launch.describe(ref)
    assert view(a, *shape) is v and view(a, shape) is v      # kept on a, either spelling


@real_numba
def test_view_keeps_no_cycle_and_defers_to_numba():
    import weakref

    from ternet.kernels import view
    a = _c_array((4, 6))
    assert view(a, 4, 6) is a                                # its own shape: a itself, not cached
    v = view(a, 24)
    probe = weakref.ref(a)
    del a                                                    # freed by its reference count at once
    assert probe() is None and v.shape == (24,)
    for strides in [(4, 16), (24, 4)]:                       # not C-contiguous: numba's reshape decides
        b = _array((4, 3), strides)
        try:
            ref = b.reshape(12)
        except NotImplementedError:
            with pytest.raises(NotImplementedError):
                view(b, 12)
        else:
            v = view(b, 12)
            assert (v.shape, v.strides) == (ref.shape, ref.strides)
    with pytest.raises(ValueError):
        _c_array((4, 6)).reshape(5, 5)
    with pytest.raises(ValueError):
        view(_c_array((4, 6)), 5, 5)
    h = np.arange(12, dtype=np.float32)                      # host arrays: numpy's reshape
    assert view(h, 3, -1).shape == (3, 4) and view(h, 3, -1).base is h


def test_launch_objects_are_kept_per_configuration():
    class Dispatcher:
        pass
    k1, k2 = Dispatcher(), Dispatcher()
    l1 = launch._getitem(k1, ((40,), 256))
    assert launch._getitem(k1, ((40,), 256)) is l1 and l1.grid == (40, 1, 1) and l1.block == (256, 1, 1)
    assert launch._getitem(k1, ((41,), 256)) is not l1 and launch._getitem(k2, ((40,), 256)) is not l1
    assert launch._getitem(k1, ([40], 256)).grid == (40, 1, 1)   # unhashable: built each time
    launch._LAUNCHES.clear()
