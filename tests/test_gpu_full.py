"""Full-size checks of the GPU path on real hardware (marker `gpu`; skipped under the simulator):
tensor-core convolutions against the pure-numba kernels, whole networks against the CPU path,
and run-to-run determinism of training steps."""
import os

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

LAYERS = [  # (N, H, W, C, K, k, stride, pad)
    (8, 32, 32, 128, 128, 3, 1, 1), (8, 16, 16, 256, 256, 3, 1, 1), (8, 8, 8, 512, 512, 3, 1, 1),
    (4, 56, 56, 64, 64, 3, 1, 1), (4, 28, 28, 64, 128, 3, 2, 1), (4, 28, 28, 64, 128, 1, 2, 0),
    (3, 7, 9, 64, 40, 3, 1, 1), (16, 1, 1, 8192, 1024, 1, 1, 0),
]


def _run(fn, tc):
    os.environ["TERNET_NO_TC"] = "0" if tc else "1"
    try:
        return fn()
    finally:
        os.environ.pop("TERNET_NO_TC")


@pytest.mark.parametrize("shape", LAYERS)
def test_tensor_core_convolutions_match_numba_kernels(shape):
    from numba import cuda
    from ternet.kernels import conv
    n, h, w, c, k, kk, s, p = shape
    rng = np.random.default_rng(sum(shape))
    x = cuda.to_device(rng.integers(-1, 2, (n, h, w, c)).astype(np.int8))
    wq = cuda.to_device(rng.integers(-1, 2, (k, kk, kk, c)).astype(np.int8))
    oh, ow = conv.out_size(h, kk, s, p), conv.out_size(w, kk, s, p)
    dy = cuda.to_device(rng.standard_normal((n, oh, ow, k)).astype(np.float32))
    res = {}
    for tc in (False, True):
        out, dx = cuda.device_array((n, oh, ow, k), np.float32), cuda.device_array((n, h, w, c), np.float32)
        dw = cuda.device_array((k, kk, kk, c), np.float32)
        _run(lambda: conv.conv2d_forward(out, x, wq, 1.0, s, p), tc)
        _run(lambda: conv.conv2d_backward_input(dx, dy, wq, 1.0, s, p), tc)
        _run(lambda: conv.conv2d_backward_weight(dw, dy, x, s, p), tc)
        res[tc] = [a.copy_to_host() for a in (out, dx, dw)]
    np.testing.assert_array_equal(res[True][0], res[False][0])          # int8 mma: exact
    for a, b in zip(res[True][1:], res[False][1:]):
        # bf16 operands (dy rounded to 8 bits of mantissa), fp32 accumulation: ~2e-3 relative
        assert np.linalg.norm(a - b) <= 4e-3 * np.linalg.norm(b)


