"""Ternary activation phi_r with its windowed surrogate derivative.

Forward: out = phi_r(x) in {-1, 0, +1} (int8). Backward (straight-through on a window):
dx = dout * phi'(x), phi' = window_grad(x) from kernels.scalar (rectangular or triangular).
The forward returns what the backward needs as an opaque ActSaved record, as compact as each
side allows. Exercise: pytest tests/test_ops.py -k act, tests/test_cuda_activation.py.
"""
import numba
import numpy as np
from numba import cuda

from . import SIMULATOR, THREADS, check, empty, flat, grid1d, on_device
from .elementwise import add_forward
from .scalar import WINDOW_RECT, ternarize, window_grad


class ActSaved:
    """What ternary_backward needs from a train-mode forward; callers only pass it along.

    deriv: phi'(x) as float32, 4 bytes per element (the CPU path; the GPU path with the
      triangular window), or
    bits: uint32 words, bit i % 32 of word i // 32 set where x lies inside the window: 1/8 byte
      per element (the GPU path with the rectangular window, whose phi' is then bit * height).
    """
    __slots__ = ("deriv", "bits", "height", "size")

    def __init__(self, size, deriv=None, bits=None, height=0.0):
        self.size, self.deriv, self.bits, self.height = size, deriv, bits, np.float32(height)

    @property
    def nbytes(self):
        """Bytes of per-element state kept for the backward."""
        return sum(int(a.size) * a.dtype.itemsize for a in (self.deriv, self.bits) if a is not None)


def num_words(n):
    """uint32 words holding one bit for each of n elements."""
    return (n + 31) // 32


# ----------------------------------------------------------------------------------------------
# CPU implementation

@numba.njit(parallel=True, cache=True)
def _ternary_fwd(x, r, a, shape, out, deriv):
    for i in numba.prange(x.size):
        v = x[i]
        out[i] = ternarize(v, r)
        deriv[i] = window_grad(v, r, a, shape)


@numba.njit(parallel=True, cache=True)
def _ternary_eval(x, r, out):
    for i in numba.prange(x.size):
        out[i] = ternarize(x[i], r)


@numba.njit(parallel=True, cache=True)
def _mul(a, b, out):
    for i in numba.prange(a.size):
        out[i] = a[i] * b[i]


# ----------------------------------------------------------------------------------------------
# CUDA kernels

AHEAD = 4        # tiles of elements a thread loads before computing any (_ternary_fwd_bits_cuda)
#
# Bit masks are written a warp's 32 elements to a word: on a GPU the warp's flags come from one
# ballot (no shared memory, no barrier); the simulator, which has no warp functions, gathers them
# in shared memory and packs them a block tile at a time (pack_tile), between two barriers. Loops
# over tiles run the same number of times in every thread of a block (the bound depends on the
# block only), as both need. (The tile packing on the GPU, 8 threads packing 32 flags each while
# the block waited, held the fused batch norm's forward to ~1.2 TB/s on the H200.)

@cuda.jit(device=True)
def pack_tile(flags, bits, base, n):
    """Threads 0 .. THREADS//32 - 1 write words base//32 + tid from flags[32 tid .. 32 tid + 31]."""
    tid = cuda.threadIdx.x
    w = base // 32 + tid
    if tid < THREADS // 32 and w * 32 < n:
        word = np.uint32(0)
        for k in range(32):
            word |= np.uint32(flags[tid * 32 + k]) << np.uint32(k)
        bits[w] = word


if SIMULATOR:
    @cuda.jit(device=True)
    def pack_flags(flags, f, bits, base, n):
        """Every thread of the block: this thread's flag f (element base + threadIdx.x; base a
        multiple of THREADS) into bit (base + tid) % 32 of word (base + tid) // 32 of bits, n
        elements in all. flags: a (THREADS,) uint8 shared array (used by the simulator's version)."""
        flags[cuda.threadIdx.x] = f
        cuda.syncthreads()
        pack_tile(flags, bits, base, n)
        cuda.syncthreads()
else:
    @cuda.jit(device=True, inline=True)
    def pack_flags(flags, f, bits, base, n):
        """Every thread of the block: this thread's flag f (element base + threadIdx.x; base a
        multiple of THREADS) into bit (base + tid) % 32 of word (base + tid) // 32 of bits, n
        elements in all. flags: a (THREADS,) uint8 shared array (used by the simulator's version)."""
        word = cuda.ballot_sync(0xFFFFFFFF, f != 0)
        tid = cuda.threadIdx.x
        w = base // 32 + tid // 32
        if tid % 32 == 0 and w * 32 < n:
            bits[w] = word


@cuda.jit
def _ternary_eval_cuda(x, r, out):
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        out[i] = ternarize(x[i], r)


