"""The training loop: batches -> forward -> loss -> backward -> transition sampler (discrete
weights) and optimizer (real parameters) -> metrics, evaluation and checkpoints in the run dir.

Everything a step depends on is a function of (seed, step, epoch, batch index), so a run resumed
from a checkpoint ends bit-identical to an uninterrupted one. With grad_shards > 1 or several
processes (a Collective from ternet.distributed) the step runs over shards of the batch
(ternet.data_parallel); rank 0 writes the run directory. Exercise: `ternet train`, or
pytest tests/test_train.py tests/test_distributed.py.
"""
import os
import signal
import time

import numpy as np
from tqdm import tqdm

from . import checkpoint
from .config import Config, validate
from .data_parallel import ShardedStep, validate_world
from .distributed import LocalCollective
from .evaluate import eval_loader, evaluate, to_side
from .kernels import configure_cpu_threads, empty, zeros
from .kernels.elementwise import put_scalars
from .kernels.loss import loss_forward_backward
from .kernels.stats import state_counts
from .model import Model
from .optim import RealOptimizer
from .run import NullRunDir, RunDir
from .samplers import make_sampler
from .schedules import Schedule


def resolve_device(name):
    """'cpu' -> False; 'cuda' -> True (an error without a GPU; numba's simulator counts, for
    tests); 'auto' -> True only on real CUDA hardware."""
    if name == "cpu":
        return False
    try:
        from numba import config, cuda
        sim = bool(config.ENABLE_CUDASIM)
        ok = cuda.is_available()
    except Exception:  # pragma: no cover - broken CUDA installs
        sim, ok = False, False
    if name == "cuda" and not ok:
        raise ValueError("--device cuda: no usable CUDA GPU found (numba.cuda.is_available() is False); "
                         "use --device cpu")
    return ok and (name == "cuda" or not sim)


def train_augment(cfg, data):
    """The training augmentation: 'auto' means none for grayscale sets (digits and garments must
    not be mirrored or shifted blindly), the loader's crop/flip choice for colour images. A
    --crop-pad needs an augmentation that shifts (config.validate catches the explicit ones)."""
    from .loader import CROPS, resolve_augment
    augment = "none" if cfg.augment == "auto" and data.image_shape[-1] == 1 else resolve_augment(cfg.augment, data)
    if cfg.crop_pad and augment not in CROPS:
        raise ValueError(f"--crop-pad {cfg.crop_pad}: --augment {cfg.augment} means {augment} on this dataset, "
                         "which makes no shifts. Pick --augment crop (or crop-flip), or leave --crop-pad out")
    return augment


def on_gpu(loader):
    """The split kept and augmented on the GPU when it fits, else the host loader's batches
    streamed over ahead of their steps (device_data.StreamLoader; TERNET_STREAM=0: copied
    synchronously before each step instead, by to_side)."""
    from .device_data import DeviceLoader, StreamLoader, fits_on_device
    if fits_on_device(loader):
        return DeviceLoader(loader)
    return loader if os.environ.get("TERNET_STREAM", "1") == "0" else StreamLoader(loader)


def open_data(cfg):
    from .shards import EMBEDDED_DEFAULT, open_dataset
    return open_dataset(cfg.data or EMBEDDED_DEFAULT)


def collective_device(cfg, gpus):
    """The device of a run over several processes: the collective's (gpus: nccl, else shm on the CPU)."""
    if cfg.device == ("cpu" if gpus else "cuda"):
        raise ValueError(f"--device {cfg.device} conflicts with the {'GPU' if gpus else 'CPU'} processes asked "
                         f"for: use {'--gpus' if cfg.device == 'cuda' else '--procs'} K instead")
    return gpus


