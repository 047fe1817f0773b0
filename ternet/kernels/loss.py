"""Losses on logits (N, K) with integer labels (N,): softmax cross-entropy and the squared hinge
loss of the GXNOR/BinaryNet reference code. Each returns (loss sum, correct count) and writes
d(mean loss)/d logits. Exercise: pytest tests/test_ops.py -k loss.
"""
import math

import numba
import numpy as np

from . import check, on_device


# ----------------------------------------------------------------------------------------------
# CPU implementation

@numba.njit(cache=True)
def _softmax_xent(logits, labels, dlogits):
    n, k = logits.shape
    total = 0.0
    correct = 0
    inv_n = np.float32(1.0 / n)
    for i in range(n):
        mx = logits[i, 0]
        am = 0
        for j in range(1, k):
            if logits[i, j] > mx:
                mx = logits[i, j]
                am = j
        s = 0.0
        for j in range(k):
            s += math.exp(logits[i, j] - mx)
        y = labels[i]
        total += math.log(s) - (logits[i, y] - mx)
        correct += am == y
        for j in range(k):
            p = math.exp(logits[i, j] - mx) / s
            dlogits[i, j] = (p - (1.0 if j == y else 0.0)) * inv_n
    return total, correct


@numba.njit(cache=True)
def _sq_hinge(logits, labels, dlogits):
    # loss = mean over samples and classes of max(0, 1 - t * y)^2 with t = +1 for the label, -1 else
    n, k = logits.shape
    total = 0.0
    correct = 0
    scale = np.float32(2.0 / (n * k))
    for i in range(n):
        am = 0
        for j in range(k):
            if logits[i, j] > logits[i, am]:
                am = j
            t = 1.0 if j == labels[i] else -1.0
            mgn = max(0.0, 1.0 - t * logits[i, j])
            total += mgn * mgn / k
            dlogits[i, j] = -t * mgn * scale
        correct += am == labels[i]
    return total, correct


# ----------------------------------------------------------------------------------------------
# launchers

LOSSES = ("xent", "sqhinge")


def loss_forward_backward(dlogits, logits, labels, kind, acc=None):
    """Overwrites dlogits with the gradient of the batch-mean loss; adds the sum of per-sample
    losses to acc[0] and the number of correct argmax predictions to acc[1] (acc float64 (2,),
    on the logits' side, so a GPU step needs no host round trip). logits float32 (N, K), labels
    int32 (N,). Returns (loss sum, correct) on the host path, None on the device path."""
    check(kind in LOSSES, f"unknown loss {kind!r}; choose one of {LOSSES}")
    check(dlogits.shape == logits.shape and labels.shape == (logits.shape[0],), "loss: shape mismatch")
    if on_device(dlogits, logits, labels, acc):
        from .loss_cuda import loss_forward_backward_cuda
        return loss_forward_backward_cuda(dlogits, logits, labels, kind, acc)
    fn = _softmax_xent if kind == "xent" else _sq_hinge
    total, correct = fn(logits, labels, dlogits)
    if acc is not None:
        acc[0] += total
        acc[1] += correct
    return float(total), int(correct)


def predict(logits):
    """argmax per row (host or device logits); first maximum wins."""
    if on_device(logits):
        logits = logits.copy_to_host()
    return np.argmax(logits, axis=1)
