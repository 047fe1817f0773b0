"""A ternary network built from an architecture string: layer construction, parameter listing,
the flat layout of its real parameters, state (de)serialisation and moving between host and
device. Exercise: pytest tests/test_model.py.
"""
import numpy as np

from . import arch as archmod
from .kernels import to_host, zeros
from .layers import (AvgPool, BatchNorm, BNAct, Conv2d, Flatten, GlobalAvgPool, Linear, MaxPool, Residual,
                     Sequential, TernaryAct, walk)


class _Builder:
    def __init__(self, in_shape, qmax, act_kw, rng):
        self.shape, self.qmax, self.act_kw, self.rng = tuple(in_shape), qmax, act_kw, rng
        self.first = True
        self.integral = False     # do the current activations hold ternary values?
        self.counts = {}

    def name(self, kind):
        self.counts[kind] = self.counts.get(kind, 0) + 1
        return f"{kind}{self.counts[kind]}"

    def push(self, layers, layer):
        self.shape = layer.out_shape(self.shape)
        if min(self.shape) < 1:
            raise archmod.ArchError(f"the feature map shrinks to {self.shape} at layer {layer.name}; "
                                    "use padding (e.g. 128C3p1) or fewer pooling stages")
        layers.append(layer)

    def conv(self, out, k, stride, pad, name=None):
        layer = Conv2d(name or self.name("conv"), self.shape[-1], out, k, stride, pad, self.qmax, self.rng,
                       needs_dinput=not self.first)
        self.first = False
        return layer

    def linear(self, layers, out, name=None):
        if len(self.shape) == 3:
            self.push(layers, Flatten(self.name("flatten")))
        layer = Linear(name or self.name("fc"), self.shape[0], out, self.qmax, self.rng, needs_dinput=not self.first)
        self.first = False
        self.push(layers, layer)

    def int_scale(self, fan_in):
        # a discrete layer on ternary inputs yields multiples of 1/qmax, exact integers x qmax of
        # magnitude <= fan_in * qmax: the device keeps them as int16 when that bound fits
        return self.qmax if self.integral and fan_in * self.qmax <= 32767 else 0

    def bn_act(self, layers, act=True, int_scale=0):
        if act:
            self.push(layers, BNAct(self.name("bn"), self.shape[-1], int_scale=int_scale, **self.act_kw))
            self.integral = True
        else:
            self.push(layers, BatchNorm(self.name("bn"), self.shape[-1]))
            self.integral = False

    def pool(self, layers, s):
        cls = MaxPool if s.op == "max" else AvgPool
        self.push(layers, cls(self.name("pool"), s.k, s.stride, s.pad))
        self.integral = self.integral and s.op == "max"

    def block(self, s):
        name = self.name("block")
        cin, main, short = self.shape[-1], [], None
        start = self.shape
        self.push(main, self.conv(s.out, 3, s.stride, 1, f"{name}.conv1"))
        self.push(main, BNAct(f"{name}.bn1", s.out, int_scale=self.int_scale(9 * cin), **self.act_kw))
        self.push(main, self.conv(s.out, 3, 1, 1, f"{name}.conv2"))
        self.push(main, BatchNorm(f"{name}.bn2", s.out, int_scale=self.qmax if 9 * s.out * self.qmax <= 32767 else 0))
        if s.stride != 1 or cin != s.out:
            self.shape = start
            sc = []
            self.push(sc, self.conv(s.out, 1, s.stride, 0, f"{name}.proj"))
            self.push(sc, BatchNorm(f"{name}.proj_bn", s.out, int_scale=self.int_scale(cin)))
            short = Sequential(f"{name}.shortcut", sc)
        self.shape = start        # the caller's push applies the block's shape change (once)
        return Residual(name, Sequential(f"{name}.main", main), short, TernaryAct(f"{name}.act2", **self.act_kw))


