"""A training step over a global batch split into R equal shards (R = Config.grad_shards), run by
K processes (K divides R; rank r runs shards r R/K .. (r+1) R/K - 1, one after the other):

    for each shard s:  forward, loss (a mean over the shard), backward  -- batch norm normalises
                       with the shard's own statistics (per-GPU BN)
    g = (sum over shards of the shards' gradients) / R     for every ternary weight, gamma, beta
    running BN statistics: one momentum step toward the mean over shards of (mean, unbiased var)
    loss sum, correct count: summed over shards

then the sampler and the optimizer step once on g, identically on every rank (same g, same
counter-based random stream). One process with grad_shards = R runs the same shards in turn.
On the CPU the shm collective adds the shards' arrays strictly in shard order 0, 1, ..., R-1
whatever K, so every K dividing R computes the same bits as one process (and a run may resume
with another K). On GPUs NCCL adds in its own order: identical on every rank, but equal to other
process counts only up to float rounding.
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
        raise ValueError(f"{world} processes cannot share --grad-shards {cfg.grad_shards} equally: use a process "
                         f"count that divides it (a run keeps its grad_shards, so that any such count reproduces "
                         "it; on the CPU bit for bit)")


class ShardedStep:
    """Forward and backward over this rank's shards, then the reduction; see the module docstring."""

    def __init__(self, model, loss, shards, coll, device, smoothing=0.0):
        self.model, self.loss, self.shards, self.coll, self.device = model, loss, shards, coll, device
        self.smoothing = smoothing           # label smoothing of the xent loss
        self.local = shards // coll.world
        self.bns = [layer for layer in model.layers() if isinstance(layer, BatchNorm)]
        for layer in self.bns:
            layer.track_running = False      # moved once per step, from the shards' mean (below)
        self.kept = {}                       # shard j < local - 1 -> copies of its arrays

    def _live(self, acc):
        """What a step reduces: every ternary weight's gradient, the flat gradient of the real
        parameters (model.RealBuffers), every BN layer's batch statistics, the loss sums."""
        m = self.model
        return ([p.grad for p in m.tparams()] + [m.reals.grad]
                + [layer.batch_stats for layer in self.bns] + [acc])

    def _keep(self, j, live):
        # the next shard's backward overwrites p.grad and batch_stats: copy this shard's aside
        if j not in self.kept:
            self.kept[j] = [empty(a.shape, a.dtype, self.device) for a in live]
        for k, a in zip(self.kept[j], live):
            _copy(k, a)
        return self.kept[j]

    def __call__(self, x, y, acc):
        """x, y: this rank's part of the global batch (its shards back to back, host or device).
        Leaves the mean gradients in p.grad, moves the running statistics and adds the step's loss
        sum and correct count (over all shards) to acc."""
        dev, n, parts = self.device, len(y) // self.local, []
        for j in range(self.local):
            shard_acc = zeros((2,), np.float64, dev)
            logits = self.model.forward(to_side(x[j * n:(j + 1) * n], dev), train=True)
            dlogits = empty(logits.shape, np.float32, dev)
            loss_forward_backward(dlogits, logits, to_side(y[j * n:(j + 1) * n], dev), self.loss, shard_acc,
                                  smoothing=self.smoothing)
            self.model.backward(dlogits)
            live = self._live(shard_acc)
            parts.append(live if j == self.local - 1 else self._keep(j, live))
        self.coll.reduce_shards(parts)
        total = parts[0]
        if self.shards > 1:
            for a in total[:-1]:
                divide(a, a, self.shards)
        tparams, reals = self.model.tparams(), self.model.reals
        for i, p in enumerate(tparams):      # several local shards: the sums sit in kept[0]; swap them in
            if p.grad is not total[i]:
                p.grad, self.kept[0][i] = total[i], p.grad
        if reals.grad is not total[len(tparams)]:    # the real parameters' views stay: copy
            _copy(reals.grad, total[len(tparams)])
        for layer, stats in zip(self.bns, total[len(tparams) + 1:-1]):
            layer.update_running(stats)
        add_forward(acc, acc, total[-1])


def _copy(dst, src):
    """dst[...] = src, both on the host or both on the device."""
    if isinstance(dst, np.ndarray):
        np.copyto(dst, src)
    else:
        dst.copy_to_device(src)
