"""Architecture strings (GXNOR style) and named presets -> a list of layer specs -> layers.

Grammar: tokens joined by '-', each optionally prefixed by a repeat count 'Rx':
  <C>C<k>[s<S>][p<P>]   ternary conv, C filters of k x k, stride S (1), padding P (k//2, "same");
                        followed by batch norm and the ternary activation. A pooling token right
                        after it is applied before the batch norm, as in the GXNOR reference code
                        (conv -> pool -> BN -> activation).
  MP<k>[s<S>][p<P>]     max pooling (stride defaults to k); AP<k>... average pooling
  <F>FC                 ternary fully connected layer of F units + batch norm + activation
  RB<C>[s<S>]           ResNet basic block (two 3x3 convs; 1x1 projection shortcut when the
                        shape changes)
  GAP                   global average pooling
  <K>                   last token only: the classifier, K outputs + batch norm, no activation
                        (may be left out: the dataset's class count is used)
Example: 32C5p0-MP2-64C5p0-MP2-512FC-10 (the `lenet` preset).
"""
import re
from dataclasses import dataclass

PRESETS = {
    # the paper's MNIST net; valid convolutions as in the authors' code (28 -> 24 -> 12 -> 8 -> 4)
    "lenet": "32C5p0-MP2-64C5p0-MP2-512FC-10",
    # the paper's CIFAR-10 net
    "vgg-gxnor": "2x128C3-MP2-2x256C3-MP2-2x512C3-MP2-1024FC-10",
    # ImageNet ResNet-18: 7x7/2 stem (conv -> BN -> act -> max-pool), basic blocks, GAP
    "resnet18": "stem64-2xRB64-RB128s2-RB128-RB256s2-RB256-RB512s2-RB512-GAP-1000",
}


class ArchError(ValueError):
    """A bad architecture string; the message points at the offending token."""


@dataclass(frozen=True)
class Spec:
    kind: str           # conv | fc | pool | rb | gap | classifier | stem
    out: int = 0        # channels / units / classes
    k: int = 0
    stride: int = 1
    pad: int = 0
    op: str = ""        # pooling: max | avg


_CONV = re.compile(r"^(\d+)C(\d+)(?:s(\d+))?(?:p(\d+))?$")
_POOL = re.compile(r"^(MP|AP)(\d+)(?:s(\d+))?(?:p(\d+))?$")
_FC = re.compile(r"^(\d+)FC$")
_RB = re.compile(r"^RB(\d+)(?:s(\d+))?$")
_STEM = re.compile(r"^stem(\d+)$")
_REPEAT = re.compile(r"^(\d+)x(.+)$")


def _point(arch, start, tok, why):
    return ArchError(f"{why}\n  {arch}\n  {' ' * start}{'^' * max(len(tok), 1)}\n"
                     "(see `ternet train --help` for the architecture grammar)")


def _one(tok):
    if m := _CONV.match(tok):
        c, k, s, p = m.groups()
        k = int(k)
        return Spec("conv", int(c), k, int(s or 1), int(p) if p is not None else k // 2)
    if m := _POOL.match(tok):
        op, k, s, p = m.groups()
        return Spec("pool", 0, int(k), int(s or k), int(p or 0), "max" if op == "MP" else "avg")
    if m := _FC.match(tok):
        return Spec("fc", int(m.group(1)))
    if m := _RB.match(tok):
        return Spec("rb", int(m.group(1)), 3, int(m.group(2) or 1), 1)
    if m := _STEM.match(tok):
        return Spec("stem", int(m.group(1)), 7, 2, 3)
    if tok == "GAP":
        return Spec("gap")
    return None


def parse(arch):
    """Parse an architecture string or preset name into a list of Specs (ArchError if bad)."""
    arch = PRESETS.get(arch, arch)
    if not arch or not arch.strip():
        raise ArchError("empty architecture string")
    specs, pos = [], 0
    toks = arch.split("-")
    for i, tok in enumerate(toks):
        start, pos = pos, pos + len(tok) + 1
        if i == len(toks) - 1 and tok.isdigit():
            if int(tok) < 2:
                raise _point(arch, start, tok, f"the classifier needs at least 2 outputs, got {tok}")
            specs.append(Spec("classifier", int(tok)))
            continue
        reps, body = 1, tok
        if m := _REPEAT.match(tok):
            reps, body = int(m.group(1)), m.group(2)
        spec = _one(body)
        if spec is None:
            raise _point(arch, start, tok, f"unknown token {tok!r} (expected e.g. 128C3, MP2, 512FC, RB64s2, GAP, "
                                           "or the class count last)")
        if reps < 1 or (spec.out == 0 and spec.kind in ("conv", "fc", "rb")):
            raise _point(arch, start, tok, f"token {tok!r} asks for zero units or repeats")
        if spec.kind in ("conv", "pool") and (spec.k < 1 or spec.stride < 1 or spec.pad >= max(spec.k, 1) + 1):
            raise _point(arch, start, tok, f"token {tok!r}: kernel, stride must be >= 1 and padding <= kernel")
        specs += [spec] * reps
    return specs
