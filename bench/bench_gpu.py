"""Times ternet's full training step on the GPU (forward, loss, backward, DST update of the
discrete weights, Adam on batch norm) and reports images/s and peak device memory, for the
configurations of docs/performance.md. Prints one JSON line per configuration, then a table.

    python bench/bench_gpu.py                 # all three configurations
    python bench/bench_gpu.py vgg resnet18-64 # a subset
    python bench/bench_gpu.py --profile       # also milliseconds per layer (synchronised)
    python bench/bench_gpu.py --host-profile  # also where the host's time per step goes (cProfile,
                                              # 10 steps, top functions by own time)
    python bench/bench_gpu.py --launch both   # numba's own kernel launches, then ternet's planned ones
                                              # (ternet/kernels/launch.py; default: planned only)
    python bench/bench_gpu.py --rounds 3      # each configuration 3 times in a row (a fresh model each):
                                              # the median round is reported, all rounds listed
    python bench/bench_gpu.py --graph both    # eager steps, then the step captured once as a CUDA graph
                                              # and replayed (ternet/cuda_graph.py; default: eager only)
    python bench/bench_gpu.py --save-memory   # ternet train's --save-memory on

reserved_gib: what the caching allocator took from the driver for this configuration (live arrays,
its cached free blocks, the graph's pool; the process's footprint, where peak_gib counts live
arrays as PyTorch's max_memory_allocated does). With --graph, graph_pool_gib is the memory the captured step's own pool reserved (its temporaries,
reused within the step); peak_gib counts only arrays live between steps there, so the graph's
footprint is at most their sum.

host_ms is the median time the host spends issuing one step (Python, launches, allocations);
when it is close to step_ms the GPU is waiting for the host, and the rate moves with the host's
other work from round to round and call to call (resnet18 at 64 px: 17,700-23,400 img/s between
calls of one session): quote the median of rounds with their range.
"""
import gc
import json
import sys
import time

import numpy as np

CONFIGS = {
    "vgg": ("vgg-gxnor", (32, 32, 3), 10, 512),
    "resnet18-224": ("resnet18", (224, 224, 3), 1000, 256),
    "resnet18-64": ("resnet18", (64, 64, 3), 1000, 512),
}


def profile(model, step, t0):
    """Milliseconds per top-level layer (forward and backward, each synchronised) for one step."""
    from numba import cuda
    times = {}
    for layer in model.net.layers:
        f0, b0 = layer.forward, layer.backward

        def wf(x, train, f0=f0, n=layer.name):
            cuda.synchronize()
            t = time.perf_counter()
            r = f0(x, train)
            cuda.synchronize()
            times[n + ".fwd"] = (time.perf_counter() - t) * 1e3
            return r

        def wb(d, b0=b0, n=layer.name):
            cuda.synchronize()
            t = time.perf_counter()
            r = b0(d)
            cuda.synchronize()
            times[n + ".bwd"] = (time.perf_counter() - t) * 1e3
            return r

        layer.forward, layer.backward = wf, wb
    cuda.synchronize()
    t = time.perf_counter()
    step(t0)
    cuda.synchronize()
    total = (time.perf_counter() - t) * 1e3
    for layer in model.net.layers:
        del layer.forward, layer.backward
    layers = sum(times.values())
    return total, {"layers": round(layers, 2), "rest (loss, sampler, optimizer)": round(total - layers, 2),
                   **{k: round(v, 2) for k, v in sorted(times.items(), key=lambda kv: -kv[1])[:14]}}


