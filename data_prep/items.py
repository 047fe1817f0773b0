"""Item lists shared by the importers: listing class folders, reading class-name files, and the
deterministic selection steps (per-class limit, seeded validation carve-out, seeded order, limit).

Exercised by tests/test_items.py.
"""
import os
import pathlib
import re

import numpy as np

from ternet import rng

from .pack import PackError, Split


def natural_key(s):
    """Sort key that orders "img2" before "img10" (file order users expect), deterministically."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", str(s))]


def list_files(folder):
    """All non-hidden files under folder (recursively), natural-sorted by relative path."""
    folder = pathlib.Path(folder)
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [pathlib.Path(root, f) for f in files if not f.startswith(".")]
    return sorted(found, key=lambda p: natural_key(p.relative_to(folder).as_posix()))


def class_folders(folder):
    """Sorted names of the subfolders of `folder` (one per class)."""
    return sorted(p.name for p in pathlib.Path(folder).iterdir()
                  if p.is_dir() and not p.name.startswith("."))


def folder_split(folder, class_ids, src):
    """(refs, keys, labels) for `folder/<class>/...`: class index = position in class_ids."""
    index = {c: i for i, c in enumerate(class_ids)}
    refs, keys, labels = [], [], []
    for c in class_folders(folder):
        if c not in index:
            raise PackError(f"{pathlib.Path(folder) / c}: class {c!r} is not among the training "
                            f"classes ({len(class_ids)} folders in train/); remove or rename it")
        for p in list_files(pathlib.Path(folder) / c):
            refs.append(str(p))
            keys.append(p.relative_to(src).as_posix())
            labels.append(index[c])
    return refs, keys, np.array(labels, dtype=np.int32)


def read_class_names(path):
    """{class id: name} from a classes file: `id<TAB>name`, `id name words...` (Kaggle's
    LOC_synset_mapping.txt) or, with no id column, one name per line (ids "0", "1", ...)."""
    lines = [ln.rstrip("\r\n") for ln in pathlib.Path(path).read_text().splitlines() if ln.strip()]
    if lines and all("\t" in ln for ln in lines):
        return dict(ln.split("\t", 1) for ln in lines)
    if lines and all(re.match(r"^n\d{8}\s", ln) for ln in lines):
        return dict(ln.split(None, 1) for ln in lines)
    return {str(i): ln.strip() for i, ln in enumerate(lines)}


def class_names(class_ids, names):
    """Names for class_ids from {id: name}; an id without a name is its own name."""
    return [names.get(c, c) for c in class_ids]


def finalize(raw, num_classes, *, per_class_limit=None, val_fraction=0.0, val_name="val",
             seed=0, shuffle=False, limit=None):
    """raw {split: (refs, keys, labels)} in file order -> {split: Split} ready to pack.

    Steps, in this order, each deterministic: keep the first K items of each class (file order);
    carve a seeded, per-class-stratified fraction of train into `val_name`; put each split in a
    seeded random order (shuffle) or keep file order; keep the first N items. Limits are an int
    for every split or a {split: int} dict.
    """
    splits = {}
    for name, (refs, keys, labels) in raw.items():
        keep = _first_per_class(labels, _for(per_class_limit, name), num_classes)
        splits[name] = Split([refs[i] for i in keep], [keys[i] for i in keep], labels[keep])
    if val_fraction:
        if "train" not in splits:
            raise PackError("--val-fraction needs a train split to carve from")
        if val_name in splits:
            raise PackError(f"--val-fraction: the source already has a {val_name!r} split; "
                            "pass --val-name to give the carved split another name")
        splits["train"], carved = _carve(splits["train"], val_fraction, seed, num_classes)
        splits[val_name] = carved
    for name, sp in splits.items():
        order = (rng.generator(seed, f"pack-order/{name}").permutation(len(sp.refs))
                 if shuffle else np.arange(len(sp.refs)))
        order = order[:_for(limit, name)]
        splits[name] = Split([sp.refs[i] for i in order], [sp.keys[i] for i in order],
                             sp.labels[order])
    return splits


def _for(spec, split):
    return spec.get(split) if isinstance(spec, dict) else spec


def _first_per_class(labels, k, num_classes):
    if k is None:
        return np.arange(len(labels))
    keep = [np.flatnonzero(labels == c)[:k] for c in range(num_classes)]
    return np.sort(np.concatenate(keep + [np.zeros(0, np.int64)]))


def _carve(train, fraction, seed, num_classes):
    gen = rng.generator(seed, "val-split")
    take = np.zeros(len(train.refs), bool)
    for c in range(num_classes):
        idx = np.flatnonzero(train.labels == c)
        take[idx[gen.permutation(len(idx))[:int(round(fraction * len(idx)))]]] = True

    def sub(mask):
        i = np.flatnonzero(mask)
        return Split([train.refs[j] for j in i], [train.keys[j] for j in i], train.labels[i])
    return sub(~take), sub(take)
