"""What the host does per GPU training step, counted without a GPU: kernel launches, device
allocations and array views (reshape) per step, and where they come from. Reshapes counted
are those a step still makes: kernels.view serves the others from the views an array keeps
(the simulator's arrays keep theirs as the GPU's do). Runs the step's Python
(layers, launchers) under numba's simulator with every kernel launch replaced by a counter, so
the counts are those of the GPU path's Python, except inside the convolutions: the simulator has no
tensor cores, so convolutions count the pure-numba path's launches (the tensor-core path adds a
bf16 conversion and a weight flip per layer). Also the bytes held by live arrays from
cuda.device_array at the step's start and at its peak (what the caching allocator's peak
counts, without its 512-byte rounding and without cuda.to_device copies). Times are not measured
here (bench_gpu.py --host-profile on a GPU).

    python bench/host_counts.py [arch] [--side 64] [--batch 4] [--top 15]
    python bench/host_counts.py vgg-gxnor --side 32 --classes 10 --batch 512 --top 0   # the peak at batch 512
    python bench/host_counts.py resnet18 --batch 512 --top 0 --peak-sites 25           # ... and who holds it
    python bench/host_counts.py resnet18 --batch 512 --top 0 --pool                     # graph-pool policies

--pool replays the step's allocations and frees (in order, 512-byte rounded, as cuda_memory
rounds them) through allocation policies for a captured step's private pool (cuda_memory.Pool: its
blocks serve only the step's own temporaries) and prints the bytes each would reserve, against the
step's own peak of live temporaries: "exact" (a freed block serves only a request of its exact
size: the Pool's policy), "best fit" (the smallest free block at least as large, used whole),
"arena" (one address range, best fit with splitting and coalescing), "planned" (one range, each
allocation at an offset chosen from the whole step's order beforehand: cuda_memory.plan, the
layout TERNET_GRAPH_POOL=planned captures with).
"""
import argparse
import collections
import os
import sys
import traceback
import weakref

os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

from numba import cuda  # noqa: E402
from numba.cuda.simulator import kernel as sim_kernel  # noqa: E402
from numba.cuda.simulator.cudadrv import devicearray as sim_array  # noqa: E402

COUNTS = collections.defaultdict(collections.Counter)
ON = [False]                     # counting (the warm-up step is not counted)
HELD = {"live": 0, "peak": 0}    # bytes of live device_array allocations
LIVE = {}                        # id -> (bytes, call site) of each live device_array allocation
AT_PEAK = {}                     # call site -> bytes held there when the step's peak was reached
EVENTS = []                      # ("a", key, bytes) and ("f", key) in order, during the counted step


def _site(depth):
    frames = traceback.extract_stack(limit=depth + 2)[:-2]
    return " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in reversed(frames))


def _instrument(depth):
    class Launch:
        def __init__(self, *cfg):
            pass

        def __call__(self, *args):      # the kernel does not run: its outputs stay as they were
            if ON[0]:
                COUNTS["launches"][_site(depth)] += 1

    sim_kernel.FakeCUDAKernel.__getitem__ = lambda self, cfg: Launch()
    alloc, reshape = cuda.device_array, sim_array.FakeCUDAArray.reshape

    def device_array(*a, **k):
        if ON[0]:
            COUNTS["allocations"][_site(depth)] += 1
        arr = alloc(*a, **k)
        HELD["live"] += arr.nbytes
        key = id(arr._ary)
        LIVE[key] = (arr.nbytes, _site(depth))
        if ON[0]:
            EVENTS.append(("a", key, arr.nbytes))
        if HELD["live"] > HELD["peak"]:
            HELD["peak"] = HELD["live"]
            if ON[0]:
                AT_PEAK.clear()
                for nb, site in LIVE.values():
                    AT_PEAK[site] = AT_PEAK.get(site, 0) + nb
        # on the wrapped numpy array: views of it (reshape, slices) keep it alive, as on a GPU
        weakref.finalize(arr._ary, _release, arr.nbytes, key)
        return arr

    def view(self, *a, **k):
        if ON[0]:
            COUNTS["reshapes"][_site(depth)] += 1
        return reshape(self, *a, **k)

    cuda.device_array = device_array
    sim_array.FakeCUDAArray.reshape = view


