"""Per-part times of the LeNet CPU training step (the step bench_cpu.py times): each layer's
forward and backward, the loss, the DST update and Adam, median over steps, in ms.

    python bench/profile_cpu.py [--batch 100] [--steps 40]
"""
import argparse
import os
import sys
import time
from collections import defaultdict

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")     # as ternet/__init__.py sets it

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    from ternet.kernels import configure_cpu_threads
    from ternet.kernels.loss import loss_forward_backward
    from ternet.model import Model
    from ternet.optim import RealOptimizer
    from ternet.samplers import make_sampler
    from ternet.schedules import Schedule
    configure_cpu_threads()
    rng = np.random.default_rng(0)
    model = Model("lenet", (28, 28, 1), 10, seed=0)
    x = rng.standard_normal((args.batch, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, args.batch).astype(np.int32)
    sampler = make_sampler("dst", seed=0, lr=Schedule("constant", 0.01), m=Schedule("constant", 3.0), source="sgd")
    opt = RealOptimizer("adam")
    tparams, layers = model.tparams(), model.net.layers
    times = defaultdict(list)

    def timed(name, fn, *a):
        t0 = time.perf_counter()
        r = fn(*a)
        times[name].append(time.perf_counter() - t0)
        return r

    for t in range(args.steps + 5):
        t_step = time.perf_counter()
        h = x
        for layer in layers:
            h = timed(f"{layer.name} fwd", layer.forward, h, True)
        d = np.empty_like(h)
        timed("loss", loss_forward_backward, d, h, y, "xent", np.zeros(2))
        for layer in reversed(layers):
            d = timed(f"{layer.name} bwd", layer.backward, d)
        timed("dst", sampler.step, tparams, [p.grad for p in tparams], t)
        timed("adam", opt.step, model.reals, 0.01, t + 1)
        times["step"].append(time.perf_counter() - t_step)
        if t == 4:
            times.clear()
    total = 0.0
    for name, ts in times.items():
        med = sorted(ts)[len(ts) // 2] * 1e3
        total += med if name != "step" else 0
        print(f"{name:14s} {med:7.2f} ms")
    print(f"{'sum of parts':14s} {total:7.2f} ms")


if __name__ == "__main__":
    main()
