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