def _release(nbytes, key):
    HELD["live"] -= nbytes
    LIVE.pop(key, None)
    if ON[0]:
        EVENTS.append(("f", key))


def pool_policies(events):
    """({policy: bytes reserved}, peak of live bytes) for the step's own allocations (see --pool)."""
    import bisect
    from ternet.cuda_memory import _rounded
    sizes = {}
    live = peak = 0
    exact, exact_res = collections.defaultdict(int), 0       # free blocks per size
    best, best_res, held = [], 0, {}                         # sorted free block sizes; key -> its block
    free, top, at = [], 0, {}                                # arena: sorted free (start, size); key -> range
    for ev in events:
        if ev[0] == "a":
            _, key, n = ev
            n = sizes[key] = _rounded(n)
            live += n
            peak = max(peak, live)
            if exact[n]:
                exact[n] -= 1
            else:
                exact_res += n
            i = bisect.bisect_left(best, n)
            if i < len(best):
                held[key] = best.pop(i)
            else:
                held[key] = n
                best_res += n
            fits = [(sz, st) for st, sz in free if sz >= n]
            if fits:
                sz, st = min(fits)
                free.remove((st, sz))
                if sz > n:
                    bisect.insort(free, (st + n, sz - n))
                at[key] = (st, n)
            else:
                at[key] = (top, n)
                top += n
        elif ev[1] in sizes:          # a free of a block the step allocated
            key = ev[1]
            n = sizes.pop(key)
            live -= n
            exact[n] += 1
            bisect.insort(best, held.pop(key))
            st, sz = at.pop(key)
            bisect.insort(free, (st, sz))
            i = free.index((st, sz))     # coalesce with the neighbours
            if i + 1 < len(free) and free[i][0] + free[i][1] == free[i + 1][0]:
                free[i] = (st, sz + free.pop(i + 1)[1])
            if i > 0 and free[i - 1][0] + free[i - 1][1] == free[i][0]:
                free[i - 1] = (free[i - 1][0], free[i - 1][1] + free.pop(i)[1])
    return {"exact": exact_res, "best fit": best_res, "arena": top, "planned": planned(events)}, peak


def planned(events):
    """Bytes of one range holding every allocation of the step at an offset chosen beforehand from
    the step's order (cuda_memory.plan, what TERNET_GRAPH_POOL=planned captures with)."""
    from ternet.cuda_memory import plan
    return plan(events)[2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("arch", nargs="?", default="resnet18")
    ap.add_argument("--side", type=int, default=64)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--depth", type=int, default=2, help="call-site frames to show")
    ap.add_argument("--peak-sites", type=int, default=0, help="list the N largest holders at the peak")
    ap.add_argument("--save-memory", action="store_true", help="ternet train's --save-memory on")
    ap.add_argument("--pool", action="store_true", help="the step's allocations through graph-pool policies")
    args = ap.parse_args()
    _instrument(args.depth)
    from bench_gpu import training_step
    _, step = training_step(args.arch, (args.side, args.side, 3), args.classes, args.batch,
                            save_memory=args.save_memory)
    step(0)                       # first-call work (weight caches, tables) is not per step
    ON[0] = True
    start = HELD["peak"] = HELD["live"]
    step(1)
    print(f"{args.arch} {args.side}x{args.side}, batch {args.batch}, one training step (DST sgd, Adam on batch norm):")
    print(f"device_array bytes held: {start:,} at the step's start, {HELD['peak']:,} at its peak")
    if args.pool:
        reserved, peak = pool_policies(EVENTS)
        print(f"\nthe step's own allocations: peak of live ones {peak:,} bytes; a captured step's pool would reserve")
        for name, n in reserved.items():
            print(f"  {name:9s} {n:15,d}  ({n / max(peak, 1):.2f}x that peak)")
    if args.peak_sites:
        print(f"\nbytes held at the peak, by allocation site (top {args.peak_sites}):")
        for site, nb in sorted(AT_PEAK.items(), key=lambda kv: -kv[1])[:args.peak_sites]:
            print(f"  {nb:13,d}  {site}")
    for what in ("launches", "allocations", "reshapes"):
        c = COUNTS[what]
        print(f"\n{what}: {sum(c.values())} per step; by call site")
        for site, n in c.most_common(args.top):
            print(f"  {n:4d}  {site}")


if __name__ == "__main__":
    main()
