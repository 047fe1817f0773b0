"""The run directory, the record of a training run: config.json (resolved, frozen),
metrics.jsonl (deterministic: loss, accuracy, lr, per-layer state counts and flip rates),
timing.jsonl (wall-clock figures, kept apart so metrics of a resumed run equal an uninterrupted
one's byte for byte) and ckpt-<step>.h5 checkpoints (keep-last-k). `ternet inspect` reads only this.
"""
import json
import os
import pathlib
import re

from .config import Config

CKPT = re.compile(r"^ckpt-(\d{9})\.h5$")


class RunDir:
    def __init__(self, path):
        self.path = pathlib.Path(path)
        self.config_path = self.path / "config.json"
        self.metrics_path = self.path / "metrics.jsonl"
        self.timing_path = self.path / "timing.jsonl"

    def exists(self):
        return self.config_path.exists()

    def create(self, cfg: Config):
        self.path.mkdir(parents=True, exist_ok=True)
        write_atomic(self.config_path, cfg.to_json() + "\n")
        for p in (self.metrics_path, self.timing_path):
            p.write_text("")

    def config(self):
        if not self.config_path.exists():
            raise FileNotFoundError(f"{self.path} is not a ternet run directory (no config.json); "
                                    "HINT: pass the folder `ternet train` created under runs/")
        return Config.from_dict(json.loads(self.config_path.read_text()))

    def append(self, path, record):
        """Append one JSON line; returns the file size after it (checkpoints remember it)."""
        with open(path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            return f.tell()

    def truncate_metrics(self, size):
        """Drop metrics lines written after the checkpoint being resumed from."""
        with open(self.metrics_path, "r+b") as f:
            f.truncate(size)

    def checkpoints(self):
        """Checkpoint paths sorted by step (oldest first)."""
        if not self.path.is_dir():
            return []
        found = [(int(m.group(1)), self.path / n) for n in os.listdir(self.path) if (m := CKPT.match(n))]
        return [p for _, p in sorted(found)]

    def checkpoint_path(self, step):
        return self.path / f"ckpt-{step:09d}.h5"

    def prune(self, keep):
        for p in self.checkpoints()[:-keep]:
            p.unlink(missing_ok=True)

    def metrics(self):
        """All metrics records (a run that crashed half-way is read up to its last full line)."""
        if not self.metrics_path.exists():
            return []
        out = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
        return out


class NullRunDir(RunDir):
    """The run directory as data-parallel ranks other than 0 see it: they write nothing (rank 0
    writes the record; every rank holds the same state)."""

    def __init__(self, path=""):
        super().__init__(path)

    def create(self, cfg):
        pass

    def append(self, path, record):
        return 0

    def truncate_metrics(self, size):
        pass

    def prune(self, keep):
        pass


def write_atomic(path, text):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
