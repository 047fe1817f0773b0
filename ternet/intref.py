"""The integer-only reference: an exported network (IntNet, a small graph of integer ops over int
arrays) run on the CPU with integer arithmetic. This module defines what an export means; folding
(ternet.export) and the file formats (ternet.exportio) only produce and carry IntNets.
Exercise: pytest tests/test_export.py; `ternet eval RUN --integer`.

Ops (per-sample shapes; every node has "name", "op" and "inputs", a list of node names):
  input      uint8 pixels (H, W, C) -> int64 fixed point lut[c, pixel] (the loader's float32
             normalisation times 2^frac_bits, exact when the node says "exact": true)
  conv       int8 weight (K, KH, KW, C), "stride", "pad" (zeros) -> (OH, OW, K) accumulators;
             "accumulate": "float32" (first layer): taps summed in (i, j, c) order, rounded to
             float32's 24 significant bits after each add, as the float evaluator's GEMM does
  linear     int8 weight (K, F) on the flattened input -> (K,)
  maxpool    "k", "stride", "pad" (padded taps are skipped, i.e. -inf)
  sumpool    "k", "stride", "pad": window sums (zero padding counted); the 1/k^2 of average
             pooling is folded into the thresholds downstream ("accumulate" as for conv)
  gsum       sum over H and W -> (C,)  (global average pooling without the 1/(H W))
  flatten    (H, W, C) -> (H*W*C,), channels fastest (NHWC)
  threshold  lo, hi (C,) int: t = +1 if acc > hi, -1 if acc < lo, else 0; out = sign[c] * t (int8)
  threshold2 residual: inputs [main, short]; lo, hi (C, V) int, "vmin": the shortcut value v
             selects column v - vmin, then as threshold on the main accumulator (sign is +1)
  affine     the classifier: logits = acc * mult[k] + offset[k] (int64), real logits times
             2^frac_bits; "rounding": "float32" rounds the sum to 53, then to 24 significant
             bits as the float path's float32 batch norm does; the prediction is the first maximum
Each node also records "bound", the largest reachable |value| of its output.
"""
import json

import numba
import numpy as np
from numba.cpython.unsafe.numbers import leading_zeros

FORMAT = "ternet-intnet"
VERSION = 1
INT32_MAX = 2 ** 31 - 1
F32_EXACT = 2 ** 24        # integers below this add exactly in float32


class IntNetError(ValueError):
    pass


class IntNet:
    """An exported network: nodes (JSON-able dicts, in execution order), arrays keyed
    "<node>.<key>" and meta (format, version, arch, class names, source run ...)."""

    def __init__(self, nodes, arrays, meta):
        self.nodes, self.arrays, self.meta = list(nodes), dict(arrays), dict(meta)
        self.by_name = {n["name"]: n for n in self.nodes}

    def arr(self, node, key):
        return self.arrays[f"{node['name'] if isinstance(node, dict) else node}.{key}"]

    def graph_json(self):
        return json.dumps({**self.meta, "format": FORMAT, "version": VERSION, "nodes": self.nodes},
                          sort_keys=True)

    @classmethod
    def from_json(cls, text, arrays, where="export"):
        g = json.loads(text)
        if g.get("format") != FORMAT or g.get("version") != VERSION:
            raise IntNetError(f"{where}: format {g.get('format')!r} version {g.get('version')!r}, expected "
                              f"{FORMAT!r} version {VERSION}. HINT: re-run `ternet export` with this ternet")
        nodes = g.pop("nodes")
        g.pop("format"), g.pop("version")
        missing = [f"{n['name']}.{k}" for n in nodes for k in n.get("arrays", []) if f"{n['name']}.{k}" not in arrays]
        if missing:
            raise IntNetError(f"{where}: arrays {missing[:5]} are missing; the export is incomplete")
        return cls(nodes, arrays, g)

    def consumers(self, name):
        return [n for n in self.nodes if name in n["inputs"]]

    def same_as(self, other):
        """True when both graphs and all arrays (dtype and values) are identical."""
        if self.graph_json() != other.graph_json() or set(self.arrays) != set(other.arrays):
            return False
        return all(a.dtype == other.arrays[k].dtype and a.shape == other.arrays[k].shape
                   and np.array_equal(a, other.arrays[k]) for k, a in self.arrays.items())


