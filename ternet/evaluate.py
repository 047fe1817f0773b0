"""Evaluation: a model's mean loss and accuracy over a split, and `ternet eval RUN`.
Exercise: pytest tests/test_train.py -k eval."""
import dataclasses

import numpy as np

from .kernels import empty, to_host, zeros
from .kernels.loss import loss_forward_backward


def to_side(a, device):
    if not device or not isinstance(a, np.ndarray):
        return a
    from numba import cuda
    return cuda.to_device(a)


def eval_loader(ds, split, cfg):
    """The loader every evaluation reads a split with: in order, unaugmented, --eval-batch-size."""
    from .loader import Loader
    return Loader(ds, split, cfg.eval_batch_size, shuffle=False, augment="none", seed=cfg.seed)


def evaluate(model, loader, loss_kind, tta="none"):
    """(mean loss, accuracy) of `model` in eval mode over one pass of `loader`.
    tta="flip": the logits are the mean of the image's and its mirror image's (NHWC batches)."""
    if tta == "flip":
        return _evaluate_flip(model, loader, loss_kind)
    if tta != "none":
        raise ValueError(f"--tta {tta}: choose none or flip")
    dev = model.device
    acc = zeros((2,), np.float64, dev)
    n = 0
    for x, y in loader.batches(0):
        logits = model.forward(to_side(x, dev), train=False)
        d = empty(logits.shape, np.float32, dev)
        loss_forward_backward(d, logits, to_side(y, dev), loss_kind, acc)
        n += len(y)
    total, correct = np.array(acc) if not dev else acc.copy_to_host()
    return float(total / n), float(correct / n)


def _evaluate_flip(model, loader, loss_kind):
    """The two passes' logits are averaged and scored on the host (a few KB a batch)."""
    dev, acc, n = model.device, np.zeros(2), 0
    for x, y in loader.batches(0):
        x = to_side(x, dev)
        logits = _host(model.forward(x, train=False))      # a copy: the next forward reuses its buffers
        logits = (logits + _host(model.forward(mirror(x), train=False))) * np.float32(0.5)
        loss_forward_backward(np.empty_like(logits), logits, _host(y).astype(np.int32), loss_kind, acc)
        n += len(y)
    return float(acc[0] / n), float(acc[1] / n)


def _host(a):
    return to_host(a, copy=True)


def mirror(x):
    """The images of an NHWC batch mirrored left to right, on the batch's side (host or device)."""
    if isinstance(x, np.ndarray):
        return np.ascontiguousarray(x[:, :, ::-1])
    from .device_data import mirror_cuda
    return mirror_cuda(x)


def load_model(run_path, device="auto", ckpt=None):
    """(config, model) from a run folder's newest (or given) checkpoint."""
    from . import checkpoint
    from .model import Model
    from .run import RunDir
    from .train import open_data, resolve_device
    run = RunDir(run_path)
    cfg = run.config()
    ck = checkpoint.load(ckpt) if ckpt else _newest(run)
    data = open_data(cfg)
    from .loader import Loader
    shape = Loader(data, "train", 1, shuffle=False, augment=cfg.augment, seed=cfg.seed).output_shape
    model = Model(cfg.arch, shape, data.num_classes, cfg.bits, cfg.act_r, cfg.act_a, cfg.window, cfg.seed)
    model.load_state_dict(ck)
    return cfg, model.to(resolve_device(device))


def _newest(run):
    from .train import latest_checkpoint
    ck = latest_checkpoint(run)
    if ck is None:
        raise FileNotFoundError(f"{run.path} has no readable checkpoint yet (ckpt-*.h5)")
    return ck


def evaluate_run(run_path, data=None, split=None, device="auto", tta="none", ckpt=None):
    """{split: (loss, accuracy)} for the run's newest (or given) checkpoint on `data` (default: the
    run's); tta="flip" averages the logits of each image and its mirror image."""
    from .train import open_data
    cfg, model = load_model(run_path, device, ckpt)
    ds = open_data(dataclasses.replace(cfg, data=data) if data else cfg)
    if ds.num_classes != model.num_classes:
        raise ValueError(f"{ds.path} has {ds.num_classes} classes but the run's model has {model.num_classes}")
    splits = [split] if split else [s for s in ("val", "test") if s in ds.splits] or list(ds.splits)
    for s in splits:
        if s not in ds.splits:
            raise ValueError(f"--split {s}: {ds.path} has splits {', '.join(ds.splits)}")
    return {s: evaluate(model, eval_loader(ds, s, cfg), cfg.loss, tta) for s in splits}
