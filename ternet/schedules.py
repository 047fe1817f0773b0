"""Schedules: a value as a function of the step t (learning rate, temperature, DST sharpness m,
activation window a). Pure functions of t, so resuming needs nothing but the step counter.
Exercise: pytest tests/test_schedules.py.
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
