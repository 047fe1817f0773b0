"""Layers: forward and hand-written backward passes over the kernels' launchers.

Every layer works on host (numpy) or device (numba.cuda) arrays alike: it allocates its outputs
beside its input and calls launchers only. In train mode a forward keeps what its backward needs
and the backward drops it again (on the device the small ones, batch norm's per-channel
statistics, come from the layer's StepBuffers, kept from step to step: Layer.kept). Ternary
weights are int8 states (TernaryParam); batch-norm parameters are real (RealParam), views of the
model's flat buffers (model.RealBuffers). Exercise: pytest tests/test_layers.py.
"""
import numpy as np

from .kernels import StepBuffers, conv_tc, empty, flat, on_device, view, workspace
from .kernels.activation import ActSaved, ternary_backward, ternary_forward
from .kernels.batchnorm import (batchnorm_backward, batchnorm_backward_int16, batchnorm_forward_eval,
                                batchnorm_forward_train, batchnorm_forward_train_int16, batchnorm_update_running,
                                bn_act_backward, bn_act_forward_eval, bn_act_forward_train, bn_add_act_forward_train)
from .kernels.conv import conv2d_backward_input, conv2d_backward_weight, conv2d_forward, out_size
from .kernels.elementwise import GradSum, add_forward
from .kernels.linear import linear_backward_input, linear_backward_weight, linear_forward
from .kernels.pool import (PoolGrad, avgpool_backward, avgpool_forward, global_avgpool_backward,
                           global_avgpool_forward, maxpool_backward, maxpool_backward_bf16, maxpool_forward,
                           pool_out_shape)
from .kernels.scalar import WINDOW_RECT, WINDOW_TRI, window_grad


def _bf16_buffer(layer, shape, dev):
    """A buffer for the bf16 copy of a layer's input gradient, where the convolution before it
    reads that gradient in bf16 (layer.grad_bf16, set by the Model) on a tensor-core GPU; else
    None."""
    return empty(shape, np.uint16, True) if layer.grad_bf16 is not None and dev and conv_tc.available() else None


def _bf16_only(layer, dev):
    """Whether a layer's input gradient goes to the convolution before it in bf16 alone (no float32
    copy): that convolution's last train forward found it reads nothing else (Conv2d.bf16_grad)."""
    return dev and layer.grad_bf16 is not None and layer.grad_bf16.bf16_grad


def _adopt(dx, dx16):
    """dx16, the bf16 copy of dx a backward kernel wrote (or None), handed to the convolution."""
    if dx16 is not None:
        conv_tc.adopt_bf16(dx, dx16)


class TernaryParam:
    """A discrete weight tensor: int8 states q in [-qmax, qmax], value q / qmax (Z_N, qmax = 2^(N-1)).

    grad holds d loss / d value after a backward (float32). `slots` holds whatever per-weight
    buffers a transition sampler keeps (e.g. Adam moments); none for plain DST.
    """

    def __init__(self, name, q, qmax):
        self.name, self.q, self.qmax = name, q, qmax
        self.grad = None
        self.slots = {}

    @property
    def scale(self):
        return 1.0 / self.qmax

    @property
    def size(self):
        return int(np.prod(self.q.shape))


class RealParam:
    """A real (float32) parameter such as a batch-norm scale or shift, with its gradient."""

    def __init__(self, name, value):
        self.name, self.value = name, value
        self.grad = None


class Layer:
    name = ""

    def out_shape(self, shape):
        """Per-sample output shape for a per-sample input shape."""
        return shape

    def forward(self, x, train):
        raise NotImplementedError

    def backward(self, dy):
        raise NotImplementedError

    def tparams(self):
        return []

    def rparams(self):
        return []

    def buffers(self):
        """Named non-trainable arrays saved in checkpoints (e.g. running statistics)."""
        return {}

    def children(self):
        return []

    @property
    def kept(self):
        """This layer's StepBuffers (made on first use): the small arrays its train forward saves
        for the backward on the device, kept from step to step (the host path ignores it)."""
        kept = self.__dict__.get("_kept")
        if kept is None:
            kept = self._kept = StepBuffers()
        return kept


