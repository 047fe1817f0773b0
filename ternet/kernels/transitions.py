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
from .scalar import (U64, adam_dw, adam_moments, bop_step, dst_may_move, dst_target, mh_step, rms_lr, sgd_dw,
                     splitmix64, uniform)

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
# locally, the block adds them in shared memory and one thread of the block adds the block's
# into the device counters (integer atomics: exact, so the totals do not depend on the order).
# (An atomic a thread on one address serialises on the H200: Bop's update took 0.43-0.52 ms a
# vgg-gxnor or ResNet-18 step against ~0.08 ms of memory traffic, sixteenth session.)

NCOUNT = 5      # counters a kernel may add to (counts[0 .. NCOUNT-1])


@cuda.jit(device=True)
def _zero_counts(sh):
    """Zero the block's shared counters sh (NCOUNT int64; every thread of the block calls it: a
    barrier)."""
    if cuda.threadIdx.x < NCOUNT:
        sh[cuda.threadIdx.x] = 0
    cuda.syncthreads()


@cuda.jit(device=True)
def _flush_counts(sh, counts, n):
    """After every thread added its counts into sh (shared atomics): counts[k] += sh[k] for k < n,
    one thread of the block (every thread calls it: a barrier)."""
    cuda.syncthreads()
    if cuda.threadIdx.x == 0:
        for k in range(n):
            if sh[k]:
                cuda.atomic.add(counts, k, sh[k])

@numba.njit(cache=True)
def _step_keys(keys, base, t):
    for i in range(keys.size):
        keys[i] = splitmix64(splitmix64(base ^ t) ^ U64(i))


@cuda.jit
def _step_keys_cuda(keys, base, t):
    for i in range(cuda.grid(1), keys.size, cuda.gridsize(1)):
        keys[i] = splitmix64(splitmix64(base ^ t) ^ U64(i))


@cuda.jit
def _put_key_cuda(out, key):
    if cuda.grid(1) == 0:
        out[0] = key


# The DST kernels read this step's values from device memory: hp = (lr, m, decay) for the sgd
# source, (lr, m, c1, c2) for adam (elementwise.put_scalars), and the tensor's transition key
# keys[ki] (step_keys), so that a captured CUDA graph replays with each step's (ternet.cuda_graph).

@cuda.jit
def _dst_sgd_cuda(q, g, hp, ss, norm, qmax, keys, ki, counts):
    lr, m, decay, key = hp[0], hp[1], hp[2], keys[ki]
    if norm:
        lr = rms_lr(lr, ss[0], q.size)
    sh = cuda.shared.array(NCOUNT, numba.int64)
    _zero_counts(sh)
    flips = 0
    for i in range(cuda.grid(1), q.size, cuda.gridsize(1)):
        old = q[i]
        new = dst_target(old, sgd_dw(g[i], old, lr, decay, qmax), qmax, m, uniform(key, i))
        if new != old:
            q[i] = new
            flips += 1
    if flips:
        cuda.atomic.add(sh, 0, flips)
    _flush_counts(sh, counts, 1)


@cuda.jit
def _dst_adam_cuda(q, g, mom, vel, hp, b1, b2, eps, qmax, keys, ki, counts):
    lr, m, c1, c2, key = hp[0], hp[1], hp[2], hp[3], keys[ki]
    sh = cuda.shared.array(NCOUNT, numba.int64)
    _zero_counts(sh)
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
        cuda.atomic.add(sh, 0, flips)
    _flush_counts(sh, counts, 1)


@cuda.jit
def _metropolis_cuda(q, g, mom, vel, adam, lr, b1, b2, c1, c2, aeps, qmax, m, eps, dst_on, h, temp,
                     k_mix, k_prop, k_acc, counts):
    sh = cuda.shared.array(NCOUNT, numba.int64)
    _zero_counts(sh)
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
        cuda.atomic.add(sh, 1, props)
        cuda.atomic.add(sh, 2, accs)
        cuda.atomic.add(sh, 3, up_props)
        cuda.atomic.add(sh, 4, up_accs)
        cuda.atomic.add(sh, 0, accs)
    _flush_counts(sh, counts, NCOUNT)


