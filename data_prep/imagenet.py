"""`ternet prep imagenet`: the ILSVRC2012 layout. train/<wnid>/*.JPEG, and val/ in any of the three
forms users have: val/<wnid>/ folders; flat files + Kaggle's LOC_val_solution.csv; flat files +
the devkit's ILSVRC2012_validation_ground_truth.txt and meta.mat (read with scipy, optional).

Class index = position in the sorted wnid list of train/. Exercised by tests/test_imagenet.py.
"""
import csv
import io
import pathlib
import re
import tarfile

import numpy as np

from . import items
from .pack import FileReader, Job, PackError

KAGGLE_CSV = "LOC_val_solution.csv"
KAGGLE_NAMES = "LOC_synset_mapping.txt"
DEVKIT_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
_DEVKIT_DIRS = (".", "data", "ILSVRC2012_devkit_t12/data", "devkit/data")


def find_root(src):
    """The folder holding train/ (SRC itself, or Kaggle's SRC/ILSVRC/Data/CLS-LOC)."""
    src = pathlib.Path(src)
    for root in (src, src / "ILSVRC" / "Data" / "CLS-LOC"):
        if (root / "train").is_dir():
            return root
    raise PackError(f"{src}: no train/ folder (nor ILSVRC/Data/CLS-LOC/train/); SRC must be the "
                    "ILSVRC2012 folder with train/<wnid>/*.JPEG and val/")


def _search(src, root, name):
    """Where a label/names file sits: beside SRC or its parents, or in a devkit data/ folder."""
    for d in [root, *root.parents[:4], src]:
        for sub in _DEVKIT_DIRS:
            if (d / sub / name).is_file():
                return d / sub / name
    return None


def read_devkit(path):
    """(ground-truth ids, {ILSVRC2012_ID: (wnid, words)}) from a devkit folder or .tar.gz."""
    path = pathlib.Path(path)
    if path.is_file() and path.suffix != ".txt":
        with tarfile.open(path) as tf:
            files = {pathlib.Path(m.name).name: m for m in tf.getmembers() if m.isfile()}
            if DEVKIT_TRUTH not in files or "meta.mat" not in files:
                raise PackError(f"{path}: no {DEVKIT_TRUTH} and meta.mat inside; pass the "
                                "ILSVRC2012_devkit_t12.tar.gz (or its extracted folder)")
            truth, meta = (tf.extractfile(files[n]).read() for n in (DEVKIT_TRUTH, "meta.mat"))
    else:
        truth_path = path if path.suffix == ".txt" else _search(path, path, DEVKIT_TRUTH)
        meta_path = truth_path.parent / "meta.mat" if truth_path else None
        if meta_path is None or not meta_path.is_file():
            raise PackError(f"{path}: the devkit needs {DEVKIT_TRUTH} with meta.mat beside it")
        truth, meta = truth_path.read_bytes(), meta_path.read_bytes()
    ids = [int(t) for t in truth.split()]
    return ids, read_meta_mat(io.BytesIO(meta), path)


