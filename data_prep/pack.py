"""The shared packer: (source, label) items per split -> decode in worker processes -> shards,
report and manifest, written through ternet.shards. Deterministic and resumable.

Every importer (imagenet, cifar, idx, folder) builds a Job and calls pack(). Exercised by
tests/test_pack.py (resume after SIGKILL, determinism) and bench/bench_prep.py.
"""
import ctypes
import hashlib
import json
import multiprocessing
import os
import pathlib
import re
import signal
from dataclasses import dataclass, field

import numpy as np
import PIL
from tqdm import tqdm

import ternet
from ternet import shards

from .decode import Unreadable, decode, resize_array

CHUNK = 32                  # items per worker task: large enough to hide IPC, small for balance
SHARD_BYTES = 1 << 27       # default shard size: ~128 MiB of pixels
_OURS = re.compile(r"^(manifest\.json|report\.json|[A-Za-z0-9_]+-\d{5}\.h5)(\.tmp)?$")


class PackError(Exception):
    """Bad input for a pack: the message names the file or option and what to do."""


@dataclass
class Split:
    """One split's items, in the order they are packed."""
    refs: list                  # what the reader needs per item (file path, or row index)
    keys: list                  # source name per item: stored in the shards, used in the report
    labels: np.ndarray          # int32 class index per item


class FileReader:
    """Decodes image files (run in worker processes; picklable)."""
    parallel = True

    def __init__(self, size=None, crop=True, channels=3, resample="bilinear"):
        self.size, self.crop, self.channels, self.resample = size, crop, channels, resample
        self.expect = None      # (h, w) every image must have when size is None

    def config(self):
        return {"reader": "file", "size": self.size, "crop": self.crop, "channels": self.channels,
                "resample": self.resample, "expect": self.expect, "pillow": PIL.__version__}

    def __call__(self, refs):
        out = []
        for path in refs:
            try:
                with open(path, "rb") as f:
                    a = decode(f.read(), self.size, self.crop, self.channels, self.resample)
                if self.expect is not None and a.shape[:2] != tuple(self.expect):
                    raise Unreadable(f"size {a.shape[1]}x{a.shape[0]} differs from the dataset's "
                                     f"{self.expect[1]}x{self.expect[0]}; pass --size to resize")
                out.append((a, None))
            except Unreadable as e:
                out.append((None, str(e)))
            except OSError as e:
                out.append((None, f"cannot read: {e.strerror or e}"))
        return out


class ArrayReader:
    """Rows of an in-memory uint8 (n, h, w, C) array, resized when size is given (main process)."""
    parallel = False

    def __init__(self, images, size=None, crop=True, resample="bilinear"):
        self.images, self.size, self.crop, self.resample = images, size, crop, resample

    def config(self):
        return {"reader": "array", "shape": list(self.images.shape[1:]), "size": self.size,
                "crop": self.crop, "resample": self.resample, "pillow": PIL.__version__}

    def __call__(self, refs):
        if self.size is None:
            return [(self.images[r], None) for r in refs]
        return [(resize_array(self.images[r], self.size, self.crop, self.resample), None)
                for r in refs]


@dataclass
class Job:
    """Everything pack() needs; built by an importer from the command line."""
    prep: dict                  # {"command", "src", "options"}: recorded in the manifest
    name: str
    splits: dict                # split name -> Split, in manifest order
    readers: dict               # split name -> FileReader | ArrayReader
    class_ids: list
    class_names: list
    layout: str = "fixed"       # or "variable": short side = image_shape[0], aspect kept
    image_shape: tuple = None   # (H, W, C); None = take it from the first readable image
    shard_size: int = None      # images per shard; None = about SHARD_BYTES each
    compress: int = 0           # gzip level, 0 = none
    extra: dict = field(default_factory=dict)   # more manifest fields (e.g. class_source)
    pre_skipped: list = field(default_factory=list)  # [(split, source, reason)] found by listing


