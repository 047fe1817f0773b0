"""Data-parallel scaling: images/s of the full training step (forward, loss, backward, the
all-reduce of every gradient and batch-norm statistic, DST, Adam) on 1, 2, 4, 8 processes, each
with the same per-process batch (weak scaling), synthetic data (the loader is left out), and a
replica checksum at the end. Prints one JSON line per process count, then a table with the
efficiency img/s(K) / (K img/s(1)).

    python bench/bench_scaling.py --gpus 1,2,4,8                 # resnet18 at 224 px, 256 per GPU
    python bench/bench_scaling.py --procs 1,2 --arch 8C5p0-MP2-16C5p0-MP2-32FC --shape 28,28,1 --classes 10 --batch 50

NOT RUN on GPUs yet (no multi-GPU host was lent when it was written): docs/distributed.md.
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def _rank(coll, args, out):
    from ternet.config import Config
    from ternet.data_parallel import ShardedStep
    from ternet.kernels import zeros
    from ternet.model import Model
    from ternet.optim import RealOptimizer
    from ternet.samplers import DST
    from ternet.schedules import Schedule
    dev, k, shape = coll.device, coll.world, tuple(args.shape)
    if dev:
        from ternet import cuda_memory
        cuda_memory.install()                         # before the first device allocation
    model = Model(args.arch, shape, args.classes, seed=0).to(dev)
    cfg = Config(arch=args.arch, batch_size=args.batch * k, grad_shards=k)
    step = ShardedStep(model, cfg.loss, k, coll, dev)
    sampler = DST(seed=0, lr=Schedule("constant", 20.0), m=Schedule("constant", 3.0), source="sgd")
    opt, acc, tparams = RealOptimizer("adam"), zeros((2,), np.float64, dev), model.tparams()
    gen = np.random.default_rng(coll.rank)          # each rank its own data, as with a real loader
    x = gen.standard_normal((args.batch,) + shape).astype(np.float32)
    y = gen.integers(0, args.classes, args.batch).astype(np.int32)
    if dev:
        from numba import cuda
        x, y = cuda.to_device(x), cuda.to_device(y)
    sync = (lambda: cuda.synchronize()) if dev else (lambda: None)

    def one(t):
        step(x, y, acc)
        sampler.step(tparams, [p.grad for p in tparams], t)
        opt.step(model.reals, 0.01, t + 1)

    for t in range(args.warm):
        one(t)
    sync()
    coll.barrier()
    t0 = time.perf_counter()
    for t in range(args.steps):
        one(args.warm + t)
    sync()
    seconds = time.perf_counter() - t0
    coll.checksum_check(model, args.warm + args.steps)      # raises if the replicas differ
    if coll.rank == 0:
        Path(out).write_text(json.dumps({"procs": k, "device": "cuda" if dev else "cpu", "arch": args.arch,
                                         "batch_per_proc": args.batch, "steps": args.steps,
                                         "step_ms": round(seconds / args.steps * 1e3, 2),
                                         "img_per_s": round(k * args.batch * args.steps / seconds, 1),
                                         "replicas": "identical"}))
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", default="", help="process counts on GPUs, e.g. 1,2,4,8")
    p.add_argument("--procs", default="", help="process counts on the CPU, e.g. 1,2")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--shape", default="224,224,3", type=lambda s: [int(v) for v in s.split(",")])
    p.add_argument("--classes", default=1000, type=int)
    p.add_argument("--batch", default=256, type=int, help="images per process")
    p.add_argument("--steps", default=20, type=int)
    p.add_argument("--warm", default=3, type=int)
    args = p.parse_args()
    from ternet.distributed import make_collective, spawn
    gpu = bool(args.gpus)
    counts = [int(v) for v in (args.gpus or args.procs or "1").split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in counts:
            out = Path(tmp) / f"k{k}.json"
            if k == 1:        # one process: the sharded step with a world-1 collective
                coll = make_collective("local")
                coll.device = gpu
                _rank(coll, args, out)
            elif spawn(k, "nccl" if gpu else "shm", _rank, (args, out)):
                raise SystemExit(f"{k} processes failed (see above)")
            rec = json.loads(out.read_text())
            base = rows[0]["img_per_s"] / rows[0]["procs"] if rows else rec["img_per_s"] / k
            rec["efficiency"] = round(rec["img_per_s"] / (k * base), 3)
            print(json.dumps(rec), flush=True)
            rows.append(rec)
    print("\n| processes | step ms | img/s | efficiency |\n| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['procs']} | {r['step_ms']} | {r['img_per_s']:,} | {r['efficiency']:.0%} |")


if __name__ == "__main__":
    main()