@pytest.mark.parametrize("shape", [sh for sh in LAYERS if sh[3] % 64 == 0])
@pytest.mark.parametrize("qmax", [1, 2])
def test_conv_sums_are_the_outputs_sums(shape, qmax):
    """The int8 forward's per-channel sums (conv_tc.ConvSums) against its own output, block by
    block (128 rows each), exactly; and the batch norm's statistics from them against the pass
    over that output, bit for bit (all channels, so K's ragged 64-column tile too)."""
    from numba import cuda
    from ternet.kernels import batchnorm as bn
    from ternet.kernels import conv
    n, h, w, c, k, kk, s, p = shape
    rng = np.random.default_rng(sum(shape) + qmax)
    x = cuda.to_device(rng.integers(-1, 2, (n, h, w, c)).astype(np.int8))
    wq = cuda.to_device(rng.integers(-qmax, qmax + 1, (k, kk, kk, c)).astype(np.int8))
    oh, ow = conv.out_size(h, kk, s, p), conv.out_size(w, kk, s, p)
    out = cuda.device_array((n, oh, ow, k), np.float32)
    sums = conv.conv2d_forward(out, x, wq, 1.0 / qmax, s, p, sums=True)
    assert sums is not None and sums.current()
    a = (out.copy_to_host().reshape(-1, k) * qmax).astype(np.int64)
    blocks = -(-a.shape[0] // 128)
    pad = np.zeros((blocks * 128 - a.shape[0], k), np.int64)
    a = np.concatenate([a, pad]).reshape(blocks, 128, k)
    part = sums.part.copy_to_host()
    np.testing.assert_array_equal(part[0], a.sum(1).T)
    np.testing.assert_array_equal(part[1], (a * a).sum(1).T)
    rows, res = out.reshape(-1, k), []
    for kw in (dict(sums=sums), {}):
        stats = cuda.to_device(np.zeros((2, k), np.float32))
        mean, invstd, _ = bn._cuda_stats(rows, 1e-4, stats, np.float32(qmax), **kw)
        res.append([v.copy_to_host().view(np.uint32) for v in (mean, invstd, stats)])
    for g, w_ in zip(*res):
        np.testing.assert_array_equal(g, w_)


FIRST = [  # first layers on float32 images: (N, H, W, C, K, k, stride, pad); ragged tiles in the last two
    (4, 32, 32, 3, 128, 3, 1, 1), (2, 64, 64, 3, 64, 7, 2, 3), (3, 30, 50, 3, 24, 5, 1, 2), (2, 45, 37, 1, 16, 5, 2, 1),
]


@pytest.mark.parametrize("shape", FIRST)
def test_first_layer_tensor_cores_match_numba_kernels(shape):
    from numba import cuda
    from ternet.kernels import conv
    n, h, w, c, k, kk, s, p = shape
    rng = np.random.default_rng(sum(shape))
    x = cuda.to_device(rng.standard_normal((n, h, w, c)).astype(np.float32))
    wq = cuda.to_device(rng.integers(-1, 2, (k, kk, kk, c)).astype(np.int8))
    oh, ow = conv.out_size(h, kk, s, p), conv.out_size(w, kk, s, p)
    dy = cuda.to_device(rng.standard_normal((n, oh, ow, k)).astype(np.float32))
    res = {}
    for tc in (False, True):
        out, dw = cuda.device_array((n, oh, ow, k), np.float32), cuda.device_array((k, kk, kk, c), np.float32)
        _run(lambda: conv.conv2d_forward(out, x, wq, 0.5, s, p), tc)
        _run(lambda: conv.conv2d_backward_weight(dw, dy, x, s, p), tc)
        res[tc] = [a.copy_to_host() for a in (out, dw)]
    # forward: x as three bf16 numbers (exact) times exact weights, fp32 sums in another order
    np.testing.assert_allclose(res[True][0], res[False][0], rtol=0, atol=1e-6 * np.abs(res[False][0]).max())
    # weight gradient: dy and x rounded to bf16, fp32 sums
    a, b = res[True][1], res[False][1]
    assert np.linalg.norm(a - b) <= 4e-3 * np.linalg.norm(b)


@pytest.mark.parametrize("shape", FIRST)
def test_first_layer_sums_are_the_outputs_sums(shape):
    """The first-layer forward's float64 per-channel sums (conv_fwd_first_f32_sums, conv_tc.ConvSums
    with a float64 part): the output the same bits as without them; the blocks' sums added up
    against the output's sums in float64 (a fixed order of its own: within float64 rounding); the
    batch norm's statistics from them against the pass over the output (float32 rounding)."""
    from numba import cuda
    from ternet.kernels import batchnorm as bn
    from ternet.kernels import conv, conv_tc
    n, h, w, c, k, kk, s, p = shape
    rng = np.random.default_rng(sum(shape) + 1)
    x = cuda.to_device((rng.standard_normal((n, h, w, c)) + 0.3).astype(np.float32))
    wq = cuda.to_device(rng.integers(-1, 2, (k, kk, kk, c)).astype(np.int8))
    oh, ow = conv.out_size(h, kk, s, p), conv.out_size(w, kk, s, p)
    out, out0 = (cuda.device_array((n, oh, ow, k), np.float32) for _ in range(2))
    sums = conv.conv2d_forward(out, x, wq, 0.5, s, p, sums=True)
    conv.conv2d_forward(out0, x, wq, 0.5, s, p)
    assert isinstance(sums, conv_tc.ConvSums) and sums.part.dtype == np.float64 and sums.current()
    y = out.copy_to_host()
    np.testing.assert_array_equal(y.view(np.uint32), out0.copy_to_host().view(np.uint32))
    d = y.reshape(-1, k).astype(np.float64)
    part = sums.part.copy_to_host()
    np.testing.assert_allclose(part.sum(2), [d.sum(0), (d * d).sum(0)], rtol=1e-12, atol=1e-9)
    got, want = (cuda.to_device(np.zeros((2, k), np.float32)) for _ in range(2))
    rows = out.reshape(n * oh * ow, k)          # (a device array view)
    mean, invstd, _ = bn._cuda_stats(rows, 1e-4, got, sums=sums)
    mean0, invstd0, _ = bn._cuda_stats(rows, 1e-4, want)
    np.testing.assert_allclose(mean.copy_to_host(), mean0.copy_to_host(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(invstd.copy_to_host(), invstd0.copy_to_host(), rtol=1e-6)
    np.testing.assert_allclose(got.copy_to_host(), want.copy_to_host(), rtol=1e-6, atol=1e-6)


POOLS = [  # (N, H, W, C, k, stride, pad): ResNet's stem, vgg-gxnor's pools, ragged edges
    (2, 112, 112, 64, 3, 2, 1), (4, 32, 32, 128, 2, 2, 0), (3, 9, 11, 8, 3, 2, 1), (2, 7, 9, 4, 2, 2, 0),
]


@pytest.mark.parametrize("dtype", ["int8", "float32"])
@pytest.mark.parametrize("shape", POOLS)
def test_vector_max_pooling_gives_the_numba_kernels_bits(shape, dtype):
    from numba import cuda
    from ternet.kernels import pool
    n, h, w, c, k, s, p = shape
    rng = np.random.default_rng(sum(shape))
    # ties everywhere (int8: ternary values; float32: integers and signed zeros)
    xh = rng.integers(-1, 2, (n, h, w, c)).astype(dtype)
    if dtype == "float32":
        xh[rng.random(xh.shape) < 0.2] = -0.0
    x = cuda.to_device(xh)
    oshape = pool.pool_out_shape(x.shape, k, s, p)
    dout = cuda.to_device(rng.standard_normal(oshape).astype(np.float32))
    res = {}
    for tc in (False, True):
        out, arg = cuda.device_array(oshape, x.dtype), cuda.device_array(oshape, np.uint8)
        dx = cuda.device_array(x.shape, np.float32)
        _run(lambda: pool.maxpool_forward(out, arg, x, k, s, p), tc)
        _run(lambda: pool.maxpool_backward(dx, dout, arg, k, s, p), tc)
        res[tc] = [a.copy_to_host() for a in (out, arg, dx)]
    for a, b in zip(res[True], res[False]):
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))   # bits: -0.0 is not 0.0
    # the bf16 copy the four-channel backward can write: the conversion kernel's bits
    from ternet.kernels import conv_tc
    dx, dx16 = cuda.device_array(x.shape, np.float32), cuda.device_array(x.shape, np.uint16)
    assert pool.maxpool_backward(dx, dout, cuda.to_device(res[True][1]), k, s, p, dx16)
    np.testing.assert_array_equal(dx.copy_to_host().view(np.uint32), res[True][2].view(np.uint32))
    np.testing.assert_array_equal(dx16.copy_to_host(), conv_tc.bf16(dx).copy_to_host())


# (N, H, W, C) of a fused batch norm's input, the max pool after it (k, stride, pad), int_scale
BN_POOLS = [((2, 112, 112, 64), (3, 2, 1), 0), ((3, 9, 11, 8), (3, 2, 1), 0), ((2, 14, 14, 32), (3, 2, 1), 4),
            ((2, 8, 6, 12), (2, 2, 0), 0)]


@pytest.mark.parametrize("shape,pooling,int_scale", BN_POOLS)
def test_pool_dx_kernel_gives_the_gathers_bits(shape, pooling, int_scale):
    """pool_vec.cu's bn_act_pool_dx (the fused batch norm's input gradient from the max pool's
    output gradient, four channels a thread) against the numba kernel gathering the same
    (bn_act_kernels(..., gather=True)), bit for bit, float32 and int16 records; and bn_act_backward
    given the pool's gradient uncomputed (PoolGrad) against the same given it stored: the sums
    from the pool's side agree to float32 rounding."""
    from numba import cuda
    from ternet.kernels import batchnorm as bn
    from ternet.kernels import pool
    from ternet.kernels.scalar import WINDOW_RECT
    n, h, w, c = shape
    k, st, pd = pooling
    rng = np.random.default_rng(sum(shape) + int_scale)
    if int_scale:
        xh = (rng.integers(-40, 41, shape) / int_scale).astype(np.float32)
    else:
        xh = (rng.standard_normal(shape) * 2 + 0.3).astype(np.float32)
    x = cuda.to_device(xh)
    gamma = cuda.to_device(rng.uniform(0.5, 1.5, c).astype(np.float32))
    beta = cuda.to_device((rng.standard_normal(c) * 0.3).astype(np.float32))
    y, stats = cuda.device_array(shape, np.int8), cuda.device_array((2, c), np.float32)
    t = bn.bn_act_forward_train(y, x, gamma, beta, None, None, 0.1, 1e-4, 1.0, 0.5, WINDOW_RECT, int_scale, stats)
    oshape = pool.pool_out_shape(shape, k, st, pd)
    pout, parg = cuda.device_array(oshape, np.int8), cuda.device_array(oshape, np.uint8)
    pool.maxpool_forward(pout, parg, y, k, st, pd)
    pdout = cuda.to_device(rng.standard_normal(oshape).astype(np.float32))
    grad = pool.PoolGrad(pdout, parg, k, st, pd, shape, False)
    out = {}
    for name in ("vec", "numba"):
        dx, dg, db = cuda.device_array(shape, np.float32), cuda.device_array(c, np.float32), cuda.device_array(c, np.float32)
        if name == "numba":      # the numba gather: the four-channel kernel not taken
            real, bn._bn_act_pool_dx_vec = bn._bn_act_pool_dx_vec, lambda *a: False
        try:
            bn.bn_act_backward(dx, dg, db, grad, t, gamma)
        finally:
            if name == "numba":
                bn._bn_act_pool_dx_vec = real
        out[name] = [a.copy_to_host() for a in (dx, dg, db)]
    for a, b in zip(out["vec"], out["numba"]):
        np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))
    assert np.isfinite(out["vec"][0]).all() and (out["vec"][0] != 0).any()
    stored = cuda.device_array(shape, np.float32)
    pool.maxpool_backward(stored, pdout, parg, k, st, pd)
    dx, dg, db = cuda.device_array(shape, np.float32), cuda.device_array(c, np.float32), cuda.device_array(c, np.float32)
    bn.bn_act_backward(dx, dg, db, stored, t, gamma)
    for a, b in zip(out["vec"][1:], (dg, db)):
        np.testing.assert_allclose(a, b.copy_to_host(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch,shape,classes", [("vgg-gxnor", (32, 32, 3), 10), ("resnet18", (64, 64, 3), 1000)])
def test_network_on_gpu_matches_cpu(arch, shape, classes):
    from ternet.kernels.loss import loss_forward_backward
    from ternet.model import Model
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8,) + shape).astype(np.float32)
    y = rng.integers(0, 10, 8).astype(np.int32)
    grads = {}
    for dev in (False, True):
        m = Model(arch, shape, classes, seed=1).to(dev)
        from numba import cuda
        xs = cuda.to_device(x) if dev else x
        logits = m.forward(xs, train=True)
        d = cuda.device_array(logits.shape, np.float32) if dev else np.empty(logits.shape, np.float32)
        acc = cuda.to_device(np.zeros(2)) if dev else np.zeros(2)
        loss_forward_backward(d, logits, cuda.to_device(y) if dev else y, "xent", acc)
        m.backward(d)
        host = lambda a: a.copy_to_host() if dev else a
        grads[dev] = {p.name: host(p.grad) for p in m.tparams()}
        grads[dev]["logits"] = host(logits)
    # float sums in other orders can flip an activation sitting on a threshold, so compare overall
    for name in grads[False]:
        a, b = grads[True][name], grads[False][name]
        assert np.linalg.norm(a - b) <= 0.05 * np.linalg.norm(b) + 1e-6, name


