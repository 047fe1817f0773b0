"""Ternary activation phi_r with its windowed surrogate derivative.

Forward: out = phi_r(x) in {-1, 0, +1} (int8). Backward (straight-through on a window):
dx = dout * phi'(x), phi' = window_grad(x) from kernels.scalar (rectangular or triangular).
The CPU path keeps phi'(x) as float32 for the backward. Exercise: pytest tests/test_ops.py -k act.
"""
import numba
import numpy as np

from . import check, on_device
from .scalar import ternarize, window_grad


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
# launchers

def ternary_forward(out, deriv, inp, r, a, shape):
    """out = phi_r(inp) (int8); deriv = phi'(inp) (float32) or None in eval mode. Overwrites both."""
    check(out.shape == inp.shape, "ternary: out shape differs from input")
    if on_device(out, inp):
        from .activation_cuda import ternary_forward_cuda
        return ternary_forward_cuda(out, deriv, inp, r, a, shape)
    x, o = inp.reshape(-1), out.reshape(-1)
    if deriv is None:
        _ternary_eval(x, np.float32(r), o)
    else:
        _ternary_fwd(x, np.float32(r), np.float32(a), shape, o, deriv.reshape(-1))


def ternary_backward(dinp, dout, deriv):
    """dinp = dout * deriv; overwrites dinp (float32)."""
    if on_device(dinp, dout, deriv):
        from .activation_cuda import ternary_backward_cuda
        return ternary_backward_cuda(dinp, dout, deriv)
    _mul(dout.reshape(-1), deriv.reshape(-1), dinp.reshape(-1))
