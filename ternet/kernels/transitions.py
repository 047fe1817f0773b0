"""Per-weight transition kernels for discrete weights: GXNOR's discrete state transition (DST)
with its two step sources (plain gradient step, Adam step), Metropolis-Hastings transitions, and
the Bop-ternary momentum threshold. The per-weight rules are in kernels.scalar (dst_target,
mh_step, bop_step), shared by the CPU and the CUDA kernels; every random draw is the
counter-based uniform(key, i), so both paths make identical moves from identical keys. States
are int8 values q in [-qmax, qmax] (weight value q / qmax); updates happen in place.
Exercise: pytest tests/test_dst.py tests/test_samplers.py tests/test_samplers_cuda.py.
"""
import numba
import numpy as np
from numba import cuda

from . import check, flat, grid1d, on_device
from .elementwise import device_scalars
from .scalar import adam_dw, adam_moments, bop_step, dst_may_move, dst_target, mh_step, rms_lr, sgd_dw, uniform

CHUNKS = 64
MH_COUNTERS = 4       # proposals, accepts, uphill proposals, uphill accepts (accepts = flips)


# ----------------------------------------------------------------------------------------------
# CPU implementation (integer counters summed over a fixed partition: deterministic)

@numba.njit(parallel=True, cache=True)
def _dst_sgd(q, g, lr, ss, norm, decay, qmax, m, key):
    # two passes per chunk: a vectorised screen (dst_may_move: one draw per weight, no tanh) marks
    # the few weights that can move, then the exact rule runs on those alone (~10x fewer ns per
    # weight than dst_target on every weight, whose tanh test and conditional store do not vectorise)
    n = q.size
    if norm:
        lr = rms_lr(lr, ss[0], n)
    part = np.zeros(CHUNKS, np.int64)
    step = (n + CHUNKS - 1) // CHUNKS
    for ch in numba.prange(CHUNKS):
        lo, hi = ch * step, min(n, (ch + 1) * step)
        may = np.empty(max(0, hi - lo), np.bool_)
        for i in range(lo, hi):
            may[i - lo] = dst_may_move(q[i], sgd_dw(g[i], q[i], lr, decay, qmax), qmax, m, uniform(key, i))
        flips = 0
        for i in range(lo, hi):
            if may[i - lo]:
                old = q[i]
                new = dst_target(old, sgd_dw(g[i], old, lr, decay, qmax), qmax, m, uniform(key, i))
                if new != old:
                    q[i] = new
                    flips += 1
        part[ch] = flips
    return part.sum()


@numba.njit(parallel=True, cache=True)
def _dst_adam(q, g, mom, vel, lr, b1, b2, c1, c2, eps, qmax, m, key):
    n = q.size
    part = np.zeros(CHUNKS, np.int64)
    step = (n + CHUNKS - 1) // CHUNKS
    for ch in numba.prange(CHUNKS):
        flips = 0
        for i in range(ch * step, min(n, (ch + 1) * step)):
            mo, ve = adam_moments(g[i], mom[i], vel[i], b1, b2)
            mom[i] = mo
            vel[i] = ve
            old = q[i]
            new = dst_target(old, adam_dw(mo, ve, lr, c1, c2, eps), qmax, m, uniform(key, i))
            if new != old:
                q[i] = new
                flips += 1
        part[ch] = flips
    return part.sum()


@numba.njit(parallel=True, cache=True)
def _metropolis(q, g, mom, vel, adam, lr, b1, b2, c1, c2, aeps, qmax, m, eps, dst_on, h, temp,
                k_mix, k_prop, k_acc):
    n = q.size
    part = np.zeros((CHUNKS, MH_COUNTERS), np.int64)
    step = (n + CHUNKS - 1) // CHUNKS
    for ch in numba.prange(CHUNKS):
        for i in range(ch * step, min(n, (ch + 1) * step)):
            mo, ve = (mom[i], vel[i]) if adam else (np.float32(0.0), np.float32(0.0))
            old = q[i]
            new, prop, de = mh_step(old, g[i], mo, ve, adam, lr, b1, b2, c1, c2, aeps, qmax, m, eps,
                                    dst_on, h, temp, uniform(k_mix, i), uniform(k_prop, i), uniform(k_acc, i))
            if adam:
                mom[i], vel[i] = adam_moments(g[i], mo, ve, b1, b2)
            if prop != old:
                part[ch, 0] += 1
                part[ch, 2] += de > 0
                if new != old:
                    q[i] = new
                    part[ch, 1] += 1
                    part[ch, 3] += de > 0
    return part.sum(axis=0)


