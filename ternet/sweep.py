"""`ternet sweep CONFIG`: algorithms x seeds, each an ordinary `ternet train` run, then a table of
validation-selected results (markdown + JSON) and accuracy curves (PNG).

Selection is on the validation split only: for each run, the epoch with the best val accuracy
(earliest on ties) is chosen and the test accuracy *of that epoch* is reported (the trainer
evaluates val and test after every epoch, so no checkpoint has to be kept). The sweep is
restartable: finished runs are skipped, interrupted ones resumed from their newest checkpoint.
Config (TOML or JSON):

    name = "fmnist-pilot"
    seeds = [0, 1, 2]
    [base]                      # Config fields shared by every run (ternet train --help)
    data = "data/fmnist-10k"    # must hold a val split: ternet prep ... --val-fraction 0.1
    arch = "lenet"
    epochs = 5
    [algorithms.dst-adam]       # one table per algorithm: Config fields, plus `set` = sampler settings
    sampler = "dst"
    source = "adam"
    lr = 0.01
    [algorithms.metropolis]
    sampler = "metropolis"
    set = { t_schedule = "adaptive", temperature = 1e-5 }

Exercise: pytest tests/test_samplers_train.py -k sweep.
"""
import json
import math
import os
import pathlib
import subprocess
import sys
import time

from .config import Config
from .run import RunDir, write_atomic

FORMAT, VERSION = "ternet-sweep", 1


def load_config(path):
    path = pathlib.Path(path)
    if path.suffix == ".toml":
        import tomllib
        spec = tomllib.loads(path.read_text())
    else:
        spec = json.loads(path.read_text())
    for key in ("name", "seeds", "algorithms"):
        if key not in spec:
            raise ValueError(f"{path}: missing {key!r} (see `ternet sweep --help`)")
    known = set(Config.__dataclass_fields__) - {"extra", "seed"}
    for algo, fields in {"base": spec.get("base", {}), **spec["algorithms"]}.items():
        bad = sorted(set(fields) - known - {"set"})
        if bad:
            raise ValueError(f"{path}: [{algo}] has unknown field(s) {bad}; Config fields: {sorted(known)}")
    return spec


def run_config(spec, algo, seed, device=None):
    """The resolved Config of one (algorithm, seed) run."""
    fields = {**spec.get("base", {}), **spec["algorithms"][algo]}
    extra = {**spec.get("base", {}).get("set", {}), **fields.pop("set", {})}
    if device:
        fields["device"] = device
    return Config(**fields, seed=seed, extra=tuple(sorted(extra.items()))).resolve()


def train_args(cfg: Config, name, runs_dir):
    """`ternet train` arguments reproducing cfg."""
    from .cli import TRAIN_OPTIONS
    args = ["train", "--name", name, "--runs-dir", str(runs_dir), "--quiet"]
    for field, _, _ in TRAIN_OPTIONS:
        args += [f"--{field.replace('_', '-')}", str(getattr(cfg, field))]
    for k, v in cfg.extra:
        args += ["--set", f"{k}={json.dumps(v)}"]
    return args


def run_status(run: RunDir, epochs):
    """'new', 'partial' or 'done'."""
    if not run.exists():
        return "new"
    done = sum(1 for r in run.metrics() if r.get("type") == "epoch")
    return "done" if done >= epochs else "partial"


def execute(spec, root, device=None, jobs=1, only=(), seeds=None, echo=print):
    """Run every (algorithm, seed) not yet finished, `jobs` at a time, as `python -m ternet train`."""
    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    write_atomic(root / "sweep.json", json.dumps({"format": FORMAT, "version": VERSION, **spec}, indent=2) + "\n")
    todo = []
    for algo in spec["algorithms"]:
        for seed in (seeds if seeds is not None else spec["seeds"]):
            if only and algo not in only:
                continue
            cfg = run_config(spec, algo, seed, device)
            name = f"{algo}-s{seed}"
            status = run_status(RunDir(root / name), cfg.epochs)
            if status == "done":
                continue
            args = ["train", "--resume", str(root / name), "--quiet"] if status == "partial" else \
                train_args(cfg, name, root)
            todo.append((name, args))
    running, failed = [], []
    while todo or running:
        while todo and len(running) < jobs:
            name, args = todo.pop(0)
            log = open(root / f"{name}.log", "a")
            echo(f"start {name}: ternet {' '.join(args)}")
            running.append((name, subprocess.Popen([sys.executable, "-m", "ternet", *args], stdout=log,
                                                   stderr=subprocess.STDOUT, cwd=os.getcwd()), log))
        time.sleep(0.2)
        for item in list(running):
            name, proc, log = item
            if proc.poll() is not None:
                running.remove(item)
                log.close()
                echo(f"{'done ' if proc.returncode == 0 else 'FAILED'} {name} (exit {proc.returncode}; log {root / name}.log)")
                if proc.returncode != 0:
                    failed.append(name)
    return failed


# ---- results ------------------------------------------------------------------------------------

