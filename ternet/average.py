"""`ternet average RUN --last K`: one model from a run's last K checkpoints.

Late in a run the discrete weights still flip (vgg-gxnor on CIFAR-10: ~1e-4 of them a step, a few
per cent an epoch), so the last checkpoint is one sample of a chain that hovers around a good
point. The average takes, for every weight, the state nearest to its mean state over the K
checkpoints (a tie, possible for even K, keeps the newest state), so it is still a network of
discrete states; the batch-norm parameters take their mean; the batch-norm running statistics
are recomputed for the new weights over training batches drawn with the run's augmentation
(`recalibrate`). The result is written as a checkpoint file beside the run's own, named so that
--resume never picks it: `ternet eval RUN --ckpt FILE`, `ternet export RUN --ckpt FILE`.
Exercise: pytest tests/test_average.py
"""
import json
import os

import numpy as np

from . import checkpoint
from .evaluate import eval_loader, evaluate, load_model, to_side
from .layers import BatchNorm, walk


def nearest_mean_state(total, k, newest):
    """The state nearest to total / k, the mean of k int8 state arrays whose sum is `total`; a tie
    (a mean halfway between two states, possible for even k) keeps the `newest` state."""
    total = np.asarray(total, np.int64)
    nearest = np.floor_divide(2 * total + k, 2 * k)          # round(total / k), halves up
    tie = np.mod(total, k) == k // 2 if k % 2 == 0 else np.zeros(total.shape, bool)
    return np.where(tie, newest, nearest).astype(np.int8)


def average_state(cks):
    """(state dict, newest checkpoint) from an iterable of checkpoint dicts, oldest first, read one
    at a time (only sums are kept): the weights' nearest mean states, the real parameters' means,
    and the newest checkpoint's buffers (to be recomputed)."""
    k, totals, reals, newest = 0, None, None, None
    for ck in cks:
        if totals is None:
            totals = {n: q.astype(np.int32) for n, q in ck["weights"].items()}
            reals = {n: v.astype(np.float64) for n, v in ck["real"].items()}
        else:
            for n in totals:
                totals[n] += ck["weights"][n]
            for n in reals:
                reals[n] += ck["real"][n]
        k, newest = k + 1, ck
    state = {"weights": {n: nearest_mean_state(t, k, newest["weights"][n]) for n, t in totals.items()},
             "real": {n: (v / k).astype(np.float32) for n, v in reals.items()},
             "buffers": dict(newest["buffers"])}
    return state, newest


def recalibrate(model, loader, images):
    """Batch-norm running statistics <- the plain mean of the batch statistics of the first
    batches of `loader` covering at least `images` images (forward passes in training mode; no
    parameter moves). Returns the number of images used."""
    bns = [layer for layer in walk(model.net) if isinstance(layer, BatchNorm)]
    momenta = [layer.momentum for layer in bns]
    seen = 0
    try:
        for k, (x, _) in enumerate(loader.batches(0)):
            if seen >= images:
                break
            for layer in bns:
                layer.momentum = 1.0 / (k + 1)          # running = mean of the first k + 1 batches
            model.forward(to_side(x, model.device), train=True)
            seen += len(x)
    finally:
        for layer, m in zip(bns, momenta):
            layer.momentum = m
    return seen


def average_run(run_path, last, images=10000, device="auto", out=None, tta="none"):
    """Average the run's last `last` checkpoints, recompute the statistics, evaluate the newest
    checkpoint and the average on the run's val and test splits, write the average; returns
    {"path", "images", "newest": {split: (loss, acc)}, "average": {split: (loss, acc)},
    "changed": the fraction of weights whose state differs from the newest checkpoint's};
    tta="flip" adds "average_flip": {split: (loss, acc)} with flip test-time augmentation."""
    from .loader import Loader
    from .run import RunDir
    from .train import open_data, train_augment
    run = RunDir(run_path)
    paths = [str(p) for p in run.checkpoints()]
    if last < 1:
        raise ValueError(f"--last must be >= 1, got {last}")
    if len(paths) < last:
        raise ValueError(f"{run.path} has {len(paths)} checkpoint(s), fewer than --last {last}; train with "
                         f"--keep-last {last} (and --ckpt-every 0 for one checkpoint per epoch)")
    paths = paths[-last:]
    cfg, model = load_model(run.path, device, ckpt=paths[-1])
    ds = open_data(cfg)
    held_out = {s: eval_loader(ds, s, cfg) for s in ("val", "test") if s in ds.splits}
    if not held_out:
        raise ValueError(f"{ds.path} has no val or test split to evaluate on")
    result = {"newest": {s: evaluate(model, ld, cfg.loss) for s, ld in held_out.items()}}
    state, newest = average_state(checkpoint.load(p) for p in paths)
    model.load_state_dict(state)
    train = Loader(ds, "train", cfg.batch_size, shuffle=True, augment=train_augment(cfg, ds),
                   crop_pad=cfg.crop_pad, cutout=cfg.cutout, seed=cfg.seed + 1)
    result["images"] = recalibrate(model, train, images)
    result["average"] = {s: evaluate(model, ld, cfg.loss) for s, ld in held_out.items()}
    if tta != "none":
        result["average_flip"] = {s: evaluate(model, ld, cfg.loss, tta) for s, ld in held_out.items()}
    changed = sum(int((state["weights"][n] != newest["weights"][n]).sum()) for n in state["weights"])
    result["changed"] = changed / sum(a.size for a in state["weights"].values())
    path = out or os.path.join(run.path, f"average-last{last}.h5")
    averaged = model.state_dict()
    checkpoint.write(path, {
        "attrs": {"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "config": cfg.to_json(),
                  "trainer": json.dumps(newest["trainer"], sort_keys=True), "seconds": newest["seconds"],
                  "averaged_from": json.dumps([os.path.basename(p) for p in paths]),
                  "recalibrated_images": result["images"]},
        "groups": {"weights": averaged["weights"], "real": averaged["real"], "buffers": averaged["buffers"],
                   "optim": {}},
        "slots": {}})
    result["path"] = path
    return result


def average_record(run_path, last, device, tta="none"):
    """`ternet train --average-last K`, after the last epoch: average_run on the run folder, and the
    metrics record of type "average" that the trainer appends ({split}_acc, {split}_loss and, with
    tta="flip", {split}_acc_flip / {split}_loss_flip of the average; the file it wrote)."""
    r = average_run(run_path, last, device=device, tta=tta)
    rec = {"type": "average", "last": last, "images": r["images"], "changed": r["changed"],
           "path": os.path.basename(r["path"])}
    for key, by_split in (("", r["average"]), ("_flip", r.get("average_flip", {}))):
        for s, (loss, acc) in by_split.items():
            rec[f"{s}_loss{key}"], rec[f"{s}_acc{key}"] = loss, acc
    return rec