def _init_states(rng, shape, qmax):
    # uniform over the 2^N + 1 states, like the reference code's Uniform(-1, 1) rounded to Z_N
    return rng.integers(-qmax, qmax + 1, size=shape).astype(np.int8)


class Conv2d(Layer):
    """y = conv(x, W / qmax), NHWC, no bias. needs_dinput=False for the first layer (data input)."""

    def __init__(self, name, cin, cout, k, stride, pad, qmax, rng, needs_dinput=True):
        self.name, self.k, self.stride, self.pad = name, k, stride, pad
        self.cin, self.cout, self.needs_dinput = cin, cout, needs_dinput
        self.w = TernaryParam(name + ".weight", _init_states(rng, (cout, k, k, cin), qmax), qmax)
        self.ctx = None
        # set by the Model where a batch norm on integers comes right after: a device train forward
        # then also adds up its output's per-channel sums for that layer's statistics (take_sums)
        self.emit_sums, self.sums = False, None
        # set by a device train forward: the backward reads dy in bf16 alone (conv_tc.takes_bf16_grad),
        # so the layer after this one may hand it a conv_tc.Bf16Grad
        self.bf16_grad = False

    def out_shape(self, shape):
        h, w, _ = shape
        return (out_size(h, self.k, self.stride, self.pad), out_size(w, self.k, self.stride, self.pad), self.cout)

    def _cols(self, name, x):
        # host path: the im2col matrix lives in a scratch buffer reused from step to step
        if on_device(x):
            return None
        n, oh, ow, _ = (x.shape[0],) + self.out_shape(x.shape[1:])
        return workspace(self, name, (n * oh * ow, self.k * self.k * self.cin), np.float32)

    def _conv(self, x, cols, sums=False):
        y = empty((x.shape[0],) + self.out_shape(x.shape[1:]), np.float32, on_device(x))
        return y, conv2d_forward(y, x, self.w.q, self.w.scale, self.stride, self.pad, cols, sums)

    def forward(self, x, train):
        cols = self._cols("cols", x)
        y, sums = self._conv(x, cols, sums=train and on_device(x) and self.emit_sums)
        self.sums = (y, sums) if isinstance(sums, conv_tc.ConvSums) else None
        if train:
            self.ctx = (x, cols)
            self.bf16_grad = on_device(x) and self.needs_dinput and conv_tc.takes_bf16_grad(x, self.cout, self.stride)
        return y

    def take_sums(self, y):
        """The conv_tc.ConvSums of y if y is this layer's last train forward's output and they were
        made, else None; handed out once."""
        kept, self.sums = self.sums, None
        return kept[1] if kept is not None and kept[0] is y else None

    def recompute(self):
        """The training forward's output once more, from the input it kept: for a batch norm right
        after this layer that dropped its own copy of it (BNAct.source). Same kernel, same bits."""
        return self._conv(*self.ctx)[0]

    def backward(self, dy):
        # dy: float32, or a conv_tc.Bf16Grad where this layer said it reads nothing else (bf16_grad)
        x, cols = self.ctx
        self.ctx = None
        dev = on_device(conv_tc.grad_array(dy))
        if self.w.grad is None:
            self.w.grad = empty(self.w.q.shape, np.float32, dev)
        conv2d_backward_weight(self.w.grad, dy, x, self.stride, self.pad, cols)
        if not self.needs_dinput:
            return None
        dx = empty(x.shape, np.float32, dev)
        conv2d_backward_input(dx, dy, self.w.q, self.w.scale, self.stride, self.pad, self._cols("dcols", x))
        return dx

    def tparams(self):
        return [self.w]


