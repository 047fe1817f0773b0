"""`ternet export` and `ternet eval --integer`: fold a run's newest checkpoint, write it, check it
against a hardware target, and run the integer network over a dataset split, optionally beside
the float evaluator to count how often the two predict the same class.
Exercise: pytest tests/test_export.py -k cli.
"""
import dataclasses
import pathlib

import numpy as np

from . import exportio, intref
from .export import fold


def _loader(ds, split, batch):
    from .loader import Loader
    return Loader(ds, split, batch, shuffle=False, augment="none", in_memory=False, prefetch=1)


def fold_run(run_path, ckpt=None, rounding="float32"):
    """(cfg, model, net): the run's newest (or given) checkpoint on the host, and its IntNet."""
    from .evaluate import load_model
    from .train import open_data
    cfg, model = load_model(run_path, device="cpu", ckpt=ckpt)
    ds = open_data(cfg)
    split = min(ds.splits, key=lambda s: ds.splits[s])
    ld = _loader(ds, split, 1)
    meta = {"source": {"run": str(pathlib.Path(run_path).resolve()), "checkpoint": str(ckpt or "newest")},
            "data": cfg.data, "class_names": list(ds.class_names), "act_r": cfg.act_r}
    return cfg, model, fold(model, (ld.scale, ld.shift), meta, rounding)


def export_run(run_path, fmt, out=None, target=None, pack=(), name="net", ckpt=None, rounding="float32"):
    """Fold and write; returns (out path, IntNet, target report text or None)."""
    from .targets import check_cutie, format_report
    _, _, net = fold_run(run_path, ckpt, rounding)
    out = pathlib.Path(out or pathlib.Path(run_path) / ("export-cutie" if fmt == "cutie" else f"export.{fmt}"))
    report, found = None, []
    if target == "cutie" or fmt == "cutie":
        layers, findings, notes = check_cutie(net)
        found = [dataclasses.asdict(f) for f in findings]
        report = format_report(net, layers, findings, notes) if target else None
    kw = {"name": name, "pack": tuple(pack), "findings": found} if fmt == "cutie" else {}
    exportio.write(net, out, fmt, **kw)
    return out, net, report


def open_integer(path, ckpt=None, rounding="float32"):
    """(IntNet, model or None, data path): a run folder is folded (its model kept for
    comparisons); an export (npz, h5 or CUTIE folder) is read."""
    p = pathlib.Path(path)
    if (p / "config.json").exists():
        cfg, model, net = fold_run(p, ckpt, rounding)
        return net, model, cfg.data
    net = exportio.read(p)
    return net, None, net.meta.get("data", "")


def _float_forward(model, x):
    """Float logits and the ternary outputs of the top-level batch norm + activation layers,
    keyed by the integer network's threshold node names."""
    from .layers import BNAct
    acts = {}
    for layer in model.net.layers:
        x = layer.forward(x, False)
        if isinstance(layer, BNAct):
            acts[layer.name.replace("bn", "act")] = np.asarray(x)
    return np.asarray(x), acts


def evaluate_integer(net, data, split, model=None, engine="int", limit=0, batch=200, progress=None):
    """Run the integer network over a split: {"n", "correct_int"} and, with the float model, its
    "correct_float", "agree", the disagreements (index, float class, integer class, whether
    the float logits of the two classes are an exact tie, their gap in float32 ulps) and, per
    threshold node, how many activations differ from the float path's (act_mismatch / act_total)."""
    from .shards import EMBEDDED_DEFAULT, open_dataset
    ds = open_dataset(data or EMBEDDED_DEFAULT)
    if ds.num_classes != net.meta["num_classes"]:
        raise ValueError(f"{ds.path} has {ds.num_classes} classes, the network {net.meta['num_classes']}")
    raw = _loader(ds, split, batch)
    flt = _loader(ds, split, batch) if model is not None else None
    res = {"n": 0, "correct_int": 0, "split": split, "engine": engine}
    if model is not None:
        res.update(correct_float=0, agree=0, disagreements=[], act_mismatch={}, act_total={})
    floats = flt.batches(0) if flt else None
    for px, y in raw.batches(0, raw=True):
        if limit and res["n"] >= limit:
            break
        if limit:
            px, y = px[:limit - res["n"]], y[:limit - res["n"]]
        if model is None:
            ipred = intref.predict(net, px, engine)
        else:
            acts = [n["name"] for n in net.nodes if n["op"] == "threshold"]
            out = intref.run(net, px, engine, keep=acts)
            ipred = np.argmax(out[None], axis=1)     # key None: the last node, the logits
            x = next(floats)[0][:len(y)]
            logits, facts = _float_forward(model, x)
            for name, f in facts.items():
                i = out[name].astype(np.int64)
                i[..., net.by_name[name].get("negated", [])] *= -1
                res["act_mismatch"][name] = res["act_mismatch"].get(name, 0) + int((i != f).sum())
                res["act_total"][name] = res["act_total"].get(name, 0) + f.size
            fpred = np.argmax(logits, axis=1)
        res["correct_int"] += int((ipred == y).sum())
        if model is not None:
            res["correct_float"] += int((fpred == y).sum())
            res["agree"] += int((fpred == ipred).sum())
            for i in np.flatnonzero(fpred != ipred):
                a, b = logits[i, fpred[i]], logits[i, ipred[i]]
                res["disagreements"].append({"index": res["n"] + int(i), "float_class": int(fpred[i]),
                                             "int_class": int(ipred[i]), "float_tie": bool(a == b),
                                             "gap_ulps": float((a - b) / np.spacing(np.abs(a)))})
        res["n"] += len(y)
        if progress:
            progress(res)
    if floats is not None:
        floats.close()
    return res


def integer_eval_cli(path, data, split, compare, engine, limit, echo, rounding="float32"):
    """`ternet eval PATH --integer [--compare]`: accuracy of the integer network (and agreement)."""
    import click
    from .shards import EMBEDDED_DEFAULT, open_dataset
    try:
        net, model, run_data = open_integer(path, rounding=rounding)
        ds = open_dataset(data or run_data or EMBEDDED_DEFAULT)
    except (FileNotFoundError, ValueError) as e:
        raise click.UsageError(str(e)) from None
    if compare and model is None:
        raise click.UsageError("--compare needs a run folder (the float model), not an export")
    splits = [split] if split else [s for s in ("val", "test") if s in ds.splits] or list(ds.splits)
    for s in splits:
        if s not in ds.splits:
            raise click.UsageError(f"--split {s}: {ds.path} has splits {', '.join(ds.splits)}")
        r = evaluate_integer(net, str(ds.path), s, model if compare else None, engine, limit)
        line = f"{s}: integer accuracy {r['correct_int'] / r['n']:.4f} ({r['n']} images, engine {engine})"
        if compare:
            ties = sum(d["float_tie"] for d in r["disagreements"])
            line += (f"; float accuracy {r['correct_float'] / r['n']:.4f}; same class {r['agree']}/{r['n']}"
                     f" ({len(r['disagreements'])} disagreements, {ties} of them exact float ties)")
        echo(line)
        if compare:
            echo("  activations that differ from the float path: " + ", ".join(
                f"{k} {r['act_mismatch'][k]}/{r['act_total'][k]}" for k in r["act_total"]))
        for d in r.get("disagreements", [])[:20]:
            why = "exact tie" if d["float_tie"] else f"float gap {d['gap_ulps']:.1f} ulp"
            echo(f"  image {d['index']}: float class {d['float_class']}, integer {d['int_class']} ({why})")
