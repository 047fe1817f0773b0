"""Optimizers for the real parameters (batch-norm scale and shift): SGD with momentum and Adam.
Host or device arrays alike (the element-wise kernels live in kernels/elementwise.py).
Exercise: pytest tests/test_optim.py.
"""
import numpy as np

from .kernels import on_device, zeros
from .kernels.elementwise import adam_update, sgd_update


class RealOptimizer:
    """kind 'adam' (b1=0.9, b2=0.999, eps=1e-8) or 'sgd' (momentum mu). step(params, lr, t)."""

    def __init__(self, kind="adam", momentum=0.9, b1=0.9, b2=0.999, eps=1e-8):
        if kind not in ("adam", "sgd"):
            raise ValueError(f"unknown optimizer {kind!r}; choose adam or sgd")
        self.kind, self.momentum, self.b1, self.b2, self.eps = kind, momentum, b1, b2, eps
        self.slots = {}   # param name -> tuple of state arrays

    def step(self, params, lr, t):
        """One update of every param with lr; t is the 1-based step (Adam bias correction)."""
        for p in params:
            dev = on_device(p.value)
            n = 2 if self.kind == "adam" else 1
            if p.name not in self.slots:
                self.slots[p.name] = tuple(zeros(p.value.shape, np.float32, dev) for _ in range(n))
            s = self.slots[p.name]
            f32 = np.float32
            if self.kind == "adam":
                adam_update(p.value, p.grad, s[0], s[1], f32(lr), f32(self.b1), f32(self.b2),
                            f32(1 - self.b1 ** t), f32(1 - self.b2 ** t), f32(self.eps))
            else:
                sgd_update(p.value, p.grad, s[0], f32(lr), f32(self.momentum))

    def state_dict(self):
        host = lambda a: a if isinstance(a, np.ndarray) else a.copy_to_host()
        return {f"{name}/{i}": host(a) for name, arrs in self.slots.items() for i, a in enumerate(arrs)}

    def load_state_dict(self, state, device=False):
        from .model import _move
        grouped = {}
        for key, a in state.items():
            name, i = key.rsplit("/", 1)
            grouped.setdefault(name, {})[int(i)] = _move(np.array(a), device) if device else np.array(a)
        self.slots = {name: tuple(d[i] for i in sorted(d)) for name, d in grouped.items()}