@numba.njit(parallel=True, cache=True)
def _bop(q, g, mom, vel, gamma, gamma2, thr, norm, reset, qmax):
    n = q.size
    part = np.zeros(CHUNKS, np.int64)
    step = (n + CHUNKS - 1) // CHUNKS
    for ch in numba.prange(CHUNKS):
        flips = 0
        for i in range(ch * step, min(n, (ch + 1) * step)):
            old = q[i]
            ve = vel[i] if norm else np.float32(0.0)
            new, mo, ve = bop_step(old, g[i], mom[i], ve, gamma, gamma2, thr, norm, reset, qmax)
            mom[i] = mo
            if norm:
                vel[i] = ve
            if new != old:
                q[i] = new
                flips += 1
        part[ch] = flips
    return part.sum()


# ----------------------------------------------------------------------------------------------
# CUDA kernels: grid-stride loops, one thread per weight; each thread sums its counters
# locally and adds them with one integer atomic per counter (integer sums are exact, so the
# totals do not depend on the order)

@cuda.jit
def _dst_sgd_cuda(q, g, lr, ss, norm, decay, qmax, m, key, counts):
    if norm:
        lr = rms_lr(lr, ss[0], q.size)
    flips = 0
    for i in range(cuda.grid(1), q.size, cuda.gridsize(1)):
        old = q[i]
        new = dst_target(old, sgd_dw(g[i], old, lr, decay, qmax), qmax, m, uniform(key, i))
        if new != old:
            q[i] = new
            flips += 1
    if flips:
        cuda.atomic.add(counts, 0, flips)


@cuda.jit
def _dst_adam_cuda(q, g, mom, vel, lr, b1, b2, c1, c2, eps, qmax, m, key, counts):
    flips = 0
    for i in range(cuda.grid(1), q.size, cuda.gridsize(1)):
        mo, ve = adam_moments(g[i], mom[i], vel[i], b1, b2)
        mom[i] = mo
        vel[i] = ve
        old = q[i]
        new = dst_target(old, adam_dw(mo, ve, lr, c1, c2, eps), qmax, m, uniform(key, i))
        if new != old:
            q[i] = new
            flips += 1
    if flips:
        cuda.atomic.add(counts, 0, flips)


@cuda.jit
def _metropolis_cuda(q, g, mom, vel, adam, lr, b1, b2, c1, c2, aeps, qmax, m, eps, dst_on, h, temp,
                     k_mix, k_prop, k_acc, counts):
    props, accs, up_props, up_accs = 0, 0, 0, 0
    for i in range(cuda.grid(1), q.size, cuda.gridsize(1)):
        mo, ve = (mom[i], vel[i]) if adam else (np.float32(0.0), np.float32(0.0))
        old = q[i]
        new, prop, de = mh_step(old, g[i], mo, ve, adam, lr, b1, b2, c1, c2, aeps, qmax, m, eps,
                                dst_on, h, temp, uniform(k_mix, i), uniform(k_prop, i), uniform(k_acc, i))
        if adam:
            mom[i], vel[i] = adam_moments(g[i], mo, ve, b1, b2)
        if prop != old:
            props += 1
            up_props += de > 0
            if new != old:
                q[i] = new
                accs += 1
                up_accs += de > 0
    if props:
        cuda.atomic.add(counts, 1, props)
        cuda.atomic.add(counts, 2, accs)
        cuda.atomic.add(counts, 3, up_props)
        cuda.atomic.add(counts, 4, up_accs)
        cuda.atomic.add(counts, 0, accs)


@cuda.jit
def _bop_cuda(q, g, mom, vel, hp, gamma2, norm, reset, qmax, counts):
    gamma, thr = hp[0], hp[1]      # this step's values (put_scalars), read on the device
    flips = 0
    for i in range(cuda.grid(1), q.size, cuda.gridsize(1)):
        old = q[i]
        ve = vel[i] if norm else np.float32(0.0)
        new, mo, ve = bop_step(old, g[i], mom[i], ve, gamma, gamma2, thr, norm, reset, qmax)
        mom[i] = mo
        if norm:
            vel[i] = ve
        if new != old:
            q[i] = new
            flips += 1
    if flips:
        cuda.atomic.add(counts, 0, flips)


def _flat(*arrays):
    return [flat(a) for a in arrays]


# ----------------------------------------------------------------------------------------------
# launchers (in place on q and the per-weight buffers; counters are accumulated, never reset)

def dst_sgd(q, g, lr, qmax, m, key, counts, ss=None, decay=0.0):
    """In place: q <- DST(q, dW = -lr * g - decay * q / qmax). q int8 (any shape), g float32 (same
    shape). With ss (float64, one element on q's side: the sum of squares of g, stats.sum_squares)
    the gradient part is normalised by the layer's gradient rms: -lr * g / rms(g) (scalar.rms_lr);
    the decay part is not. Accumulates the number of weights whose state changed into counts[0]
    (int64, same side)."""
    check(q.shape == g.shape and q.dtype == np.int8, "dst_sgd: q must be int8 with g's shape")
    dev = on_device(q, g, counts, ss)
    norm = ss is not None
    args = (np.float32(lr), ss if norm else _dummy(dev, np.float64), np.int64(norm), np.float32(decay), qmax,
            np.float32(m), key)
    if dev:
        _dst_sgd_cuda[grid1d(q.size)](*_flat(q, g), *args, counts)
        return
    counts[0] += _dst_sgd(q.reshape(-1), g.reshape(-1), *args)


