"""Transition samplers: rules that move discrete weights between the states of Z_N.

One interface, step(states, grads, t) -> stats (tinygrad's _step, larq's Bop): `states` are the
model's TernaryParams (int8 states plus any per-weight slots), `grads` their gradients, t the
0-based global step. stats is the sampler's counter array (int64, (layers, len(COUNTERS)), on
the weights' side): step() adds to it, the trainer reads and clears it every log interval (and
hands the totals to observe(), where adaptive rules update themselves), so a GPU step never
waits for the host. Sampler settings arrive as `--set key=value` (OPTIONS of each class).

Randomness: every draw is the counter-based uniform(key, weight index) of kernels.scalar, with
keys from rng.stream_key(seed, stream, t, layer index): "transition" for the move itself (DST's
extra step, the proposal), "transition-mix" (which proposal component) and "transition-accept"
(the Metropolis test) for the second and third independent draws per weight per step. A resumed
run, every data-parallel replica and the CPU and CUDA kernels therefore make identical moves —
this replaces per-thread xoroshiro128p states (no 16-byte generator state per weight).
Exercise: pytest tests/test_dst.py tests/test_samplers.py; docs/samplers.md.
"""
import math

import numpy as np

from .kernels import empty, on_device, to_host, zeros
from .kernels.stats import sum_squares
from .kernels.transitions import bop, dst_adam, dst_sgd, metropolis, step_keys
from .rng import stream_base, stream_key
from .schedules import KINDS, AdaptiveTemperature, Schedule

REGISTRY = {}


def register(cls):
    REGISTRY[cls.name] = cls
    return cls


class Sampler:
    """Base class: holds the run seed, the schedules and the counters; a subclass holds only its rule."""
    name = ""
    COUNTERS = ("flips",)
    SOURCES = ("sgd",)
    OPTIONS = {"m_schedule": ""}     # --set keys and their defaults ("" = m_end decides: linear or constant)

    def __init__(self, seed, lr: Schedule, m: Schedule, source="sgd", total=1, **opts):
        unknown = sorted(set(opts) - set(self.OPTIONS))
        if unknown:
            raise ValueError(f"sampler {self.name!r}: unknown --set key(s) {', '.join(unknown)}; it takes "
                             f"{', '.join(sorted(self.OPTIONS))} (docs/samplers.md)")
        if source not in self.SOURCES:
            raise ValueError(f"sampler {self.name!r}: unknown step source {source!r}; choose "
                             f"{' or '.join(self.SOURCES)}")
        self.seed, self.lr, self.m, self.source, self.total = seed, lr, m, source, total
        self.opts = {k: type(d)(opts.get(k, d)) for k, d in self.OPTIONS.items()}
        if self.opts["m_schedule"]:
            self.m = Schedule(self.opts["m_schedule"], m.start, m.end, m.total)
        self.counts = None

    def counters(self, states):
        if self.counts is None:
            self.counts = zeros((len(states), len(self.COUNTERS)), np.int64, on_device(states[0].q))
        return self.counts

    def read_counters(self):
        """Host copy of the counters since the last read, then zeroes them."""
        c = self.counts
        if c is None:
            return None
        host = to_host(c).tolist()
        if isinstance(c, np.ndarray):
            c[:] = 0
        else:
            from .kernels.elementwise import fill
            fill(c, 0)
        return host

    def key(self, t, index, stream="transition"):
        return stream_key(self.seed, stream, t, index)

    def slot(self, p, name):
        """The per-weight float32 buffer `name` of p, created as zeros on p's side at first use."""
        if name not in p.slots:
            p.slots[name] = zeros(p.q.shape, np.float32, on_device(p.q))
        return p.slots[name]

    def step(self, states, grads, t, hp=None):
        """Move every weight of `states` given `grads` at step t; returns the counter array.
        hp: None, or (samplers whose GRAPH is True) a float32 device array holding scalars(t),
        which the kernels then read on the device (a captured CUDA graph, ternet.cuda_graph)."""
        raise NotImplementedError

    GRAPH = False       # can a step be captured as a CUDA graph (every per-step value read from hp)?

    def scalars(self, t):
        """The per-step values of step t the device kernels read from hp (GRAPH samplers)."""
        return ()

    def prepare(self, t, n):
        """Before step t's launches on the GPU, with n weight tensors: per-step device state that
        is not in hp (DST: the step's transition keys, one launch). Nothing by default."""

    def summarize(self, row, n_weights, steps, layer=None):
        """Per-layer rates for the metrics from one layer's counters over `steps` steps."""
        return {"flip_rate": row[0] / (n_weights * steps)}

    def observe(self, counters, steps, t):
        """The counters of a finished logging interval that ended at step t (adaptive rules)."""

    def hparams(self, t):
        """The schedule values at step t (logged in metrics)."""
        return {"lr": self.lr(t), "m": self.m(t)}

    def state_dict(self):
        """JSON-able state beyond the per-weight slots (saved in every checkpoint)."""
        return {}

    def load_state_dict(self, state, device=False):
        pass


