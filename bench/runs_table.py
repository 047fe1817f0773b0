"""One line per run folder: what it was asked to do, how far it got, and its accuracies.

    python bench/runs_table.py RUNS_DIR [--json]

Reads each RUNS_DIR/<name>/config.json, metrics.jsonl and timing.jsonl (a run cut short by a
time limit shows the epochs it finished). Test accuracy is reported at the last finished epoch and
at the best one (the best is selected on test, so it is shown for reference only).
"""
import json
import pathlib
import sys


def summary(run):
    cfg = json.loads((run / "config.json").read_text())
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
              if '"type": "epoch"' in line]
    timing = [json.loads(line) for line in (run / "timing.jsonl").read_text().splitlines()] \
        if (run / "timing.jsonl").exists() else []
    row = dict(run=run.name, data=pathlib.Path(cfg["data"]).name or "embedded", arch=cfg["arch"],
               sampler=cfg["sampler"], source=cfg["source"], lr=cfg["lr"], batch=cfg["batch_size"],
               settings=cfg.get("extra", {}), epochs_planned=cfg["epochs"], epochs_done=len(epochs),
               wall_s=round(timing[-1]["seconds"], 1) if timing else None)
    if epochs:
        best = max(epochs, key=lambda e: e["test_acc"])
        row.update(last_test_acc=epochs[-1]["test_acc"], last_train_acc=epochs[-1].get("train_acc"),
                   best_test_acc=best["test_acc"], best_epoch=best["epoch"] + 1)
    return row


def main(argv):
    root = pathlib.Path(argv[0])
    rows = [summary(r) for r in sorted(root.iterdir()) if (r / "config.json").exists()]
    if "--json" in argv:
        for r in rows:
            print(json.dumps(r))
        return
    print("| run | data | sampler (source) | batch | lr | settings | epochs | wall s | test % (last) | "
          "train % (last) | test % (best, epoch) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        pct = lambda v: f"{100 * v:.2f}" if v is not None else "-"  # noqa: E731
        sets = " ".join(f"{k}={v}" for k, v in r["settings"].items())
        print(f"| {r['run']} | {r['data']} | {r['sampler']} ({r['source']}) | {r['batch']} | {r['lr']} | "
              f"{sets} | {r['epochs_done']}/{r['epochs_planned']} | {r['wall_s']} | "
              f"{pct(r.get('last_test_acc'))} | {pct(r.get('last_train_acc'))} | "
              f"{pct(r.get('best_test_acc'))} ({r.get('best_epoch', '-')}) |")


if __name__ == "__main__":
    main(sys.argv[1:])
