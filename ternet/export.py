"""Folding: a trained ternary Model -> an IntNet (ternet.intref) of int8 weights and per-channel
integer thresholds on exact accumulators that reproduce the float32 evaluator's decisions.
Exercise: pytest tests/test_export.py; `ternet export RUN --format npz`.

How thresholds are found. Behind every conv/linear -> [pool] -> batch norm -> phi_r block the float
path computes, in float32, v = value(acc) (acc / qmax, times 1/k^2 after average pooling), then
y = v * scale + shift and phi_r(y). Every step is a monotone function of the integer accumulator
(float rounding is monotone), non-decreasing when scale >= 0. So the decision is a step function
of acc with at most two steps, found by binary search over the reachable range [-B, B] with the
evaluator's own kernels (bn_act_forward_eval, add_forward, ternary_forward) deciding each
candidate: the thresholds agree with the float path for every reachable accumulator, exact ties
and float rounding included, not only away from the real-valued boundary. A threshold that would
lie outside the range (a constant channel, e.g. gamma = 0) is clamped to -(B+1) or B+1.

Negative scale (decreasing decision): without a max pool between the conv and the batch norm the
channel's weights are negated (acc -> -acc) and the thresholds found for the increasing map.
With one (conv -> max pool -> BN, the GXNOR order) negating would need a min pool, so instead the
channel's output is negated (sign -1, thresholds on the unflipped acc for -phi, which is
increasing and commutes with max) and the sign is moved into the next conv/linear's weights for
that input channel when that is the only consumer; otherwise the threshold node keeps sign -1.
"""
import math
from dataclasses import dataclass, replace
from fractions import Fraction

import numpy as np

from .intref import INT32_MAX, IntNet
from .kernels.activation import ternary_forward
from .kernels.batchnorm import batchnorm_forward_eval, bn_act_forward_eval
from .kernels.elementwise import add_forward
from .layers import (AvgPool, BatchNorm, BNAct, Conv2d, Flatten, GlobalAvgPool, Linear, MaxPool, Residual)

INT64_SAFE = 2 ** 62


class ExportError(ValueError):
    pass


@dataclass(frozen=True)
class _T:
    """An integer tensor of the folded graph and how the float path sees it: float value =
    f32(int * 2^-fe), then times each float32 factor in `divs` (1/k^2 that is no power of two)."""
    name: str
    shape: tuple
    kind: str               # pixels | acc | ternary | sum
    bound: int              # largest reachable |int|
    fe: int = 0
    divs: tuple = ()
    match: str = "bitwise"  # bitwise | rounding (input layer: exact sums vs float32 GEMM) | approx
    producer: str = ""      # conv/linear node behind an accumulator
    maxpooled: bool = False
    f32sums: bool = False   # sums rounded to float32 after every add, as the float path does


def bn_eval_affine(bn):
    """(scale, shift) float32 exactly as batchnorm_forward_eval computes them (scalar.bn_eval_coeffs)."""
    from .kernels.scalar import bn_eval_coeffs
    pairs = [bn_eval_coeffs(g, b, m, v, np.float64(bn.eps)) for g, b, m, v in
             zip(bn.gamma.value, bn.beta.value, bn.running_mean, bn.running_var)]
    return (np.array([p[0] for p in pairs], np.float32), np.array([p[1] for p in pairs], np.float32))


def input_lut(scale, shift):
    """(C, 256) float32: what the loader feeds the first layer for each pixel value, computed by
    the loader's own kernel (so any rounding it does is reproduced)."""
    from .augment import crop_flip
    c = len(scale)
    src = np.repeat(np.arange(256, dtype=np.uint8), c)
    out = np.empty((1, 1, 256, c), np.float32)
    z = np.zeros(1, np.int64)
    crop_flip(src, z, np.ones(1, np.int32), np.full(1, 256, np.int32), z, z, z, z, np.zeros(1, np.bool_),
              np.asarray(scale, np.float32), np.asarray(shift, np.float32), out)
    return out[0, 0].T.copy()


def _frac_bits(values, cap):
    """Smallest F <= cap with every value * 2^F an integer (float32 values are dyadic)."""
    v = np.asarray(values, np.float64)
    f = 0
    while f < cap and not np.all(np.ldexp(v, f) == np.round(np.ldexp(v, f))):
        f += 1
    return f, bool(np.all(np.ldexp(v, f) == np.round(np.ldexp(v, f))))


def _log2(n):
    return n.bit_length() - 1 if n > 0 and n & (n - 1) == 0 else None


