"""Schedules: a value as a function of the step t (learning rate, temperature, DST sharpness m,
activation window a). Schedule is a pure function of t, so resuming needs nothing but the step
counter; AdaptiveTemperature (per-layer temperatures steered toward a target acceptance rate) is a
deterministic function of the logged counters and round-trips through state_dict().
Exercise: pytest tests/test_samplers.py -k schedule.
"""
import math
from dataclasses import dataclass

KINDS = ("constant", "step", "exp", "cosine", "linear")


@dataclass(frozen=True)
class Schedule:
    """value(t) for t in [0, total]:

    constant: start
    step:     start * gamma ** floor(t / every)
    exp:      start * (end / start) ** (t / total)      (geometric from start to end)
    cosine:   end + (start - end) * (1 + cos(pi t / total)) / 2
    linear:   start + (end - start) * t / total
    """
    kind: str
    start: float
    end: float = 0.0
    total: int = 1
    every: int = 1
    gamma: float = 0.1

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown schedule {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.kind == "exp" and (self.start <= 0 or self.end <= 0):
            raise ValueError("an exp schedule needs start > 0 and end > 0")

    def __call__(self, t):
        f = min(max(t / max(self.total, 1), 0.0), 1.0)
        if self.kind == "constant":
            return self.start
        if self.kind == "step":
            return self.start * self.gamma ** (int(t) // max(self.every, 1))
        if self.kind == "exp":
            return self.start * (self.end / self.start) ** f
        if self.kind == "cosine":
            return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * f))
        return self.start + (self.end - self.start) * f


class AdaptiveTemperature:
    """Per-layer temperatures T_l steered toward a target rate of accepted uphill moves.

    After each logging interval, for every layer that proposed uphill moves (dE > 0),
        log T_l <- clip(log T_l + gain * (target(t) - accepted_uphill / proposed_uphill),
                        log t_min, log t_max).
    The uphill acceptance rises monotonically with T for any proposal (each uphill move is accepted
    with min(1, exp(-dE / T) * ratio)), so the controller is stable; the overall acceptance rate
    is not monotone in T for the DST proposal and would not be. Annealing the target to ~0 drives
    T towards greedy. Per-layer temperatures absorb the 100x spread of gradient scales between
    layers; they no longer sample one Boltzmann distribution of the loss (a fixed schedule does).
    Mis-set: a large gain oscillates, a tiny one never reaches the target; t_min bounds how greedy
    it can get. The state (the T_l) is exact in JSON and is saved with the checkpoint.
    """

    def __init__(self, start, target: Schedule, gain=1.0, t_min=1e-12, t_max=1.0):
        if not (0 < t_min <= start <= t_max):
            raise ValueError(f"adaptive temperature: need 0 < t_min <= temperature <= t_max, got "
                             f"{t_min}, {start}, {t_max}")
        self.start, self.target, self.gain, self.t_min, self.t_max = start, target, gain, t_min, t_max
        self.values = []

    def __call__(self, layer):
        while len(self.values) <= layer:
            self.values.append(float(self.start))
        return self.values[layer]

    def update(self, proposed, accepted, t):
        """One controller step per layer from that layer's uphill proposal/accept counts."""
        goal = self.target(t)
        for i, (n, k) in enumerate(zip(proposed, accepted)):
            if n > 0:
                log_t = math.log(self(i)) + self.gain * (goal - k / n)
                self.values[i] = min(max(math.exp(log_t), self.t_min), self.t_max)

    def state_dict(self):
        return {"values": list(self.values)}

    def load_state_dict(self, state):
        self.values = [float(v) for v in state.get("values", [])]
