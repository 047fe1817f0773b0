"""GPU time of every kernel of one training step, by layer (bench_gpu's step, eager).

    python bench/profile_kernels.py [--arch vgg-gxnor] [--side 32] [--classes 10]
                                    [--sampler bop|dst] [--batch 64 128 512] [--top 25] [--dw-chunk M]
                                    [--save-memory] [--no-conv-sums]

The step's launches are queued behind a kernel that sleeps ~0.3 s, so the host is always ahead of
the GPU and the CUDA events recorded around each planned launch measure the kernel alone (plus the
event's own ~2 us), not the host's gaps. Per batch size: the step's summed kernel time, the time
per layer and phase, and the largest kernels. Run at two or more batch sizes to see which kernels
cost the same whatever the batch (the fixed part of a small-batch step).
"""
import argparse
import json
import re
from collections import defaultdict

from numba import cuda

from bench_gpu import training_step


@cuda.jit
def _sleep(n):
    for _ in range(n):
        cuda.nanosleep(1000000)


def short_name(mangled):
    """'_ZN6cudapy6ternet7kernels7conv_tc9_fwd_int8B2v1...' -> 'conv_tc._fwd_int8'."""
    parts, i = [], mangled.find("_ZN")
    i = i + 3 if i >= 0 else len(mangled)
    while i < len(mangled) and mangled[i].isdigit():
        m = re.match(r"\d+", mangled[i:])
        n = int(m.group())
        i += len(m.group())
        parts.append(mangled[i:i + n])
        i += n
    parts = [p for p in parts if p not in ("cudapy", "ternet", "kernels")]
    return ".".join(parts[-2:]) if parts else mangled[:40]


def profile(arch, shape, classes, batch, sampler, top, save_memory=False):
    from ternet import cuda_memory
    from ternet.kernels import launch
    cuda_memory.install()
    launch.install()
    model, step = training_step(arch, shape, classes, batch, sampler=sampler, save_memory=save_memory)
    for t in range(3):                              # compile, plan every launch
        step(t)
    cuda.synchronize()

    where = ["rest"]
    for layer in model.net.layers:                  # label the launches by layer and phase
        f0, b0 = layer.forward, layer.backward

        def wf(x, train, f0=f0, n=layer.name):
            where[0] = n + ".fwd"
            r = f0(x, train)
            where[0] = "rest"
            return r

        def wb(d, b0=b0, n=layer.name):
            where[0] = n + ".bwd"
            r = b0(d)
            where[0] = "rest"
            return r
        layer.forward, layer.backward = wf, wb

    recs, orig = [], launch._Plan.launch

    def timed(self, grid, block, vals):
        e0, e1 = cuda.event(), cuda.event()
        e0.record()
        orig(self, grid, block, vals)
        e1.record()
        recs.append((where[0], short_name(self.name), grid, e0, e1))

    _sleep[1, 1](300)
    launch._Plan.launch = timed
    try:
        a, b = cuda.event(), cuda.event()
        a.record()
        step(3)
        b.record()
        b.synchronize()
    finally:
        launch._Plan.launch = orig
        for layer in model.net.layers:
            del layer.forward, layer.backward
    ms = [(w, k, g, cuda.event_elapsed_time(e0, e1)) for w, k, g, e0, e1 in recs]
    by_place, by_kernel = defaultdict(float), defaultdict(lambda: [0, 0.0])
    for w, k, g, t in ms:
        by_place[w] += t
        by_kernel[k][0] += 1
        by_kernel[k][1] += t
    total = sum(t for *_, t in ms)
    out = dict(arch=arch, batch=batch, sampler=sampler, launches=len(ms), kernels_ms=round(total, 3),
               step_ms=round(cuda.event_elapsed_time(a, b), 3),
               by_place={k: round(v, 3) for k, v in sorted(by_place.items(), key=lambda kv: -kv[1])},
               by_kernel={k: [c, round(v, 3)] for k, (c, v) in sorted(by_kernel.items(), key=lambda kv: -kv[1][1])},
               top=[[w, k, list(g), round(t, 4)] for w, k, g, t in sorted(ms, key=lambda r: -r[3])[:top]])
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="vgg-gxnor")
    ap.add_argument("--side", type=int, default=32)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--sampler", default="bop", choices=["bop", "dst"])
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 128, 512])
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--dw-chunk", type=int, default=0,
                    help="rows m per split of the tensor-core weight gradient (conv_tc.DW_CHUNK; 0: as set)")
    ap.add_argument("--save-memory", action="store_true", help="ternet train --save-memory on")
    ap.add_argument("--no-conv-sums", action="store_true",
                    help="batch statistics from a pass over each output (TERNET_CONV_SUMS=0)")
    a = ap.parse_args()
    if a.no_conv_sums:
        from ternet.kernels import conv_tc
        conv_tc.SUMS = False
    if a.dw_chunk:
        from ternet.kernels import conv_tc
        conv_tc.DW_CHUNK = a.dw_chunk
    res = [profile(a.arch, (a.side, a.side, a.channels), a.classes, b, a.sampler, a.top, a.save_memory)
           for b in a.batch]
    if len(res) > 1:            # per kernel: the time at the smallest and the largest batch
        lo, hi = res[0], res[-1]
        print(f"\nkernel | launches | ms at batch {lo['batch']} | ms at batch {hi['batch']}")
        for k, (c, t) in lo["by_kernel"].items():
            print(f"{k} | {c} | {t} | {hi['by_kernel'].get(k, [0, 0])[1]}")
