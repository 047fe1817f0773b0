"""A training step over a global batch split into R equal shards (R = Config.grad_shards), run by
K processes (K divides R; rank r runs shards r R/K .. (r+1) R/K - 1, one after the other):

    for each shard s:  forward, loss (a mean over the shard), backward  -- batch norm normalises
                       with the shard's own statistics (per-GPU BN)
    g = (sum over shards of the shards' gradients) / R     for every ternary weight, gamma, beta
    running BN statistics: one momentum step toward the mean over shards of (mean, unbiased var)
    loss sum, correct count: summed over shards

then the sampler and the optimizer step once on g, identically on every rank (same g, same
counter-based random stream). One process with grad_shards = R runs the same shards in turn, so
on the CPU `--procs R` and `--grad-shards R` compute the same bits. Sums run in shard order inside
a rank, then over ranks in rank order: K = 1 and K = R both add shard 0, 1, ..., R-1 strictly in
turn; for 1 < K < R the per-rank partial sums group the terms differently (equal up to rounding).
Exercise: pytest tests/test_distributed.py; docs/distributed.md.
"""
import numpy as np

from .evaluate import to_side
from .kernels import empty, zeros
from .kernels.elementwise import add_forward, divide
from .kernels.loss import loss_forward_backward
from .layers import BatchNorm


def validate_world(cfg, world):
    """Raise ValueError unless `world` processes can run the config's grad_shards shards."""
    if cfg.grad_shards % world:
        raise ValueError(f"{world} processes cannot share the run's --grad-shards {cfg.grad_shards} equally: use a "
                         f"process count that divides it ({cfg.grad_shards} or 1 reproduce the run bit for bit on "
                         "the CPU; other divisors add the shard gradients in another grouping)")


class ShardedStep:
    """Forward and backward over this rank's shards, then the reduction; see the module docstring."""

    def __init__(self, model, loss, shards, coll, device):
        self.model, self.loss, self.shards, self.coll, self.device = model, loss, shards, coll, device
        self.local = shards // coll.world
        self.bns = [layer for layer in model.layers() if isinstance(layer, BatchNorm)]
        for layer in self.bns:
            layer.track_running = False      # moved once per step, from the shards' mean (below)
        self.sums = None

    def _current(self):
        """What a step reduces: every gradient, then every BN layer's batch statistics."""
        m = self.model
        return ([p.grad for p in m.tparams()] + [p.grad for p in m.rparams()]
                + [layer.batch_stats for layer in self.bns])

    def _accumulate(self, j):
        # several shards on this rank: keep their sum apart (the next backward overwrites p.grad)
        cur = self._current()
        if self.sums is None:
            self.sums = [empty(a.shape, a.dtype, self.device) for a in cur]
        for s, a in zip(self.sums, cur):
            if j > 0:
                add_forward(s, s, a)
            elif isinstance(s, np.ndarray):
                np.copyto(s, a)
            else:
                s.copy_to_device(a)

    def __call__(self, x, y, acc):
        """x, y: this rank's part of the global batch (its shards back to back, host or device).
        Leaves the mean gradients in p.grad, moves the running statistics and adds the step's loss
        sum and correct count (over all shards) to acc."""
        dev, n = self.device, len(y) // self.local
        step_acc = zeros((2,), np.float64, dev)
        for j in range(self.local):
            logits = self.model.forward(to_side(x[j * n:(j + 1) * n], dev), train=True)
            dlogits = empty(logits.shape, np.float32, dev)
            loss_forward_backward(dlogits, logits, to_side(y[j * n:(j + 1) * n], dev), self.loss, step_acc)
            self.model.backward(dlogits)
            if self.local > 1:
                self._accumulate(j)
        bufs = self._current() if self.local == 1 else list(self.sums)
        self.coll.allreduce_sum(bufs + [step_acc])
        if self.shards > 1:
            for a in bufs:
                divide(a, a, self.shards)
        params = self.model.tparams() + self.model.rparams()
        if self.local > 1:                   # hand the sums to the sampler / optimizer by swapping
            for i, p in enumerate(params):
                p.grad, self.sums[i] = self.sums[i], p.grad
        for layer, stats in zip(self.bns, bufs[len(params):]):
            layer.update_running(stats)
        add_forward(acc, acc, step_acc)
