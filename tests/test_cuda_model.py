"""A whole small Model on the device (the simulator on machines without a GPU) against the same
model on the CPU: train-mode logits, every gradient, the running statistics, eval logits.

The `own_layers` variant runs convolutions and linear layers through a host round trip, so it
checks batch norm, the fused BN + activation, the activation, pooling, residual adds and the loss
on the device inside a real network; the `all_layers` variant runs everything on the device."""
import numpy as np
import pytest
from numba import cuda

import reference as ref
import ternet.layers as layers
from cudacheck import needs_cuda
from ternet.kernels import empty, is_device_array, zeros
from ternet.kernels.loss import loss_forward_backward
from ternet.model import Model

pytestmark = needs_cuda

ARCHS = [("8C3-MP2-16C3-MP2-16FC-5", "rect"),          # the GXNOR-style stack: conv -> pool -> BN+act
         ("8C3-MP3s2p1-RB8-AP2-GAP-5", "tri")]         # overlapping max pool, residual block, avg pools
HOST_OPS = ["conv2d_forward", "conv2d_backward_input", "conv2d_backward_weight",
            "linear_forward", "linear_backward_input", "linear_backward_weight"]


def via_host(fn):
    """fn run on host copies of its device arguments, the results copied back."""
    def run(*args):
        host = [a.copy_to_host() if is_device_array(a) else a for a in args]
        result = fn(*host)
        for a, h in zip(args, host):
            if is_device_array(a):
                a.copy_to_device(h)
        return result
    return run


def step(model, x, y, device):
    """One forward/backward; host copies of logits, gradients, buffers, and eval logits."""
    side = (lambda a: cuda.to_device(a)) if device else (lambda a: a)
    host = (lambda a: a.copy_to_host()) if device else np.array
    logits = model.forward(side(x), train=True)
    d = empty(logits.shape, np.float32, device)
    acc = zeros((2,), np.float64, device)
    loss_forward_backward(d, logits, side(y), "xent", acc)
    model.backward(d)
    out = {"logits": host(logits), "acc": host(acc)}
    out.update({p.name: host(p.grad) for p in model.tparams() + model.rparams()})
    out.update(model.state_dict()["buffers"])
    out["eval logits"] = host(model.forward(side(x), train=False))
    return out


def compare(arch, window):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 8, 8, 3)).astype(np.float32)
    y = rng.integers(0, 5, 4).astype(np.int32)
    cpu = step(Model(arch, (8, 8, 3), 5, bits=2, window=window, seed=1), x, y, False)
    gpu = step(Model(arch, (8, 8, 3), 5, bits=2, window=window, seed=1).to(True), x, y, True)
    assert cpu.keys() == gpu.keys()
    assert gpu["acc"][1] == cpu["acc"][1]
    for name in cpu:
        # float32 results downstream of float64 batch statistics and float32 GEMMs: same
        # formulas, other summation orders; ternary activations in between match exactly
        ref.assert_close(gpu[name], cpu[name], 1e-5, 1e-4, name)


@pytest.mark.parametrize("arch,window", ARCHS)
def test_model_own_layers_on_device(arch, window, monkeypatch):
    for op in HOST_OPS:
        monkeypatch.setattr(layers, op, via_host(getattr(layers, op)))
    compare(arch, window)


@pytest.mark.parametrize("arch,window", ARCHS)
def test_model_all_layers_on_device(arch, window, monkeypatch):
    # the pure-numba convolutions (fp32); the tensor-core ones (bf16 gradients) are checked
    # against these in tests/test_gpu_full.py
    monkeypatch.setenv("TERNET_NO_TC", "1")
    compare(arch, window)