def read_meta_mat(fileobj, where):
    """{ILSVRC2012_ID: (wnid, words)} for the leaf synsets of the devkit's meta.mat."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise PackError(f"{where}: reading the devkit's meta.mat needs scipy: `pip install scipy` (the extra ternet[devkit]); "
                        f"or use val/<wnid>/ folders or Kaggle's {KAGGLE_CSV} instead") from None
    syn = loadmat(fileobj, squeeze_me=True)["synsets"]
    return {int(s["ILSVRC2012_ID"]): (str(s["WNID"]), str(s["words"]))
            for s in np.atleast_1d(syn) if int(s["num_children"]) == 0}


def _val_number(path):
    m = re.search(r"(\d+)\.[A-Za-z]+$", path.name)
    return int(m.group(1)) if m else None


def val_split(src, root, class_ids, val_labels=None, devkit=None):
    """(refs, keys, labels, unlabeled [(key, reason)], form) of val/, or None when there is none."""
    val = root / "val"
    if not val.is_dir():
        return None
    if items.class_folders(val):
        return (*items.folder_split(val, class_ids, root), [], "folders")
    files = items.list_files(val)
    index = {c: i for i, c in enumerate(class_ids)}
    if val_labels and str(val_labels).endswith(".csv"):
        csv_path, dk = pathlib.Path(val_labels), None
    elif val_labels or devkit:
        csv_path, dk = None, devkit or val_labels
    else:
        csv_path = _search(src, root, KAGGLE_CSV)
        dk = _search(src, root, DEVKIT_TRUTH) if csv_path is None else None
    if csv_path is not None:
        with open(csv_path, newline="") as f:
            wnid = {r["ImageId"]: r["PredictionString"].split()[0] for r in csv.DictReader(f)}
        label_of, form = (lambda p: wnid.get(p.stem)), KAGGLE_CSV
    else:
        if dk is None:
            raise PackError(f"{val}: flat files but no labels: put {KAGGLE_CSV} (Kaggle) or the "
                            f"devkit ({DEVKIT_TRUTH} + meta.mat) beside SRC, pass --val-labels "
                            "or --devkit, or sort val/ into val/<wnid>/ folders")
        truth, meta = read_devkit(dk)

        def label_of(p):
            k = _val_number(p)
            return meta.get(truth[k - 1], (None,))[0] if k and 0 < k <= len(truth) else None
        form = DEVKIT_TRUTH
    refs, keys, labels, unlabeled = [], [], [], []
    for p in files:
        w, key = label_of(p), p.relative_to(root).as_posix()
        if w is None:
            unlabeled.append((key, f"no label for it in {form}"))
        elif w not in index:
            raise PackError(f"{form}: {p.name} is labelled {w}, which is not a class folder in "
                            f"{root / 'train'}")
        else:
            refs.append(str(p))
            keys.append(key)
            labels.append(index[w])
    return refs, keys, np.array(labels, np.int32), unlabeled, form


def class_names(src, root, class_ids, classes=None, devkit=None):
    """Names from --classes, else the devkit's meta.mat, else Kaggle's LOC_synset_mapping.txt."""
    if classes:
        return items.class_names(class_ids, items.read_class_names(classes)), str(classes)
    dk = devkit or _search(src, root, DEVKIT_TRUTH)
    if dk is not None:
        try:
            _, meta = read_devkit(dk)
            return items.class_names(class_ids, dict(meta.values())), "devkit meta.mat"
        except PackError:
            pass
    mapping = _search(src, root, KAGGLE_NAMES)
    if mapping is not None:
        return items.class_names(class_ids, items.read_class_names(mapping)), KAGGLE_NAMES
    return list(class_ids), "wnids (no names found)"


def build_job(src, *, command, options, name=None, size=64, crop=True, resample="bilinear",
              classes=None, val_labels=None, devkit=None, shard_size=None, compress=0,
              select=None):
    src = pathlib.Path(src)
    root = find_root(src)
    class_ids = items.class_folders(root / "train")
    if not class_ids:
        raise PackError(f"{root / 'train'}: no <wnid> class folders")
    raw = {"train": items.folder_split(root / "train", class_ids, root)}
    val = val_split(src, root, class_ids, val_labels, devkit)
    pre_skipped, extra = [], {}
    if val is not None:
        raw["val"] = val[:3]
        pre_skipped = [("val", k, why) for k, why in val[3]]
        extra["val_labels_from"] = val[4]
    names, extra["class_names_from"] = class_names(src, root, class_ids, classes, devkit)
    splits = items.finalize(raw, len(class_ids), **(select or {}))
    reader = FileReader(size, crop, 3, resample)
    return Job(prep={"command": command, "src": str(src), "options": options},
               name=name or f"imagenet-{size}", splits=splits, readers={k: reader for k in splits},
               class_ids=class_ids, class_names=names,
               layout="fixed" if crop else "variable", image_shape=(size, size, 3),
               shard_size=shard_size, compress=compress, extra=extra, pre_skipped=pre_skipped)