def dst_adam(q, g, mom, vel, lr, t, qmax, m, key, counts, b1=0.9, b2=0.999, eps=1e-8):
    """In place: Adam moments (mom, vel, float32) advance with g, then q <- DST(q, dW = Adam step
    at bias-correction step t >= 1). Accumulates the number of state changes into counts[0]."""
    check(q.shape == g.shape == mom.shape == vel.shape, "dst_adam: shape mismatch")
    c1, c2 = 1 - b1 ** t, 1 - b2 ** t
    args = (np.float32(lr), np.float32(b1), np.float32(b2), np.float32(c1), np.float32(c2),
            np.float32(eps), qmax, np.float32(m), key)
    if on_device(q, g, mom, vel, counts):
        _dst_adam_cuda[grid1d(q.size)](*_flat(q, g, mom, vel), *args, counts)
        return
    counts[0] += _dst_adam(*_flat(q, g, mom, vel), *args)


def metropolis(q, g, mom, vel, keys, counts, *, lr, qmax, m, eps, dst_on, h, temp, t=1,
               b1=0.9, b2=0.999, aeps=1e-8):
    """In place: one Metropolis-Hastings transition of every weight (kernels.scalar.mh_step).

    Proposal (1 - eps) DST(dW) + eps neighbour (dst_on=1), or the neighbour move with rate eps
    (dst_on=0); dW = -lr g when mom is None, else the Adam step (mom, vel float32 advance with g,
    bias-correction step t >= 1). Accepted with min(1, exp(-dE / temp) Q(y->x) / Q(x->y)),
    dE = g dv + h dv^2 / 2. keys = (mix, proposal, acceptance) stream keys (uint64).
    Accumulates into counts[0:5]: flips, proposals, accepts, uphill proposals, uphill accepts.
    """
    check(q.shape == g.shape and q.dtype == np.int8, "metropolis: q must be int8 with g's shape")
    adam = mom is not None
    c1, c2 = 1 - b1 ** t, 1 - b2 ** t
    f = np.float32
    args = (np.int64(adam), f(lr), f(b1), f(b2), f(c1), f(c2), f(aeps), qmax, f(m), f(eps),
            np.int64(dst_on), f(h), f(temp), *keys)
    dev = on_device(q, g, mom, vel, counts)
    if not adam:     # the kernels index the moments only when adam=1
        mom = vel = _dummy(dev)
    check(mom.shape == q.shape or not adam, "metropolis: moments must have q's shape")
    if dev:
        _metropolis_cuda[grid1d(q.size)](*_flat(q, g, mom, vel), *args, counts)
        return
    part = _metropolis(*_flat(q, g, mom, vel), *args)
    counts[0] += part[1]
    counts[1:5] += part


def bop(q, g, mom, vel, counts, *, gamma, thr, qmax, gamma2=1e-3, reset=True, hp=None):
    """In place: one Bop-ternary update of every weight (kernels.scalar.bop_step). mom float32
    (q's shape) is the momentum; vel float32 the second moment when normalising (None: no
    normalisation). Accumulates the number of state changes into counts[0]. On the GPU the
    kernel reads (gamma, thr) from hp, a float32 device array the caller filled with
    elementwise.put_scalars (None: filled here), so a captured CUDA graph reads each step's."""
    check(q.shape == g.shape == mom.shape and q.dtype == np.int8, "bop: shape or dtype mismatch")
    norm = vel is not None
    dev = on_device(q, g, mom, vel, counts)
    if not norm:
        vel = _dummy(dev)
    tail = (np.int64(norm), np.int64(reset), qmax)
    if dev:
        hp = device_scalars(gamma, thr) if hp is None else hp
        _bop_cuda[grid1d(q.size)](*_flat(q, g, mom, vel), hp, np.float32(gamma2), *tail, counts)
        return
    counts[0] += _bop(*_flat(q, g, mom, vel), np.float32(gamma), np.float32(gamma2), np.float32(thr), *tail)


_DUMMIES = {}


def _dummy(device, dtype=np.float32):
    """A one-element stand-in for a buffer a kernel will not read, made once per side and dtype
    (a fresh device copy each step would make the host wait for the GPU)."""
    key = (bool(device), np.dtype(dtype).str)
    if key not in _DUMMIES:
        a = np.zeros(1, dtype)
        _DUMMIES[key] = cuda.to_device(a) if device else a
    return _DUMMIES[key]