@register
class DST(Sampler):
    """GXNOR's discrete state transition (Deng et al., Neural Networks 100, 2018, sec. 3.3).

    With w = q / qmax on Z_N, step dW, rho = clip(dW, -1 - w, 1 - w), kappa = trunc(rho / dz),
    nu = rho - kappa dz: the weight moves kappa states, plus one more in the direction of rho with
    probability tau = tanh(m |nu| / dz).

    source='sgd': dW = -lr(t) * g. No full-precision memory per weight at all (the paper's claim).
    source='adam': dW = the Adam step of g with lr(t), which is what the authors' reference code
    ran; it keeps two float32 moments per weight (8 bytes per weight, 64x an int8 state).
    --set beta1=, beta2= set its decay rates (0.9, 0.999 as in Adam).

    --set norm=rms (source sgd): dW = -lr * g / rms(g), rms over the layer's gradient in this
    step. One float per layer, none per weight; layers whose gradients differ by 20x (conv1 against
    fc1 in lenet) then flip at comparable rates. Default lr 0.03 with it (docs/samplers.md).

    --set decay=D (source sgd): dW = -lr * (g [/ rms(g)] + D w), a decoupled weight decay: every
    weight feels a pull of lr * D toward state 0 besides its gradient step (none per weight: D is
    one number). Without it a weight whose gradient averages to ~0 random-walks over all states
    (the histograms of a long run stay at a third each); with it such weights settle at 0.

    lr sets the expected move per step; too small and (with tau ~ m |nu| / dz) nearly nothing flips,
    too large and kappa >= 1 makes weights jump deterministically every step (a random walk
    between the extremes). m sharpens tau: large m makes small steps flip more often than their
    size warrants (m = 3 in the paper). --set m_schedule=linear|cosine|exp anneals m to --m-end.
    With small steps lr scales the up and down rates of a weight alike, so it sets how fast the
    states mix, not which states win; the minibatch's gradient noise (the batch size) sets that.
    """
    name = "dst"
    SOURCES = ("sgd", "adam")
    # adam source: the moments' decay rates. A slower first moment (beta1 = 0.99) averages the
    # gradient over ~100 steps instead of ~10, so fewer weights flip on minibatch noise.
    OPTIONS = {**Sampler.OPTIONS, "beta1": 0.9, "beta2": 0.999, "norm": "none", "decay": 0.0}

    def __init__(self, seed, lr, m, source="sgd", total=1, **opts):
        super().__init__(seed, lr, m, source, total, **opts)
        if self.opts["norm"] not in ("none", "rms"):
            raise ValueError(f"dst: --set norm={self.opts['norm']!r}; choose none or rms")
        if self.opts["norm"] == "rms" and source != "sgd":
            raise ValueError("dst: --set norm=rms normalises the sgd step; the adam step is already "
                             "normalised per weight (drop norm=rms or use --source sgd)")
        if self.opts["decay"] < 0 or not math.isfinite(self.opts["decay"]):
            raise ValueError(f"dst: --set decay={self.opts['decay']}; use a finite value >= 0 (0: no decay)")
        if self.opts["decay"] and source != "sgd":
            raise ValueError("dst: --set decay adds to the sgd step; drop it or use --source sgd")
        self.sumsq = self.dkeys = None
        self.base = stream_base(seed, "transition")

    GRAPH = True        # lr(t), m(t) (and Adam's corrections) come from hp, the keys from prepare()

    def scalars(self, t):
        lr, m, o = self.lr(t), self.m(t), self.opts
        if self.source == "sgd":
            return lr, m, lr * o["decay"]
        return lr, m, 1 - o["beta1"] ** (t + 1), 1 - o["beta2"] ** (t + 1)

    def prepare(self, t, n):
        if self.dkeys is None or self.dkeys.size != n:
            self.dkeys = empty((n,), np.uint64, True)
        step_keys(self.dkeys, self.base, t)        # = self.key(t, i) for every tensor i, on the GPU

    def step(self, states, grads, t, hp=None):
        lr, m, counts, o = self.lr(t), self.m(t), self.counters(states), self.opts
        if o["norm"] == "rms" and self.sumsq is None:      # one float64 per layer, on the weights' side
            self.sumsq = zeros((len(states),), np.float64, on_device(states[0].q))
        dev = {} if hp is None else {"hp": hp, "keys": self.dkeys}
        for i, (p, g) in enumerate(zip(states, grads)):
            key = self.key(t, i)
            if self.source == "sgd":
                ss = None
                if self.sumsq is not None:
                    ss = self.sumsq[i:i + 1]
                    sum_squares(g, ss)
                dst_sgd(p.q, g, lr, p.qmax, m, key, counts[i], ss=ss, decay=lr * o["decay"], ki=i, **dev)
            else:
                dst_adam(p.q, g, self.slot(p, "adam_m"), self.slot(p, "adam_v"), lr, t + 1, p.qmax, m, key,
                         counts[i], b1=o["beta1"], b2=o["beta2"], ki=i, **dev)
        return counts


