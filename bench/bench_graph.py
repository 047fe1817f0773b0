"""The trainer's GPU step with and without --cuda-graph (ternet/cuda_graph.py), in one process.

    python bench/bench_graph.py [--arch vgg-gxnor] [--side 32] [--batch 128] [--images 25600]
                                [--epochs 3] [--rounds 2] [--classes 10]
    python bench/bench_graph.py --arch resnet18 --side 64 --batch 512 --images 12800 --classes 1000

Packs a synthetic training split (random pixels: the content does not change the speed), then
trains it with ternet.train.Trainer as `ternet train` would (annealed Bop, crop-flip, cutout 16,
the GPU-resident loader), graph off and on alternately, a fresh model each run. Reports per run
the median of the logged intervals' img/s after the first epoch (compilation, capture), the
host's time per step (Python; measured on a separate eager/graph run of 50 steps), and whether
the final weights of the two modes are equal (same seed: they must be). One JSON line per run.
"""
import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))


def synthetic(folder, side, n, classes=10):
    from data_prep.pack import pack_arrays
    gen = np.random.default_rng(0)
    images = gen.integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    pack_arrays(folder, {"train": (images, gen.integers(0, classes, n))}, [str(i) for i in range(classes)],
                name="synthetic")
    return folder


def run(data, tmp, args, graph, tag):
    from numba import cuda

    from ternet.config import Config
    from ternet.run import RunDir
    from ternet.train import Trainer
    cfg = Config(data=str(data), arch=args.arch, sampler="bop", epochs=args.epochs, batch_size=args.batch,
                 augment="crop-flip", cutout=16, act_r=0.5, cuda_graph=graph, device="cuda", log_every=25,
                 ckpt_every=0).resolve()
    run = RunDir(tmp / tag)
    run.create(cfg)
    t = Trainer(cfg, run, progress=False)
    t.fit()
    cuda.synchronize()
    rate = interval_rate(run)
    host = host_ms(t)
    w = t.model.state_dict()["weights"]
    rec = dict(arch=args.arch, side=args.side, batch=args.batch, cuda_graph=graph, img_per_s=round(rate, 1),
               step_ms=round(args.batch / rate * 1e3, 3), host_ms=host,
               capture_failed=(t.graph.failed if t.graph is not None else None))
    return rec, w


def interval_rate(run):
    """Median img/s of a run's logged intervals after its first epoch (compilation, capture)."""
    return statistics.median(r["img_per_s"] for r in map(json.loads, open(run.timing_path))
                             if "img_per_s" in r and r["epoch"] >= 1)


def host_ms(t, steps=50):
    """Median host time of one train_step on the trainer's own full batch (after its run)."""
    from numba import cuda
    x, y = next(iter(t.train_loader.batches(0)))
    times = []
    for _ in range(steps):
        h = time.perf_counter()
        t.train_step(x, y)
        times.append((time.perf_counter() - h) * 1e3)
        t.state["step"] += 1
    cuda.synchronize()
    return round(statistics.median(times), 3)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="vgg-gxnor")
    ap.add_argument("--side", type=int, default=32)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--images", type=int, default=25600)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--classes", type=int, default=10, help="1000 for resnet18")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = pathlib.Path(d)
        data = synthetic(tmp / "data", args.side, args.images, args.classes)
        for r in range(args.rounds):
            weights = {}
            for graph in ("off", "on"):
                rec, weights[graph] = run(data, tmp, args, graph, f"{graph}-{r}")
                print(json.dumps({**rec, "round": r}), flush=True)
            same = all(np.array_equal(weights["on"][k], weights["off"][k]) for k in weights["off"])
            print(json.dumps({"round": r, "weights_equal": same}), flush=True)


if __name__ == "__main__":
    main()
