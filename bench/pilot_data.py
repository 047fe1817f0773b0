"""Pack an MNIST-style IDX set (MNIST, Fashion-MNIST) into a train/val/test dataset for the CPU
pilot of the sampler sweep, with exactly the selection `ternet prep mnist --per-class-limit
train=K,test=J --val-fraction F --seed S` makes (data_prep.items.finalize). Stop-gap: that command
currently fails with --val-fraction on array importers (idx, cifar10: KeyError 'val', the carved
split has no array of its own), so this script reads the carved split from the train array.
Usage: python bench/pilot_data.py SRC OUT --train-per-class 500 --test-per-class 200 --val-fraction 0.1
"""
import argparse
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from data_prep.idx import PRESETS, read_idx        # noqa: E402
from data_prep.items import finalize               # noqa: E402
from data_prep.pack import pack_arrays             # noqa: E402

FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src"), ap.add_argument("out")
    ap.add_argument("--train-per-class", type=int, default=500)
    ap.add_argument("--test-per-class", type=int, default=200)
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--classes", default="fashion-mnist", choices=sorted(PRESETS))
    a = ap.parse_args()
    src = pathlib.Path(a.src)
    images, raw = {}, {}
    for split, (im, lb) in FILES.items():
        images[split] = read_idx(src / im)[..., None]
        labels = read_idx(src / lb).astype(np.int32)
        raw[split] = (list(range(len(labels))), [f"{im}[{i}]" for i in range(len(labels))], labels)
    splits = finalize(raw, 10, per_class_limit={"train": a.train_per_class, "test": a.test_per_class},
                      val_fraction=a.val_fraction, seed=a.seed)
    arrays = {name: (images["test" if name == "test" else "train"][sp.refs], sp.labels) for name, sp in splits.items()}
    pack_arrays(a.out, arrays, PRESETS[a.classes], name=pathlib.Path(a.out).name)
    print({k: len(v[1]) for k, v in arrays.items()})


if __name__ == "__main__":
    main()