@register
class Metropolis(Sampler):
    """Metropolis-Hastings transitions with simulated annealing of the temperature T.

    Each weight proposes y from Q(x -> .) and accepts it with
        A = min(1, exp(-dE / T) Q(y -> x) / Q(x -> y)),   dE = g dv + h dv^2 / 2,
    dv = (y - x) / qmax the change of its value, g the minibatch gradient, h = curvature (a diagonal
    curvature guess; 0 = first order). proposal='dst': Q = (1 - mix) DST(dW) + mix Nb, DST's move
    with dW = -lr g (source sgd) or the Adam step (source adam), mixed with a symmetric neighbour
    move Nb (one state down or up, 1/2 each) so that every move can be undone; the reverse
    Q(y -> x) is the same proposal made from y with its gradient estimated as g + h dv (the Hastings
    correction). proposal='neighbour': Q = rate Nb + (1 - rate) stay, symmetric (ratio 1).
    Each weight's rule satisfies detailed balance for exp(-E / T) of the local quadratic energy; all
    weights move at once on one minibatch gradient, so on a network it is a stochastic, parallel
    approximation of MCMC on the loss, not an exact one. T <= 0 is greedy: only moves with dE <= 0.
    follow_lr=1 scales mix / rate by lr(t) / lr(0) (the proposal kernel may change with t; each
    step stays reversible), so the neighbour moves anneal with the lr schedule.

    Temperature (in units of the mean minibatch loss): t_schedule constant | exp | linear | cosine
    from `temperature` to t_end (exp needs t_end > 0; linear/cosine to 0 end greedy), or adaptive:
    per-layer T steered toward the uphill acceptance `target` (annealed linearly to target_end when
    that is >= 0), see schedules.AdaptiveTemperature. lr and m schedule as for DST.

    Mis-set: T far above |g| dz accepts uphill moves freely (a random walk) and, with the DST
    proposal, rejects most DST moves (the Hastings ratio ~ mix / (2 tau) < 1); T = 0 with the
    neighbour proposal accepts every downhill coordinate at the rate `rate` (greedy coordinate
    descent). mix = 0 makes a first-order DST proposal irreversible: nothing is accepted at T > 0;
    a large mix floods the run with neighbour moves (at T ~ 0 about mix / 4 flips per weight per
    step, against ~4e-3 falling to ~1e-4 for DST-adam at lr 0.01: mix = 0.05 cost 5-8 points in a probe).
    Memory: none per weight for source sgd, two float32 moments for adam (as DST-adam).
    Refs: Metropolis et al. 1953; Hastings 1970; Kirkpatrick et al. 1983 (annealing); a discrete
    gradient-informed proposal as in Zhang, Liu & Liu, "A Langevin-like sampler for discrete
    distributions", ICML 2022.
    """
    name = "metropolis"
    SOURCES = ("sgd", "adam")
    COUNTERS = ("flips", "proposals", "accepts", "uphill_proposals", "uphill_accepts")
    OPTIONS = {**Sampler.OPTIONS, "proposal": "dst", "mix": 1e-3, "rate": 0.01, "follow_lr": 1, "curvature": 0.0,
               "temperature": 1e-6, "t_end": 0.0, "t_schedule": "constant",
               "target": 0.1, "target_end": -1.0, "gain": 1.0, "t_min": 1e-12, "t_max": 1.0}

    def __init__(self, seed, lr, m, source="sgd", total=1, **opts):
        super().__init__(seed, lr, m, source, total, **opts)
        o = self.opts
        if o["proposal"] not in ("dst", "neighbour"):
            raise ValueError(f"metropolis: proposal {o['proposal']!r}; choose dst or neighbour")
        self.eps = o["mix"] if o["proposal"] == "dst" else o["rate"]
        if not 0 <= self.eps <= 1 or o["curvature"] < 0 or o["temperature"] < 0:
            raise ValueError("metropolis: need 0 <= mix, rate <= 1, curvature >= 0, temperature >= 0")
        if o["t_schedule"] not in KINDS + ("adaptive",):
            raise ValueError(f"metropolis: t_schedule {o['t_schedule']!r}; choose {', '.join(KINDS)} or adaptive")
        self.adaptive = None
        if o["t_schedule"] == "adaptive":
            end = o["target"] if o["target_end"] < 0 else o["target_end"]
            target = Schedule("linear", o["target"], end, total)
            self.adaptive = AdaptiveTemperature(o["temperature"], target, o["gain"], o["t_min"], o["t_max"])
        else:
            self.temperature = Schedule(o["t_schedule"], o["temperature"], o["t_end"], total)

    def temp(self, t, layer):
        return self.adaptive(layer) if self.adaptive else self.temperature(t)

    def eps_at(self, t):
        """mix (dst proposal) or rate (neighbour) at step t: scaled by lr(t) / lr(0) when follow_lr,
        so the neighbour moves anneal with the DST moves instead of outlasting them."""
        lr0 = self.lr(0)
        return self.eps * (self.lr(t) / lr0 if self.opts["follow_lr"] and lr0 > 0 else 1.0)

    def step(self, states, grads, t, hp=None):
        lr, m, counts, o = self.lr(t), self.m(t), self.counters(states), self.opts
        for i, (p, g) in enumerate(zip(states, grads)):
            keys = (self.key(t, i, "transition-mix"), self.key(t, i), self.key(t, i, "transition-accept"))
            adam = self.source == "adam"
            mom = self.slot(p, "adam_m") if adam else None
            vel = self.slot(p, "adam_v") if adam else None
            metropolis(p.q, g, mom, vel, keys, counts[i], lr=lr, qmax=p.qmax, m=m, eps=self.eps_at(t),
                       dst_on=o["proposal"] == "dst", h=o["curvature"], temp=self.temp(t, i), t=t + 1)
        return counts

    def summarize(self, row, n_weights, steps, layer=None):
        flips, props, accs, up_props, up_accs = row
        out = {"flip_rate": flips / (n_weights * steps), "proposal_rate": props / (n_weights * steps)}
        if props:
            out["acceptance_rate"] = accs / props
        if up_props:
            out["uphill_acceptance"] = up_accs / up_props
        if layer is not None and self.adaptive:     # a fixed schedule's T is one number, in hparams
            out["temperature"] = self.adaptive(layer)
        return out

    def observe(self, counters, steps, t):
        if self.adaptive and counters is not None:
            self.adaptive.update([r[3] for r in counters], [r[4] for r in counters], t)

    def hparams(self, t):
        out = super().hparams(t)
        if self.adaptive:
            vals = self.adaptive.values or [self.adaptive.start]
            out["temperature"] = math.exp(sum(math.log(v) for v in vals) / len(vals))   # geometric mean
            out["target"] = self.adaptive.target(t)
        else:
            out["temperature"] = self.temperature(t)
        return out

    def state_dict(self):
        return {"temperature": self.adaptive.state_dict()} if self.adaptive else {}

    def load_state_dict(self, state, device=False):
        if self.adaptive and "temperature" in state:
            self.adaptive.load_state_dict(state["temperature"])