def host_profile(name, step, t0, steps=10, top=25):
    """cProfile over `steps` steps (synchronised at the end): the host-side functions with the
    most own time, in milliseconds per step, and the call counts per step."""
    import cProfile
    import pstats
    from numba import cuda
    cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    for t in range(steps):
        step(t0 + t)
    cuda.synchronize()
    pr.disable()
    st = pstats.Stats(pr)
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:top]
    out = [{"fn": f"{pathname.split('/')[-1]}:{line}:{fn}", "calls_per_step": round(cc / steps, 1),
            "own_ms_per_step": round(tt / steps * 1e3, 3), "cum_ms_per_step": round(ct / steps * 1e3, 3)}
           for (pathname, line, fn), (cc, nc, tt, ct, _) in rows]
    total = sum(v[2] for v in st.stats.values()) / steps * 1e3
    print(json.dumps({"host_profile": name, "profiled_ms_per_step": round(total, 2), "top": out}), flush=True)


def training_step(arch, shape, classes, batch, use_graph=False, sampler="dst", save_memory=False):
    """(model, step): a model on the GPU and step(t), the training step the benchmarks time
    (forward, cross-entropy, backward, DST-sgd on the discrete weights -- or with sampler="bop"
    the annealed Bop of ternet train's default --, Adam on batch norm) on a fixed random batch;
    save_memory: ternet train's --save-memory on. bench/host_counts.py counts what the same
    step does on the host."""
    from numba import cuda

    from ternet.kernels import empty, zeros
    from ternet.kernels.loss import loss_forward_backward
    from ternet.model import Model
    from ternet.optim import RealOptimizer
    from ternet.samplers import DST, BopTernary
    from ternet.schedules import Schedule
    from ternet.cuda_graph import StepGraph
    from ternet.kernels.elementwise import put_scalars
    rng = np.random.default_rng(0)
    model = Model(arch, shape, classes, seed=0).to(True)
    if save_memory:
        model.save_memory()
    x = cuda.to_device(rng.standard_normal((batch,) + shape).astype(np.float32))
    y = cuda.to_device(rng.integers(0, classes, batch).astype(np.int32))
    if sampler == "bop":
        sampler = BopTernary(seed=0, lr=Schedule("constant", 20.0), m=Schedule("constant", 3.0), total=10 ** 6)
    else:
        sampler = DST(seed=0, lr=Schedule("constant", 20.0), m=Schedule("constant", 3.0), source="sgd")
    opt = RealOptimizer("adam")
    acc = zeros((2,), np.float64, True)
    tparams = model.tparams()
    hp = empty((3 + 3,), np.float32, True)        # as the trainer: the per-step values on the device
    hp_sampler, hp_opt = hp[:3], hp[3:]           # sliced once: the step reuses the same views
    now = [0]

    def body(xb, yb):
        t = now[0]
        logits = model.forward(xb, train=True)
        d = empty(logits.shape, np.float32, True)
        loss_forward_backward(d, logits, yb, "xent", acc)
        model.backward(d)
        sampler.step(tparams, [p.grad for p in tparams], t, hp=hp_sampler)
        opt.step(model.reals, 0.01, t + 1, hp=hp_opt)

    graph = StepGraph(body, rows=batch) if use_graph else None

    def step(t):
        now[0] = t
        put_scalars(hp, *(tuple(sampler.scalars(t)) + (0.0,) * 3)[:3], *opt.scalars(0.01, t + 1))
        sampler.prepare(t, len(tparams))
        (graph or body)(x, y)

    step.graph = graph
    return model, step


