"""Hardware targets: how an IntNet maps onto the layers of a ternary accelerator, and what the
hardware cannot take. `ternet export RUN --target cutie` prints the findings layer by layer and
still exports everything for simulation. Exercise: pytest tests/test_export.py -k target.

CUTIE-style engines (Scherer et al., "CUTIE: Beyond PetaOp/s/W Ternary DNN Inference Acceleration
with Better-than-Binary Energy Efficiency", 2021) run layers of: ternary conv -> optional pooling
of the accumulators (pool stride = pool kernel) -> two thresholds per output channel, and a last
fully connected layer with full-precision outputs. Limits checked here (CUTIE_LIMITS): channels in
and out, the kernel (3x3 only), the input feature map of each conv, the number of layers, padding
(zeros, "valid" or "same" only; max pooling with padding needs -inf / -1 pads), and anything that
is not such a layer (residual adds, average pooling of activations, global pooling, outputs that
need negating, weights with more than three states).
"""
from dataclasses import dataclass, field

from .intref import shapes

CUTIE_LIMITS = {"max_channels": 96, "kernel": (3, 3), "max_feature_map": 64, "max_layers": 8}


@dataclass
class HwLayer:
    """One accelerator layer: conv/linear -> [pool] -> thresholds (or the classifier)."""
    index: int
    main: dict                       # conv or linear node
    in_shape: tuple                  # (H, W, C) the conv reads; for linear, the map before flatten
    pool: dict = None                # pooling of the accumulators (before the thresholds)
    act: dict = None                 # threshold | threshold2 | affine node
    post_pool: dict = None           # max pool after the thresholds, moved before them (commutes)
    extra: list = field(default_factory=list)   # nodes with no place in an accelerator layer

    @property
    def fp_out(self):
        return self.act is not None and self.act["op"] == "affine"


@dataclass
class Finding:
    layer: object                    # layer index, or None for the network as a whole
    rule: str   # channels | kernel | feature_map | layers | padding | pooling | residual | sign | weights | input
    message: str


def hw_layers(net):
    """Group the graph's nodes into accelerator layers (HwLayer list) and loose nodes."""
    shp = shapes(net)
    layers, cur, loose = [], None, []
    producer = {}                   # node name -> the HwLayer whose output it is
    for node in net.nodes:
        op, src = node["op"], (node["inputs"] or [None])[0]
        if op in ("conv", "linear"):
            in_shape = shp[src]
            if op == "linear" and len(in_shape) == 1:
                base = net.by_name.get(src)
                in_shape = shp[base["inputs"][0]] if base and base["op"] == "flatten" else (1, 1, in_shape[0])
                in_shape = in_shape if len(in_shape) == 3 else (1, 1, in_shape[0])
            cur = HwLayer(len(layers), node, tuple(in_shape), extra=loose)
            layers.append(cur)
            loose = []
            producer[node["name"]] = cur
        elif cur is not None and op in ("maxpool", "sumpool") and src == cur.main["name"] and cur.act is None:
            cur.pool = node
            producer[node["name"]] = cur
        elif op in ("threshold", "threshold2", "affine") and src in producer and producer[src].act is None:
            producer[src].act = node            # (a residual's projection conv comes in between)
            producer[node["name"]] = producer[src]
        elif (cur is not None and op == "maxpool" and cur.act is not None and src == cur.act["name"]
              and cur.pool is None and cur.act["op"] == "threshold" and (net.arr(cur.act, "sign") > 0).all()
              and len(net.consumers(src)) == 1):
            cur.post_pool = node    # max commutes with an increasing threshold map
            producer[node["name"]] = cur
        elif op not in ("input", "flatten"):
            loose.append(node)
    if loose and layers:
        layers[-1].extra += loose
    return layers


def describe(net, l):
    """'l3 conv4 (3x3/1, 128->128, in 16x16)' and the like."""
    m, (h, w, c) = l.main, l.in_shape
    k = net.arr(m, "weight").shape
    if m["op"] == "conv":
        return f"l{l.index} {m['name']} ({k[1]}x{k[2]}/{m['stride']}, {c}->{k[0]}, in {h}x{w})"
    kind = "classifier" if l.fp_out else "fc"
    return f"l{l.index} {m['name']} ({kind} {h}x{w}x{c}->{k[0]})"