@cuda.jit
def _bop_cuda(q, g, mom, vel, hp, gamma2, norm, reset, qmax, counts):
    gamma, thr = hp[0], hp[1]      # this step's values (put_scalars), read on the device
    sh = cuda.shared.array(NCOUNT, numba.int64)
    _zero_counts(sh)
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
        cuda.atomic.add(sh, 0, flips)
    _flush_counts(sh, counts, 1)


def _flat(*arrays):
    return [flat(a) for a in arrays]


# ----------------------------------------------------------------------------------------------
# launchers (in place on q and the per-weight buffers; counters are accumulated, never reset)

def step_keys(keys, base, t):
    """keys[i] = rng.stream_key(seed, name, t, i) for every i, given base = rng.stream_base(seed,
    name): a step's transition keys, one per weight tensor, made where keys lives (on the GPU by
    one launch, which a replayed CUDA graph's step is preceded by)."""
    if on_device(keys):
        _step_keys_cuda[grid1d(keys.size)](keys, np.uint64(base), np.uint64(t))
        return
    _step_keys(keys, np.uint64(base), np.uint64(t))


def _device_key(key):
    out = cuda.device_array(1, np.uint64)
    _put_key_cuda[1, 1](out, np.uint64(key))
    return out


def dst_sgd(q, g, lr, qmax, m, key, counts, ss=None, decay=0.0, hp=None, keys=None, ki=0):
    """In place: q <- DST(q, dW = -lr * g - decay * q / qmax). q int8 (any shape), g float32 (same
    shape). With ss (float64, one element on q's side: the sum of squares of g, stats.sum_squares)
    the gradient part is normalised by the layer's gradient rms: -lr * g / rms(g) (scalar.rms_lr);
    the decay part is not. Accumulates the number of weights whose state changed into counts[0]
    (int64, same side). On the GPU the kernel reads (lr, m, decay) from hp and its key from
    keys[ki] (device arrays the caller filled, see above; None: filled here from the arguments)."""
    check(q.shape == g.shape and q.dtype == np.int8, "dst_sgd: q must be int8 with g's shape")
    dev = on_device(q, g, counts, ss)
    norm = ss is not None
    ss = ss if norm else _dummy(dev, np.float64)
    if dev:
        hp = device_scalars(lr, m, decay) if hp is None else hp
        keys, ki = (_device_key(key), 0) if keys is None else (keys, ki)
        _dst_sgd_cuda[grid1d(q.size)](*_flat(q, g), hp, ss, np.int64(norm), qmax, keys, np.int64(ki), counts)
        return
    counts[0] += _dst_sgd(q.reshape(-1), g.reshape(-1), np.float32(lr), ss, np.int64(norm), np.float32(decay), qmax,
                          np.float32(m), key)


def dst_adam(q, g, mom, vel, lr, t, qmax, m, key, counts, b1=0.9, b2=0.999, eps=1e-8, hp=None, keys=None, ki=0):
    """In place: Adam moments (mom, vel, float32) advance with g, then q <- DST(q, dW = Adam step
    at bias-correction step t >= 1). Accumulates the number of state changes into counts[0]. On
    the GPU the kernel reads (lr, m, c1, c2) from hp (c1, c2 = 1 - b1^t, 1 - b2^t) and its key
    from keys[ki], as dst_sgd."""
    check(q.shape == g.shape == mom.shape == vel.shape, "dst_adam: shape mismatch")
    c1, c2 = 1 - b1 ** t, 1 - b2 ** t
    if on_device(q, g, mom, vel, counts):
        hp = device_scalars(lr, m, c1, c2) if hp is None else hp
        keys, ki = (_device_key(key), 0) if keys is None else (keys, ki)
        _dst_adam_cuda[grid1d(q.size)](*_flat(q, g, mom, vel), hp, np.float32(b1), np.float32(b2), np.float32(eps),
                                       qmax, keys, np.int64(ki), counts)
        return
    counts[0] += _dst_adam(*_flat(q, g, mom, vel), np.float32(lr), np.float32(b1), np.float32(b2), np.float32(c1),
                           np.float32(c2), np.float32(eps), qmax, np.float32(m), key)


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