def test_training_steps_are_deterministic(tiny_data, tmp_path):
    from ternet.config import Config
    from ternet.run import RunDir
    from ternet.train import Trainer
    weights = []
    for i in range(2):
        cfg = Config(data=str(tiny_data), arch="64C3-MP2-64C3-MP2-64FC", sampler="dst", epochs=1, batch_size=50,
                     device="cuda").resolve()
        run = RunDir(tmp_path / f"r{i}")
        run.create(cfg)
        t = Trainer(cfg, run, progress=False)
        t.fit()
        weights.append(t.model.state_dict()["weights"])
    for k in weights[0]:
        np.testing.assert_array_equal(weights[0][k], weights[1][k])


@pytest.mark.parametrize("arch", ["64C3-RB64-MP2-64FC", "stem64-RB64-64FC"])
def test_save_memory_trains_the_same_bits(tiny_data, tmp_path, arch):
    """ternet train --save-memory on (the first layer's output recomputed, fused batch-norm gradients
    in place, the residual block's plain batch norms on int16 records; with a ResNet stem, its max
    pool's gradient gathered by the batch norm before it) against off, with the tensor-core
    convolutions, eager and replayed from a CUDA graph: the same weights bit for bit."""
    from ternet.config import Config
    from ternet.run import RunDir
    from ternet.train import Trainer
    weights = {}
    for save, graph in (("off", "off"), ("on", "off"), ("on", "on")):
        cfg = Config(data=str(tiny_data), arch=arch, sampler="dst", epochs=1, batch_size=50,
                     device="cuda", save_memory=save, cuda_graph=graph).resolve()
        run = RunDir(tmp_path / f"{save}-{graph}")
        run.create(cfg)
        t = Trainer(cfg, run, progress=False)
        t.fit()
        weights[save, graph] = t.model.state_dict()["weights"]
    for k in weights["off", "off"]:
        for key in (("on", "off"), ("on", "on")):
            np.testing.assert_array_equal(weights[key][k], weights["off", "off"][k], err_msg=f"{key} {k}")


