"""`ternet prep cifar10`: the official python-pickle archive (cifar-10-python.tar.gz), its extracted
folder (cifar-10-batches-py/), or class folders of images (train/<class>/, test/<class>/).

The pickles are read with an unpickler that only builds numpy arrays and plain containers, so a
tampered archive cannot run code. Exercised by tests/test_cifar.py.
"""
import io
import pathlib
import pickle
import tarfile

import numpy as np

from . import folder, items
from .pack import ArrayReader, Job, PackError

BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


class _SafeUnpickler(pickle.Unpickler):
    ALLOWED = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray",
                                "numpy.core.numeric", "numpy._core.numeric")
               for n in ("_reconstruct", "_frombuffer")} | {
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR pickle")
        return super().find_class(module, name)


def _load(data):
    return _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()


def read_batches(src):
    """{name: bytes} of the pickled batches, from the .tar.gz or an (enclosing) extracted folder."""
    src = pathlib.Path(src)
    wanted = set(BATCHES["train"] + BATCHES["test"] + ["batches.meta"])
    if src.is_file():
        try:
            with tarfile.open(src) as tf:
                return {pathlib.Path(m.name).name: tf.extractfile(m).read() for m in tf.getmembers()
                        if m.isfile() and pathlib.Path(m.name).name in wanted}
        except tarfile.TarError as e:
            raise PackError(f"{src}: not a readable tar archive ({e}); expected "
                            "cifar-10-python.tar.gz or its extracted folder") from None
    for d in (src, src / "cifar-10-batches-py"):
        if (d / "data_batch_1").is_file():
            return {n: (d / n).read_bytes() for n in wanted if (d / n).is_file()}
    return None


def build_job(src, *, command, options, name=None, size=None, crop=True, resample="bilinear",
              shard_size=None, compress=0, select=None, classes=None):
    src = pathlib.Path(src)
    if not src.exists():
        raise PackError(f"{src}: no such file or folder")
    batches = read_batches(src)
    if batches is None:     # class folders of images
        return folder.build_job(src, command=command, options=options,
                                name=name or "cifar10", size=size, crop=crop, channels=3,
                                resample=resample, classes=classes, shard_size=shard_size,
                                compress=compress, select=select)
    raw, arrays = {}, {}
    for split, names in BATCHES.items():
        missing = [n for n in names if n not in batches]
        if missing:
            raise PackError(f"{src}: lacks {', '.join(missing)}; expected the complete "
                            "cifar-10-python.tar.gz (or its extracted cifar-10-batches-py/)")
        data, labels, keys = [], [], []
        for n in names:
            d = _load(batches[n])
            data.append(np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32))
            labels += list(d[b"labels"])
            keys += [f"{n}[{i}]" for i in range(len(d[b"labels"]))]
        arrays[split] = np.ascontiguousarray(np.concatenate(data).transpose(0, 2, 3, 1))
        raw[split] = (list(range(len(keys))), keys, np.array(labels, np.int32))
    meta = _load(batches["batches.meta"]) if "batches.meta" in batches else {}
    class_names = [s.decode() for s in meta.get(b"label_names", [])] or [str(i) for i in range(10)]
    if classes:
        found = items.read_class_names(classes)
        class_names = [found.get(str(i), n) for i, n in enumerate(class_names)]
    splits = items.finalize(raw, len(class_names), **(select or {}))
    return Job(prep={"command": command, "src": str(src), "options": options},
               name=name or "cifar10", splits=splits,
               # a carved-out val split indexes the train arrays
               readers={k: ArrayReader(arrays[k] if k in arrays else arrays["train"], size, crop, resample)
                        for k in splits},
               class_ids=list(class_names), class_names=class_names,
               layout="fixed" if crop or size is None else "variable",
               image_shape=(size, size, 3) if size else (32, 32, 3),
               shard_size=shard_size, compress=compress)
