"""After a run trained with --keep-last K (and --ckpt-every 0, one checkpoint per epoch): its newest
checkpoint and the averages of its last k checkpoints (`ternet average`), each evaluated single-view
and with flip test-time augmentation, in one process (the kernels compile once). One JSON line per
model on stdout. Usage (docs/results.md):
    python3 bench/average_eval.py RUN --last 4 8 16 --device cuda
"""
import argparse
import json
import time

from ternet.average import average_run
from ternet.evaluate import evaluate_run


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--last", type=int, nargs="+", default=[8])
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()

    def line(name, single, flip, extra):
        out = {"model": name, **extra}
        for split in single:
            out[f"{split}_acc"], out[f"{split}_loss"] = single[split][1], round(single[split][0], 4)
            out[f"{split}_acc_flip"], out[f"{split}_loss_flip"] = flip[split][1], round(flip[split][0], 4)
        print(json.dumps(out), flush=True)

    t = time.perf_counter()
    single, flip = (evaluate_run(a.run, device=a.device, tta=tta) for tta in ("none", "flip"))
    line("newest", single, flip, {"eval_s": round(time.perf_counter() - t, 1)})
    for k in a.last:        # average_run evaluates the average single-view and, with tta, flipped
        t = time.perf_counter()
        r = average_run(a.run, k, images=a.images, device=a.device, tta="flip")
        line(f"average-last{k}", r["average"], r["average_flip"],
             {"changed": round(r["changed"], 5), "images": r["images"], "average_s": round(time.perf_counter() - t, 1)})

if __name__ == "__main__":
    main()
