"""CUDA transition kernels against the CPU path (numba's simulator where there is no GPU): from
identical states, gradients, buffers and stream keys, every sampler makes identical moves and
counts them identically, for Z_N with N = 1, 2, 3."""
import numpy as np
import pytest

from cudacheck import both, first_mismatches, needs_cuda
from ternet.kernels import on_device, zeros
from ternet.kernels.stats import sum_squares
from ternet.kernels.transitions import bop, dst_adam, dst_sgd, metropolis
from ternet.rng import stream_key

pytestmark = needs_cuda
f32 = np.float32
KEYS = tuple(stream_key(9, s, 3, 1) for s in ("transition-mix", "transition", "transition-accept"))

# name -> (launcher over (q, mom, vel, counts) given g and qmax, number of counters, uses moments)
CASES = {
    "dst-sgd": (lambda q, mo, ve, c, g, qmax: dst_sgd(q, g, 0.7, qmax, 3.0, KEYS[1], c), 1),
    "dst-sgd-rms": (lambda q, mo, ve, c, g, qmax: dst_sgd(q, g, 0.3, qmax, 3.0, KEYS[1], c, ss=_sumsq(g)), 1),
    "dst-sgd-rms-decay": (lambda q, mo, ve, c, g, qmax: dst_sgd(q, g, 0.3, qmax, 3.0, KEYS[1], c, ss=_sumsq(g),
                                                                decay=0.37), 1),
    "dst-adam": (lambda q, mo, ve, c, g, qmax: dst_adam(q, g, mo, ve, 0.05, 3, qmax, 3.0, KEYS[1], c), 1),
    "mh-dst-sgd": (lambda q, mo, ve, c, g, qmax: metropolis(q, g, None, None, KEYS, c, lr=0.7, qmax=qmax, m=3.0,
                                                            eps=0.3, dst_on=True, h=0.2, temp=0.05), 5),
    "mh-dst-adam": (lambda q, mo, ve, c, g, qmax: metropolis(q, g, mo, ve, KEYS, c, lr=0.3, qmax=qmax, m=2.0,
                                                             eps=0.1, dst_on=True, h=0.0, temp=0.02, t=4), 5),
    "mh-neighbour-greedy": (lambda q, mo, ve, c, g, qmax: metropolis(q, g, None, None, KEYS, c, lr=0.0, qmax=qmax,
                                                                     m=3.0, eps=0.6, dst_on=False, h=0.5,
                                                                     temp=0.0), 5),
    "bop-rms": (lambda q, mo, ve, c, g, qmax: bop(q, g, mo, ve, c, gamma=0.3, thr=0.4, qmax=qmax, gamma2=0.2), 1),
    "bop-plain-noreset": (lambda q, mo, ve, c, g, qmax: bop(q, g, mo, None, c, gamma=0.3, thr=0.1, qmax=qmax,
                                                            reset=False), 1),
}


def _sumsq(g):
    """The gradient's sum of squares on g's side (for the rms-normalised DST step)."""
    ss = zeros((1,), np.float64, on_device(g))
    sum_squares(g, ss)
    return ss


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("bits", [1, 2, 3])
def test_identical_moves(case, bits, n=33):
    launch, ncount = CASES[case]
    qmax = 2 ** (bits - 1)
    rng = np.random.default_rng(bits)
    q = rng.integers(-qmax, qmax + 1, n).astype(np.int8)
    g = (rng.standard_normal(n) * 10 ** rng.uniform(-2, 0.5, n)).astype(f32)
    mo, ve = (rng.standard_normal(n) * 0.1).astype(f32), rng.uniform(0, 0.1, n).astype(f32)
    cpu, gpu = both(launch, [q, mo, ve, np.zeros(ncount, np.int64)], [g], inplace=True, extra=(qmax,))
    np.testing.assert_array_equal(gpu[0], cpu[0], err_msg=first_mismatches(gpu[0], cpu[0]))
    np.testing.assert_array_equal(gpu[3], cpu[3])           # integer counters: exact
    # the simulator runs the same float32 operations; a real GPU may contract a*b+c into an FMA,
    # hence a tolerance on the float buffers (the moves above are compared exactly)
    for c, d in zip(cpu[1:3], gpu[1:3]):
        np.testing.assert_allclose(d, c, rtol=1e-6, atol=1e-9)
    assert (cpu[0] != q).any() or case == "bop-rms", "the case moved nothing: it tests nothing"


def test_grid_stride_and_sampler_on_device():
    """A sampler stepping device-resident weights (two blocks, counters accumulated with atomics,
    slots created on the device) moves like the same sampler on host arrays."""
    from numba import cuda

    from ternet.layers import TernaryParam
    from ternet.samplers import make_sampler
    from ternet.schedules import Schedule
    rng = np.random.default_rng(0)
    shapes = [(300,), (5, 7)]
    q0 = [rng.integers(-1, 2, s).astype(np.int8) for s in shapes]
    grads = [[(rng.standard_normal(s) * 0.01).astype(f32) for s in shapes] for _ in range(3)]
    for name, source, opts in (("metropolis", "adam", dict(t_schedule="adaptive", proposal="dst", mix=0.2)),
                               ("bop", "sgd", dict(threshold=0.3, gamma=0.3)), ("dst", "adam", {}),
                               ("dst", "sgd", dict(norm="rms"))):
        out = []
        for dev in (False, True):
            ps = [TernaryParam(f"w{i}", cuda.to_device(q) if dev else q.copy(), 1) for i, q in enumerate(q0)]
            s = make_sampler(name, seed=4, lr=Schedule("constant", 0.05), m=Schedule("constant", 3.0),
                             source=source, **opts)
            for t, gs in enumerate(grads):
                s.step(ps, [cuda.to_device(g) if dev else g for g in gs], t)
            out.append(([p.q.copy_to_host() if dev else p.q for p in ps], s.read_counters(),
                        sorted(ps[0].slots)))
        for a, b in zip(out[0][0], out[1][0]):
            np.testing.assert_array_equal(a, b)
        assert out[0][1] == out[1][1] and out[0][2] == out[1][2]


def test_step_keys_are_the_host_stream_keys():
    """step_keys (one launch per step) gives every tensor's transition key as rng.stream_key does
    on the host: the keys DST's kernels read from device memory are the ones it passed before."""
    from numba import cuda
    from ternet.kernels.transitions import step_keys
    from ternet.rng import stream_base, stream_key
    for seed, t in ((0, 0), (7, 12345), (2 ** 40 + 3, 2 ** 33 + 1)):
        want = np.array([stream_key(seed, "transition", t, i) for i in range(70)], np.uint64)
        host = np.zeros(70, np.uint64)
        step_keys(host, stream_base(seed, "transition"), t)
        dev = cuda.to_device(np.zeros(70, np.uint64))
        step_keys(dev, stream_base(seed, "transition"), t)
        np.testing.assert_array_equal(host, want)
        np.testing.assert_array_equal(dev.copy_to_host(), want)