class Trainer:
    """coll: the Collective of this process when several train together (rank 0 writes `run`)."""

    def __init__(self, cfg: Config, run: RunDir, progress=True, coll=None):
        from .loader import Loader
        validate(cfg)
        self.coll = coll or LocalCollective()
        validate_world(cfg, self.coll.world)
        self.main = self.coll.rank == 0
        self.cfg, self.run, self.progress = cfg, run if self.main else NullRunDir(), progress and self.main
        self.device = resolve_device(cfg.device) if self.coll.world == 1 else collective_device(cfg, self.coll.device)
        if not self.device:
            configure_cpu_threads()
        self.data = open_data(cfg)
        share = self.coll.local_world           # processes of this host share its cores and RAM
        self.train_loader = Loader(self.data, "train", cfg.batch_size, shuffle=True,
                                   augment=train_augment(cfg, self.data), crop_pad=cfg.crop_pad,
                                   cutout=cfg.cutout, seed=cfg.seed,
                                   ram_share=share,
                                   threads=max(1, len(os.sched_getaffinity(0)) // share))
        self.eval_loaders = {s: eval_loader(self.data, s, cfg)
                             for s in ("val", "test") if s in self.data.splits and self.main}
        if self.device:
            from . import cuda_memory
            from .kernels import launch
            cuda_memory.install()
            launch.install()
            self.train_loader = on_gpu(self.train_loader)
            self.eval_loaders = {s: on_gpu(ld) for s, ld in self.eval_loaders.items()}
        self.model = Model(cfg.arch, self.train_loader.output_shape, self.data.num_classes, cfg.bits,
                           cfg.act_r, cfg.act_a, cfg.window, cfg.seed).to(self.device)
        if cfg.save_memory == "on":
            self.model.save_memory()
        self.spe = len(self.train_loader)
        total = cfg.epochs * self.spe
        lr = Schedule(cfg.lr_schedule, cfg.lr, cfg.lr_end, total, cfg.lr_every * self.spe, cfg.lr_gamma)
        m = Schedule("linear" if cfg.m_end else "constant", cfg.m, cfg.m_end, total)
        extra = dict(cfg.extra)
        self.window = window_schedule(cfg, extra, total)     # pops the trainer-level keys a_end, a_schedule
        self.sampler = make_sampler(cfg.sampler, seed=cfg.seed, lr=lr, m=m, source=cfg.source, total=total,
                                    **extra)
        self.optimizer = RealOptimizer(cfg.bn_optim)
        self.tparams = self.model.tparams()
        self.acc = zeros((2,), np.float64, self.device)      # loss sum, correct: summed on the device
        self.sharded = None                                    # the plain step: one process, one shard
        if cfg.grad_shards > 1 or self.coll.world > 1:
            self.sharded = ShardedStep(self.model, cfg.loss, cfg.grad_shards, self.coll, self.device,
                                       smoothing=cfg.label_smoothing)
        self.part = {"part": (self.coll.rank, self.coll.world)} if self.coll.world > 1 else {}
        self.hp = self.hp_sampler = self.hp_optim = None
        if self.device:      # the step's per-step values, read by the update kernels on the device
            n = len(self.sampler.scalars(0))
            self.hp = empty((n + len(self.optimizer.scalars(1.0, 1)),), np.float32, True)
            self.hp_sampler, self.hp_optim = (self.hp[:n] if n else None), self.hp[n:]
        self.graph = self._step_graph() if cfg.cuda_graph == "on" else None
        self.state = {"step": 0, "epoch": 0, "batch": 0, "metrics_bytes": 0, "acc": [0.0, 0.0],
                      "interval": self._fresh(), "epoch_totals": self._fresh()}
        self.writer = checkpoint.Writer()
        self._stop = False
        self._seconds_before = 0.0      # training time before this process (from a checkpoint)

    def _fresh(self):
        return {"loss": 0.0, "correct": 0.0, "count": 0, "steps": 0, "counters": None}

    def _step_graph(self):
        """--cuda-graph on: the StepGraph that replays full-batch steps, or a ValueError naming
        what in this run's options stands in the way."""
        from .cuda_graph import StepGraph
        from .kernels import SIMULATOR, launch
        why = ("needs --device cuda on a GPU" if not self.device or SIMULATOR else
               "needs the planned launches (unset TERNET_FAST_LAUNCH=0)" if not launch.install() else
               f"does not support --sampler {self.cfg.sampler}: its kernels take per-step values (random keys, "
               "temperatures) as launch arguments; use --sampler bop or dst" if not self.sampler.GRAPH else
               "needs one process and --grad-shards 1" if self.sharded is not None else
               "does not support an annealed activation window (--set a_end)" if self.window is not None else "")
        if why:
            raise ValueError(f"--cuda-graph on {why}, or leave --cuda-graph off")
        return StepGraph(self._step, rows=self.cfg.batch_size)

    # -- one step --------------------------------------------------------------------------------
    def train_step(self, x, y):
        t = self.state["step"]
        if self.window is not None:
            set_window(self.model, self.window(t))
        if self.hp is not None:      # one launch writes every per-step value the update kernels read
            put_scalars(self.hp, *self.sampler.scalars(t), *self.optimizer.scalars(self._bn_lr(t), t + 1))
            self.sampler.prepare(t, len(self.tparams))
        if self.graph is not None:
            self.graph(x, y)
        else:
            self._step(x, y)

    def _bn_lr(self, t):
        return self.cfg.bn_lr * self.sampler.lr(t) / self.cfg.lr

    def _step(self, x, y):
        """Forward, loss, backward and updates of one batch. On the GPU its per-step values come
        from self.hp (train_step), so the same launches serve every step (--cuda-graph)."""
        cfg, t = self.cfg, self.state["step"]
        if self.sharded is not None:     # over shards (and processes): mean gradients left in p.grad
            self.sharded(x, y, self.acc)
        else:
            logits = self.model.forward(to_side(x, self.device), train=True)
            dlogits = empty(logits.shape, np.float32, self.device)
            loss_forward_backward(dlogits, logits, to_side(y, self.device), cfg.loss, self.acc,
                                  smoothing=cfg.label_smoothing)
            self.model.backward(dlogits)
        self.sampler.step(self.tparams, [p.grad for p in self.tparams], t, hp=self.hp_sampler)
        self.optimizer.step(self.model.reals, self._bn_lr(t), t + 1, hp=self.hp_optim)

    # -- metrics ---------------------------------------------------------------------------------
    def _read_acc(self):
        return np.array(self.acc) if not self.device else self.acc.copy_to_host()

    def _set_acc(self, values):
        a = np.array(values, np.float64)
        if self.device:
            self.acc.copy_to_device(a)
        else:
            self.acc[:] = a

    def _layer_stats(self, counters, steps):
        out = {}
        for i, p in enumerate(self.tparams):
            rec = {"counts": [int(c) for c in state_counts(p.q, p.qmax)]}
            if counters is not None and steps:
                rec.update(self.sampler.summarize(counters[i], p.size, steps, layer=i))
            out[p.name] = rec
        return out

    def hparams(self, t):
        out = self.sampler.hparams(t)
        if self.window is not None:
            out["act_a"] = self.window(t)
        return out

    def log_interval(self, bar):
        """Close the current logging interval: one metrics line, one timing line."""
        st, iv, ep = self.state, self.state["interval"], self.state["epoch_totals"]
        loss_sum, correct = self._read_acc()
        self._set_acc([0.0, 0.0])
        counters = self.sampler.read_counters()
        for tot in (ep,):
            tot["loss"] += loss_sum
            tot["correct"] += correct
            tot["count"] += iv["count"]
            tot["steps"] += iv["steps"]
            tot["counters"] = counters if tot["counters"] is None else [
                [a + b for a, b in zip(r0, r1)] for r0, r1 in zip(tot["counters"], counters)]
        rec = {"type": "step", "epoch": st["epoch"], "step": st["step"], "loss": loss_sum / iv["count"],
               "acc": correct / iv["count"], **self.hparams(st["step"] - 1),
               "layers": self._layer_stats(counters, iv["steps"])}
        st["metrics_bytes"] = self.run.append(self.run.metrics_path, rec)
        self.sampler.observe(counters, iv["steps"], st["step"] - 1)   # adaptive rules update here
        now = time.perf_counter()
        self.run.append(self.run.timing_path, {"step": st["step"], "epoch": st["epoch"], "seconds": self.seconds(now),
                                               "img_per_s": iv["count"] / max(now - self._t_iv, 1e-9),
                                               **({"cuda_graph": self.graph.status()} if self.graph else {})})
        self._t_iv = now
        st["interval"] = self._fresh()
        if bar is not None:
            bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['acc']:.3f}", lr=f"{rec['lr']:.3g}")

    def end_epoch(self):
        cfg, st, ep = self.cfg, self.state, self.state["epoch_totals"]
        rec = {"type": "epoch", "epoch": st["epoch"], "step": st["step"],
               "train_loss": ep["loss"] / ep["count"], "train_acc": ep["correct"] / ep["count"],
               **self.hparams(st["step"] - 1)}
        t = time.perf_counter()
        for split, loader in self.eval_loaders.items():
            rec[f"{split}_loss"], rec[f"{split}_acc"] = evaluate(self.model, loader, cfg.loss)
            if cfg.eval_tta == "flip":
                rec[f"{split}_loss_flip"], rec[f"{split}_acc_flip"] = evaluate(self.model, loader, cfg.loss, "flip")
        t_eval = time.perf_counter() - t
        rec["layers"] = self._layer_stats(ep["counters"], ep["steps"])
        st["metrics_bytes"] = self.run.append(self.run.metrics_path, rec)
        self.run.append(self.run.timing_path, {"epoch": st["epoch"], "step": st["step"],
                                               "seconds": self.seconds(), "eval_s": round(t_eval, 4)})
        st["epoch_totals"], st["epoch"], st["batch"] = self._fresh(), st["epoch"] + 1, 0
        return rec

    # -- checkpoints -----------------------------------------------------------------------------
    def save(self):
        self.state["acc"] = [float(v) for v in self._read_acc()]
        counters = self.sampler.read_counters()
        iv = self.state["interval"]
        if counters is not None:   # fold the unread counters into the interval, exactly (integers)
            iv["counters"] = counters if iv["counters"] is None else [
                [a + b for a, b in zip(r0, r1)] for r0, r1 in zip(iv["counters"], counters)]
        self.state["sampler"] = self.sampler.state_dict()
        path = None
        if self.main:        # every rank holds the same state: rank 0 writes it, on a background thread
            path = self.run.checkpoint_path(self.state["step"])
            snap = checkpoint.snapshot(self.cfg.to_json(), self.model, self.optimizer, self.state, self.seconds())
            self.writer.submit(path, snap, then=lambda: self.run.prune(self.cfg.keep_last))
        self._restore_counters()
        return path

    def _restore_counters(self):
        iv = self.state["interval"]
        if iv["counters"] is not None:
            c = self.sampler.counters(self.tparams)
            a = np.array(iv["counters"], np.int64)
            if isinstance(c, np.ndarray):
                c[:] = a
            else:
                c.copy_to_device(a)
            iv["counters"] = None

    def restore(self, ck):
        checkpoint.restore(ck, self.model, self.optimizer)
        self.tparams = self.model.tparams()
        self.state = ck["trainer"]
        self.sampler.load_state_dict(self.state.get("sampler", {}), self.device)
        self._set_acc(self.state["acc"])
        self._restore_counters()
        self.run.truncate_metrics(self.state["metrics_bytes"])
        self._seconds_before = ck.get("seconds", 0.0)

    def initialize(self, path):
        """Start from the weights of another run's checkpoint (--init): discrete states, batch-norm
        parameters and running statistics. The step count, the schedules, the sampler's per-weight
        state and the optimizer's moments start fresh. Raises ValueError when the checkpoint does
        not fit this model (names the first parameter that differs)."""
        ck = load_init(path)
        theirs = ck["config"]
        if theirs.get("bits", 1) != self.cfg.bits:
            raise ValueError(f"{path}: its weights have --bits {theirs.get('bits')} states, this run --bits "
                             f"{self.cfg.bits}; use the same --bits")
        mine = self.model.state_dict()
        for group in ("weights", "real", "buffers"):
            for name, a in mine[group].items():
                b = ck[group].get(name)
                if b is None or b.shape != a.shape:
                    there = "missing" if b is None else f"shape {b.shape}"
                    raise ValueError(f"{path}: {group}/{name} is {there} there, shape {a.shape} in this model "
                                     f"(--arch {self.cfg.arch}; the checkpoint's run: --arch {theirs.get('arch')}); "
                                     "use the same architecture and class count")
        self.model.load_state_dict(ck)

    def seconds(self, now=None):
        """Wall-clock seconds of training, counted on from the checkpoint a run resumed from."""
        return self._seconds_before + (time.perf_counter() if now is None else now) - self._t0

    # -- the loop --------------------------------------------------------------------------------
    def fit(self):
        cfg, st = self.cfg, self.state
        self._t0 = self._t_iv = time.perf_counter()
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        last = None
        if st["step"] == 0:   # the initial state distribution, before any transition
            st["metrics_bytes"] = self.run.append(self.run.metrics_path, {"type": "init", "layers": self._layer_stats(None, 0)})
        self.coll.checksum_check(self.model, st["step"])     # every rank starts from the same state
        try:
            while st["epoch"] < cfg.epochs:
                bar = tqdm(total=self.spe, initial=st["batch"], desc=f"epoch {st['epoch'] + 1}/{cfg.epochs}",
                           unit="batch", disable=not self.progress, dynamic_ncols=True, leave=False)
                for x, y in self.train_loader.batches(st["epoch"], start=st["batch"], **self.part):
                    self.train_step(x, y)
                    st["step"] += 1
                    st["batch"] += 1
                    st["interval"]["count"] += len(y) * self.coll.world
                    st["interval"]["steps"] += 1
                    if st["batch"] % cfg.log_every == 0 or st["batch"] == self.spe:
                        self.log_interval(bar)
                    bar.update()
                    if cfg.check_every and st["step"] % cfg.check_every == 0:
                        self.coll.checksum_check(self.model, st["step"])
                    if self._stopping():
                        path = self.save()
                        self.writer.wait()
                        raise KeyboardInterrupt(f"interrupted at step {st['step']}; checkpoint {path}; "
                                                f"resume with: ternet train --resume {self.run.path}")
                    if cfg.ckpt_every and st["step"] % cfg.ckpt_every == 0 and st["batch"] < self.spe:
                        self.save()
                bar.close()
                last = self.end_epoch()
                self.save()
                if self.progress:
                    tqdm.write(_epoch_line(last, cfg.epochs))
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            self.writer.wait()      # the last checkpoint is on disk when fit() returns or raises
        return last

    def average(self):
        """--average-last K, after fit(): average the run's newest K checkpoints (ternet.average),
        append the "average" metrics record and return it."""
        from .average import average_record
        rec = average_record(self.run.path, self.cfg.average_last, "cuda" if self.device else "cpu", self.cfg.eval_tta)
        self.run.append(self.run.metrics_path, rec)
        return rec

    def _on_signal(self, signum, frame):
        self._stop = True

    def _stopping(self):
        """Stop after this step? Several processes decide together at log boundaries (one small
        collective), so that all of them stop, and checkpoint, at the same step."""
        st = self.state
        if self.coll.world == 1:
            return self._stop
        if st["batch"] % self.cfg.log_every and st["batch"] != self.spe:
            return False
        return self.coll.any(self._stop)


def window_schedule(cfg, extra, total):
    """Annealing of the activation window half-width a (trainer-level, not a sampler setting):
    --set a_end=A [--set a_schedule=linear|cosine|exp] takes a from --act-a to A over the run.
    Removes those keys from `extra`; None when a stays constant."""
    a_end, kind = extra.pop("a_end", None), extra.pop("a_schedule", "linear")
    if a_end is None:
        return None
    if float(a_end) <= 0:
        raise ValueError(f"--set a_end={a_end}: the window half-width must stay > 0")
    return Schedule(kind, cfg.act_a, float(a_end), total)


def set_window(model, a):
    """Set the surrogate-window half-width of every ternary activation (fused ones too)."""
    from .layers import BNAct, TernaryAct
    for layer in model.layers():
        if isinstance(layer, TernaryAct):
            layer.a = a
        elif isinstance(layer, BNAct):
            layer.act.a = a


def _epoch_line(rec, epochs):
    parts = [f"epoch {rec['epoch'] + 1}/{epochs}", f"train loss {rec['train_loss']:.4f} acc {rec['train_acc']:.4f}"]
    for split in ("val", "test"):
        if f"{split}_acc" in rec:
            parts.append(f"{split} loss {rec[f'{split}_loss']:.4f} acc {rec[f'{split}_acc']:.4f}")
    return " | ".join(parts)


def load_init(path):
    """The checkpoint named by --init: a checkpoint file, or a run folder's newest one."""
    if os.path.isdir(path):
        ck = latest_checkpoint(RunDir(path))
        if ck is None:
            raise ValueError(f"{path}: a folder without a readable checkpoint (ckpt-*.h5); give a run folder "
                             "that has trained at least one epoch, or a checkpoint file")
        return ck
    try:
        return checkpoint.load(path)
    except checkpoint.CheckpointError as e:
        raise ValueError(str(e)) from None


def latest_checkpoint(run: RunDir):
    """The newest checkpoint that loads, or None."""
    for path in reversed(run.checkpoints()):
        try:
            return checkpoint.load(path)
        except checkpoint.CheckpointError:
            continue
    return None