def pack(job, out, workers=None, progress=True):
    """Pack job into folder `out`; returns the manifest. Shards already there for the same plan
    are kept, so rerunning an interrupted pack finishes it with identical output."""
    out = pathlib.Path(out)
    _check_out(out)
    for tmp in out.glob("*.tmp"):
        tmp.unlink()        # a temp file is never valid: it is only renamed once complete
    if job.image_shape is None:
        job.image_shape = _probe_shape(job)
    plans = _plan(job)
    done, todo = {}, []
    for key, (split, lo, hi, plan) in plans.items():
        found = shards.existing_shard(out / shards.shard_name(*key), plan)
        if found:
            done[key] = found
        else:
            todo.append(key)
    total = sum(hi - lo for _, lo, hi, _ in plans.values())
    bar = tqdm(total=total, initial=sum(plans[k][2] - plans[k][1] for k in done),
               unit="img", unit_scale=True, desc=f"pack {job.name}", disable=not progress,
               smoothing=0.05)
    with bar:
        for key, results in _decoded(job, plans, todo, workers, bar.update):
            done[key] = _write(job, out, key, plans[key], results)
    return _finish(job, out, plans, done)


def _check_out(out):
    if out.exists() and not out.is_dir():
        raise PackError(f"{out}: exists and is not a folder; choose a folder for the shards")
    out.mkdir(parents=True, exist_ok=True)
    strangers = sorted(p.name for p in out.iterdir() if not _OURS.match(p.name))
    if strangers:
        raise PackError(f"{out}: holds files that are not ternet shards ({', '.join(strangers[:3])}"
                        f"{' ...' if len(strangers) > 3 else ''}); pack into an empty folder")


def _probe_shape(job):
    """The image size of a set packed without --size: that of its first readable image."""
    for name, sp in job.splits.items():
        for i in range(len(sp.refs)):
            (a, _), = job.readers[name]([sp.refs[i]])
            if a is not None:
                for r in job.readers.values():
                    if isinstance(r, FileReader):
                        r.expect = list(a.shape[:2])
                return tuple(a.shape)
    raise PackError("no readable image among the inputs; check SRC")