@cuda.jit
def _ternary_fwd_cuda(x, r, a, shape, out, deriv):
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        v = x[i]
        out[i] = ternarize(v, r)
        deriv[i] = window_grad(v, r, a, shape)


@cuda.jit
def _ternary_fwd_bits_cuda(x, r, a, out, bits):
    # a tile of THREADS elements per block and step, a thread's elements of AHEAD tiles loaded
    # before any is computed (as batchnorm's fused forward)
    flags = cuda.shared.array(THREADS, numba.uint8)
    vl = cuda.local.array(AHEAD, numba.float32)
    tid, n = cuda.threadIdx.x, x.size
    base, stride = cuda.blockIdx.x * THREADS, cuda.gridDim.x * THREADS
    while base < n:
        b = base
        for u in range(AHEAD):
            if b + tid < n:
                vl[u] = x[b + tid]
            b += stride
        for u in range(AHEAD):
            if base < n:                        # the same for the whole block (pack_flags)
                i = base + tid
                f = np.uint8(0)
                if i < n:
                    v = vl[u]
                    out[i] = ternarize(v, r)
                    if window_grad(v, r, a, WINDOW_RECT) != 0:
                        f = np.uint8(1)
                pack_flags(flags, f, bits, base, n)
            base += stride


@cuda.jit(device=True)
def bit_of(bits, i):
    """The mask bit of element i (0 or 1)."""
    return (bits[i // 32] >> np.uint32(i % 32)) & np.uint32(1)


@cuda.jit
def _ternary_bwd_bits_cuda(dout, bits, height, dinp):
    zero = np.float32(0.0)
    for i in range(cuda.grid(1), dinp.size, cuda.gridsize(1)):
        dinp[i] = dout[i] * (height if bit_of(bits, i) else zero)   # dout * 0, as the CPU path


@cuda.jit
def _ternary_bwd_bits_sum_cuda(dout, dout2, bits, height, dinp):
    # _ternary_bwd_bits_cuda of dout + dout2, added here (the float32 sum add_forward makes)
    zero = np.float32(0.0)
    for i in range(cuda.grid(1), dinp.size, cuda.gridsize(1)):
        dinp[i] = (dout[i] + dout2[i]) * (height if bit_of(bits, i) else zero)


@cuda.jit
def _mul_cuda(a, b, out):
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        out[i] = a[i] * b[i]


# ----------------------------------------------------------------------------------------------
# launchers

def ternary_forward(out, inp, r, a, shape, train=True):
    """out = phi_r(inp) (int8, overwritten); inp float32.

    train=True returns an ActSaved holding phi'(inp) for ternary_backward (a fresh allocation);
    train=False returns None. r the threshold, a the window half-width, shape WINDOW_RECT or
    WINDOW_TRI.
    """
    check(out.shape == inp.shape, "ternary: out shape differs from input")
    dev, n = on_device(out, inp), int(np.prod(inp.shape))
    x, o = flat(inp), flat(out)
    r32, a32 = np.float32(r), np.float32(a)
    if not train:
        (_ternary_eval_cuda[grid1d(n)] if dev else _ternary_eval)(x, r32, o)
        return None
    if dev and shape == WINDOW_RECT:
        bits = empty(num_words(n), np.uint32, True)
        _ternary_fwd_bits_cuda[grid1d(n)](x, r32, a32, o, bits)
        # the window's height, computed by the same function the CPU path uses, at x = r
        return ActSaved(n, bits=bits, height=window_grad(r32, r32, a32, WINDOW_RECT))
    deriv = empty(n, np.float32, dev)
    (_ternary_fwd_cuda[grid1d(n)] if dev else _ternary_fwd)(x, r32, a32, shape, o, deriv)
    return ActSaved(n, deriv=deriv)


def ternary_backward(dinp, dout, saved, dout2=None):
    """dinp = dout * phi'(x) with phi' from the forward's ActSaved; overwrites dinp (float32),
    which may be dout itself. dout2 (device, or None): the gradient is dout + dout2, added here
    where the rectangular window's bits are kept (the same float32 sum as add_forward's)."""
    check(int(np.prod(dinp.shape)) == saved.size, "ternary_backward: size differs from the forward's")
    dev = on_device(dinp, dout)
    d, g = flat(dinp), flat(dout)
    if dout2 is not None and saved.bits is not None:
        _ternary_bwd_bits_sum_cuda[grid1d(saved.size)](g, flat(dout2), saved.bits, saved.height, d)
        return
    if dout2 is not None:
        add_forward(dout, dout, dout2)
    if saved.bits is not None:
        _ternary_bwd_bits_cuda[grid1d(saved.size)](g, saved.bits, saved.height, d)
    elif dev:
        _mul_cuda[grid1d(saved.size)](g, saved.deriv, d)
    else:
        _mul(g, saved.deriv, d)
