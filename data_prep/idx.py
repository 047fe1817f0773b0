"""`ternet prep mnist`: MNIST-style IDX files (MNIST, Fashion-MNIST, ...), gzipped or not.

SRC holds train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz] and the t10k-* pair (the
`.idx3-ubyte` spelling too). Exercised by tests/test_idx.py and the embedded-dataset test.
"""
import gzip
import pathlib

import numpy as np

from . import items
from .pack import ArrayReader, Job, PackError

FASHION_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                 "Sneaker", "Bag", "Ankle boot"]
PRESETS = {"digits": [str(i) for i in range(10)], "fashion-mnist": FASHION_NAMES}
_PREFIX = {"train": ("train",), "test": ("t10k", "test")}


def read_idx(path):
    """An IDX file (gzipped or not, told by content) as a numpy array of its stored shape."""
    data = pathlib.Path(path).read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise PackError(f"{path}: not an IDX file of unsigned bytes (magic {data[:4].hex()}); "
                        "expected e.g. train-images-idx3-ubyte[.gz] from MNIST or Fashion-MNIST")
    ndim = data[3]
    dims = [int(d) for d in np.frombuffer(data[4:4 + 4 * ndim], ">u4")]
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise PackError(f"{path}: holds {body.size} bytes of data, its header says {dims} "
                        "(truncated download?)")
    return body.reshape(dims)


def find_file(src, split, kind):
    """The IDX file for split ('train'/'test') and kind ('images'/'labels') in folder src."""
    hits = sorted(p for p in pathlib.Path(src).iterdir() for pre in _PREFIX[split]
                  if p.name.startswith(f"{pre}-{kind}") and "idx" in p.name)
    if not hits:
        return None
    gz = [p for p in hits if p.suffix == ".gz"]
    return (gz or hits)[0]


def build_job(src, *, command, options, name=None, size=None, crop=True, resample="bilinear",
              channels=1, classes="digits", shard_size=None, compress=0, select=None):
    src = pathlib.Path(src)
    if not src.is_dir():
        raise PackError(f"{src}: not a folder; SRC must hold train-images-idx3-ubyte[.gz] etc.")
    raw, arrays = {}, {}
    for split in ("train", "test"):
        ipath, lpath = find_file(src, split, "images"), find_file(src, split, "labels")
        if ipath is None and lpath is None:
            continue
        if ipath is None or lpath is None:
            raise PackError(f"{src}: found {(ipath or lpath).name} but not its "
                            f"{'images' if ipath is None else 'labels'} partner")
        images, labels = read_idx(ipath), read_idx(lpath).astype(np.int32)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise PackError(f"{ipath}, {lpath}: shapes {images.shape} and {labels.shape} do not "
                            "pair up as (n, h, w) images and (n,) labels")
        images = images[..., None]
        if channels == 3:
            images = np.repeat(images, 3, axis=3)
        arrays[split] = images
        raw[split] = (list(range(len(labels))), [f"{ipath.name}[{i}]" for i in range(len(labels))],
                      labels)
    if not raw:
        raise PackError(f"{src}: no train-images-idx3-ubyte[.gz] or t10k-images-idx3-ubyte[.gz]")
    class_names = PRESETS.get(classes) if classes in PRESETS else None
    if class_names is None:
        names = items.read_class_names(classes)
        class_names = [names.get(str(i), str(i)) for i in range(10)]
    num_classes = max(len(class_names), int(max(r[2].max() for r in raw.values())) + 1)
    class_ids = [str(i) for i in range(num_classes)]
    class_names = [class_names[i] if i < len(class_names) else str(i) for i in range(num_classes)]
    splits = items.finalize(raw, num_classes, **(select or {}))
    h, w = next(iter(arrays.values())).shape[1:3]
    return Job(prep={"command": command, "src": str(src), "options": options},
               name=name or src.resolve().name, splits=splits,
               # a carved-out val split indexes the train arrays
               readers={k: ArrayReader(arrays[k] if k in arrays else arrays["train"], size, crop, resample)
                        for k in splits},
               class_ids=class_ids, class_names=class_names,
               layout="fixed" if crop or size is None else "variable",
               image_shape=(size, size, channels) if size else (h, w, channels),
               shard_size=shard_size, compress=compress)
