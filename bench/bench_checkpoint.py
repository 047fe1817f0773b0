"""Time one checkpoint of a model with Bop's per-weight slots (momentum and rms, float32): the part
the trainer waits for (the snapshot to host memory) and the part a background thread does (the
HDF5 write, fsync and rename; ternet/checkpoint.py: Writer).
    python bench/bench_checkpoint.py [--arch vgg-gxnor] [--shape 32 32 3] [--rounds 3] [--dir /tmp]"""
import argparse
import json
import os
import tempfile
import time

import numpy as np

from ternet import checkpoint
from ternet.model import Model
from ternet.optim import RealOptimizer


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="vgg-gxnor")
    ap.add_argument("--shape", type=int, nargs=3, default=[32, 32, 3])
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    a = ap.parse_args()
    model = Model(a.arch, a.shape, a.classes)     # on the host: a GPU run's snapshot adds the copy back
    for p in model.tparams():                     # what Bop (norm=rms) keeps per weight
        for name in ("bop_m", "bop_v"):
            p.slots[name] = np.zeros(p.q.shape, np.float32)
    opt = RealOptimizer("adam")
    folder = tempfile.mkdtemp(dir=a.dir)
    for r in range(a.rounds):
        path = os.path.join(folder, f"ckpt-{r:09d}.h5")
        t0 = time.perf_counter()
        snap = checkpoint.snapshot("{}", model, opt, {"step": r})
        t1 = time.perf_counter()
        checkpoint.write(path, snap)
        t2 = time.perf_counter()
        print(json.dumps({"arch": a.arch, "weights": model.num_weights(), "mb": round(os.path.getsize(path) / 1e6, 1),
                          "snapshot_s": round(t1 - t0, 4), "write_s": round(t2 - t1, 4)}))
        os.remove(path)
    os.rmdir(folder)


if __name__ == "__main__":
    main()