def _plan(job):
    """{(split, shard index): (split, lo, hi, plan hash)}: fixed item ranges per shard."""
    h, w, c = job.image_shape
    per_image = h * w * c * (4 / 3 if job.layout == "variable" else 1)
    size = job.shard_size or max(1000, int(SHARD_BYTES // per_image) // 1000 * 1000)
    plans = {}
    for name, sp in job.splits.items():
        n = len(sp.refs)
        for i, lo in enumerate(range(0, max(n, 1), size)):
            hi = min(n, lo + size)
            desc = {"format": shards.FORMAT, "version": shards.VERSION, "ternet": ternet.__version__,
                    "split": name, "index": i, "layout": job.layout, "shape": list(job.image_shape),
                    "compress": job.compress, "reader": job.readers[name].config(),
                    "keys": sp.keys[lo:hi], "labels": sp.labels[lo:hi].tolist()}
            digest = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()
            plans[(name, i)] = (name, lo, hi, digest)
    return plans


def _tasks(job, plans, todo):
    for key in todo:
        name, lo, hi, _ = plans[key]
        for a in range(lo, hi, CHUNK):
            yield key, job.readers[name], job.splits[name].refs[a:min(hi, a + CHUNK)]
        if hi == lo:
            yield key, job.readers[name], []


def _run_task(task):
    key, reader, refs = task
    return key, reader(refs)


def _decoded(job, plans, todo, workers, progress):
    """Yield (shard key, [(image | None, reason | None)]) for every todo shard, in order;
    progress(n) is called as each chunk of n items arrives."""
    workers = workers or len(os.sched_getaffinity(0))
    parallel = workers > 1 and any(job.readers[plans[k][0]].parallel for k in todo)
    pool = _pool(workers) if parallel else None
    try:
        results = pool.imap(_run_task, _tasks(job, plans, todo)) if pool else \
            map(_run_task, _tasks(job, plans, todo))
        current, acc = None, []
        for key, res in results:
            if key != current and current is not None:
                yield current, acc
                acc = []
            current = key
            acc += res
            progress(len(res))
        if current is not None:
            yield current, acc
    finally:
        if pool:
            pool.terminate()
            pool.join()


def _pool(workers):
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    return ctx.Pool(workers, initializer=_worker_init)


def _worker_init():
    # Ctrl-C is handled once, by the parent; and a worker must not outlive a killed parent.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _write(job, out, key, plan, results):
    name, lo, hi, digest = plan
    sp = job.splits[name]
    ok = [i for i, (a, _) in enumerate(results) if a is not None]
    skipped = [(sp.keys[lo + i], why) for i, (a, why) in enumerate(results) if a is None]
    images = [results[i][0] for i in ok]
    h, w, c = job.image_shape
    if job.layout == "fixed":
        images = np.stack(images) if images else np.zeros((0, h, w, c), np.uint8)
    entry = shards.write_shard(
        out / shards.shard_name(*key), split=name, index=key[1], images=images,
        labels=sp.labels[lo:hi][ok], sources=[sp.keys[lo + i] for i in ok], plan=digest,
        skipped=skipped, compress=job.compress)
    return entry, shards.read_shard_header(out / entry["file"])


def _finish(job, out, plans, done):
    """Write report.json then manifest.json (last: its presence marks a complete dataset)."""
    keys = list(plans)
    splits = {}
    skipped = [{"split": s, "source": k, "reason": r} for s, k, r in job.pre_skipped]
    for name, sp in job.splits.items():
        mine = [k for k in keys if k[0] == name]
        per_class = np.zeros(len(job.class_ids), np.int64)
        for k in mine:
            per_class += np.bincount(shards.shard_labels(out / done[k][0]["file"]),
                                     minlength=len(job.class_ids))
            skipped += [{"split": name, "source": s, "reason": r} for s, r in done[k][1]["skipped"]]
        splits[name] = {"count": int(per_class.sum()), "counts_per_class": per_class.tolist(),
                        "listed": len(sp.refs), "skipped": len(sp.refs) - int(per_class.sum()),
                        "shards": [done[k][0] for k in mine]}
    stat_split = "train" if "train" in splits else next(iter(splits))
    mean, std = shards.channel_stats([done[k][1] for k in keys if k[0] == stat_split])
    names = {shards.shard_name(*k) for k in keys}
    for p in out.glob("*.h5"):
        if p.name not in names:
            p.unlink()      # a shard of an earlier, different plan into this folder
    shards.write_report(out, {"name": job.name, "skipped": skipped,
                              "counts": {k: {f: v[f] for f in ("listed", "count", "skipped")}
                                         for k, v in splits.items()}})
    manifest = {"format": shards.FORMAT, "version": shards.VERSION, "name": job.name,
                "layout": job.layout, "image_shape": list(job.image_shape),
                "num_classes": len(job.class_ids), "class_ids": list(job.class_ids),
                "class_names": list(job.class_names), "mean": mean, "std": std,
                "stats_split": stat_split, "splits": splits, "report": shards.REPORT,
                "prep": job.prep, "ternet": ternet.__version__, **job.extra}
    shards.write_manifest(out, manifest)
    return manifest



def pack_arrays(out, arrays, class_names, *, name="arrays", size=None, crop=True, shard_size=None,
                compress=0, progress=False):
    """Pack in-memory images: arrays = {split: (uint8 (n, H, W, C), int labels (n,))}. For
    synthetic sets in tests and benchmarks, and for users with data already in numpy."""
    splits, readers = {}, {}
    for split, (images, labels) in arrays.items():
        n = len(images)
        splits[split] = Split(list(range(n)), [f"{split}[{i}]" for i in range(n)],
                              np.asarray(labels, np.int32))
        readers[split] = ArrayReader(np.asarray(images, np.uint8), size, crop)
    h, w, c = next(iter(arrays.values()))[0].shape[1:]
    job = Job(prep={"command": "pack_arrays", "src": None, "options": {}}, name=name,
              splits=splits, readers=readers, class_ids=[str(i) for i in range(len(class_names))],
              class_names=list(class_names), layout="fixed" if crop or size is None else "variable",
              image_shape=(size, size, c) if size else (h, w, c), shard_size=shard_size,
              compress=compress)
    return pack(job, out, workers=1, progress=progress)
