#!/usr/bin/env bash
# End to end on the GPU (docs/performance.md, acceptance of the GPU path): prepare CIFAR-10 from
# the JPEG archive and train vgg-gxnor; prepare MNIST from its PNG folders and train lenet.
# Wall time is measured from the start of preparation. Usage (in a device call, after
#   the numpy wheel install of gpu_session.sh):
#   bash bench/e2e_gpu.sh cifar|mnist [extra ternet train options...]
# Two at once on a two-GPU host, each alone on its GPU, with their own folders:
#   CUDA_VISIBLE_DEVICES=0 OUT=/tmp/e2e-a bash bench/e2e_gpu.sh cifar ... &
#   CUDA_VISIBLE_DEVICES=1 OUT=/tmp/e2e-b bash bench/e2e_gpu.sh cifar ...
# Below batch 256 the vgg-gxnor step is partly bound by the host; --cuda-graph on replays it from a
# captured CUDA graph (host ~0.3 ms a step; docs/performance.md; the summary counts the logged
# intervals that were replayed, so an eager fallback shows). In a 600 s device call keep
# LIMIT <= ~540 so that the preparation and the summary below fit too.
set -u
OUT=${OUT:-/tmp/ternet-e2e}
what=$1; shift
t0=$(date +%s.%N)
src=$OUT/src-$what
data=$OUT/data-$what
mkdir -p "$src" "$OUT"
if [ "$what" = cifar ]; then
    tar -xzf .data/cifar10-jpg.tar.gz -C "$src"
    python3 -m ternet prep cifar10 "$src" "$data" --quiet
    args=(--data "$data" --arch vgg-gxnor)
else
    tar -xzf .data/mnist-png.tar.gz -C "$src"
    python3 -m ternet prep folder "$src" "$data" --channels 1 --name mnist --quiet
    args=(--data "$data" --arch lenet)
fi
t1=$(date +%s.%N)
# LIMIT (seconds, default 590): the training is cut there so that the summary below still prints
timeout "${LIMIT:-590}" python3 -m ternet train "${args[@]}" --device cuda --quiet --runs-dir "$OUT/runs" --name "$what" "$@"
echo "train exit $?"
t2=$(date +%s.%N)
python3 - "$OUT/runs/$what" "$t0" "$t1" "$t2" <<'PY'
import json, sys
run, t0, t1, t2 = sys.argv[1], *map(float, sys.argv[2:])
recs = [json.loads(l) for l in open(f"{run}/metrics.jsonl")]
ep = [r for r in recs if r["type"] == "epoch"]
avg = [r for r in recs if r["type"] == "average"]       # --average-last K: after the last epoch, in train_s
timing = [json.loads(l) for l in open(f"{run}/timing.jsonl")]
ends = [r for r in timing if "img_per_s" not in r]       # one record per epoch end
secs = {r["epoch"]: r["seconds"] for r in ends}
for r in ep:   # every 10th epoch and the last: test/train accuracy and seconds since the trainer started
    if (r["epoch"] + 1) % 10 == 0 or r is ep[-1]:
        print(f"epoch {r['epoch'] + 1:4d}  test {100 * r['test_acc']:.2f}  train {100 * r['train_acc']:.2f}  "
              f"t {secs.get(r['epoch'], float('nan')):.1f} s")
best = max(ep, key=lambda r: r["test_acc"])
graph = {}     # --cuda-graph on: how many logged intervals were replayed (or why not)
for r in timing:
    if "cuda_graph" in r:
        graph[r["cuda_graph"]] = graph.get(r["cuda_graph"], 0) + 1
med = lambda v: sorted(v)[len(v) // 2] if v else float("nan")
epoch_s = med([b["seconds"] - a["seconds"] for a, b in zip(ends, ends[1:])])     # median, from epoch 2 on
eval_s = med([r["eval_s"] for r in ends if "eval_s" in r])                       # test-set evaluation
print(json.dumps(dict(e2e=run, prep_s=round(t1 - t0, 1), train_s=round(t2 - t1, 1), total_s=round(t2 - t0, 1),
                      epochs=len(ep), final_test_acc=ep[-1]["test_acc"], best_test_acc=best["test_acc"],
                      best_epoch=best["epoch"] + 1, epoch_s=round(epoch_s, 3), eval_s=round(eval_s, 3),
                      **({"final_test_acc_flip": ep[-1]["test_acc_flip"]} if "test_acc_flip" in ep[-1] else {}),
                      **({f"average_last{avg[-1]['last']}_test_acc": avg[-1]["test_acc"]} if avg else {}),
                      **({"cuda_graph": graph} if graph else {}))))
PY
