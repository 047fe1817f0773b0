"""Optimizers for the real parameters (batch-norm scale and shift): SGD with momentum and Adam,
one elementwise launch per step over the model's flat buffers (model.RealBuffers), host or
device alike (the kernels live in kernels/elementwise.py).
Exercise: pytest tests/test_optim.py.
"""
import numpy as np

from .kernels.elementwise import adam_update, sgd_update


class RealOptimizer:
    """kind 'adam' (b1=0.9, b2=0.999, eps=1e-8) or 'sgd' (momentum mu). step(reals, lr, t).

    Its state is one flat array per moment (Adam: m, v; SGD: the momentum buffer), laid out like
    the RealBuffers it steps; state_dict() names it per parameter, '<param>/<i>', as checkpoints
    have always held it."""

    def __init__(self, kind="adam", momentum=0.9, b1=0.9, b2=0.999, eps=1e-8):
        if kind not in ("adam", "sgd"):
            raise ValueError(f"unknown optimizer {kind!r}; choose adam or sgd")
        self.kind, self.momentum, self.b1, self.b2, self.eps = kind, momentum, b1, b2, eps
        self.reals, self.moments = None, ()
        self.loaded = {}      # state loaded before the first step: laid out when it comes

    def scalars(self, lr, t):
        """The per-step values of step(reals, lr, t) its GPU kernel reads from hp: lr, and
        Adam's bias corrections."""
        if self.kind == "adam":
            return lr, 1 - self.b1 ** t, 1 - self.b2 ** t
        return (lr,)

    def step(self, reals, lr, t, hp=None):
        """One update of every real parameter of `reals` (a model's RealBuffers) with lr; t is
        the 1-based step (Adam bias correction). hp: None, or a float32 device array holding
        scalars(lr, t), which the kernel then reads on the device (ternet.cuda_graph)."""
        if reals is not self.reals:
            self._lay_out(reals, self.state_dict())
        f32, g = np.float32, reals.grad
        if self.kind == "adam":
            lr, c1, c2 = self.scalars(lr, t)
            adam_update(reals.value, g, *self.moments, f32(lr), f32(self.b1), f32(self.b2),
                        f32(c1), f32(c2), f32(self.eps), hp=hp)
        else:
            sgd_update(reals.value, g, *self.moments, f32(lr), f32(self.momentum), hp=hp)

    def _lay_out(self, reals, state):
        """Flat moments on reals' side and in its layout, from state ('<param>/<i>': host arrays;
        zeros for what it lacks, as at the first step)."""
        n = 2 if self.kind == "adam" else 1
        self.moments = tuple(reals.flat({name: state[f"{name}/{i}"] for name in reals.names()
                                         if f"{name}/{i}" in state}) for i in range(n))
        self.reals, self.loaded = reals, {}

    def state_dict(self):
        """{'<param>/<i>': host float32 array}; empty before the first step (unless loaded)."""
        if self.reals is None:
            return dict(self.loaded)
        split = [self.reals.split(m) for m in self.moments]
        return {f"{name}/{i}": s[name] for name in self.reals.names() for i, s in enumerate(split)}

    def load_state_dict(self, state):
        state = {key: np.array(a) for key, a in state.items()}
        if self.reals is None:
            self.loaded = state
        else:
            self._lay_out(self.reals, state)
