"""Transition samplers: rules that move discrete weights between the states of Z_N.

One interface, step(states, grads, t) -> stats (tinygrad's _step, larq's Bop): `states` are the
model's TernaryParams (int8 states plus any per-weight slots), `grads` their gradients, t the
0-based global step. stats is the sampler's counter array (int64, (layers, len(COUNTERS)), on
the weights' side): step() adds to it, the trainer reads and clears it every log interval, so a
GPU step never waits for the host. Every random draw comes from the counter-based stream
("transition", t, layer index), so a resumed run and every data-parallel replica move the same
weights. Exercise: pytest tests/test_dst.py.
"""
import numpy as np

from .kernels import on_device, zeros
from .kernels.transitions import dst_adam, dst_sgd
from .rng import stream_key
from .schedules import Schedule

REGISTRY = {}


def register(cls):
    REGISTRY[cls.name] = cls
    return cls


class Sampler:
    """Base class: holds the run seed, the schedules and the counters; a subclass holds only its rule."""
    name = ""
    COUNTERS = ("flips",)

    def __init__(self, seed, lr: Schedule, m: Schedule, **_):
        self.seed, self.lr, self.m = seed, lr, m
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
        host = (np.array(c) if isinstance(c, np.ndarray) else c.copy_to_host()).tolist()
        if isinstance(c, np.ndarray):
            c[:] = 0
        else:
            from .kernels.elementwise import fill
            fill(c, 0)
        return host

    def key(self, t, index):
        return stream_key(self.seed, "transition", t, index)

    def step(self, states, grads, t):
        """Move every weight of `states` given `grads` at step t; returns {param name: stats}."""
        raise NotImplementedError

    def summarize(self, row, n_weights, steps):
        """Per-layer rates for the metrics from one layer's counters over `steps` steps."""
        return {"flip_rate": row[0] / (n_weights * steps)}

    def hparams(self, t):
        """The schedule values at step t (logged in metrics)."""
        return {"lr": self.lr(t), "m": self.m(t)}

    def state_dict(self):
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

    lr sets the expected move per step; too small and (with tau ~ m |nu| / dz) nearly nothing flips,
    too large and kappa >= 1 makes weights jump deterministically every step (a random walk
    between the extremes). m sharpens tau: large m makes small steps flip more often than their
    size warrants (m = 3 in the paper).
    """
    name = "dst"

    def __init__(self, seed, lr, m, source="sgd", **kw):
        super().__init__(seed, lr, m, **kw)
        if source not in ("sgd", "adam"):
            raise ValueError(f"unknown DST step source {source!r}; choose sgd or adam")
        self.source = source

    def step(self, states, grads, t):
        lr, m, counts = self.lr(t), self.m(t), self.counters(states)
        for i, (p, g) in enumerate(zip(states, grads)):
            key = self.key(t, i)
            if self.source == "sgd":
                dst_sgd(p.q, g, lr, p.qmax, m, key, counts[i])
            else:
                if "adam_m" not in p.slots:
                    dev = on_device(p.q)
                    p.slots["adam_m"] = zeros(p.q.shape, np.float32, dev)
                    p.slots["adam_v"] = zeros(p.q.shape, np.float32, dev)
                dst_adam(p.q, g, p.slots["adam_m"], p.slots["adam_v"], lr, t + 1, p.qmax, m, key, counts[i])
        return counts


def make_sampler(name, **kw):
    if name not in REGISTRY:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name](**kw)
