"""`ternet inspect RUN`: how the weight-state histograms and flip rates evolved, per layer, read
from the run's metrics.jsonl alone (a run that crashed half-way is shown up to its last record).
Terminal table, --json for scripts, --png for a figure (Pillow). Exercise: pytest tests/test_inspect.py.
"""
import json

from .run import RunDir


def collect(run_path):
    """{'states': [...], 'epochs': [...], 'layers': {name: [per-epoch dicts]}} from the run's metrics.

    One entry per finished epoch (plus 'init' before training); a crashed or running epoch
    contributes its newest step record, marked partial.
    """
    run = RunDir(run_path)
    cfg = run.config()
    qmax = 2 ** (cfg.bits - 1)
    states = [k / qmax for k in range(-qmax, qmax + 1)]
    rows, latest_step, average = [], None, None
    for rec in run.metrics():
        if rec["type"] == "init":
            rows.append(dict(epoch="init", layers=rec["layers"], partial=False))
        elif rec["type"] == "epoch":
            rows.append(dict(epoch=rec["epoch"] + 1, layers=rec["layers"], partial=False,
                             **{k: rec[k] for k in rec if k.endswith(("_acc", "_loss", "_flip")) or k in HPARAMS}))
            latest_step = None
        elif rec["type"] == "step":
            latest_step = rec
        elif rec["type"] == "average":      # --average-last K, after the last epoch
            average = {k: v for k, v in rec.items() if k != "type"}
    if latest_step is not None:
        rows.append(dict(epoch=latest_step["epoch"] + 1, layers=latest_step["layers"], partial=True,
                         step=latest_step["step"], **{k: latest_step[k] for k in HPARAMS if k in latest_step}))
    layers = {}
    for row in rows:
        for name, st in row["layers"].items():
            total = sum(st["counts"]) or 1
            entry = {"epoch": row["epoch"], "partial": row["partial"], "counts": st["counts"],
                     "fractions": [c / total for c in st["counts"]]}
            entry.update({k: v for k, v in st.items() if k.endswith("_rate") or k in LAYER_EXTRA})
            if "temperature" not in entry and "temperature" in row:    # one schedule for all layers
                entry["temperature"] = row["temperature"]
            layers.setdefault(name, []).append(entry)
    epochs = [{k: v for k, v in row.items() if k != "layers"} for row in rows]
    info = {"run": str(run.path), "arch": cfg.arch, "states": states, "epochs": epochs, "layers": layers}
    return {**info, "average": average} if average else info


DEFAULT_ROWS = 25     # epoch rows per layer in the terminal view (--rows; 0 = all)
HPARAMS = ("temperature", "target", "m", "lr", "gamma", "act_a")
LAYER_EXTRA = ("temperature", "uphill_acceptance")
# optional per-layer columns: (key, header, format)
COLUMNS = [("acceptance_rate", "accept", "{:.3f}"), ("uphill_acceptance", "uphill acc", "{:.3f}"),
           ("temperature", "T", "{:.2e}")]


def _fmt_state(v):
    return f"{v:+g}" if v else "0"


def shown(n, rows):
    """Indices of the rows to print out of n: all if rows <= 0 or n <= rows, else `rows` evenly
    spaced ones that always include the first and the last (a long run reads as its outline)."""
    if rows <= 0 or n <= rows:
        return list(range(n))
    if rows == 1:
        return [n - 1]
    return sorted({round(i * (n - 1) / (rows - 1)) for i in range(rows)})


def render_text(info, rows=DEFAULT_ROWS):
    """The terminal view; with more than `rows` epochs, every k-th of them (first and last always)."""
    states = info["states"]
    lines = [f"run {info['run']} ({info['arch']}), weight states {' '.join(_fmt_state(s) for s in states)}"]
    first = next(iter(info["layers"].values()))
    picked = [first[i]["epoch"] for i in shown(len(first), rows)]     # the same epochs in every layer
    for key, what in (("test_acc", "test accuracy"), ("test_acc_flip", "test accuracy, flip evaluation,")):
        acc = {e["epoch"]: e[key] for e in info["epochs"] if key in e and not e["partial"]}
        if acc:
            lines.append(f"{what} by epoch: " + " ".join(f"{e}:{acc[e]:.4f}" for e in picked if e in acc))
    if "average" in info:
        av = info["average"]
        flip = f" (flip evaluation {av['test_acc_flip']:.4f})" if "test_acc_flip" in av else ""
        lines.append(f"average of the last {av['last']} checkpoints ({av['path']}): test accuracy "
                     f"{av.get('test_acc', float('nan')):.4f}{flip}")
    if len(picked) < len(first):
        lines.append(f"({len(picked)} of {len(first)} epoch rows shown, evenly spaced; --rows 0 shows all)")
    for name, all_rows in info["layers"].items():
        rows_ = [r for r in all_rows if r["epoch"] in picked]
        lines.append("")
        lines.append(f"{name}  ({sum(all_rows[0]['counts']):,} weights)")
        cols = [c for c in COLUMNS if any(c[0] in r for r in all_rows)]
        head = f"  {'epoch':>7} " + " ".join(f"{_fmt_state(s):>7}" for s in states) + "   flip rate"
        lines.append(head + "".join(f" {h:>10}" for _, h, _ in cols) + "   histogram")
        for r in rows_:
            ep = f"{r['epoch']}{'*' if r['partial'] else ''}"
            fr = f"{r['flip_rate']:.2e}" if "flip_rate" in r else "-"
            extra = "".join(f" {fmt.format(r[k]) if k in r else '-':>10}" for k, _, fmt in cols)
            bar = "".join(ch * round(20 * f) for ch, f in zip(_bar_chars(len(states)), r["fractions"]))
            lines.append(f"  {ep:>7} " + " ".join(f"{f:7.1%}" for f in r["fractions"]) + f"   {fr:>9}{extra}   {bar}")
    if any(r["partial"] for rows in info["layers"].values() for r in rows):
        lines.append("\n* epoch not finished (newest step record)")
    return "\n".join(lines)


def _bar_chars(n):
    return "-" * (n // 2) + "0" + "+" * (n // 2) if n > 1 else "0"


def inspect_run(run_path, png=None, as_json=False, echo=print, rows=DEFAULT_ROWS):
    info = collect(run_path)
    if not info["layers"]:
        raise ValueError(f"{run_path}: no metrics recorded yet")
    echo(json.dumps(info, indent=1) if as_json else render_text(info, rows))
    if png:
        from .plots import state_figure
        state_figure(info, png)
        if not as_json:
            echo(f"wrote {png}")