def thresholds(decide, bound, shape):
    """(lo, hi) int64 arrays of `shape` with decide(A) = +1 iff A > hi, -1 iff A < lo, for every
    integer A in [-bound, bound]. decide maps int64 candidates of `shape` to int8 and must be
    non-decreasing in A elementwise. lo <= hi + 1 (equality: no zero band); a step outside the
    range is clamped just outside it (-(bound+1) <= hi, lo <= bound+1)."""
    def first(pred):        # smallest A in [-bound, bound + 1] with pred(decide(A))
        lo = np.full(shape, -bound - 1, np.int64)
        hi = np.full(shape, bound + 1, np.int64)
        while True:
            active = hi - lo > 1
            if not active.any():
                return hi
            mid = (lo + hi) // 2
            t = pred(decide(mid))
            hi = np.where(active & t, mid, hi)
            lo = np.where(active & ~t, mid, lo)
    return first(lambda d: d >= 0), first(lambda d: d > 0) - 1


class _Folder:
    def __init__(self, model, rounding):
        self.model, self.qmax, self.rounding = model, model.qmax, rounding
        self.nodes, self.arrays, self.names = [], {}, set()

    def add(self, name, op, inputs, arrays=None, **attrs):
        base, i = name, 1
        while name in self.names:
            i += 1
            name = f"{base}_{i}"
        self.names.add(name)
        arrays = arrays or {}
        for k, a in arrays.items():
            self.arrays[f"{name}.{k}"] = a
        self.nodes.append({"name": name, "op": op, "inputs": list(inputs), "arrays": sorted(arrays), **attrs})
        return name

    def node(self, name):
        return next(n for n in self.nodes if n["name"] == name)

    # -- the float path's view of a tensor ---------------------------------------------------
    @staticmethod
    def value(t, a):
        """float32 values the float path holds for integer values a of tensor t."""
        if np.abs(a).max(initial=0) >= 2 ** 53:
            raise ExportError(f"{t.name}: accumulator range too large to fold")
        v = np.ldexp(a.astype(np.float64), -t.fe).astype(np.float32)
        for d in t.divs:
            v = v * np.float32(d)
        return v

    # -- layers ------------------------------------------------------------------------------
    def input(self, scale, shift, in_shape):
        lut = input_lut(scale, shift)
        # float32 pixels are dyadic: 2^F makes them integers (F ~ 34 for a value near zero); a cap
        # keeps the first layer's sums far below 2^62 for any kernel
        f, exact = _frac_bits(lut, 40)
        ilut = np.round(np.ldexp(lut.astype(np.float64), f)).astype(np.int64)
        name = self.add("input", "input", [], {"lut": ilut}, shape=list(in_shape), frac_bits=f,
                        exact=exact, bound=int(np.abs(ilut).max()))
        return _T(name, tuple(in_shape), "pixels", int(np.abs(ilut).max()), fe=f,
                  match="rounding" if exact else "approx")

    def weighted(self, layer, t):
        q = np.array(layer.w.q, np.int8)
        fan = layer.k * layer.k * t.shape[-1] if isinstance(layer, Conv2d) else layer.fin
        bound = t.bound * fan * self.qmax
        f32 = t.kind == "pixels" and self.rounding == "float32"
        # first layer: the float GEMM sums the taps in order, rounding after every add (see
        # intref._conv_f32seq); rounding may step one float32 ulp past the exact bound
        extra = {"accumulate": "float32"} if f32 else {}
        bound = bound + (bound >> 22) + 1 if f32 else bound
        if isinstance(layer, Conv2d):
            if len(t.shape) != 3:
                raise ExportError(f"{layer.name}: convolution on a flat input")
            name = self.add(layer.name, "conv", [t.name], {"weight": q}, k=layer.k, stride=layer.stride,
                            pad=layer.pad, bound=bound, **extra)
            shape = layer.out_shape(t.shape)
        else:
            name = self.add(layer.name, "linear", [t.name], {"weight": q}, bound=bound, **extra)
            shape = (layer.fout,)
        if bound >= INT64_SAFE:
            raise ExportError(f"{layer.name}: accumulators could reach {bound}, beyond int64")
        match = "approx" if t.divs else "bitwise" if f32 and t.match == "rounding" else t.match
        return _T(name, shape, "acc", bound, fe=t.fe + _log2(self.qmax), divs=t.divs, match=match,
                  producer=name, f32sums=f32)

    def pool(self, layer, t):
        op = "maxpool" if not isinstance(layer, AvgPool) else "sumpool"
        area = layer.k * layer.k
        bound = t.bound if op == "maxpool" else t.bound * area
        extra = {"accumulate": "float32"} if op == "sumpool" and t.f32sums else {}
        name = self.add(layer.name, op, [t.name], k=layer.k, stride=layer.stride, pad=layer.pad, bound=bound,
                        **extra)
        t = replace(t, name=name, shape=layer.out_shape(t.shape), bound=bound)
        if op == "maxpool":
            return replace(t, maxpooled=t.maxpooled or t.kind == "acc")
        kind = "sum" if t.kind == "ternary" else t.kind
        if _log2(area) is not None:
            return replace(t, kind=kind, fe=t.fe + _log2(area))
        # the float path rounds sum * f32(1/k^2) once: exact on an accumulator (see value()),
        # not once a conv has mixed such values (weighted() marks that "approx")
        return replace(t, kind=kind, divs=t.divs + (float(np.float32(1.0 / area)),))

    def gsum(self, layer, t):
        h, w, c = t.shape
        name = self.add(layer.name, "gsum", [t.name], bound=t.bound * h * w)
        t = replace(t, name=name, shape=(c,), kind="sum", bound=t.bound * h * w)
        if _log2(h * w) is not None:
            return replace(t, fe=t.fe + _log2(h * w))
        return replace(t, divs=t.divs + (float(np.float32(1.0 / (h * w))),))

    def flip_channels(self, t, neg):
        """Negate the producer's weights of output channels `neg` (acc -> -acc there)."""
        w = self.arrays[f"{t.producer}.weight"]
        w[neg] = -w[neg]

    def bn_act(self, bn, t, name=None):
        if t.kind != "acc":
            raise ExportError(f"{bn.name}: batch norm + activation must follow a conv or linear layer")
        scale, _ = bn_eval_affine(bn)
        neg = scale < 0
        c = len(scale)
        g, b, rm, rv, r = bn.gamma.value, bn.beta.value, bn.running_mean, bn.running_var, bn.act.r

        def phi(a):
            out = np.empty(a.shape, np.int8)
            bn_act_forward_eval(out, self.value(t, a), g, b, rm, rv, bn.eps, r)
            return out
        if t.maxpooled:     # sign trick: -phi is increasing where scale < 0
            sign = np.where(neg, -1, 1).astype(np.int8)
            decide = lambda a: phi(a) * sign            # noqa: E731
        else:
            self.flip_channels(t, neg)
            sign = np.ones(c, np.int8)
            decide = lambda a: phi(np.where(neg, -a, a))   # noqa: E731
        lo, hi = thresholds(decide, t.bound, (1, c))
        dt = np.int32 if t.bound + 1 <= INT32_MAX else np.int64
        name = self.add(name or bn.name.replace("bn", "act"), "threshold", [t.name],
                        {"lo": lo[0].astype(dt), "hi": hi[0].astype(dt), "sign": sign}, bound=1, match=t.match)
        return _T(name, t.shape, "ternary", 1)

    def classifier(self, bn, t):
        scale, shift = bn_eval_affine(bn)
        base = Fraction(1, 2 ** t.fe)
        for d in t.divs:
            base *= Fraction(d)
        mult = [base * Fraction(float(s)) for s in scale]
        off = [Fraction(float(s)) for s in shift]
        e = max(int(math.log2(x.denominator)) for x in mult + off)
        top = max(abs(m) for m in mult) * t.bound + max(abs(o) for o in off) + 1
        exact = True
        while top * Fraction(2) ** e >= INT64_SAFE:
            e, exact = e - 1, False
        im = np.array([round(m * Fraction(2) ** e) for m in mult], np.int64)
        io = np.array([round(o * Fraction(2) ** e) for o in off], np.int64)
        match = t.match if exact else "approx"
        extra = {"rounding": "float32"} if self.rounding == "float32" else {}
        return self.add("logits", "affine", [t.name], {"mult": im, "offset": io}, frac_bits=e,
                        bound=int(top * Fraction(2) ** e), match=match, **extra)

    def residual(self, block, t):
        conv1, bn1, conv2, bn2 = block.main.layers
        a = self.bn_act(bn1, self.weighted(conv1, t), name=f"{block.name}.act1")
        main = self.weighted(conv2, a)
        if block.shortcut is None:
            short, vb = t, t.bound

            def yshort(v):
                return v.astype(np.int8)
        else:
            proj, bnp = block.shortcut.layers
            short = self.weighted(proj, t)
            vb = short.bound

            def yshort(v):
                y = np.empty(v.shape, np.float32)
                batchnorm_forward_eval(y, self.value(short, v), bnp.gamma.value, bnp.beta.value,
                                       bnp.running_mean, bnp.running_var, bnp.eps)
                return y
        scale, _ = bn_eval_affine(bn2)
        neg = scale < 0
        self.flip_channels(main, neg)
        c = len(scale)
        v = np.broadcast_to(np.arange(-vb, vb + 1)[:, None], (2 * vb + 1, c))

        def decide(acc):
            y = np.empty(acc.shape, np.float32)
            batchnorm_forward_eval(y, self.value(main, np.where(neg, -acc, acc)), bn2.gamma.value,
                                   bn2.beta.value, bn2.running_mean, bn2.running_var, bn2.eps)
            s = np.empty(acc.shape, np.float32)
            add_forward(s, y, yshort(v))
            out = np.empty(acc.shape, np.int8)
            ternary_forward(out, s, block.act.r, 0.5, 0, train=False)
            return out
        lo, hi = thresholds(decide, main.bound, v.shape)
        dt = np.int32 if main.bound + 1 <= INT32_MAX else np.int64
        match = "bitwise" if main.match == short.match == "bitwise" else "approx"
        name = self.add(f"{block.name}.act2", "threshold2", [main.name, short.name],
                        {"lo": lo.T.astype(dt).copy(), "hi": hi.T.astype(dt).copy()}, vmin=-vb, bound=1,
                        match=match)
        return _T(name, main.shape, "ternary", 1)

    # -- after the walk ----------------------------------------------------------------------
    def propagate_signs(self):
        """Move sign -1 of threshold outputs into the weights of their only (linear) consumer."""
        for node in self.nodes:
            if node["op"] != "threshold":
                continue
            sign = self.arrays[f"{node['name']}.sign"]
            if (sign > 0).all():
                continue
            cur, flat = node, None
            while True:
                users = [n for n in self.nodes if cur["name"] in n["inputs"]]
                if len(users) != 1:
                    break
                cur = users[0]
                if cur["op"] == "flatten":
                    flat = True
                if cur["op"] in ("conv", "linear"):
                    w = self.arrays[f"{cur['name']}.weight"]
                    c = len(sign)
                    chan = np.arange(w.shape[-1]) % c if flat or cur["op"] == "linear" else np.arange(c)
                    w[..., sign[chan] < 0] *= -1
                    node["negated"] = np.flatnonzero(sign < 0).tolist()   # outputs are -phi there
                    sign[:] = 1
                    break
                if cur["op"] not in ("flatten", "sumpool", "gsum"):
                    break