def build_layers(specs, in_shape, num_classes, qmax, act_kw, rng):
    """Turn parsed specs into a Sequential of layers; checks shapes and the class count."""
    b, layers, i = _Builder(in_shape, qmax, act_kw, rng), [], 0
    if not specs or specs[-1].kind != "classifier":
        specs = list(specs) + [archmod.Spec("classifier", num_classes)]
    elif specs[-1].out != num_classes:
        raise archmod.ArchError(f"the architecture ends in {specs[-1].out} classes but the dataset has "
                                f"{num_classes}; end the string with -{num_classes} (or leave the count out)")
    while i < len(specs):
        s = specs[i]
        if s.kind in ("conv", "stem"):
            if len(b.shape) != 3:
                raise archmod.ArchError(f"convolution token #{i + 1} comes after a fully connected layer")
            scale = b.int_scale(s.k * s.k * b.shape[-1])
            b.push(layers, b.conv(s.out, s.k, s.stride, s.pad))
            if s.kind == "conv" and i + 1 < len(specs) and specs[i + 1].kind == "pool":
                i += 1
                b.pool(layers, specs[i])
                scale = scale if specs[i].op == "max" else 0     # an average is no integer
            b.bn_act(layers, int_scale=scale)
            if s.kind == "stem":
                b.pool(layers, archmod.Spec("pool", 0, 3, 2, 1, "max"))
        elif s.kind == "pool":
            b.pool(layers, s)
        elif s.kind == "fc":
            scale = b.int_scale(int(np.prod(b.shape)))
            b.linear(layers, s.out)
            b.bn_act(layers, int_scale=scale)
        elif s.kind == "rb":
            b.push(layers, b.block(s))
            b.integral = True
        elif s.kind == "gap":
            b.push(layers, GlobalAvgPool(b.name("gap")))
            b.integral = False
        elif s.kind == "classifier":
            b.linear(layers, s.out, name="classifier")
            b.bn_act(layers, act=False)
        i += 1
    return Sequential("net", layers)


class RealBuffers:
    """A model's real parameters (batch-norm gamma, beta) as views of one flat float32 buffer per
    role: `value` and `grad` here, an optimizer's moments laid out alike (`flat`), so that one
    elementwise launch updates every parameter, each element seeing the same float32 operations
    as in a launch per tensor. p.value and p.grad are the views; write into them, never rebind.
    Lives on one side (host or device), like the model.
    """

    def __init__(self, params, values, device):
        """params: RealParams; values: their host arrays, in the same order."""
        self.params, self.device = list(params), device
        self.shapes = [tuple(p.value.shape) for p in self.params]
        ends = np.cumsum([0] + [int(np.prod(s)) for s in self.shapes])
        self.spans = list(zip(ends[:-1].tolist(), ends[1:].tolist()))
        self.size = int(ends[-1])
        self.value = self.flat(dict(zip(self.names(), values)))
        self.grad = zeros(self.size, np.float32, device)
        for p, value, grad in zip(self.params, self.views(self.value), self.views(self.grad)):
            p.value, p.grad = value, grad

    def names(self):
        return [p.name for p in self.params]

    def views(self, flat):
        """The per-parameter views of a flat array laid out like `value`."""
        return [flat[a:b].reshape(shape) for (a, b), shape in zip(self.spans, self.shapes)]

    def flat(self, named):
        """A new flat float32 array on the buffers' side from {name: host array}, zeros for the
        names missing; a shape that differs from the parameter's is an error."""
        return _move(self._host_flat(named), self.device)

    def _host_flat(self, named):
        out = np.zeros(self.size, np.float32)
        for name, (a, b), shape in zip(self.names(), self.spans, self.shapes):
            if name in named:
                _check_shape(name, named[name], shape)
                out[a:b] = np.ravel(named[name])
        return out

    def split(self, flat):
        """{name: host array} of a flat array laid out like `value`."""
        host = to_host(flat)
        return {name: host[a:b].reshape(shape).copy()
                for name, (a, b), shape in zip(self.names(), self.spans, self.shapes)}

    def load(self, named):
        """Overwrite every value from {name: host array} (one copy; the views stay)."""
        missing = [n for n in self.names() if n not in named]
        if missing:
            raise KeyError(f"no saved value for real parameter {missing[0]!r}")
        src = self._host_flat(named)
        if self.device:
            self.value.copy_to_device(src)
        else:
            self.value[:] = src