def bench(name, steps=20, warm=3, prof=False, fast=True, hprof=False, graph=False):
    from numba import cuda

    from ternet import cuda_memory
    from ternet.kernels import launch, release_scratch
    arch, shape, classes, batch = CONFIGS[name]
    cuda_memory.install()
    launch.install() if fast else launch.uninstall()
    release_scratch()                 # the previous configuration's partial-sum buffers, which can be
    gc.collect()                      # larger than this one's; its model is gone before this one's is built
    cuda_memory.trim()                # and its cached blocks: reserved_gib counts this round's
    held_before, reserved_before = cuda_memory.in_use_bytes(), cuda_memory.reserved_bytes()
    model, step = training_step(arch, shape, classes, batch, graph, save_memory=SAVE_MEMORY)
    for t in range(warm):
        step(t)
    cuda.synchronize()
    cuda_memory.reset_peak()
    times, host = [], []
    e0, e1 = cuda.event(), cuda.event()
    for t in range(steps):
        e0.record()
        h = time.perf_counter()
        step(warm + t)
        host.append((time.perf_counter() - h) * 1e3)
        e1.record()
        e1.synchronize()
        times.append(cuda.event_elapsed_time(e0, e1))
    times.sort()
    host.sort()
    med = times[len(times) // 2]
    if hprof and not graph:
        host_profile(name, step, warm + steps)
    if prof and not graph:
        total, parts = profile(model, step, warm + steps)
        print(json.dumps({"profile": name, "synced_step_ms": round(total, 2), **parts}), flush=True)
    return dict(impl="ternet", launch="graph" if graph else "planned" if fast else "numba", model=name, batch=batch,
                **({"save_memory": True} if SAVE_MEMORY else {}), step_ms=round(med, 3),
                host_ms=round(host[len(host) // 2], 3), img_per_s=round(batch / med * 1e3, 1),
                peak_gib=round(cuda_memory.peak_bytes() / 2 ** 30, 3),
                reserved_gib=round((cuda_memory.reserved_bytes() - reserved_before) / 2 ** 30, 3),
                held_before_gib=round(held_before / 2 ** 30, 3), **(launch.stats() if fast else {}),
                **({"graph_pool_gib": round(sum(n for _, n in (step.graph.graph.pool.spans if step.graph.graph else ())) / 2 ** 30, 3),
                    "capture_failed": step.graph.failed, "graph_pool": "planned" if _planned() else "exact"}
                   if graph else {}))


def _planned():
    from ternet import cuda_graph
    return cuda_graph.PLANNED


SAVE_MEMORY = "--save-memory" in sys.argv

if __name__ == "__main__":
    prof = "--profile" in sys.argv
    mode = sys.argv[sys.argv.index("--launch") + 1] if "--launch" in sys.argv else "planned"
    modes = [(f, False) for f in {"planned": [True], "numba": [False], "both": [False, True]}[mode]]
    gmode = sys.argv[sys.argv.index("--graph") + 1] if "--graph" in sys.argv else "off"
    modes = {"off": modes, "on": [(True, True)], "both": modes + [(True, True)]}[gmode]
    values = {i + 1 for i, a in enumerate(sys.argv) if a in ("--launch", "--rounds", "--graph")}   # option arguments
    which = [a for i, a in enumerate(sys.argv) if i and i not in values and not a.startswith("--")] or list(CONFIGS)
    rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 1
    rows = []
    for name in which:
        for fast, graph in modes:
            t0 = time.time()
            recs = [bench(name, prof=prof and r == 0, fast=fast, hprof="--host-profile" in sys.argv and fast and r == 0,
                          graph=graph) for r in range(rounds)]
            rec = dict(sorted(recs, key=lambda x: x["img_per_s"])[(rounds - 1) // 2])   # the median (lower) round
            if rounds > 1:
                rec["img_per_s_rounds"] = [x["img_per_s"] for x in recs]
                rec["host_ms_rounds"] = [x["host_ms"] for x in recs]
                rec["peak_gib_rounds"] = [x["peak_gib"] for x in recs]
            rec["wall_s"] = round(time.time() - t0, 1)
            print(json.dumps(rec), flush=True)
            rows.append(rec)
    print("\n| model | batch | launches | step ms | host ms | img/s | peak GiB |\n| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        spread = f" ({min(r['img_per_s_rounds']):,}-{max(r['img_per_s_rounds']):,})" if "img_per_s_rounds" in r else ""
        print(f"| {r['model']} | {r['batch']} | {r['launch']} | {r['step_ms']} | {r['host_ms']} | {r['img_per_s']:,}{spread} "
              f"| {r['peak_gib']} |")