def fold(model, norm, meta=None, rounding="float32"):
    """IntNet of a host Model in eval mode. norm = (scale, shift), the loader's per-channel
    float32 normalisation x = pixel * scale + shift (Loader.scale, Loader.shift).

    rounding: where the float path forms sums of real values -- the first layer (real-valued
    inputs) and the classifier's logits -- "float32" reproduces its float32 rounding with integer
    ops: the first layer's taps are summed in im2col order with a rounding after every add (as its
    GEMM does: OpenBLAS accumulates along k in order; `eval --compare` counts any platform where
    this differs), and the logits are rounded after the scale and after the shift, so the
    integer network predicts what the float path predicts, exact ties included. "exact": exact
    integer sums and logits, as an accelerator computes them; then a first-layer sum within a few
    ulps of a boundary, or two logits within an ulp, may decide differently (see docs/export.md).
    """
    if model.device:
        raise ExportError("fold a host model (model.to(False) first)")
    if rounding not in ("float32", "exact"):
        raise ExportError(f"rounding={rounding!r}: float32 or exact")
    f = _Folder(model, rounding)
    t = f.input(norm[0], norm[1], model.in_shape)
    for layer in model.net.layers:
        if isinstance(layer, (Conv2d, Linear)):
            t = f.weighted(layer, t)
        elif isinstance(layer, BNAct):
            t = f.bn_act(layer, t)
        elif isinstance(layer, BatchNorm):
            t = _T(f.classifier(layer, t), (layer.c,), "logits", 0)
        elif isinstance(layer, (MaxPool, AvgPool)):
            t = f.pool(layer, t)
        elif isinstance(layer, Flatten):
            t = replace(t, name=f.add(layer.name, "flatten", [t.name], bound=t.bound),
                        shape=(int(np.prod(t.shape)),))
        elif isinstance(layer, GlobalAvgPool):
            t = f.gsum(layer, t)
        elif isinstance(layer, Residual):
            t = f.residual(layer, t)
        else:
            raise ExportError(f"layer {layer.name} ({type(layer).__name__}) has no integer form")
    if t.kind != "logits":
        raise ExportError("the network must end in a classifier (linear + batch norm)")
    f.propagate_signs()
    meta = dict(meta or {})
    meta.update(arch=model.arch, qmax=model.qmax, rounding=rounding, num_classes=model.num_classes,
                input_shape=list(model.in_shape),
                norm={"scale": [float(x) for x in norm[0]], "shift": [float(x) for x in norm[1]]})
    return IntNet(f.nodes, f.arrays, meta)
