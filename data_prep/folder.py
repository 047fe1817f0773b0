"""`ternet prep folder`: one subfolder per class (`SRC/<class>/*`), or per split
(`SRC/{train,val,test}/<class>/*`). Also the class-folder form of `ternet prep cifar10`.

Exercised by tests/test_folder.py (CIFAR-10 JPEG and MNIST PNG folders from ../shared/data).
"""
import pathlib

from . import items
from .pack import FileReader, Job, PackError

SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test"}


def find_splits(src):
    """{split: folder}: SRC's train/val/test subfolders, or {"train": SRC} for plain class folders."""
    src = pathlib.Path(src)
    if not src.is_dir():
        raise PackError(f"{src}: not a folder; SRC must hold one subfolder per class, or "
                        "train/ (val/, test/) subfolders that do")
    found = {}
    for name in items.class_folders(src):
        alias = SPLIT_ALIASES.get(name.lower())
        if alias:
            if alias in found:
                raise PackError(f"{src}: both {found[alias].name}/ and {name}/ look like the "
                                f"{alias} split; keep one")
            found[alias] = src / name
    if not found:
        found = {"train": src}
    return {k: found[k] for k in ("train", "val", "test") if k in found}


def build_job(src, *, command, options, name=None, size=None, crop=True, channels=3,
              resample="bilinear", classes=None, shard_size=None, compress=0, select=None):
    """A Job for class folders under src. select: keyword arguments for items.finalize()."""
    src = pathlib.Path(src)
    folders = find_splits(src)
    base = folders.get("train") or next(iter(folders.values()))
    class_ids = items.class_folders(base)
    if not class_ids:
        raise PackError(f"{base}: no class subfolders; expected {base}/<class>/<image files>")
    raw = {k: items.folder_split(f, class_ids, src) for k, f in folders.items()}
    empty = [k for k, (refs, _, _) in raw.items() if not refs]
    if empty:
        raise PackError(f"{folders[empty[0]]}: no image files in its class folders")
    splits = items.finalize(raw, len(class_ids), **(select or {}))
    reader = FileReader(size, crop, channels, resample)
    names = items.read_class_names(classes) if classes else {}
    return Job(prep={"command": command, "src": str(src), "options": options},
               name=name or src.resolve().name, splits=splits,
               readers={k: reader for k in splits}, class_ids=class_ids,
               class_names=items.class_names(class_ids, names),
               layout="fixed" if crop or size is None else "variable",
               image_shape=(size, size, channels) if size else None,
               shard_size=shard_size, compress=compress)