def acc_dtype(bound):
    return np.int32 if bound <= INT32_MAX else np.int64


# ----------------------------------------------------------------------------------------------
# integer kernels (numba): every product and sum in int32 / int64, no floating point

@numba.njit(parallel=True, cache=True)
def _gemm_int(a, bt, out):
    # out (M, K) = a (M, D) @ bt (D, K). Rows go in blocks of 32 so that a weight row is read
    # once per block; zero inputs (common in ternary activations) are skipped.
    m, d = a.shape
    k = bt.shape[1]
    nblk = (m + 31) // 32
    for b in numba.prange(nblk):
        r0, r1 = b * 32, min(m, b * 32 + 32)
        for r in range(r0, r1):
            for kk in range(k):
                out[r, kk] = 0
        for e in range(d):
            row = bt[e]
            for r in range(r0, r1):
                v = a[r, e]
                if v != 0:
                    o = out[r]
                    for kk in range(k):
                        o[kk] += v * row[kk]


@numba.njit(inline="always")
def round_sig(v, bits):
    """A fixed-point int64 value rounded to `bits` significant bits, ties to even: what a float
    with that many significant bits does to the same value (a power-of-two scale keeps them)."""
    a = v if v >= 0 else -v
    s = 64 - bits - leading_zeros(a)    # bit length - bits: the bits the float cannot keep
    if s <= 0:
        return v
    a = ((a + (np.int64(1) << (s - 1)) - 1 + ((a >> s) & 1)) >> s) << s
    return a if v >= 0 else -a


@numba.njit(inline="always")
def round_f32(v):
    """A fixed-point int64 value rounded to float32's 24 significant bits, ties to even: what
    float32 addition does to the same value (any power-of-two scale keeps the significant bits)."""
    a = v if v >= 0 else -v
    s = 40 - leading_zeros(a)           # bit length - 24: the bits float32 cannot keep
    if s <= 0:
        return v
    # add just under half an ulp, plus one when the kept part is odd (ties to even), truncate
    a = ((a + (np.int64(1) << (s - 1)) - 1 + ((a >> s) & 1)) >> s) << s
    return a if v >= 0 else -a


@numba.njit(parallel=True, cache=True)
def _conv_f32seq(x, w, stride, pad, out):
    # out[n, oh, ow, k] = sum over taps in (i, j, c) order of x * w, rounded to float32 after every
    # add: how a float32 GEMM on the im2col matrix accumulates (zero taps add exactly nothing)
    n_img, h, wd, c = x.shape
    k_n, kh, kw, _ = w.shape
    _, oh_n, ow_n, _ = out.shape
    taps = kh * kw * c
    wf = w.reshape(k_n, taps)
    nnz = np.zeros(k_n, np.int64)           # each filter's non-zero taps, in order
    idx = np.zeros((k_n, taps), np.int64)
    val = np.zeros((k_n, taps), np.int64)
    for k in range(k_n):
        for e in range(taps):
            if wf[k, e] != 0:
                idx[k, nnz[k]], val[k, nnz[k]] = e, wf[k, e]
                nnz[k] += 1
    for n in numba.prange(n_img):
        patch = np.zeros(taps, np.int64)
        for oh in range(oh_n):
            for ow in range(ow_n):
                for i in range(kh):
                    ih = oh * stride - pad + i
                    for j in range(kw):
                        iw = ow * stride - pad + j
                        inside = 0 <= ih < h and 0 <= iw < wd
                        for ch in range(c):
                            patch[(i * kw + j) * c + ch] = x[n, ih, iw, ch] if inside else 0
                for k in range(k_n):
                    acc = np.int64(0)
                    for t in range(nnz[k]):
                        acc = round_f32(acc + patch[idx[k, t]] * val[k, t])
                    out[n, oh, ow, k] = acc


@numba.njit(cache=True)
def _affine_f32(acc, mult, offset, out):
    # out = f32(f64(x) * f64(scale) + f64(shift)): the float path's batch norm (scalar.affine),
    # on fixed-point integers -- the product is exact in float64 and in int64 alike, the sum is
    # rounded to float64's 53 significant bits, then to float32's 24
    n, k = out.shape
    for i in range(n):
        for j in range(k):
            out[i, j] = round_f32(round_sig(acc[i, j] * mult[j] + offset[j], 53))