class Model:
    """A ternary network: forward/backward over its layers, parameters and state."""

    def __init__(self, arch, in_shape, num_classes, bits=1, act_r=1.0, act_a=0.5, window="rect", seed=0):
        from .rng import generator
        if bits not in (1, 2, 3):
            raise ValueError(f"weight bits N must be 1, 2 or 3 (states 2^N + 1), got {bits}")
        self.arch, self.in_shape, self.num_classes, self.qmax = arch, tuple(in_shape), num_classes, 2 ** (bits - 1)
        act_kw = dict(r=act_r, a=act_a, window=window)
        self.net = build_layers(archmod.parse(arch), in_shape, num_classes, self.qmax, act_kw,
                                generator(seed, "init"))
        self.device = False
        params = self.rparams()
        self.reals = RealBuffers(params, [p.value for p in params], False)
        for seq in walk(self.net):
            kids = getattr(seq, "layers", [])
            for conv, nxt in zip(kids, kids[1:]):
                if not isinstance(conv, Conv2d):
                    continue
                if conv.needs_dinput and type(nxt) in (BatchNorm, BNAct, MaxPool):
                    nxt.grad_bf16 = conv        # its input gradient, read by the convolution in bf16
                if isinstance(nxt, BatchNorm) and (nxt.int_scale > 0 or not conv.needs_dinput):
                    conv.emit_sums, nxt.sums_from = True, conv    # statistics from the conv's sums
                if isinstance(nxt, BNAct):
                    nxt.borrow = True           # a float32 input kept as the conv's output itself
            for prev, block in zip(kids, kids[1:]):
                if type(prev) is Residual and type(prev.act) is TernaryAct and type(block) is Residual:
                    block.defer = True          # its input gradient added by prev's activation
        self._lazy_pools(False)

    def _lazy_pools(self, save_memory):
        """A max pool right after a fused batch norm (ResNet's stem) hands it the gradient
        uncomputed (PoolGrad): that layer's sums come from the pool's side, and its dx gathers
        each element's gradient where it reads it (pool_vec.cu's kernel) or, where that kernel
        does not run, from the gradient stored (storing it is left out under --save-memory)."""
        for seq in walk(self.net):
            kids = getattr(seq, "layers", [])
            for bn, pool in zip(kids, kids[1:]):
                if isinstance(bn, BNAct) and type(pool) is MaxPool:
                    pool.lazy, pool.store = True, not save_memory

    def save_memory(self, on=True):
        """ternet train --save-memory: on the GPU, (1) the batch norm right after the first layer
        does not keep that layer's float32 output from the forward to the backward but has the layer
        compute it again there (one more first-layer forward per step), (2) every fused batch norm +
        activation writes its input gradient over the gradient it receives, (3) plain batch norms
        on integer inputs (ResNet's before the residual add) keep them as int16 instead of xhat as
        float32, and (4) the input-sized gradient between a fused batch norm and a max pool right
        after it (ResNet's stem), which the batch norm's kernels take from the pool's output
        gradient (Model._lazy_pools), is never stored, not even where pool_vec.cu's kernel does not
        run (the triangular window). Same results bit for bit. (1) needs the
        first layer to feed its batch norm directly (vgg-gxnor, resnet18; not lenet, which pools
        first). Returns whether (1) applies."""
        found = False
        for layer in walk(self.net):
            if isinstance(layer, BNAct):
                layer.in_place = on
            elif isinstance(layer, BatchNorm):
                layer.lean = on
        self._lazy_pools(on)
        layers = self.net.layers
        for conv, bn in zip(layers, layers[1:]):
            if isinstance(conv, Conv2d) and not conv.needs_dinput and isinstance(bn, BNAct):
                bn.source, found = (conv if on else None), True
                break
        return found

    def forward(self, x, train=True):
        return self.net.forward(x, train)

    def backward(self, dlogits):
        self.net.backward(dlogits)

    def layers(self):
        return list(walk(self.net))

    def tparams(self):
        return [p for layer in walk(self.net) for p in layer.tparams()]

    def rparams(self):
        return [p for layer in walk(self.net) for p in layer.rparams()]

    def buffers(self):
        out = {}
        for layer in walk(self.net):
            out.update(layer.buffers())
        return out

    def num_weights(self):
        return sum(p.size for p in self.tparams())

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self):
        """Host copies: {'weights': {name: int8}, 'real': {name: float32}, 'buffers': {...}}."""
        host = lambda a: to_host(a, copy=True)
        return {"weights": {p.name: host(p.q) for p in self.tparams()},
                "real": self.reals.split(self.reals.value),
                "buffers": {k: host(v) for k, v in self.buffers().items()}}

    def load_state_dict(self, state):
        for p in self.tparams():
            _assign(p, "q", state["weights"][p.name], self.device)
        self.reals.load(state["real"])
        for layer in walk(self.net):
            if isinstance(layer, BatchNorm):
                _assign(layer, "running_mean", state["buffers"][layer.name + ".running_mean"], self.device)
                _assign(layer, "running_var", state["buffers"][layer.name + ".running_var"], self.device)

    def to(self, device):
        """Move every parameter and buffer to the GPU (device=True) or back to the host."""
        if device == self.device:
            return self
        state = self.state_dict()
        self.device = device
        for p in self.tparams():
            p.grad = None
        params = self.rparams()
        self.reals = RealBuffers(params, [state["real"][p.name] for p in params], device)
        self.load_state_dict(state)
        for p in self.tparams():
            for k, v in list(p.slots.items()):
                p.slots[k] = _move(v, device)
        return self


def _move(a, device):
    from numba import cuda
    if device:
        return cuda.to_device(np.ascontiguousarray(a))
    return to_host(a)


def _check_shape(what, value, shape):
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{what}: saved shape {value.shape} != model shape {tuple(shape)}")


def _assign(obj, attr, value, device):
    cur = getattr(obj, attr)
    _check_shape(f"{getattr(obj, 'name', attr)}.{attr}", value, cur.shape)
    setattr(obj, attr, _move(np.ascontiguousarray(value, dtype=cur.dtype), device) if device
            else np.array(value, dtype=cur.dtype))