@pytest.mark.parametrize("arch", ["64C3-64C3-MP2-128C3-64FC", "64C3-RB64-RB128s2-64FC"])
def test_conv_sums_train_the_same_bits(tiny_data, tmp_path, arch, monkeypatch):
    """Batch statistics from the integer convolutions' sums (conv_tc.ConvSums; fused batch norm +
    activation, ResNet's plain ones, the block-end kernel, a projection shortcut) against the pass
    over their outputs (TERNET_CONV_SUMS=0), eager and replayed: the same weights and running
    statistics bit for bit; and the sums did give statistics."""
    from ternet.config import Config
    from ternet.kernels import batchnorm as bn
    from ternet.kernels import conv_tc
    from ternet.run import RunDir
    from ternet.train import Trainer
    used = [0]
    kernel = bn._stats_from_sums_cuda

    class Counted:
        def __getitem__(self, grid):
            used[0] += 1
            return kernel[grid]

    monkeypatch.setattr(bn, "_stats_from_sums_cuda", Counted())
    state = {}
    for on, graph in ((False, "off"), (True, "off"), (True, "on")):
        monkeypatch.setattr(conv_tc, "SUMS", on)
        cfg = Config(data=str(tiny_data), arch=arch, sampler="dst", epochs=1, batch_size=50, device="cuda",
                     cuda_graph=graph).resolve()
        run = RunDir(tmp_path / f"{on}-{graph}")
        run.create(cfg)
        t = Trainer(cfg, run, progress=False)
        t.fit()
        sd = t.model.state_dict()
        state[on, graph] = {**sd["weights"], **sd["buffers"]}
        if not on:
            assert used[0] == 0
    assert used[0] > 0
    for key in ((True, "off"), (True, "on")):
        for name, v in state[False, "off"].items():
            np.testing.assert_array_equal(state[key][name], v, err_msg=f"{key} {name}")