def test_save_memory_gives_the_same_bits(monkeypatch):
    """Model.save_memory (ternet train --save-memory on) on the device path: the first batch norm's
    record keeps no float32 input from the forward (the backward recomputes it), the fused layers'
    backwards write dx over dy, the residual block's plain batch norm keeps an int16 record instead of
    xhat, and the step's logits, every gradient and the running statistics are the same bits as
    without. (The same Conv2d -> BNAct pair as ResNet's 7x7 stem, which costs minutes in the
    simulator.)"""
    monkeypatch.setenv("TERNET_NO_TC", "1")
    arch = "6C3-RB6-GAP-5"
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 8, 8, 3)).astype(np.float32)
    y = rng.integers(0, 5, 2).astype(np.int32)
    plain, lean = (Model(arch, (8, 8, 3), 5, seed=2).to(True) for _ in range(2))
    assert lean.save_memory() and not Model("6C3-MP2-8FC-5", (8, 8, 3), 5).save_memory()   # pooled first
    bn, seen = lean.net.layers[1], []
    assert bn.source is lean.net.layers[0] and all(l.in_place for l in lean.layers() if isinstance(l, layers.BNAct))
    plain_bn = [l for l in lean.layers() if type(l) is layers.BatchNorm and l.int_scale > 0]
    assert [l.name for l in plain_bn] == ["block1.bn2"] and plain_bn[0].lean
    forward = plain_bn[0].forward

    def spy_forward(x, train):
        y = forward(x, train)
        kinds.append(plain_bn[0].ctx[0] if train else None)
        return y

    fused = plain_bn[0].forward_add_act

    def spy_fused(x, res, act):
        out = fused(x, res, act)
        kinds.append(plain_bn[0].ctx[0])
        return out

    kinds = []
    plain_bn[0].forward, plain_bn[0].forward_add_act = spy_forward, spy_fused
    backward = bn.backward

    def spy(dy):
        seen.append((bn.ctx.s, bn.ctx.xf, bn.ctx.nbytes))
        dx = backward(dy)
        assert dx is dy
        return dx

    bn.backward = spy
    want, got = step(plain, x, y, True), step(lean, x, y, True)
    assert seen == [(0, None, 2 * 8 * 8 * 6 // 8)]      # only the window bits were kept
    assert kinds == ["int16", None]                     # the train forward's record, then the eval forward
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def same_memory(a, b):
    """Whether two device arrays (the simulator's, or a GPU's) start at the same memory."""
    if hasattr(a, "_ary"):
        return np.shares_memory(a._ary, b._ary)
    return a.__cuda_array_interface__["data"][0] == b.__cuda_array_interface__["data"][0]


def test_save_memory_gathers_the_stem_pools_gradient(monkeypatch):
    """ResNet's stem shape under --save-memory: conv -> fused BN -> 3/2 max pool. The pool hands the
    batch norm its gradient uncomputed (PoolGrad) and the batch norm writes dx over the recomputed
    conv output; the step's logits, every gradient and the running statistics are the same bits as
    without --save-memory. (The 3x3 first layer and the pool are inserted by hand: the 7x7 stem
    costs minutes in the simulator.)"""
    monkeypatch.setenv("TERNET_NO_TC", "1")
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 8, 8, 3)).astype(np.float32)
    y = rng.integers(0, 5, 2).astype(np.int32)
    plain, lean = (Model("6C3-RB6-GAP-5", (8, 8, 3), 5, seed=4).to(True) for _ in range(2))
    for m in (plain, lean):
        m.net.layers.insert(2, layers.MaxPool("pool1", 3, 2, 1))      # 8x8 -> 4x4 for the block
        m._lazy_pools(False)                 # as the Model links the pool it builds
    assert lean.save_memory() and lean.net.layers[2].lazy and plain.net.layers[2].lazy
    assert not lean.net.layers[2].store and plain.net.layers[2].store
    pool, bn, conv, handed, made = lean.net.layers[2], lean.net.layers[1], lean.net.layers[0], [], []
    pool_backward, bn_backward, recompute = pool.backward, bn.backward, conv.recompute

    def spy_pool(dy):
        g = pool_backward(dy)
        handed.append(type(g).__name__)
        return g

    def spy_recompute():
        made.append(recompute())
        return made[-1]

    def spy_bn(dy):
        xf = bn.ctx.xf
        dx = bn_backward(dy)
        # the conv output recomputed for the backward, then overwritten by dx
        assert xf is None and dx.shape == (2, 8, 8, 6) and len(made) == 1
        assert same_memory(dx, made[0])
        return dx

    pool.backward, bn.backward, conv.recompute = spy_pool, spy_bn, spy_recompute
    want, got = step(plain, x, y, True), step(lean, x, y, True)
    assert handed == ["PoolGrad"]          # lean's (plain's spied on neither)
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_fused_residual_end_gives_the_same_bits(monkeypatch):
    """ResNet's block end on the device: the plain batch norm, the residual add and the activation
    as one kernel (Residual's fused forward: BatchNorm.forward_add_act), here with a projection
    shortcut: the step's logits, every gradient and the running statistics are the same bits as
    with the three layers one after the other (Residual.fuse = False). (--save-memory's int16
    record and an identity shortcut: test_save_memory_keeps_less above, fused on both sides, and
    tests/test_cuda_batchnorm_bits.py::test_bn_add_act_forward_bits.)"""
    monkeypatch.setenv("TERNET_NO_TC", "1")
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 5, 5, 3)).astype(np.float32)
    y = rng.integers(0, 5, 2).astype(np.int32)
    fused, plain = (Model("6C3-RB8s2-GAP-5", (5, 5, 3), 5, seed=6).to(True) for _ in range(2))
    block, = [l for l in plain.layers() if isinstance(l, layers.Residual)]
    assert block.shortcut is not None
    block.fuse = False
    calls = []
    block, = [l for l in fused.layers() if isinstance(l, layers.Residual)]
    bn_end, f = block.main.layers[-1], block.main.layers[-1].forward_add_act
    bn_end.forward_add_act = lambda x, r, a: calls.append(bn_end.name) or f(x, r, a)
    want, got = step(plain, x, y, True), step(fused, x, y, True)
    assert calls == ["block1.bn2"]         # the train forward fused; eval is not
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_deferred_residual_adds_give_the_same_bits(monkeypatch):
    """Consecutive ResNet blocks on the device: a block's backward hands the block before it its
    two input gradients unadded (Residual.defer, elementwise.GradSum) and that block's activation
    adds them in its kernel: the step's logits, every gradient and the running statistics are the
    same bits as with the add on its own (defer = False), with an identity and a projection
    shortcut."""
    monkeypatch.setenv("TERNET_NO_TC", "1")
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 6, 6, 3)).astype(np.float32)
    y = rng.integers(0, 5, 2).astype(np.int32)
    deferred, plain = (Model("6C3-RB6-RB6-RB8s2-GAP-5", (6, 6, 3), 5, seed=8).to(True) for _ in range(2))
    blocks = [b for b in deferred.layers() if isinstance(b, layers.Residual)]
    assert [b.defer for b in blocks] == [False, True, True]
    for b in plain.layers():
        if isinstance(b, layers.Residual):
            b.defer = False
    handed = []
    act, real = blocks[0].act, blocks[0].act.backward
    act.backward = lambda dy: handed.append(type(dy).__name__) or real(dy)
    want, got = step(plain, x, y, True), step(deferred, x, y, True)
    assert handed == ["GradSum"]
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
