"""Metropolis-Hastings and Bop-ternary transitions, and the annealing schedules: exact detailed
balance of each proposal's transition matrix, the kernels sampling that matrix, Boltzmann
distributions reached (chi-square), the greedy T -> 0 limit, states staying in Z_N, the Bop rule
against its equations, schedules monotone and resumable."""
import math

import numpy as np
import pytest

from ternet.kernels.scalar import drift, mh_accept_prob, mh_proposal_prob
from ternet.kernels.transitions import bop, dst_sgd, metropolis
from ternet.rng import stream_key
from ternet.samplers import make_sampler
from ternet.schedules import AdaptiveTemperature, Schedule

f32 = np.float32


def chi_square_pvalue(observed, expected):
    """Upper-tail p-value of Pearson's X^2 (cells with expectation < 5 pooled), by the
    Wilson-Hilferty approximation: (X^2 / k)^(1/3) ~ Normal(1 - 2 / (9k), 2 / (9k))."""
    obs, exp = np.asarray(observed, float), np.asarray(expected, float)
    small = exp < 5
    if small.any():
        obs = np.append(obs[~small], obs[small].sum())
        exp = np.append(exp[~small], exp[small].sum())
        if exp[-1] == 0:
            obs, exp = obs[:-1], exp[:-1]
    assert not ((exp == 0) & (obs > 0)).any(), "a state with probability 0 was reached"
    k = len(exp) - 1
    if k < 1:
        return 1.0
    x2 = float(((obs - exp) ** 2 / exp).sum())
    z = ((x2 / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_chi_square_pvalue_is_calibrated():
    rng = np.random.default_rng(0)
    p = np.array([0.5, 0.3, 0.15, 0.05])
    pv = [chi_square_pvalue(rng.multinomial(2000, p), 2000 * p) for _ in range(400)]
    assert 0.03 < np.mean(np.array(pv) < 0.05) < 0.08          # ~5% false alarms at the 5% level
    assert chi_square_pvalue([700, 600, 500, 200], 2000 * p) < 1e-6


# ---- one weight on Z_N with the energy E(w) = a w + b w^2 (w = q / qmax) -------------------------
# g(w) = a + 2 b w and curvature h = 2 b make the sampler's local quadratic energy model exact.

class Energy:
    def __init__(self, a, b, bits):
        self.a, self.b, self.qmax = f32(a), f32(b), 2 ** (bits - 1)
        self.states = np.arange(-self.qmax, self.qmax + 1)

    def E(self, q):
        w = np.asarray(q, np.float64) / self.qmax
        return self.a * w + self.b * w * w

    def grad(self, q):
        return (self.a + f32(2) * self.b * (np.asarray(q).astype(f32) / f32(self.qmax))).astype(f32)

    def boltzmann(self, temp):
        e = self.E(self.states)
        p = np.exp(-(e - e.min()) / temp)
        return p / p.sum()


# proposal configurations: (proposal, source, mix-or-rate, lr, m, Adam moments before the step)
PROPOSALS = {
    "dst-sgd": ("dst", "sgd", 0.2, 0.9, 3.0, None),
    "dst-adam": ("dst", "adam", 0.2, 0.6, 2.0, (f32(0.3), f32(0.2))),
    "neighbour": ("neighbour", "sgd", 0.5, 0.0, 3.0, None),
}
ADAM = dict(b1=f32(0.9), b2=f32(0.999), c1=f32(1 - 0.9 ** 3), c2=f32(1 - 0.999 ** 3), eps=f32(1e-8))


def _drift(cfg, g):
    proposal, source, _, lr, _, mv = PROPOSALS[cfg]
    mo, ve = mv or (f32(0), f32(0))
    a = ADAM
    return drift(f32(g), mo, ve, int(source == "adam"), f32(lr), a["b1"], a["b2"], a["c1"], a["c2"], a["eps"])


def transition_matrix(cfg, energy, temp):
    """P[x, y] from the scalar functions the kernels use (states indexed from -qmax)."""
    proposal, _, eps, _, m, _ = PROPOSALS[cfg]
    qmax, n = energy.qmax, len(energy.states)
    dst_on, h = int(proposal == "dst"), f32(2) * energy.b
    P = np.zeros((n, n))
    for i, x in enumerate(energy.states):
        dw_x = _drift(cfg, energy.grad(x))
        for j, y in enumerate(energy.states):
            if x == y:
                continue
            fwd = mh_proposal_prob(int(x), int(y), dw_x, qmax, f32(m), f32(eps), dst_on)
            if fwd == 0:
                continue
            dv = f32(y - x) / f32(qmax)
            de = energy.grad(x) * dv + f32(0.5) * h * dv * dv
            rev = mh_proposal_prob(int(y), int(x), _drift(cfg, energy.grad(y)), qmax, f32(m), f32(eps), dst_on)
            P[i, j] = fwd * mh_accept_prob(f32(de), f32(temp), f32(rev / fwd))
        P[i, i] = 1 - P[i].sum()
    return P


ENERGIES = [(0.8, 0.0), (-0.5, 0.6), (0.3, -0.4), (1.7, 0.9)]


@pytest.mark.parametrize("cfg", list(PROPOSALS))
@pytest.mark.parametrize("bits", [1, 2, 3])
@pytest.mark.parametrize("temp", [0.05, 0.4, 3.0])
def test_detailed_balance_exact(cfg, bits, temp):
    for a, b in ENERGIES:
        en = Energy(a, b, bits)
        P, pi = transition_matrix(cfg, en, temp), en.boltzmann(temp)
        assert (P >= -1e-7).all() and np.allclose(P.sum(1), 1)
        flow = pi[:, None] * P
        np.testing.assert_allclose(flow, flow.T, rtol=2e-5, atol=1e-9, err_msg=f"a={a} b={b}")  # float32 math
        np.testing.assert_allclose(pi @ P, pi, rtol=1e-5, atol=1e-9)


def _run_metropolis(cfg, en, q, temp, t, moments=None, h=None, counts=None):
    proposal, source, eps, lr, m, _ = PROPOSALS[cfg]
    keys = tuple(stream_key(11, s, t, en.qmax) for s in ("transition-mix", "transition", "transition-accept"))
    mom, vel = moments if moments is not None else (None, None)
    counts = np.zeros(5, np.int64) if counts is None else counts
    metropolis(q, en.grad(q), mom, vel, keys, counts, lr=lr, qmax=en.qmax, m=m, eps=eps,
               dst_on=proposal == "dst", h=2 * en.b if h is None else h, temp=temp, t=3)
    return counts


@pytest.mark.parametrize("cfg", list(PROPOSALS))
def test_kernel_samples_the_transition_matrix(cfg):
    en, temp, n = Energy(0.5, 0.3, 2), 0.4, 100_000
    P = transition_matrix(cfg, en, temp)
    for x in (-2, 0, 1):
        q = np.full(n, x, np.int8)
        mv = PROPOSALS[cfg][5]
        moments = (np.full(n, mv[0], f32), np.full(n, mv[1], f32)) if mv else None
        counts = _run_metropolis(cfg, en, q, temp, t=x, moments=moments)
        hist = np.bincount(q.astype(int) + en.qmax, minlength=len(en.states))
        p = chi_square_pvalue(hist, n * P[x + en.qmax])
        assert p > 1e-4, f"from {x}: {hist} vs {n * P[x + en.qmax]}"
        assert counts[0] == counts[2] == (q != x).sum()


@pytest.mark.parametrize("cfg", ["dst-sgd", "neighbour"])
@pytest.mark.parametrize("bits", [1, 2, 3])
def test_reaches_boltzmann_distribution(cfg, bits):
    """Independent chains from a uniform start; after burn-in their states follow exp(-E/T)/Z.
    Burn-in from the chain's spectral gap: |lambda_2|^steps < 1e-3, far below the chi-square's
    resolution at n chains (~1/sqrt(n))."""
    n = 20_000
    for k, (a, b, temp) in enumerate([(0.6, 0.2, 0.5), (-0.3, -0.5, 0.25)]):
        en = Energy(a, b, bits)
        lam2 = np.sort(np.abs(np.linalg.eigvals(transition_matrix(cfg, en, temp))))[-2]
        steps = int(math.log(1e-3) / math.log(lam2)) + 10
        q = np.random.default_rng(k).integers(-en.qmax, en.qmax + 1, n).astype(np.int8)
        for t in range(steps):
            _run_metropolis(cfg, en, q, temp, t=1000 * k + t)
        hist = np.bincount(q.astype(int) + en.qmax, minlength=len(en.states))
        pi = en.boltzmann(temp)
        p = chi_square_pvalue(hist, n * pi)
        assert p > 1e-4, f"chi-square p={p:.2g}: {hist} vs {np.round(n * pi)}"


@pytest.mark.parametrize("cfg", list(PROPOSALS))
@pytest.mark.parametrize("bits", [1, 2, 3])
def test_zero_temperature_is_greedy(cfg, bits):
    qmax, n = 2 ** (bits - 1), 50_000
    rng = np.random.default_rng(bits)
    q0 = rng.integers(-qmax, qmax + 1, n).astype(np.int8)
    g = (rng.standard_normal(n) * 10 ** rng.uniform(-3, 1, n)).astype(f32)
    proposal, source, eps, lr, m, mv = PROPOSALS[cfg]
    for h in (0.0, 0.7):
        q = q0.copy()
        mom = vel = None
        if source == "adam":   # moments unrelated to g, so some Adam moves run uphill and must be refused
            mom, vel = rng.standard_normal(n).astype(f32), rng.uniform(0, 2, n).astype(f32)
        counts = np.zeros(5, np.int64)
        keys = (stream_key(1, "a"), stream_key(1, "b"), stream_key(1, "c"))
        metropolis(q, g, mom, vel, keys, counts, lr=lr, qmax=qmax, m=m, eps=eps, dst_on=proposal == "dst",
                   h=h, temp=0.0)
        dv = (q.astype(np.float64) - q0) / qmax
        de = g * dv + 0.5 * h * dv * dv
        assert (de[q != q0] <= 0).all(), "an uphill move was accepted at T = 0"
        assert counts[4] == 0 and counts[2] == counts[1] - counts[3]    # every downhill proposal accepted
        assert counts[1] > 0 and q.min() >= -qmax and q.max() <= qmax
    # and T -> 0+ approaches the limit continuously
    assert mh_accept_prob(f32(1e-3), f32(1e-6), f32(5.0)) == 0.0
    assert mh_accept_prob(f32(-1e-3), f32(1e-6), f32(0.01)) == 1.0


def test_greedy_dst_proposal_without_mixing_is_dst():
    """proposal=dst, mix=0, T=0, first order: DST's moves are all downhill, so all are accepted."""
    rng = np.random.default_rng(5)
    q0 = rng.integers(-1, 2, 20_000).astype(np.int8)
    g = rng.standard_normal(q0.size).astype(f32) * f32(0.05)
    a, b = q0.copy(), q0.copy()
    dst_sgd(a, g, 2.0, 1, 3.0, stream_key(0, "transition", 4, 0), np.zeros(1, np.int64))
    keys = (stream_key(0, "transition-mix", 4, 0), stream_key(0, "transition", 4, 0), stream_key(0, "x", 4, 0))
    metropolis(b, g, None, None, keys, np.zeros(5, np.int64), lr=2.0, qmax=1, m=3.0, eps=0.0, dst_on=True,
               h=0.0, temp=0.0)
    np.testing.assert_array_equal(a, b)
    assert (a != q0).sum() > 1000


@pytest.mark.parametrize("name,opts", [("metropolis", {"proposal": "dst", "temperature": 1e-3}),
                                       ("metropolis", {"proposal": "neighbour", "rate": 0.3, "curvature": 0.1}),
                                       ("bop", {"norm": "none", "threshold": 0.05}), ("bop", {"reset": 0})])
@pytest.mark.parametrize("bits", [1, 2, 3])
def test_states_stay_in_z_n(name, opts, bits):
    from ternet.layers import TernaryParam
    qmax = 2 ** (bits - 1)
    rng = np.random.default_rng(bits)
    p = TernaryParam("w", rng.integers(-qmax, qmax + 1, (40, 50)).astype(np.int8), qmax)
    s = make_sampler(name, seed=1, lr=Schedule("constant", 1.0), m=Schedule("constant", 3.0), **opts)
    for t in range(6):
        g = (rng.standard_normal(p.q.shape) * 10 ** rng.uniform(-4, 1, p.q.shape)).astype(f32)
        before = p.q.copy()
        s.step([p], [g], t)
        assert p.q.dtype == np.int8 and p.q.min() >= -qmax and p.q.max() <= qmax
        flips = s.read_counters()[0][0]
        assert flips == (p.q != before).sum() and (np.abs(p.q.astype(int) - before) <= (2 * qmax)).all()


# ---- Bop-ternary --------------------------------------------------------------------------------

def bop_reference(q, g, mo, ve, gamma, gamma2, thr, norm, reset, qmax):
    """The update equations of samplers.BopTernary in numpy float32."""
    q, mo, ve = q.astype(int).copy(), mo.copy(), ve.copy()
    mo = (f32(1) - f32(gamma)) * mo + f32(gamma) * g
    s = mo
    if norm:
        ve = (f32(1) - f32(gamma2)) * ve + f32(gamma2) * g * g
        s = mo / (np.sqrt(ve) + f32(1e-8))
    y = q - np.sign(s).astype(int)
    move = (np.abs(s) > thr) & (y >= -qmax) & (y <= qmax)
    q[move] = y[move]
    if reset:
        mo[move] = 0
    return q.astype(np.int8), mo, ve


@pytest.mark.parametrize("norm,reset", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("bits", [1, 3])
def test_bop_matches_its_equations(norm, reset, bits):
    qmax, n = 2 ** (bits - 1), 5000
    rng = np.random.default_rng(3)
    q = rng.integers(-qmax, qmax + 1, n).astype(np.int8)
    mo, ve = np.zeros(n, f32), np.zeros(n, f32)
    thr = 0.3 if norm else 0.02
    for t in range(8):
        g = (rng.standard_normal(n) * 0.1 + 0.05).astype(f32)
        want = bop_reference(q, g, mo, ve, 0.2, 0.1, thr, norm, reset, qmax)
        bop(q, g, mo, ve if norm else None, np.zeros(1, np.int64), gamma=0.2, thr=thr, qmax=qmax, gamma2=0.1,
            reset=reset)
        np.testing.assert_array_equal(q, want[0])
        np.testing.assert_allclose(mo, want[1], rtol=1e-6, atol=1e-9)
        if norm:
            np.testing.assert_allclose(ve, want[2], rtol=1e-6, atol=1e-12)


def test_bop_walks_one_state_per_move_and_reset_adds_hysteresis():
    g = np.full(1, 1.0, f32)               # a steady positive gradient: descent is downwards
    def walk(reset, steps=12):
        q, mo, path = np.ones(1, np.int8), np.zeros(1, f32), []
        for _ in range(steps):
            bop(q, g, mo, None, np.zeros(1, np.int64), gamma=0.5, thr=0.7, qmax=1, reset=reset)
            path.append(int(q[0]))
        return path, float(mo[0])
    path, mo = walk(True)
    # momentum 0.5, 0.75 > 0.7: move at step 2; reset; again two steps to the next move; then blocked
    assert path[:5] == [1, 0, 0, -1, -1] and path[-1] == -1 and mo > 0.7
    path, _ = walk(False)
    assert path[:3] == [1, 0, -1]          # without reset the momentum carries it straight through


# ---- schedules ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["exp", "linear", "cosine", "step", "constant"])
def test_schedules_monotone_and_pure(kind):
    for start, end in ((1.0, 1e-3), (1e-3, 1.0)):
        s = Schedule(kind, start, end, total=1000, every=100, gamma=0.5 if start > end else 2.0)
        v = np.array([s(t) for t in range(0, 1200, 7)])
        d = np.diff(v) * (1 if end > start else -1)
        assert (d >= -1e-15 * np.abs(v[1:])).all(), f"{kind} not monotone"
        if kind in ("exp", "linear", "cosine"):
            assert math.isclose(s(0), start) and math.isclose(s(1000), end) and s(5000) == s(1000)
        fresh = Schedule(kind, start, end, total=1000, every=100, gamma=0.5 if start > end else 2.0)
        assert [fresh(t) for t in range(0, 1200, 7)] == v.tolist()      # a pure function of t: resumes exactly


def test_adaptive_temperature_direction_clamp_and_resume():
    target = Schedule("linear", 0.3, 0.1, 100)
    a = AdaptiveTemperature(1e-3, target, gain=2.0, t_min=1e-6, t_max=1e-2)
    a.update([100, 100, 0], [90, 5, 0], t=0)        # layer 0 too hot, layer 1 too cold, layer 2 no data
    assert a(0) < 1e-3 < a(1) and a(2) == 1e-3
    for _ in range(100):
        a.update([100], [100], t=50)
    assert a(0) == 1e-6                              # clamped at t_min
    rng = np.random.default_rng(0)
    hist = [(rng.integers(1, 50, 3).tolist(), rng.integers(0, 50, 3).tolist()) for _ in range(20)]
    full = AdaptiveTemperature(1e-3, target, gain=1.0)
    for t, (n, k) in enumerate(hist):
        full.update(n, [min(x, y) for x, y in zip(n, k)], t)
    part = AdaptiveTemperature(1e-3, target, gain=1.0)
    for t, (n, k) in enumerate(hist[:7]):
        part.update(n, [min(x, y) for x, y in zip(n, k)], t)
    import json
    resumed = AdaptiveTemperature(1e-3, target, gain=1.0)
    resumed.load_state_dict(json.loads(json.dumps(part.state_dict())))
    for t, (n, k) in enumerate(hist[7:], start=7):
        resumed.update(n, [min(x, y) for x, y in zip(n, k)], t)
    assert resumed.values == full.values            # bit for bit through JSON


def test_sampler_options_are_checked():
    lr, m = Schedule("constant", 1.0), Schedule("constant", 3.0)
    with pytest.raises(ValueError, match="unknown --set key"):
        make_sampler("metropolis", seed=0, lr=lr, m=m, temprature=1.0)
    with pytest.raises(ValueError, match="step source"):
        make_sampler("bop", seed=0, lr=lr, m=m, source="adam")
    with pytest.raises(ValueError, match="proposal"):
        make_sampler("metropolis", seed=0, lr=lr, m=m, proposal="gibbs")
    s = make_sampler("metropolis", seed=0, lr=lr, m=m, t_schedule="cosine", temperature=1, t_end=0, total=10)
    assert s.hparams(10)["temperature"] == 0.0 and s.opts["temperature"] == 1.0
    s = make_sampler("dst", seed=0, lr=lr, m=Schedule("constant", 3.0, 1.0, 10), m_schedule="cosine", total=10)
    assert s.hparams(0)["m"] == 3.0 and s.hparams(10)["m"] == 1.0