@numba.njit(parallel=True, cache=True)
def _im2col_int(x, kh, kw, stride, pad, oh_n, ow_n, cols):
    # x (N, H, W, C) -> cols (N*OH*OW, KH*KW*C), zeros outside the image; order (i, j, c)
    n_img, h, w, c = x.shape
    for n in numba.prange(n_img):
        for oh in range(oh_n):
            for ow in range(ow_n):
                row = (n * oh_n + oh) * ow_n + ow
                for i in range(kh):
                    ih = oh * stride - pad + i
                    for j in range(kw):
                        iw = ow * stride - pad + j
                        base = (i * kw + j) * c
                        inside = 0 <= ih < h and 0 <= iw < w
                        for ch in range(c):
                            cols[row, base + ch] = x[n, ih, iw, ch] if inside else 0


@numba.njit(parallel=True, cache=True)
def _pool_int(x, k, stride, pad, mode, out):
    # mode 0: max (padded taps skipped); 1: sum; 2: sum rounded to float32 after every add
    n_img, h, w, c = x.shape
    _, oh_n, ow_n, _ = out.shape
    for n in numba.prange(n_img):
        for oh in range(oh_n):
            for ow in range(ow_n):
                for ch in range(c):
                    first, acc = True, x[n, 0, 0, ch] * 0
                    for i in range(k):
                        ih = oh * stride - pad + i
                        if ih < 0 or ih >= h:
                            continue
                        for j in range(k):
                            iw = ow * stride - pad + j
                            if iw < 0 or iw >= w:
                                continue
                            v = x[n, ih, iw, ch]
                            if mode == 1:
                                acc += v
                            elif mode == 2:
                                acc = round_f32(acc + v)
                            elif first or v > acc:
                                acc = v
                            first = False
                    out[n, oh, ow, ch] = acc


def _out(h, k, stride, pad):
    return (h + 2 * pad - k) // stride + 1


def _gemm(a, w2d, dtype, engine):
    """a (M, D) int @ w2d (K, D).T int8 -> (M, K) dtype, exactly. engine "f32" runs float32
    BLAS on the integer values: exact because every operand and partial sum is an integer below
    2^24 (the caller checks the node's bound); "int" runs the integer kernel above."""
    if engine == "f32":
        out = a.astype(np.float32) @ w2d.T.astype(np.float32)
        return out.astype(dtype)
    out = np.empty((a.shape[0], w2d.shape[0]), dtype)
    bt = np.ascontiguousarray(w2d.T).astype(np.int16 if dtype == np.int32 else np.int64)
    _gemm_int(np.ascontiguousarray(a), bt, out)
    return out


def _conv(x, node, w, engine):
    n, h, wd, c = x.shape
    k, kh, kw, _ = w.shape
    s, p = node["stride"], node["pad"]
    oh, ow = _out(h, kh, s, p), _out(wd, kw, s, p)
    if node.get("accumulate") == "float32":
        out = np.empty((n, oh, ow, k), np.int64)
        _conv_f32seq(x.astype(np.int64), w, s, p, out)
        return out
    cols = np.empty((n * oh * ow, kh * kw * c), x.dtype)
    _im2col_int(x, kh, kw, s, p, oh, ow, cols)
    return _gemm(cols, w.reshape(k, -1), acc_dtype(node["bound"]), engine).reshape(n, oh, ow, k)


def _pool(x, node, is_max):
    n, h, w, c = x.shape
    k, s, p = node["k"], node["stride"], node["pad"]
    out = np.empty((n, _out(h, k, s, p), _out(w, k, s, p), c), x.dtype if is_max else acc_dtype(node["bound"]))
    mode = 0 if is_max else 2 if node.get("accumulate") == "float32" else 1
    _pool_int(x if is_max else x.astype(out.dtype), k, s, p, mode, out)
    return out


def _tern(acc, lo, hi):
    return ((acc > hi).astype(np.int8) - (acc < lo).astype(np.int8))