class Linear(Layer):
    """y = x @ (W / qmax).T, no bias. x (N, F)."""

    def __init__(self, name, fin, fout, qmax, rng, needs_dinput=True):
        self.name, self.fin, self.fout, self.needs_dinput = name, fin, fout, needs_dinput
        self.w = TernaryParam(name + ".weight", _init_states(rng, (fout, fin), qmax), qmax)
        self.ctx = None

    def out_shape(self, shape):
        return (self.fout,)

    def forward(self, x, train):
        y = empty((x.shape[0], self.fout), np.float32, on_device(x))
        linear_forward(y, x, self.w.q, self.w.scale)
        if train:
            self.ctx = x
        return y

    def backward(self, dy):
        x, self.ctx = self.ctx, None
        if self.w.grad is None:
            self.w.grad = empty(self.w.q.shape, np.float32, on_device(dy))
        linear_backward_weight(self.w.grad, dy, x)
        if not self.needs_dinput:
            return None
        dx = empty(x.shape, np.float32, on_device(dy))
        linear_backward_input(dx, dy, self.w.q, self.w.scale)
        return dx

    def tparams(self):
        return [self.w]


class BatchNorm(Layer):
    """Batch normalisation over the last axis (channels); gamma, beta real.

    A train-mode forward records its batch mean and unbiased variance in `batch_stats` (float32
    (2, C)) and, while `track_running` is True (the default), moves the running statistics toward
    them. The data-parallel step (ternet.data_parallel) turns tracking off, averages the shards'
    batch_stats and calls update_running once per step instead.
    """

    def __init__(self, name, c, momentum=0.1, eps=1e-4, int_scale=0):
        self.name, self.c, self.momentum, self.eps = name, c, momentum, eps
        self.gamma = RealParam(name + ".gamma", np.ones(c, np.float32))
        self.beta = RealParam(name + ".beta", np.zeros(c, np.float32))
        self.running_mean = np.zeros(c, np.float32)
        self.running_var = np.ones(c, np.float32)
        self.track_running, self.batch_stats = True, None
        self.ctx = None
        # int_scale > 0: inputs are integers once multiplied by it (as BNAct's); with lean set
        # (Model.save_memory) the GPU then keeps them as int16 for the backward instead of xhat
        self.int_scale, self.lean = int_scale, False
        # set by the Model to the Conv2d right before where it needs its input gradient: on a GPU
        # with tensor cores the backward also writes dx in bf16, the form that layer reads it in
        # (one conversion kernel less; the same bits), or only in bf16 (_bf16_only)
        self.grad_bf16 = None
        # set by the Model: the Conv2d right before whose sums (Conv2d.take_sums) give the statistics
        self.sums_from = None

    def _sums(self, x):
        return self.sums_from.take_sums(x) if self.sums_from is not None else None

    def forward_add_act(self, x, res, act):
        """GPU, train: act(this layer's forward of x + res) (int8), in one pass over the elements
        (kernels.batchnorm.bn_add_act_forward_train; act a TernaryAct with the rectangular window).
        This layer's and act's records are left as their own forwards leave them: their backwards
        run as ever. The same bits as forward, the add and act.forward."""
        rm, rv, stats = self._train_args(True)
        lean = self.lean and self.int_scale > 0
        out = empty(x.shape, np.int8, True)
        record, bits = bn_add_act_forward_train(out, x, res, self.gamma.value, self.beta.value, rm, rv, self.momentum,
                                                self.eps, act.r, act.a, self.int_scale if lean else 0, stats,
                                                self.kept, self._sums(x))
        self.ctx = ("int16", record) if lean else record
        r32, a32 = np.float32(act.r), np.float32(act.a)
        act.ctx = ActSaved(x.size, bits=bits, height=window_grad(r32, r32, a32, WINDOW_RECT))
        return out


    def _train_args(self, dev):
        """(running_mean, running_var, stats) for a train forward: None, None when not tracking."""
        if self.batch_stats is None or on_device(self.batch_stats) != dev:
            self.batch_stats = empty((2, self.c), np.float32, dev)
        run = (self.running_mean, self.running_var) if self.track_running else (None, None)
        return run + (self.batch_stats,)

    def update_running(self, stats):
        """Running statistics += momentum * (stats - running); stats (2, C) = mean, unbiased var."""
        batchnorm_update_running(self.running_mean, self.running_var, stats, self.momentum)

    def forward(self, x, train):
        dev = on_device(x)
        y = empty(x.shape, np.float32, dev)
        if not train:
            batchnorm_forward_eval(y, x, self.gamma.value, self.beta.value, self.running_mean,
                                   self.running_var, self.eps)
            return y
        rm, rv, stats = self._train_args(dev)
        if dev and self.lean and self.int_scale > 0:
            self.ctx = ("int16", batchnorm_forward_train_int16(y, x, self.gamma.value, self.beta.value, rm, rv,
                                                               self.momentum, self.eps, self.int_scale, stats,
                                                               self.kept, self._sums(x)))
            return y
        xhat = empty(x.shape, np.float32, dev)
        invstd = batchnorm_forward_train(y, xhat, x, self.gamma.value, self.beta.value, rm, rv, self.momentum,
                                         self.eps, stats, self.kept, self._sums(x) if dev else None)
        self.ctx = (xhat, invstd)
        return y

    def backward(self, dy):
        ctx, self.ctx = self.ctx, None
        dev = on_device(dy)
        for p in (self.gamma, self.beta):
            if p.grad is None:
                p.grad = empty((self.c,), np.float32, dev)
        only16 = _bf16_only(self, dev)
        dx = None if only16 else empty(dy.shape, np.float32, dev)
        dx16 = _bf16_buffer(self, dy.shape, dev)
        if isinstance(ctx[0], str):
            batchnorm_backward_int16(dx, self.gamma.grad, self.beta.grad, dy, ctx[1], self.gamma.value, dx16)
        else:
            batchnorm_backward(dx, self.gamma.grad, self.beta.grad, dy, ctx[0], self.gamma.value, ctx[1], dx16)
        if only16:
            return conv_tc.Bf16Grad(dx16)
        _adopt(dx, dx16)
        return dx

    def rparams(self):
        return [self.gamma, self.beta]

    def buffers(self):
        return {self.name + ".running_mean": self.running_mean, self.name + ".running_var": self.running_var}