@pytest.mark.parametrize("arch", ["64C3-64C3-MP2-128C3-64FC", "64C3-RB64-RB128s2-64FC"])
def test_bf16_only_gradients_train_the_same_bits(tiny_data, tmp_path, arch, monkeypatch):
    """The gradients that convolutions read in bf16 alone handed over without their float32 copy
    (conv_tc.Bf16Grad: from a fused batch norm, a max pool, ResNet's plain batch norms) against
    with it (TERNET_BF16_GRADS=0), eager, replayed and with --save-memory: the same weights and
    running statistics bit for bit; and such gradients were handed over."""
    from ternet.config import Config
    from ternet.kernels import conv_tc
    from ternet.run import RunDir
    from ternet.train import Trainer

    class Counted(conv_tc.Bf16Grad):
        made = 0

        def __init__(self, bits):
            super().__init__(bits)
            Counted.made += 1

    monkeypatch.setattr(conv_tc, "Bf16Grad", Counted)
    state = {}
    for on, graph, save in ((False, "off", "off"), (True, "off", "off"), (True, "on", "off"), (True, "off", "on")):
        monkeypatch.setattr(conv_tc, "BF16_GRADS", on)
        cfg = Config(data=str(tiny_data), arch=arch, sampler="dst", epochs=1, batch_size=50, device="cuda",
                     cuda_graph=graph, save_memory=save).resolve()
        run = RunDir(tmp_path / f"{on}-{graph}-{save}")
        run.create(cfg)
        t = Trainer(cfg, run, progress=False)
        t.fit()
        sd = t.model.state_dict()
        state[on, graph, save] = {**sd["weights"], **sd["buffers"]}
        if not on:
            assert Counted.made == 0
    assert Counted.made > 0
    for key in list(state)[1:]:
        for name, v in state[False, "off", "off"].items():
            np.testing.assert_array_equal(state[key][name], v, err_msg=f"{key} {name}")