def _node_forward(net, node, ins, engine):
    op = node["op"]
    a = lambda key: net.arr(node, key)      # noqa: E731
    if op == "input":
        px = ins[0]
        lut = a("lut")
        return lut[np.arange(lut.shape[0]), px.astype(np.intp)]
    if op == "conv":
        eng = engine if node["bound"] < F32_EXACT and ins[0].dtype != np.int64 else "int"
        return _conv(ins[0], node, a("weight"), eng)
    if op == "linear" and node.get("accumulate") == "float32":
        x = ins[0].reshape(len(ins[0]), 1, 1, -1).astype(np.int64)
        w = a("weight")
        out = np.empty((len(x), 1, 1, len(w)), np.int64)
        _conv_f32seq(x, w.reshape(len(w), 1, 1, -1), 1, 0, out)
        return out.reshape(len(x), -1)
    if op == "linear":
        eng = engine if node["bound"] < F32_EXACT and ins[0].dtype != np.int64 else "int"
        return _gemm(ins[0].reshape(len(ins[0]), -1), a("weight"), acc_dtype(node["bound"]), eng)
    if op in ("maxpool", "sumpool"):
        return _pool(ins[0], node, op == "maxpool")
    if op == "gsum":
        return ins[0].sum(axis=(1, 2), dtype=acc_dtype(node["bound"]))
    if op == "flatten":
        return ins[0].reshape(len(ins[0]), -1)
    if op == "threshold":
        return _tern(ins[0], a("lo"), a("hi")) * a("sign")
    if op == "threshold2":
        main, short = ins
        col = short.astype(np.intp) - node["vmin"]
        ch = np.broadcast_to(np.arange(main.shape[-1]), main.shape)
        return _tern(main, a("lo")[ch, col], a("hi")[ch, col])
    if op == "affine":
        acc = ins[0].astype(np.int64)
        if node.get("rounding") == "float32":
            out = np.empty((len(acc), len(a("mult"))), np.int64)
            _affine_f32(acc, a("mult"), a("offset"), out)
            return out
        return acc * a("mult") + a("offset")
    raise IntNetError(f"node {node['name']}: unknown op {op!r}")


def run(net, pixels, engine="int", keep=()):
    """Run the integer network on uint8 pixels (N, H, W, C). Returns the last node's output
    (int64 logits for a classifier), or {name: output} for the node names in `keep` plus the
    last one (key None). engine: "int" (integer kernels) or "f32" (exact float32 BLAS where a
    node's bound allows; see _gemm)."""
    if pixels.dtype != np.uint8:
        raise IntNetError(f"the integer network reads uint8 pixels, got {pixels.dtype}")
    vals, kept = {}, {}
    uses = {}
    for node in net.nodes:
        for i in node["inputs"]:
            uses[i] = uses.get(i, 0) + 1
    for node in net.nodes:
        ins = [pixels] if node["op"] == "input" else [vals[i] for i in node["inputs"]]
        out = _node_forward(net, node, ins, engine)
        for i in node["inputs"]:
            uses[i] -= 1
            if uses[i] == 0 and i not in keep:
                vals.pop(i, None)
        vals[node["name"]] = out
        if node["name"] in keep:
            kept[node["name"]] = out
    last = vals[net.nodes[-1]["name"]]
    if keep:
        kept[None] = last
        return kept
    return last


def predict(net, pixels, engine="int"):
    """Class indices (N,) int64: the first maximum of the integer logits."""
    return np.argmax(run(net, pixels, engine), axis=1)


def shapes(net):
    """{node name: per-sample output shape} by shape inference over the graph."""
    out = {}
    for node in net.nodes:
        op = node["op"]
        src = out[node["inputs"][0]] if node["inputs"] else None
        if op == "input":
            s = tuple(node["shape"])
        elif op == "conv":
            k, kh, kw, _ = net.arr(node, "weight").shape
            s = (_out(src[0], kh, node["stride"], node["pad"]), _out(src[1], kw, node["stride"], node["pad"]), k)
        elif op in ("maxpool", "sumpool"):
            s = (_out(src[0], node["k"], node["stride"], node["pad"]),
                 _out(src[1], node["k"], node["stride"], node["pad"]), src[2])
        elif op == "linear":
            s = (net.arr(node, "weight").shape[0],)
        elif op == "gsum":
            s = (src[-1],)
        elif op == "flatten":
            s = (int(np.prod(src)),)
        else:
            s = src
        out[node["name"]] = s
    return out
