"""The on-disk dataset format ("ternet-shards" v1): a folder of HDF5 shards plus manifest.json.

This is the one module that knows the format: data_prep writes through write_shard/write_manifest,
the loader reads through open_dataset. Layout and fields: docs/data.md. Tests: tests/test_shards.py.
"""
import hashlib
import json
import os
import pathlib

import h5py
import numpy as np

FORMAT = "ternet-shards"
VERSION = 1
MANIFEST = "manifest.json"
REPORT = "report.json"
REPORT_FORMAT = "ternet-prep-report"
EMBEDDED_DEFAULT = pathlib.Path(__file__).resolve().parent / "data" / "fashion-mnist-small"

_HINT = "re-run `ternet prep ...` into a fresh folder (see `ternet prep --help`)"


class ShardFormatError(Exception):
    """A dataset file is missing, of another format or version, or damaged. Says what to run."""


def shard_name(split, index):
    return f"{split}-{index:05d}.h5"


def _atomic_write(path, write):
    """Write through a temp file and os.replace it, so a crash never leaves a half-written file."""
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# writer side (used by data_prep)

def _put(f, name, data, compress):
    # Fixed chunking, no timestamps: the same data always gives a byte-identical file, which is
    # what lets an interrupted `ternet prep` resume into exactly the output of an uninterrupted one.
    kw = {"track_times": False}
    if compress and data.size:
        row = max(1, int(np.prod(data.shape[1:], dtype=np.int64)) * data.dtype.itemsize)
        kw.update(chunks=(min(len(data), max(1, (1 << 20) // row)),) + data.shape[1:],
                  compression="gzip", compression_opts=int(compress), shuffle=data.dtype.itemsize > 1)
    f.create_dataset(name, data=data, **kw)


def write_shard(path, *, split, index, labels, sources, images=None, shapes=None, plan="",
                skipped=(), compress=0):
    """Write one shard atomically and return its manifest entry {file, count, bytes, sha256}.

    images: uint8 (n, H, W, C) for the fixed layout, or a list of n uint8 (h, w, C) arrays for the
    variable layout (stored flat as `pixels` with `offsets` and `shapes`; pass shapes=None).
    labels: int32 (n,). sources: n str, where each image came from. plan: a hash of everything
    that decided this shard's content, so a rerun can tell whether an existing shard is still
    valid. skipped: [(source, reason)] for inputs that could not be decoded (kept for the report).
    compress: gzip level, 0 = contiguous uncompressed (fastest to read, memory-mappable).
    """
    labels = np.asarray(labels, dtype=np.int32)
    n = len(labels)
    variable = isinstance(images, list)
    if variable:
        shapes = np.array([im.shape for im in images], dtype=np.int32).reshape(n, 3)
        sizes = np.prod(shapes, axis=1, dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        pixels = (np.concatenate([im.reshape(-1) for im in images]) if n
                  else np.zeros(0, np.uint8))
        channels = pixels.reshape(-1, shapes[0, 2]) if n else np.zeros((0, 1), np.uint8)
    else:
        images = np.ascontiguousarray(images, dtype=np.uint8)
        assert images.ndim == 4 and len(images) == n, images.shape
        channels = images.reshape(-1, images.shape[3])
    # Exact integer sums (from per-channel histograms), so the mean/std of a whole split do not
    # depend on shard order or float rounding. bincount widens its input to intp: a chunk at a
    # time keeps that copy in cache instead of an int64 copy of the whole shard.
    hist = np.zeros((channels.shape[1], 256), np.int64)
    for i in range(0, len(channels), 1 << 16):
        part = channels[i:i + (1 << 16)]
        for k in range(channels.shape[1]):
            hist[k] += np.bincount(part[:, k], minlength=256)
    v = np.arange(256, dtype=np.int64)
    stat_sum, stat_sumsq = hist @ v, hist @ (v * v)
    enc = [s.encode() for s in sources]
    src = np.array(enc, dtype=f"S{max([1] + [len(s) for s in enc])}")

    def write(tmp):
        with h5py.File(tmp, "w", track_order=False) as f:
            a = f.attrs
            a["format"], a["version"], a["split"], a["index"] = FORMAT, VERSION, split, index
            a["count"], a["layout"], a["plan"] = n, "variable" if variable else "fixed", plan
            a["stat_sum"], a["stat_sumsq"], a["stat_pixels"] = stat_sum, stat_sumsq, len(channels)
            a["skipped"] = json.dumps([list(s) for s in skipped])
            if variable:
                _put(f, "pixels", pixels, compress)
                _put(f, "offsets", offsets, compress)
                _put(f, "shapes", shapes, compress)
            else:
                _put(f, "images", images, compress)
            _put(f, "labels", labels, compress)
            _put(f, "sources", src, compress)

    path = pathlib.Path(path)
    _atomic_write(path, write)
    return {"file": path.name, "count": n, "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def read_shard_header(path):
    """attrs of a shard as a dict, or None when the file is absent, unreadable or not ours."""
    try:
        with h5py.File(path, "r") as f:
            a = dict(f.attrs)
            if a.get("format") != FORMAT or a.get("version") != VERSION:
                return None
            a["skipped"] = [tuple(s) for s in json.loads(a["skipped"])]
            return a
    except (OSError, KeyError, ValueError):
        return None


def existing_shard(path, plan):
    """The manifest entry of a complete shard at `path` written for `plan`, else None.

    Shards only ever appear under their final name once complete (write_shard renames a finished
    temp file), so a readable shard with the right plan hash is valid and need not be rewritten.
    """
    path = pathlib.Path(path)
    head = read_shard_header(path) if path.exists() else None
    if head is None or head.get("plan") != plan:
        return None
    return {"file": path.name, "count": int(head["count"]), "bytes": path.stat().st_size,
            "sha256": file_sha256(path)}, head


def shard_labels(path):
    with h5py.File(path, "r") as f:
        return f["labels"][()]


def write_manifest(folder, manifest):
    text = json.dumps(manifest, indent=1) + "\n"
    _atomic_write(pathlib.Path(folder) / MANIFEST, lambda tmp: tmp.write_text(text))


def write_report(folder, report):
    text = json.dumps({"format": REPORT_FORMAT, "version": 1, **report}, indent=1) + "\n"
    _atomic_write(pathlib.Path(folder) / REPORT, lambda tmp: tmp.write_text(text))


def channel_stats(shard_heads):
    """Per-channel (mean, std) in units of pixel/255 from shard headers' exact integer sums."""
    total = sum(int(h["stat_pixels"]) for h in shard_heads)
    if total == 0:
        return [0.0], [1.0]
    # Python ints: a sum of squares over all of ImageNet at 256 px would overflow int64.
    sums = np.sum([np.asarray(h["stat_sum"]).astype(object) for h in shard_heads], axis=0)
    sqs = np.sum([np.asarray(h["stat_sumsq"]).astype(object) for h in shard_heads], axis=0)
    mean = [float(v) / total / 255.0 for v in sums]
    var = [float(q * total - v * v) / (total * total) / 255.0**2 for v, q in zip(sums, sqs)]
    return mean, [max(v, 0.0) ** 0.5 for v in var]


# ----------------------------------------------------------------------------------------------
# reader side (used by the loader, `ternet prep verify` and `ternet train`)

def open_dataset(path):
    """Open a packed dataset: a folder holding manifest.json, or that manifest file itself."""
    path = pathlib.Path(path)
    folder = path.parent if path.is_file() else path
    mpath = folder / MANIFEST
    if not mpath.is_file():
        why = "no such folder" if not folder.is_dir() else f"no {MANIFEST} in it"
        raise ShardFormatError(
            f"{folder}: not a packed dataset ({why}). HINT: pack one with `ternet prep "
            f"imagenet|cifar10|mnist|folder SRC {folder}`; if a prep into it was interrupted, "
            "re-run that same command to finish it")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        raise ShardFormatError(f"{mpath}: unreadable ({e}). HINT: {_HINT}") from None
    got = (manifest.get("format"), manifest.get("version")) if isinstance(manifest, dict) else None
    if got != (FORMAT, VERSION):
        raise ShardFormatError(
            f"{mpath}: format {got} where this ternet reads ({FORMAT!r}, {VERSION}). HINT: "
            f"{_hint(manifest) if isinstance(manifest, dict) else _HINT}")
    return Dataset(folder, manifest)


def _hint(manifest):
    prep = manifest.get("prep")
    if not isinstance(prep, dict) or prep.get("command") not in ("imagenet", "cifar10", "mnist",
                                                                  "folder"):
        return _HINT
    return (f"re-pack with this ternet: `ternet prep {prep.get('command')} {prep.get('src')} "
            f"NEW_FOLDER ...` (the options used are in the manifest's \"prep\" field)")


def _array(dset, mmap):
    """Dataset contents; a read-only memory map when asked and the data is stored contiguously."""
    offset = dset.id.get_offset()
    if mmap and offset is not None and dset.compression is None:
        return np.memmap(dset.file.filename, dtype=dset.dtype, mode="r", offset=offset,
                         shape=dset.shape)
    return dset[()]


class Dataset:
    """A packed dataset: its manifest plus readers for its shards. Made by open_dataset()."""

    def __init__(self, path, manifest):
        self.path = pathlib.Path(path)
        self.manifest = manifest
        self.splits = {k: int(v["count"]) for k, v in manifest["splits"].items()}
        self.class_ids = list(manifest["class_ids"])
        self.class_names = list(manifest["class_names"])
        self.num_classes = len(self.class_ids)
        self.layout = manifest["layout"]      # "fixed" (n,H,W,C) or "variable" (short side = H)
        self.image_shape = tuple(manifest["image_shape"])
        self.mean = np.array(manifest["mean"], dtype=np.float32)
        self.std = np.array(manifest["std"], dtype=np.float32)

    def __repr__(self):
        return (f"Dataset({str(self.path)!r}, splits={self.splits}, image_shape="
                f"{self.image_shape}, layout={self.layout!r}, classes={self.num_classes})")

    def shards(self, split):
        """[(path, count)] of a split's shards, in order."""
        if split not in self.splits:
            raise KeyError(f"{self.path}: no split {split!r}; it has {sorted(self.splits)}")
        return [(self.path / s["file"], int(s["count"]))
                for s in self.manifest["splits"][split]["shards"]]

    def read_shard(self, split, index, mmap=False):
        """One shard as a dict: labels int32 (n,), sources, and images uint8 (n,H,W,C) (fixed)
        or pixels uint8 (total,), offsets int64 (n+1,), shapes int32 (n,3) (variable)."""
        path, count = self.shards(split)[index]
        try:
            f = h5py.File(path, "r")
        except OSError as e:
            raise ShardFormatError(f"{path}: cannot open ({e}). HINT: `ternet prep verify "
                                   f"{self.path}`, then {_hint(self.manifest)}") from None
        with f:
            got = (f.attrs.get("format"), f.attrs.get("version"))
            if got != (FORMAT, VERSION) or int(f.attrs.get("count", -1)) != count:
                raise ShardFormatError(
                    f"{path}: format {got}, count {f.attrs.get('count')}; the manifest expects "
                    f"({FORMAT!r}, {VERSION}) and {count} images. HINT: {_hint(self.manifest)}")
            names = ("pixels", "offsets", "shapes") if self.layout == "variable" else ("images",)
            out = {k: _array(f[k], mmap) for k in names}
            out["labels"] = f["labels"][()]
            out["sources"] = f["sources"][()]
        return out

    def load_split(self, split):
        """(images uint8 (n,H,W,C), labels int32 (n,)): a whole split in RAM, in file order.

        Variable-layout sets (short side stored at S) give their S x S center crops."""
        parts = [self.read_shard(split, i) for i in range(len(self.shards(split)))]
        labels = np.concatenate([p["labels"] for p in parts]).astype(np.int32)
        h, w, c = self.image_shape
        if self.layout == "fixed":
            images = np.concatenate([p["images"] for p in parts]) if parts else None
            return (images if images is not None else np.zeros((0, h, w, c), np.uint8)), labels
        images = np.empty((len(labels), h, w, c), np.uint8)
        k = 0
        for p in parts:
            for off, (ih, iw, _) in zip(p["offsets"], p["shapes"]):
                im = p["pixels"][off:off + ih * iw * c].reshape(ih, iw, c)
                y, x = (ih - h) // 2, (iw - w) // 2
                images[k] = im[y:y + h, x:x + w]
                k += 1
        return images, labels

    def verify(self):
        """Re-check every shard against the manifest: list of problems found (empty = OK)."""
        problems = []
        for split, count in self.splits.items():
            info = self.manifest["splits"][split]
            per_class = np.zeros(self.num_classes, np.int64)
            entries = info["shards"]
            if sum(int(s["count"]) for s in entries) != count:
                problems.append(f"{split}: shard counts do not add up to {count}")
            found = [p for i, s in enumerate(entries)
                     for p in self._verify_shard(split, i, s, per_class)]
            problems += found
            # Per-class totals only mean something once every shard of the split could be read.
            if not found and per_class.tolist() != list(info["counts_per_class"]):
                problems.append(f"{split}: labels per class {per_class.tolist()} differ from the "
                                f"manifest's counts_per_class {info['counts_per_class']}")
        return problems

    def _verify_shard(self, split, i, entry, per_class):
        path = self.path / entry["file"]
        if not path.is_file():
            return [f"{path}: missing"]
        if path.stat().st_size != entry["bytes"] or file_sha256(path) != entry["sha256"]:
            return [f"{path}: size or sha256 differs from the manifest (damaged or replaced)"]
        try:
            sh = self.read_shard(split, i, mmap=True)
        except (ShardFormatError, KeyError, OSError) as e:
            return [str(e)]
        labels, n, problems = sh["labels"], int(entry["count"]), []
        if len(labels) != n or len(sh["sources"]) != n:
            problems.append(f"{path}: {len(labels)} labels / {len(sh['sources'])} sources, not {n}")
        if n and (labels.min() < 0 or labels.max() >= self.num_classes):
            problems.append(f"{path}: labels outside 0..{self.num_classes - 1}")
        else:
            per_class += np.bincount(labels, minlength=self.num_classes)[:self.num_classes]
        h, w, c = self.image_shape
        if self.layout == "fixed" and sh["images"].shape != (n, h, w, c):
            problems.append(f"{path}: images {sh['images'].shape}, expected {(n, h, w, c)}")
        if self.layout == "variable":
            sizes = np.prod(sh["shapes"].astype(np.int64), axis=1)
            if (len(sh["offsets"]) != n + 1 or np.any(np.diff(sh["offsets"]) != sizes)
                    or sh["offsets"][-1] != len(sh["pixels"])
                    or np.any(sh["shapes"][:, :2].min(axis=1, initial=h) != h)):
                problems.append(f"{path}: offsets/shapes inconsistent with short side {h}")
        return problems