class BNAct(BatchNorm):
    """Batch norm fused with the ternary activation: out = phi_r(gamma * xhat + beta) (int8).

    The backward needs only the BN input and the window (kept as compactly as the backend can:
    exact int16 accumulators and packed mask bits on the GPU). int_scale > 0 marks inputs that
    are integers once multiplied by it (outputs of a ternary conv on ternary inputs).
    """

    def __init__(self, name, c, r=1.0, a=0.5, window="rect", int_scale=0, momentum=0.1, eps=1e-4):
        super().__init__(name, c, momentum, eps)
        self.act = TernaryAct(name.replace("bn", "act"), r, a, window)
        self.int_scale = int_scale
        # Model.save_memory, on the GPU: source, a Conv2d right before this layer that recomputes a
        # float32 input for the backward instead of this layer keeping it (4 bytes per element);
        # in_place, the backward's dx written over dy
        self.source, self.in_place = None, False
        # set by the Model where a Conv2d comes right before: a float32 input is kept as the
        # convolution's output array itself (no copy; nothing else reads or writes it after)
        self.borrow = False

    def forward(self, x, train):
        dev = on_device(x)
        y = empty(x.shape, np.int8, dev)
        g, b = self.gamma.value, self.beta.value
        if not train:
            bn_act_forward_eval(y, x, g, b, self.running_mean, self.running_var, self.eps, self.act.r)
            return y
        rm, rv, stats = self._train_args(dev)
        self.ctx = bn_act_forward_train(y, x, g, b, rm, rv, self.momentum, self.eps, self.act.r, self.act.a,
                                        self.act.shape, self.int_scale, stats, self.kept,
                                        keep_input=self.source is None, sums=self._sums(x) if dev else None,
                                        borrow=self.borrow)
        return y

    def backward(self, dy):
        saved, self.ctx = self.ctx, None
        pooled = isinstance(dy, PoolGrad)
        dev = on_device(dy.dout if pooled else dy)
        if dev and saved.s == 0 and saved.xf is None:     # dropped by the forward: recompute
            saved.xf = flat(self.source.recompute())
        for p in (self.gamma, self.beta):
            if p.grad is None:
                p.grad = empty((self.c,), np.float32, dev)
        # in place: dx overwrites dy, whose kernel reads each element of dy before writing that same
        # element; a fused layer's dy is its own (the next layer's fresh gradient, never a residual's
        # shared one): one activation-sized float32 buffer less at every such backward. A pool's
        # gradient not computed yet (PoolGrad) has no buffer: dx then goes over the float32 record
        # of the input (this layer's: read at each element before it is written), where there is
        # one (a convolution that reads the gradient in bf16 alone gets only that: _bf16_only)
        only16 = not pooled and _bf16_only(self, dev)
        if pooled:
            over = dev and saved.s == 0
            dx = view(saved.xf, dy.shape) if over else empty(dy.shape, np.float32, dev)
        else:
            dx = None if only16 else dy if dev and self.in_place else empty(dy.shape, np.float32, dev)
        dx16 = _bf16_buffer(self, dy.shape, dev)
        bn_act_backward(dx, self.gamma.grad, self.beta.grad, dy, saved, self.gamma.value, dx16)
        if only16:
            return conv_tc.Bf16Grad(dx16)
        _adopt(dx, dx16)
        return dx


