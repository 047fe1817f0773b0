"""The run configuration: one typed, frozen dataclass. CLI options map onto its fields; the
resolved config is written to runs/<name>/config.json and into every checkpoint.
"""
import dataclasses
import json
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Config:
    # what to train
    data: str = ""                  # prepared dataset folder; "" = the embedded Fashion-MNIST subset
    arch: str = "lenet"             # preset name or architecture string (see ternet.arch)
    bits: int = 1                   # N: weights live in Z_N with 2^N + 1 states (1 = ternary)
    # the ternary activation phi_r and its surrogate window (authors' code: r = 1, a = 0.5 after BN)
    act_r: float = 1.0
    act_a: float = 0.5
    window: str = "rect"            # rect | tri
    loss: str = "xent"              # xent | sqhinge (the authors' squared hinge)
    label_smoothing: float = 0.0    # xent: targets (1 - eps) one-hot + eps / K in training
    # transitions of the discrete weights
    sampler: str = "bop"            # bop (momentum threshold) | dst (GXNOR) | metropolis, see docs/samplers.md
    source: str = "sgd"             # DST step source: sgd (no per-weight memory) | adam (two fp32 moments)
    lr: float = 0.0                 # 0 = the default for the source (see resolve())
    lr_end: float = 0.0             # final lr for cosine / exp / linear schedules
    lr_schedule: str = "cosine"     # constant | step | exp | cosine | linear
    lr_every: int = 10              # step schedule: decay every this many epochs
    lr_gamma: float = 0.1           # step schedule: decay factor
    m: float = 3.0                  # DST sharpness: tau = tanh(m |nu| / dz)
    m_end: float = 0.0              # 0 = constant m
    # real parameters (batch norm)
    bn_optim: str = "adam"          # adam | sgd (momentum 0.9)
    bn_lr: float = 0.01
    # the loop
    epochs: int = 10
    batch_size: int = 100
    eval_batch_size: int = 1000
    eval_tta: str = "none"          # flip: each epoch also reports every split with flip test-time augmentation
    augment: str = "auto"           # none | auto | crop-flip | crop | rrc-flip
    crop_pad: int = 0               # crop-flip / crop: largest random shift in pixels; 0 = round(H/8), >= 1
    cutout: int = 0                 # side of a square set to the mean in every training image; 0 = none
    seed: int = 0
    device: str = "auto"            # auto | cpu | cuda
    cuda_graph: str = "off"         # on: replay each full-batch GPU step from a captured CUDA graph
    save_memory: str = "off"        # on: the GPU keeps less from the forward to the backward (Model.save_memory)
    log_every: int = 50             # steps between metrics lines
    ckpt_every: int = 500           # steps between mid-epoch checkpoints (0 = at epoch ends only)
    keep_last: int = 3              # checkpoints kept
    average_last: int = 0           # > 0: after the last epoch, average the last K checkpoints (ternet.average)
    # data parallelism (ternet.data_parallel, docs/distributed.md)
    grad_shards: int = 1            # the global batch is split into this many shards (one per process)
    check_every: int = 100          # steps between replica checksum comparisons (several processes; 0 = never)
    # sampler extras (temperature, proposals ...), kept as a sorted tuple of (key, value) pairs
    extra: tuple = ()
    # a checkpoint (file, or run folder: its newest) whose weights start this run (ternet.train.Trainer.initialize)
    init: str = ""

    def to_json(self):
        d = dataclasses.asdict(self)
        d["extra"] = dict(self.extra)
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config fields {sorted(unknown)}")
        d = dict(d)
        d["extra"] = tuple(sorted(dict(d.get("extra", ())).items()))
        return cls(**d)

    def resolve(self):
        """Fill the defaults that depend on other fields."""
        rms = self.sampler == "dst" and self.source == "sgd" and dict(self.extra).get("norm") == "rms"
        lr = self.lr or (0.03 if rms else {"sgd": 20.0, "adam": 0.01}[self.source])
        return dataclasses.replace(self, lr=lr)


CHOICES = {
    "window": ("rect", "tri"), "cuda_graph": ("off", "on"), "loss": ("xent", "sqhinge"), "source": ("sgd", "adam"),
    "lr_schedule": ("constant", "step", "exp", "cosine", "linear"), "bn_optim": ("adam", "sgd"),
    "augment": ("none", "auto", "crop-flip", "crop", "rrc-flip"), "device": ("auto", "cpu", "cuda"),
    "eval_tta": ("none", "flip"), "save_memory": ("off", "on"),
}


def validate(cfg):
    """Raise ValueError naming the option and the fix for values that cannot work."""
    for name, choices in CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(cfg, name)!r}: choose one of {', '.join(choices)}")
    positive = ("epochs", "batch_size", "eval_batch_size", "log_every", "keep_last")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.bits not in (1, 2, 3):
        raise ValueError(f"--bits must be 1, 2 or 3 (2^N + 1 weight states), got {cfg.bits}")
    if cfg.act_a <= 0 or cfg.act_r < 0:
        raise ValueError(f"--act-a must be > 0 and --act-r >= 0, got a={cfg.act_a}, r={cfg.act_r}")
    if cfg.lr < 0 or cfg.bn_lr <= 0 or cfg.m <= 0 or cfg.ckpt_every < 0 or cfg.check_every < 0:
        raise ValueError("--lr, --bn-lr and --m must be positive and --ckpt-every, --check-every >= 0")
    if not 0.0 <= cfg.label_smoothing < 1.0:
        raise ValueError(f"--label-smoothing must be in [0, 1) (e.g. 0.1), got {cfg.label_smoothing}")
    if cfg.label_smoothing and cfg.loss != "xent":
        raise ValueError(f"--label-smoothing {cfg.label_smoothing} smooths the targets of --loss xent; "
                         f"--loss {cfg.loss} has none. Use --loss xent or leave --label-smoothing out")
    if cfg.average_last < 0 or cfg.average_last > cfg.keep_last:
        raise ValueError(f"--average-last {cfg.average_last} averages the run's newest checkpoints, of which it "
                         f"keeps --keep-last {cfg.keep_last}: use 0 <= --average-last <= --keep-last (e.g. "
                         f"--keep-last {max(cfg.average_last, 1)})")
    if cfg.average_last > cfg.epochs and cfg.ckpt_every == 0:
        raise ValueError(f"--average-last {cfg.average_last} needs that many checkpoints; with --ckpt-every 0 the "
                         f"run writes one an epoch, {cfg.epochs} in all: train more --epochs or average fewer")
    if cfg.cutout < 0:
        raise ValueError(f"--cutout must be >= 0 (the side of the square in pixels; 0 = none), got {cfg.cutout}")
    if cfg.crop_pad < 0:
        raise ValueError(f"--crop-pad must be >= 0 (pixels; 0 = automatic, round(H/8)), got {cfg.crop_pad}")
    if cfg.crop_pad and cfg.augment in ("none", "rrc-flip"):
        raise ValueError(f"--crop-pad {cfg.crop_pad} sets the shifts of --augment crop and crop-flip; --augment "
                         f"{cfg.augment} makes none. Pick --augment crop (or crop-flip), or leave --crop-pad out")
    if cfg.grad_shards < 1 or cfg.batch_size % cfg.grad_shards:
        raise ValueError(f"--batch-size {cfg.batch_size} (the global batch) must split into --grad-shards "
                         f"{cfg.grad_shards} equal shards")