def test_planned_launches_give_the_same_bits(tiny_data, tmp_path, monkeypatch):
    """Every kernel of a training epoch launched by ternet/kernels/launch.py against numba's own
    launches: same weights, bit for bit; and the step's kernels do run planned."""
    from ternet.config import Config
    from ternet.kernels import launch
    from ternet.run import RunDir
    from ternet.train import Trainer
    weights = {}
    for fast in (False, True):
        launch.uninstall()
        monkeypatch.setenv("TERNET_FAST_LAUNCH", "1" if fast else "0")
        for sampler in ("dst", "bop"):
            cfg = Config(data=str(tiny_data), arch="64C3-MP2-64C3-MP2-64FC", sampler=sampler, epochs=1,
                         batch_size=50, device="cuda").resolve()
            run = RunDir(tmp_path / f"{sampler}-{fast}")
            run.create(cfg)
            t = Trainer(cfg, run, progress=False)
            t.fit()
            weights[sampler, fast] = t.model.state_dict()["weights"]
    stats = launch.stats()
    launch.uninstall()
    assert stats["planned"] >= 20 and stats["numba"] <= stats["planned"] // 4, stats
    for sampler in ("dst", "bop"):
        for k in weights[sampler, False]:
            np.testing.assert_array_equal(weights[sampler, True][k], weights[sampler, False][k])


def test_streamed_batches_train_as_the_host_batches_copied_per_step(tiny_data, tmp_path, monkeypatch):
    """A split that is not kept on the GPU (forced here): batches through StreamLoader's pinned
    buffers, copy stream and events give the weights of the same run with each host batch copied
    synchronously before its step (the trainer's path before StreamLoader), bit for bit."""
    from ternet import device_data, train
    from ternet.config import Config
    from ternet.run import RunDir
    monkeypatch.setattr(device_data, "fits_on_device", lambda loader, fraction=0.25: False)
    weights = {}
    for how in ("stream", "copy"):
        if how == "copy":       # the host Loader itself: the trainer copies each batch with to_side
            monkeypatch.setenv("TERNET_STREAM", "0")
        cfg = Config(data=str(tiny_data), arch="64C3-MP2-64C3-MP2-64FC", epochs=2, batch_size=50,
                     cutout=6, device="cuda").resolve()
        run = RunDir(tmp_path / how)
        run.create(cfg)
        t = train.Trainer(cfg, run, progress=False)
        assert isinstance(t.train_loader, device_data.StreamLoader) == (how == "stream")
        t.fit()
        weights[how] = (t.model.state_dict()["weights"], run.metrics_path.read_bytes())
    for k in weights["copy"][0]:
        np.testing.assert_array_equal(weights["stream"][0][k], weights["copy"][0][k])
    assert weights["stream"][1] == weights["copy"][1]


def test_cuda_graph_captures_in_a_fresh_process(tiny_data, tmp_path):
    """In a new process, where no launch has been planned yet, `ternet train --cuda-graph on`
    captures the step: the kernels it launches once per step (the first convolution) are proven
    by the two eager warm-up steps. The run's timing records say whether the steps were replayed."""
    import json
    import os
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "ternet", "train", "--data", str(tiny_data), "--arch",
                        "64C3-MP2-64C3-MP2-64FC", "--device", "cuda", "--cuda-graph", "on", "--epochs", "1",
                        "--batch-size", "64", "--quiet", "--runs-dir", str(tmp_path), "--name", "g"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "default"})
    assert r.returncode == 0, r.stderr
    assert "could not be captured" not in r.stderr, r.stderr
    recs = [json.loads(line) for line in open(tmp_path / "g" / "timing.jsonl") if "cuda_graph" in line]
    assert recs and recs[-1]["cuda_graph"] == "replayed"