class TernaryAct(Layer):
    """phi_r(x) in {-1, 0, +1} (int8) with a rectangular or triangular surrogate window of half-width a."""

    def __init__(self, name, r=1.0, a=0.5, window="rect"):
        self.name, self.r, self.a = name, r, a
        self.shape = {"rect": WINDOW_RECT, "tri": WINDOW_TRI}[window]
        self.ctx = None

    def forward(self, x, train):
        y = empty(x.shape, np.int8, on_device(x))
        self.ctx = ternary_forward(y, x, self.r, self.a, self.shape, train)
        return y

    def backward(self, dy):
        saved, self.ctx = self.ctx, None
        if isinstance(dy, GradSum):         # a later block's two gradients, added by the kernel
            ternary_backward(dy.a, dy.a, saved, dy.b)
            return dy.a
        dx = empty(dy.shape, np.float32, on_device(dy))
        ternary_backward(dx, dy, saved)
        return dx


class MaxPool(Layer):
    def __init__(self, name, k, stride=None, pad=0):
        self.name, self.k, self.stride, self.pad = name, k, stride or k, pad
        self.ctx = None
        # set by the Model, on the GPU, when a fused batch norm comes right before: the backward
        # returns its gradient uncomputed (PoolGrad), for that layer's kernels to take from the
        # pool's output gradient (kernels.batchnorm: bn_act_pool_sums, bn_act_pool_dx); store,
        # whether they may store it where they cannot gather it (not under --save-memory)
        self.lazy, self.store = False, True
        # as BatchNorm.grad_bf16: the convolution before this layer, which reads its dx in bf16
        self.grad_bf16 = None

    def out_shape(self, shape):
        return pool_out_shape((1,) + tuple(shape), self.k, self.stride, self.pad)[1:]

    def forward(self, x, train):
        dev = on_device(x)
        shape = pool_out_shape(x.shape, self.k, self.stride, self.pad)
        y, arg = empty(shape, x.dtype, dev), empty(shape, np.uint8, dev)
        maxpool_forward(y, arg, x, self.k, self.stride, self.pad)
        if train:
            self.ctx = (x.shape, arg)
        return y

    def backward(self, dy):
        (shape, arg), self.ctx = self.ctx, None
        if self.lazy and on_device(dy):
            return PoolGrad(dy, arg, self.k, self.stride, self.pad, tuple(shape), self.store)
        dev = on_device(dy)
        dx16 = _bf16_buffer(self, shape, dev)
        if _bf16_only(self, dev) and maxpool_backward_bf16(dx16, dy, arg, self.k, self.stride, self.pad):
            return conv_tc.Bf16Grad(dx16)
        dx = empty(shape, np.float32, dev)
        _adopt(dx, dx16 if maxpool_backward(dx, dy, arg, self.k, self.stride, self.pad, dx16) else None)
        return dx


