"""Loader throughput with augmentation, from shards on disk (acceptance 6): images/s of
ternet.loader.Loader at 32x32 and 64x64 (and 224 from short-side-256 shards), in memory and
memory-mapped, normalised float32 and raw uint8.

Run: python bench/bench_loader.py [--data OUT ...] [--threads N] [--batch 256] [--epochs 2]
Without --data it packs synthetic sets (random pixels: content does not change the speed).
"""
import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from data_prep.pack import pack_arrays  # noqa: E402
from ternet.loader import Loader  # noqa: E402
from ternet.shards import open_dataset  # noqa: E402

SYNTHETIC = [(32, 50_000, {}), (64, 20_000, {}),
             (256, 2_000, {"size": 256, "crop": False, "src": (256, 320)})]


def synthetic(tmp):
    """Packed sets of random images: 32 px x 50k, 64 px x 20k, short side 256 x 2k."""
    out = []
    gen = np.random.default_rng(0)
    for side, n, kw in SYNTHETIC:
        h, w = kw.pop("src", (side, side))
        images = gen.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
        path = tmp / f"synthetic-{side}"
        pack_arrays(path, {"train": (images, gen.integers(0, 10, n))}, [str(i) for i in range(10)],
                    name=f"synthetic-{side}", **kw)
        out.append(path)
    return out


def run(loader, epochs, raw):
    for _ in loader.batches(0, raw=raw):     # warm up: kernels compiled, pages touched
        break
    t, n = time.perf_counter(), 0
    for e in range(epochs):
        for x, y in loader.batches(e, raw=raw):
            n += len(y)
    return n / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", action="append", type=pathlib.Path, help="packed dataset(s)")
    ap.add_argument("--threads", type=int, default=None, help="[default: all cores]")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in args.data or synthetic(pathlib.Path(tmp)):
            ds = open_dataset(path)
            for in_memory in (True, False):
                for raw in (False, True):
                    loader = Loader(ds, "train", args.batch, in_memory=in_memory,
                                    threads=args.threads)
                    rows.append({"data": ds.manifest["name"], "shape": list(loader.output_shape),
                                 "augment": loader.augment, "in_memory": in_memory,
                                 "output": "uint8 raw" if raw else "float32 normalised",
                                 "img_s": round(run(loader, args.epochs, raw))})
    print(f"Loader, batch {args.batch}, threads {args.threads or len(os.sched_getaffinity(0))}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'data':18s} {'output shape':13s} {'augment':10s} {'mode':8s} {'x':19s} {'img/s':>9s}")
    for r in rows:
        print(f"{r['data']:18s} {'x'.join(map(str, r['shape'])):13s} {r['augment']:10s} "
              f"{'memory' if r['in_memory'] else 'mmap':8s} {r['output']:19s} {r['img_s']:9,d}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