@register
class BopTernary(Sampler):
    """Latent-free momentum threshold for Z_N: the ternary analogue of Bop.

    Bop (Helwegen et al., "Latent weights do not exist: rethinking binarized neural network
    optimization", NeurIPS 2019) keeps an exponential moving average of the gradient per binary
    weight and flips the weight when the average is strong enough and points against it. Here,
    for the 2^N + 1 states of Z_N:
        m <- (1 - gamma) m + gamma g                         (momentum, float32 per weight)
        s = m                     (norm='none')
        s = m / (sqrt(v) + 1e-8), v <- (1 - gamma2) v + gamma2 g^2        (norm='rms')
        if |s| > threshold:  q <- q - sign(s)  unless that leaves Z_N,  and then m <- 0 (reset=1)
    "Against the gradient" means one state down the descent direction: a positive signal walks a
    ternary weight +1 -> 0 -> -1, one state per move, so every weight passes through 0. Without the
    reset, a momentum past the threshold keeps walking the weight to the end of Z_N on
    consecutive steps (ternary collapses to binary with a transient 0); with it, every further
    move needs fresh evidence (a hysteresis of about ln(1 / (1 - threshold / |g|)) / gamma steps).
    A weight at the end of Z_N keeps its momentum (the move is blocked, not spent).

    norm='none' is Bop's rule: threshold is in gradient units, so one value cannot suit layers
    whose gradients differ by 100x (Bop's defaults: threshold 1e-8..1e-6, gamma 1e-4..1e-3).
    norm='rms' divides by the root-mean-square gradient (as Bop2ndOrder, Suarez-Ramirez et al.
    2021): s is a signal-to-noise ratio in [-1, 1] (about 1 for a consistent gradient, about
    sqrt(gamma / 2) for pure noise), so threshold is dimensionless and shared across layers.
    gamma sets the memory (1 / gamma steps); gamma_schedule/gamma_end anneal it (gamma -> 0
    freezes the momentum, and with reset=1 stops the moves). threshold_schedule/threshold_end
    anneal the threshold: raising it towards the end freezes the weights while the momentum still
    tracks the gradient, so the last epochs stop flipping on noise. Too small a threshold: flips every
    few steps on noise; too large: nothing moves. lr and m are unused (lr still scales the
    batch-norm learning rate). Memory: 4 bytes per weight (norm none), 8 (rms): the momentum is not
    a latent weight (it is reset and never read as a weight), but it is float state.
    """
    name = "bop"
    # By default gamma and the threshold anneal together, geometrically, from (0.05, 0.5) to
    # (0.002, 0.1): threshold**2 / gamma stays 5, so a weight flips on pure noise at about the same
    # rate throughout, while the evidence a flip needs in its favour (the chain's inverse
    # temperature, ~ 4 threshold / gamma) grows 5x: the chain cools (docs/samplers.md).
    OPTIONS = {**Sampler.OPTIONS, "gamma": 0.05, "gamma_end": 0.002, "gamma_schedule": "exp",
               "threshold": 0.5, "threshold_end": 0.1, "threshold_schedule": "exp",
               "norm": "rms", "gamma2": 1e-2, "reset": 1}

    def __init__(self, seed, lr, m, source="sgd", total=1, **opts):
        super().__init__(seed, lr, m, source, total, **opts)
        o = self.opts
        if o["norm"] not in ("none", "rms"):
            raise ValueError(f"bop: norm {o['norm']!r}; choose none or rms")
        if not (0 < o["gamma"] <= 1 and 0 < o["gamma2"] <= 1 and o["threshold"] >= 0):
            raise ValueError("bop: need 0 < gamma, gamma2 <= 1 and threshold >= 0")
        self.gamma = Schedule(o["gamma_schedule"], o["gamma"], o["gamma_end"], total)
        self.threshold = Schedule(o["threshold_schedule"], o["threshold"], o["threshold_end"], total)

    GRAPH = True        # no random draws; gamma(t) and threshold(t) are read from hp on the device

    def scalars(self, t):
        return self.gamma(t), self.threshold(t)

    def step(self, states, grads, t, hp=None):
        counts, o = self.counters(states), self.opts
        gamma, thr = self.scalars(t)
        for i, (p, g) in enumerate(zip(states, grads)):
            vel = self.slot(p, "bop_v") if o["norm"] == "rms" else None
            bop(p.q, g, self.slot(p, "bop_m"), vel, counts[i], gamma=gamma, thr=thr,
                qmax=p.qmax, gamma2=o["gamma2"], reset=bool(o["reset"]), hp=hp)
        return counts

    def hparams(self, t):
        return {"lr": self.lr(t), "gamma": self.gamma(t), "threshold": self.threshold(t)}


def make_sampler(name, **kw):
    if name not in REGISTRY:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name](**kw)