def check_cutie(net, limits=CUTIE_LIMITS):
    """(layers, findings, notes): findings are what the hardware cannot take, layer by layer;
    notes are remarks that do not stop a layer from running."""
    layers = hw_layers(net)
    findings, notes = [], []
    mc, (kh_ok, kw_ok), mf = limits["max_channels"], limits["kernel"], limits["max_feature_map"]
    if net.meta.get("qmax", 1) != 1:
        findings.append(Finding(None, "weights", f"weights have {2 * net.meta['qmax'] + 1} states (N > 1); "
                                                 "the engine stores ternary weights"))
    notes.append(Finding(0, "input", "layer 0 reads 8-bit pixels through the input table (int64 fixed point); "
                                     "the engine's activations are ternary: run layer 0 on the host, or train "
                                     "on ternarized inputs"))
    for l in layers:
        m, (h, w, cin) = l.main, l.in_shape
        k = net.arr(m, "weight").shape
        kout = k[0]
        kk = (k[1], k[2]) if m["op"] == "conv" else (h, w)
        f = lambda rule, msg, li=l.index: findings.append(Finding(li, rule, msg))    # noqa: E731
        if cin > mc:
            f("channels", f"{cin} input channels (max {mc})")
        if kout > mc:
            f("channels", f"{kout} output {'classes' if l.fp_out else 'channels'} (max {mc})")
        if l.fp_out:
            if h * w > kh_ok * kw_ok:
                f("kernel", f"the classifier reads a {h}x{w} map; the engine's dense layer takes at most "
                            f"{kh_ok}x{kw_ok} positions")
        elif kk != (kh_ok, kw_ok):
            what = "kernel" if m["op"] == "conv" else f"fully connected layer over a {h}x{w} map = kernel"
            f("kernel", f"{what} {kk[0]}x{kk[1]} (only {kh_ok}x{kw_ok})")
        if m["op"] == "conv":
            if h > mf or w > mf:
                f("feature_map", f"input feature map {h}x{w} (max {mf}x{mf})")
            if m["pad"] not in (0, (k[1] - 1) // 2) or k[1] != k[2]:
                f("padding", f"conv padding {m['pad']} (only 0 or 'same' = {(k[1] - 1) // 2})")
        pools = [p for p in (l.pool, l.post_pool) if p is not None]
        for p in pools:
            if p["pad"] and p["op"] == "maxpool":
                f("padding", f"max pooling {p['k']}x{p['k']} with padding {p['pad']} pads with -inf "
                             f"(-1 on ternary values); the engine pads with zeros")
            if p["stride"] != p["k"]:
                f("pooling", f"pooling {p['k']}x{p['k']} with stride {p['stride']} (only stride = kernel)")
        if l.act is not None and l.act["op"] == "threshold2":
            f("residual", f"residual add ({l.act['inputs'][1]} + {m['name']}) before the thresholds: no skip "
                          "connections")
        if l.act is not None and l.act["op"] == "threshold" and (net.arr(l.act, "sign") < 0).any():
            n = int((net.arr(l.act, "sign") < 0).sum())
            f("sign", f"{n} channels with negative BN scale behind a max pool need negated outputs "
                      "(no linear consumer to absorb the sign)")
        for x in l.extra:
            what = {"gsum": "global average pooling", "sumpool": "average pooling of ternary activations",
                    "maxpool": "max pooling outside a layer's pooling stage"}.get(x["op"], x["op"])
            f("pooling", f"{what} ({x['name']}) before this layer has no place in an engine layer")
        if l.act is None:
            out = (l.pool or m)["name"]
            adds = [n["name"] for n in net.consumers(out) if n["op"] == "threshold2" and n["inputs"][1] == out]
            if adds:
                f("residual", f"shortcut projection: its accumulators feed the residual add {adds[0]}")
            else:
                f("layers", f"{m['name']} is not followed by thresholds or a classifier")
    if len(layers) > limits["max_layers"]:
        findings.append(Finding(None, "layers", f"{len(layers)} layers (max {limits['max_layers']})"))
    return layers, findings, notes


def format_report(net, layers, findings, notes, target="cutie"):
    """Human-readable report, one line per layer that has findings."""
    lines = [f"target {target}: {len(findings)} finding(s) in {len(layers)} layer(s)"
             + (" -- the network fits" if not findings else "")]
    for l in layers:
        mine = [x for x in findings if x.layer == l.index]
        if mine:
            lines.append("  " + describe(net, l))
            lines += [f"      [{x.rule}] {x.message}" for x in mine]
    for x in findings:
        if x.layer is None:
            lines.append(f"  network: [{x.rule}] {x.message}")
    lines += [f"  note (l{x.layer}): {x.message}" for x in notes]
    return "\n".join(lines)
