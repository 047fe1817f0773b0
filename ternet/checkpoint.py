"""Checkpoints: one HDF5 file per save, written to a temporary name and os.replace()d, so a crash
never leaves a half-written checkpoint. Ternary weights are stored as int8 states; nothing in a
checkpoint of an `sgd` DST run holds a float copy of a discrete weight.

Layout (attrs format="ternet-checkpoint", version=1, config=<json>, trainer=<json>):
  weights/<param>      int8 states q (value q / qmax)
  slots/<param>/<name> per-weight sampler buffers (e.g. Adam moments), when the sampler keeps any
  real/<param>         float32 real parameters (batch norm gamma, beta)
  buffers/<name>       float32 running statistics
  optim/<key>          optimizer state of the real parameters
Exercise: pytest tests/test_train.py -k checkpoint.
"""
import json
import os

import h5py
import numpy as np

FORMAT = "ternet-checkpoint"
VERSION = 1


class CheckpointError(Exception):
    pass


def save(path, config_json, model, optimizer, trainer_state, seconds=0.0):
    """Write a checkpoint atomically (temp file + rename). `seconds`: wall-clock seconds of training
    so far (over every resume), kept apart from the trainer state, which is deterministic."""
    state = model.state_dict()
    host = lambda a: a if isinstance(a, np.ndarray) else a.copy_to_host()
    tmp = f"{path}.tmp"
    with h5py.File(tmp, "w", track_order=True) as f:
        f.attrs["format"], f.attrs["version"] = FORMAT, VERSION
        f.attrs["config"] = config_json
        f.attrs["trainer"] = json.dumps(trainer_state, sort_keys=True)
        f.attrs["seconds"] = float(seconds)
        for group, items in (("weights", state["weights"]), ("real", state["real"]),
                             ("buffers", state["buffers"]), ("optim", optimizer.state_dict())):
            g = f.create_group(group)
            for name, a in items.items():
                g.create_dataset(name.replace("/", "|"), data=a, track_times=False)
        g = f.create_group("slots")
        for p in model.tparams():
            for name, a in p.slots.items():
                g.create_dataset(f"{p.name}/{name}", data=host(a), track_times=False)
        f.flush()
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load(path):
    """Read a checkpoint into host arrays: dict with config, trainer, seconds, weights, real, buffers, optim, slots."""
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise CheckpointError(f"{path}: not a readable HDF5 checkpoint ({e})") from None
    with f:
        fmt, ver = f.attrs.get("format"), f.attrs.get("version")
        if fmt != FORMAT or ver != VERSION:
            raise CheckpointError(f"{path}: format {fmt!r} version {ver!r}, expected {FORMAT!r} version {VERSION}. "
                                  "HINT: it was written by another ternet version; re-run training with this one")
        out = {"config": json.loads(f.attrs["config"]), "trainer": json.loads(f.attrs["trainer"]),
               "seconds": float(f.attrs.get("seconds", 0.0))}
        for group in ("weights", "real", "buffers", "optim"):
            out[group] = {k.replace("|", "/"): f[group][k][()] for k in f[group]}
        out["slots"] = {p: {k: f["slots"][p][k][()] for k in f["slots"][p]} for p in f["slots"]}
    return out


def restore(ck, model, optimizer):
    """Load a checkpoint dict (from load()) into a built model and optimizer (host or device)."""
    model.load_state_dict(ck)
    from .model import _move
    for p in model.tparams():
        p.slots = {k: _move(v, model.device) for k, v in ck["slots"].get(p.name, {}).items()}
    optimizer.load_state_dict(ck["optim"])