class AvgPool(MaxPool):
    def forward(self, x, train):
        y = empty(pool_out_shape(x.shape, self.k, self.stride, self.pad), np.float32, on_device(x))
        avgpool_forward(y, x, self.k, self.stride, self.pad)
        if train:
            self.ctx = x.shape
        return y

    def backward(self, dy):
        shape, self.ctx = self.ctx, None
        dx = empty(shape, np.float32, on_device(dy))
        avgpool_backward(dx, dy, self.k, self.stride, self.pad)
        return dx


class GlobalAvgPool(Layer):
    def __init__(self, name):
        self.name, self.ctx = name, None

    def out_shape(self, shape):
        return (shape[-1],)

    def forward(self, x, train):
        y = empty((x.shape[0], x.shape[3]), np.float32, on_device(x))   # (N, H, W, C)
        global_avgpool_forward(y, x)
        if train:
            self.ctx = x.shape
        return y

    def backward(self, dy):
        shape, self.ctx = self.ctx, None
        dx = empty(shape, np.float32, on_device(dy))
        global_avgpool_backward(dx, dy)
        return dx


class Flatten(Layer):
    def __init__(self, name):
        self.name, self.ctx = name, None

    def out_shape(self, shape):
        return (int(np.prod(shape)),)

    def forward(self, x, train):
        self.ctx = x.shape
        return view(x, x.shape[0], -1)

    def backward(self, dy):
        return view(dy, tuple(self.ctx))


class Sequential(Layer):
    def __init__(self, name, layers):
        self.name, self.layers = name, list(layers)

    def out_shape(self, shape):
        for layer in self.layers:
            shape = layer.out_shape(shape)
        return shape

    def forward(self, x, train):
        for layer in self.layers:
            x = layer.forward(x, train)
        return x

    def backward(self, dy):
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy

    def children(self):
        return self.layers


class Residual(Layer):
    """y = act(main(x) + shortcut(x)); shortcut is identity when None (ResNet basic block).

    On the GPU in training, when main ends in a plain BatchNorm and act is a TernaryAct with the
    rectangular window (ResNet's blocks), that batch norm, the add and act run as one kernel
    (BatchNorm.forward_add_act: the same bits; fuse = False turns it off)."""

    def __init__(self, name, main, shortcut, act):
        self.name, self.main, self.shortcut, self.act = name, main, shortcut, act
        self.fuse = True
        # set by the Model where another block comes right before: the backward hands it main's
        # and the shortcut's input gradients unadded (GradSum), its activation's backward adds them
        self.defer = False

    def out_shape(self, shape):
        return self.main.out_shape(shape)

    def _fused_bn(self, x, train):
        """main's last layer when the fused forward applies, else None."""
        last = self.main.layers[-1] if isinstance(self.main, Sequential) else None
        if (self.fuse and train and type(last) is BatchNorm and type(self.act) is TernaryAct
                and self.act.shape == WINDOW_RECT and on_device(x)):
            return last
        return None

    def forward(self, x, train):
        bn = self._fused_bn(x, train)
        if bn is not None:
            # the shortcut first: main's last convolution's sums (Conv2d.take_sums) are then still
            # in their buffer when its batch norm takes them
            b = x if self.shortcut is None else self.shortcut.forward(x, train)
            z = x
            for layer in self.main.layers[:-1]:
                z = layer.forward(z, train)
            return bn.forward_add_act(z, b, self.act)
        a = self.main.forward(x, train)
        b = x if self.shortcut is None else self.shortcut.forward(x, train)
        s = empty(a.shape, np.float32, on_device(a))
        add_forward(s, a, b)
        return self.act.forward(s, train)

    def backward(self, dy):
        ds = self.act.backward(dy)
        dx = self.main.backward(ds)
        dsc = ds if self.shortcut is None else self.shortcut.backward(ds)
        if self.defer and on_device(dx):
            return GradSum(dx, dsc)
        add_forward(dx, dx, dsc)
        return dx

    def children(self):
        return [self.main] + ([self.shortcut] if self.shortcut else []) + [self.act]


def walk(layer):
    """All layers in forward order, depth first (containers included)."""
    yield layer
    for c in layer.children():
        yield from walk(c)