def run_result(run: RunDir):
    """Per-run figures: the val-selected epoch, its val and test accuracy, the last epoch's, wall time."""
    epochs = [r for r in run.metrics() if r.get("type") == "epoch"]
    if not epochs:
        return None
    if "val_acc" not in epochs[0]:
        raise ValueError(f"{run.path}: no val split was evaluated; pack the data with --val-fraction "
                         "(ternet prep ... --val-fraction 0.1) so that selection never looks at test")
    best = max(range(len(epochs)), key=lambda i: (epochs[i]["val_acc"], -i))
    return {"epochs": len(epochs), "best_epoch": best + 1, "val_acc": epochs[best]["val_acc"],
            "test_acc": epochs[best].get("test_acc"), "last_test_acc": epochs[-1].get("test_acc"),
            "last_val_acc": epochs[-1]["val_acc"], "wall_s": wall_seconds(run),
            "curve": {k: [e.get(k) for e in epochs] for k in ("val_acc", "test_acc", "train_loss")}}


def wall_seconds(run: RunDir):
    """Training wall time from timing.jsonl: each (re)start counts from 0; segments are summed."""
    total, last = 0.0, 0.0
    if not run.timing_path.exists():
        return None
    for line in run.timing_path.read_text().splitlines():
        s = json.loads(line).get("seconds", 0.0)
        if s < last:
            total += last
        last = s
    return total + last


def mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def collect(spec, root, device=None):
    root = pathlib.Path(root)
    table = []
    for algo, fields in spec["algorithms"].items():
        runs = {}
        for seed in spec["seeds"]:
            res = run_result(RunDir(root / f"{algo}-s{seed}"))
            if res is not None:
                runs[seed] = res
        cfg = run_config(spec, algo, spec["seeds"][0], device)
        row = {"algorithm": algo, "sampler": cfg.sampler, "source": cfg.source, "lr": cfg.lr,
               "settings": dict(cfg.extra), "seeds": sorted(runs), "runs": runs,
               "complete": all(r["epochs"] >= cfg.epochs for r in runs.values()) and len(runs) == len(spec["seeds"])}
        for key in ("val_acc", "test_acc", "last_test_acc", "best_epoch", "wall_s"):
            row[key] = mean_std([r[key] for r in runs.values()])
        table.append(row)
    return table


def _pct(ms):
    m, s = ms
    return "-" if m is None else f"{100 * m:.2f} ± {100 * s:.2f}"


def markdown(spec, table):
    base = spec.get("base", {})
    lines = [f"### {spec['name']}", "",
             f"{base.get('arch', 'lenet')} on `{base.get('data', '(embedded)')}`, {base.get('epochs', 10)} epochs, "
             f"seeds {spec['seeds']}. Val-selected: the epoch with the best validation accuracy per run; "
             "test accuracy is read at that epoch (mean ± std over seeds, std with n - 1).", "",
             "| algorithm | sampler (source, lr; settings) | runs | val acc % (best epoch) | test acc % at best-val epoch "
             "| test acc % (last epoch) | best epoch | wall time / run |",
             "|---|---|---|---|---|---|---|---|"]
    for r in table:
        sets = ", ".join(f"{k}={v}" for k, v in r["settings"].items())
        desc = f"{r['sampler']} ({r['source']}, lr {r['lr']:g}{'; ' + sets if sets else ''})"
        ep, wall = r["best_epoch"], r["wall_s"]
        lines.append(f"| {r['algorithm']} | {desc} | {len(r['seeds'])}{'' if r['complete'] else ' (incomplete)'} "
                     f"| {_pct(r['val_acc'])} | {_pct(r['test_acc'])} | {_pct(r['last_test_acc'])} "
                     f"| {'-' if ep[0] is None else f'{ep[0]:.1f}'} "
                     f"| {'-' if wall[0] is None else f'{wall[0] / 60:.1f} min'} |")
    return "\n".join(lines) + "\n"


def report(spec, root, device=None, echo=print):
    """Write results.json, results.md and curves.png under the sweep folder; returns the markdown."""
    root = pathlib.Path(root)
    table = collect(spec, root, device)
    write_atomic(root / "results.json", json.dumps({"format": FORMAT, "version": VERSION, "name": spec["name"],
                                                    "table": table}, indent=1, default=str) + "\n")
    md = markdown(spec, table)
    write_atomic(root / "results.md", md)
    from .plots import accuracy_curves
    series = {r["algorithm"]: [run["curve"] for run in r["runs"].values()] for r in table if r["runs"]}
    if series:
        accuracy_curves(series, root / "curves.png", f"{spec['name']}: accuracy per epoch (mean ± std over seeds)")
    echo(md)
    echo(f"wrote {root / 'results.md'}, {root / 'results.json'}, {root / 'curves.png'}")
    return md


def sweep(config_path, runs_dir="runs", device=None, jobs=1, only=(), report_only=False, echo=print):
    spec = load_config(config_path)
    root = pathlib.Path(runs_dir) / spec["name"]
    _check_val_split(spec)
    failed = [] if report_only else execute(spec, root, device, jobs, only, echo=echo)
    report(spec, root, device, echo)
    return failed


def _check_val_split(spec):
    from .shards import EMBEDDED_DEFAULT, open_dataset
    datas = {f.get("data", spec.get("base", {}).get("data", "")) for f in spec["algorithms"].values()}
    for data in datas:
        splits = open_dataset(data or EMBEDDED_DEFAULT).splits
        if "val" not in splits:
            raise ValueError(f"{data or 'the embedded dataset'} has no val split (splits: {', '.join(splits)}); "
                             "HINT: pack it with `ternet prep ... --val-fraction 0.1` so that model selection "
                             "never looks at test")
