"""Times ternet's LeNet training step on the CPU (forward, loss, backward, DST update of the
discrete weights, Adam on batch norm) at batch 100 and 256, and in the same run the same step in
PyTorch on the CPU (../shared/bench/peer_torch_cpu.py) when torch is installed. Prints JSON lines
and a table with the ratio.

    python bench/bench_cpu.py [--peer PATH] [--steps 30]
"""
import argparse
import json
import os
import subprocess
import sys
import time

PEER_ENV = dict(os.environ)      # the peer runs in the environment this bench was started in
# as `ternet` sets it before numpy loads OpenBLAS (ternet/__init__.py): its workers stop spinning
# soon after a GEMM, so the numba kernels between GEMMs get the cores
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def bench(batch, steps=30, warm=5):
    sys.path.insert(0, os.path.dirname(HERE))
    from ternet.kernels import configure_cpu_threads
    from ternet.kernels.loss import loss_forward_backward
    from ternet.model import Model
    from ternet.optim import RealOptimizer
    from ternet.samplers import make_sampler
    from ternet.schedules import Schedule
    configure_cpu_threads()          # as the trainer does on the CPU
    rng = np.random.default_rng(0)
    model = Model("lenet", (28, 28, 1), 10, seed=0)
    x = rng.standard_normal((batch, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, batch).astype(np.int32)
    sampler = make_sampler("dst", seed=0, lr=Schedule("constant", 0.01), m=Schedule("constant", 3.0), source="sgd")
    opt = RealOptimizer("adam")
    tparams = model.tparams()
    acc = np.zeros(2)

    def step(t):
        logits = model.forward(x, train=True)
        d = np.empty_like(logits)
        loss_forward_backward(d, logits, y, "xent", acc)
        model.backward(d)
        sampler.step(tparams, [p.grad for p in tparams], t)
        opt.step(model.reals, 0.01, t + 1)

    for t in range(warm):
        step(t)
    ts = []
    for t in range(steps):
        t0 = time.perf_counter()
        step(warm + t)
        ts.append(time.perf_counter() - t0)
    ts.sort()
    med = ts[len(ts) // 2]
    import numba

    from ternet.kernels import _STREAM_THREADS
    return dict(impl="ternet-cpu", model="lenet_gxnor_28", batch=batch, numba_threads=numba.get_num_threads(),
                stream_threads=_STREAM_THREADS[0] if _STREAM_THREADS else None,
                step_ms=round(med * 1e3, 2), img_per_s=round(batch / med, 1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peer", default=os.path.join(HERE, "..", "..", "shared", "bench", "peer_torch_cpu.py"))
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    rows = []
    for b in (100, 256):
        rows.append(bench(b, args.steps))
        print(json.dumps(rows[-1]), flush=True)
    peer = {}
    if os.path.exists(args.peer):
        try:
            out = subprocess.run([sys.executable, args.peer], capture_output=True, text=True, timeout=900,
                                 env=PEER_ENV)
            for line in out.stdout.splitlines():
                if line.startswith("{"):
                    rec = json.loads(line)
                    peer[rec["batch"]] = rec
                    print(line, flush=True)
            if not peer:
                print(f"peer produced no figures: {out.stderr.strip()[-300:]}")
        except (OSError, subprocess.SubprocessError) as e:
            print(f"peer not run: {e}")
    print("\n| batch | ternet img/s | torch-cpu img/s | ratio |\n| --- | --- | --- | --- |")
    for r in rows:
        p = peer.get(r["batch"])
        ratio = f"{r['img_per_s'] / p['img_per_s']:.2f}x" if p else "-"
        print(f"| {r['batch']} | {r['img_per_s']:,} | {p['img_per_s'] if p else '-'} | {ratio} |")


if __name__ == "__main__":
    main()
