"""Optimizers for the real parameters (batch-norm scale and shift): SGD with momentum and Adam.
Host or device arrays alike (element-wise numba kernels on the CPU, CUDA kernels on the GPU).
Exercise: pytest tests/test_optim.py.
"""
import numba
import numpy as np

from .kernels import on_device, zeros


@numba.njit(cache=True)
def _adam(p, g, m, v, lr, b1, b2, c1, c2, eps):
    for i in range(p.size):
        m[i] = b1 * m[i] + (1 - b1) * g[i]
        v[i] = b2 * v[i] + (1 - b2) * g[i] * g[i]
        p[i] -= lr * (m[i] / c1) / (np.sqrt(v[i] / c2) + eps)


@numba.njit(cache=True)
def _sgd(p, g, buf, lr, mu):
    for i in range(p.size):
        buf[i] = mu * buf[i] + g[i]
        p[i] -= lr * buf[i]


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
                args = (f32(lr), f32(self.b1), f32(self.b2), f32(1 - self.b1 ** t), f32(1 - self.b2 ** t), f32(self.eps))
                if dev:
                    from .kernels.elementwise_cuda import adam_cuda
                    adam_cuda(p.value, p.grad, s[0], s[1], *args)
                else:
                    _adam(p.value, p.grad, s[0], s[1], *args)
            elif dev:
                from .kernels.elementwise_cuda import sgd_cuda
                sgd_cuda(p.value, p.grad, s[0], f32(lr), f32(self.momentum))
            else:
                _sgd(p.value, p.grad, s[0], f32(lr), f32(self.momentum))

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