@pytest.mark.parametrize("sampler,source,extra", [("bop", "sgd", ()), ("dst", "sgd", (("decay", 0.1), ("norm", "rms"))),
                                                  ("dst", "adam", ())])
def test_cuda_graph_replays_train_as_the_eager_steps(tiny_data, tmp_path, sampler, source, extra):
    """--cuda-graph on: full batches replayed from one captured step (the short last batch of each
    epoch eager, evaluation between epochs, checkpoints) give the eager run's weights, batch-norm
    state and metrics, bit for bit; and the graph did replace the steps. DST's transition keys
    and schedules come from device memory refreshed before each replay."""
    from ternet.config import Config
    from ternet.run import RunDir
    from ternet.train import Trainer
    out = {}
    for graph in ("off", "on"):
        cfg = Config(data=str(tiny_data), arch="64C3-MP2-64C3-MP2-64FC", sampler=sampler, source=source, extra=extra,
                     epochs=3, batch_size=64, lr_schedule="cosine", augment="crop", cutout=6, cuda_graph=graph,
                     ckpt_every=5, device="cuda").resolve()
        run = RunDir(tmp_path / graph)
        run.create(cfg)
        t = Trainer(cfg, run, progress=False)
        t.fit()
        if graph == "on":
            assert t.graph.failed is None and t.graph.graph is not None and t.graph.calls == 3 * (400 // 64)
        sd = t.model.state_dict()
        out[graph] = (sd, run.metrics_path.read_bytes())
    for group in ("weights", "real", "buffers"):
        for k in out["off"][0][group]:
            np.testing.assert_array_equal(out["on"][0][group][k], out["off"][0][group][k])
    assert out["on"][1] == out["off"][1]


def test_allocator_installs_into_a_context_made_before_it(tmp_path):
    """CUDA used before ternet (a context numba made with its own memory manager): install() gives
    that context the caching allocator, which a graph capture's pool needs (without it a captured
    step's temporaries went back to cuMemFree under the graph: illegal addresses in replays)."""
    import subprocess
    import sys
    code = ("from numba import cuda\n"
            "a = cuda.device_array(1000)\n"
            "from ternet import cuda_memory\n"
            "assert not cuda_memory.active()\n"
            "cuda_memory.install()\n"
            "assert cuda_memory.active()\n"
            "b = cuda.device_array(1000)\n"
            "del a, b\n"
            "c = cuda.device_array(1000)\n"
            "print('ok', cuda_memory.in_use_bytes())\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ok", "8192"], r.stdout


def test_planned_graph_pool_trains_as_the_eager_steps(tiny_data, tmp_path, monkeypatch):
    """The planned graph pool (the default; TERNET_GRAPH_POOL=exact turns it off): the capture's
    allocations placed by a layout planned from the last warm-up step (cuda_memory.plan) give the
    eager run's weights and metrics bit for bit, every allocation of the captured step found its
    planned place, and the pool reserved less than with free lists of exact sizes."""
    from ternet import cuda_graph
    from ternet.config import Config
    from ternet.run import RunDir
    from ternet.train import Trainer
    out, pools = {}, {}
    for graph, planned in (("off", False), ("on", False), ("on", True)):
        monkeypatch.setattr(cuda_graph, "PLANNED", planned)
        cfg = Config(data=str(tiny_data), arch="64C3-MP2-64C3-MP2-64FC", sampler="dst", epochs=2, batch_size=64,
                     cuda_graph=graph, device="cuda").resolve()
        run = RunDir(tmp_path / f"{graph}-{planned}")
        run.create(cfg)
        t = Trainer(cfg, run, progress=False)
        t.fit()
        if graph == "on":
            pool = t.graph.graph.pool
            pools[planned] = sum(n for _, n in pool.spans)
            if planned:
                assert pool.planned.next == len(pool.planned.sizes) and len(pool.spans) == 1   # all as planned
        out[graph, planned] = (t.model.state_dict()["weights"], run.metrics_path.read_bytes())
    for key in (("on", False), ("on", True)):
        for k in out["off", False][0]:
            np.testing.assert_array_equal(out[key][0][k], out["off", False][0][k])
        assert out[key][1] == out["off", False][1]
    assert pools[True] < pools[False]
