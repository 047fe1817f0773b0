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
import threading

import h5py

from .kernels import to_host

FORMAT = "ternet-checkpoint"
VERSION = 1


class CheckpointError(Exception):
    pass


def save(path, config_json, model, optimizer, trainer_state, seconds=0.0):
    """Write a checkpoint atomically (temp file + rename). `seconds`: wall-clock seconds of training
    so far (over every resume), kept apart from the trainer state, which is deterministic."""
    write(path, snapshot(config_json, model, optimizer, trainer_state, seconds))


def snapshot(config_json, model, optimizer, trainer_state, seconds=0.0):
    """Host copies of everything a checkpoint holds, taken now: training may go on while write()
    puts them in a file (Writer)."""
    host = lambda a: to_host(a, copy=True)
    state = model.state_dict()
    return {"attrs": {"format": FORMAT, "version": VERSION, "config": config_json,
                      "trainer": json.dumps(trainer_state, sort_keys=True), "seconds": float(seconds)},
            "groups": {"weights": state["weights"], "real": state["real"], "buffers": state["buffers"],
                       "optim": optimizer.state_dict()},
            "slots": {f"{p.name}/{name}": host(a) for p in model.tparams() for name, a in p.slots.items()}}


def write(path, snap):
    """A snapshot() to `path`: written to path.tmp, fsync'd, then renamed over path."""
    tmp = f"{path}.tmp"
    with h5py.File(tmp, "w", track_order=True) as f:
        for key, value in snap["attrs"].items():
            f.attrs[key] = value
        for group, items in snap["groups"].items():
            g = f.create_group(group)
            for name, a in items.items():
                g.create_dataset(name.replace("/", "|"), data=a, track_times=False)
        g = f.create_group("slots")
        for name, a in snap["slots"].items():
            g.create_dataset(name, data=a, track_times=False)
        f.flush()
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class Writer:
    """Writes snapshots on a background thread, one at a time, so that training goes on while the
    file is written and fsync'd (117 MB for vgg-gxnor with Bop's two float32 slots per weight:
    bench/bench_checkpoint.py). The next submit() and wait() wait for the write before; a failed
    write raises there. Until it has been renamed into place a checkpoint does not exist: a crash
    meanwhile leaves the previous ones."""

    def __init__(self):
        self._thread, self._error = None, None

    def submit(self, path, snap, then=None):
        """Write `snap` to `path`, then call then() (e.g. prune older checkpoints)."""
        self.wait()

        def work():
            try:
                write(path, snap)
                if then is not None:
                    then()
            except BaseException as e:     # re-raised in the trainer's thread by wait()
                self._error = e
        self._thread = threading.Thread(target=work, name="ternet-checkpoint")
        self._thread.start()

    def wait(self):
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            e, self._error = self._error, None
            raise CheckpointError(f"writing a checkpoint failed: {e}") from e


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
