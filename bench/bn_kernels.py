"""GPU time of the fused batch norm + activation kernels (kernels/batchnorm.py) on the shapes where
they cost most: the forward, and the backward's two kernels reading a stored gradient and, for
ResNet's stem, taking the max pool's gradient from the pool's side (the sums over its output, dx
gathered by pool_vec.cu's kernel; also by the numba gather, its reference: the same bits), against
the max-pool backward that would store it. CUDA events, median of 10 after 2 warm-up calls. Shapes:
ResNet-18's 224 px stem at batch 256 (float32 record, 3x3/2 pooling after it) and vgg-gxnor's
conv2 at batch 512 (int16 record).

    python bench/bn_kernels.py [--quick] [--chunks 256 512 ...]   (--quick: tiny shapes, for the simulator)

--chunks: the backward's time with each count of row chunks (MAX_CHUNKS, the reduction grid's
first dimension; it fixes the order of the sums). Also printed: each kernel's registers a thread
(what bounds the threads an SM holds), the plain batch norm's backward (ResNet's last batch norm
of a block) on the same shape, and the fused backward also writing dx's bf16 copy against the
conversion kernel (conv_tc's to_bf16) that copy saves.

Measured with it (fifteenth session): loading ROWS tiles ahead in the forward, 1.50 -> 1.20 ms on
the stem; the same in the backward's kernels, slower (sums 1.72 -> 1.91 ms, dx 2.30 -> 2.76 ms), so
not kept.
"""
import json
import sys

import numpy as np
from numba import cuda

from ternet import cuda_memory
from ternet.kernels import batchnorm as B, launch, pool
from ternet.kernels.scalar import WINDOW_RECT


def timed(fn, reps=10):
    for _ in range(2):
        fn()
    ms = []
    for _ in range(reps):
        e0, e1 = cuda.event(), cuda.event()
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        ms.append(e0.elapsed_time(e1) if hasattr(e0, "elapsed_time") else cuda.event_elapsed_time(e0, e1))
    return round(float(np.median(ms)), 3)


def regs(kernel):
    """Registers a thread of a compiled numba kernel (all its signatures: one here)."""
    try:
        r = kernel.get_regs_per_thread()
        return sorted(set(r.values())) if isinstance(r, dict) else r
    except Exception as e:  # noqa: BLE001 - the simulator has no such figure
        return type(e).__name__


def run(name, shape, int_scale, pooling, reps, chunk_counts):
    rng = np.random.default_rng(0)
    c = shape[-1]
    xh = ((rng.integers(-40, 41, shape) / int_scale) if int_scale else rng.standard_normal(shape)).astype(np.float32)
    x = cuda.to_device(xh)
    out = cuda.device_array(shape, np.int8)
    gamma, beta = cuda.to_device(np.ones(c, np.float32)), cuda.to_device(np.zeros(c, np.float32))
    rm, rv = cuda.to_device(np.zeros(c, np.float32)), cuda.to_device(np.ones(c, np.float32))
    stats = cuda.device_array((2, c), np.float32)
    t = B.bn_act_forward_train(out, x, gamma, beta, rm, rv, 0.1, 1e-5, 1.0, 1.0, WINDOW_RECT, int_scale, stats)
    n = x.size
    res = {"shape": name, "elements": n, "record": "int16" if t.s > 0 else "float32"}
    o, xq, bits = cuda.device_array(n, np.int8), cuda.device_array(t.xq.size, np.int16), cuda.device_array(t.bits.size, np.uint32)
    xf = cuda.device_array(t.xf.size if t.xf is not None else 1, np.float32)
    fargs = (B.flat(x), t.mean, t.invstd, gamma, beta, t.r, t.a, t.shape, t.s, o, xq, xf, bits)
    fwd, sums, dxk = B.bn_act_kernels(True, bool(t.s > 0))
    res["fwd_ms"] = timed(lambda: fwd[B.grid1d(n)](*fargs), reps)
    # the backward through its launcher (sums, final, dx), from a stored gradient and gathered
    dgamma, dbeta = cuda.device_array(c, np.float32), cuda.device_array(c, np.float32)
    dx = cuda.device_array(shape, np.float32)
    dout = cuda.to_device(rng.standard_normal(shape).astype(np.float32))
    res["bwd_ms"] = timed(lambda: B.bn_act_backward(dx, dgamma, dbeta, dout, t, gamma), reps)
    # the backward writing dx's bf16 copy as well, against the conversion kernel it saves
    dx16 = cuda.device_array(shape, np.uint16)
    res["bwd_bf16_ms"] = timed(lambda: B.bn_act_backward(dx, dgamma, dbeta, dout, t, gamma, dx16), reps)
    from ternet.kernels import conv_tc
    if conv_tc.available():
        cvt = conv_tc._kernels()["to_bf16"]
        res["to_bf16_ms"] = timed(lambda: cvt[min(4096, (n + 255) // 256), 256](conv_tc._ptr(dx), conv_tc._ptr(dx16), n),
                                  reps)
    kept = B.MAX_CHUNKS
    for k in chunk_counts:
        B.MAX_CHUNKS = k
        res[f"bwd_ms_chunks{k}"] = timed(lambda: B.bn_act_backward(dx, dgamma, dbeta, dout, t, gamma), reps)
    B.MAX_CHUNKS = kept
    res["regs"] = {"fwd": regs(fwd), "bwd_sums": regs(sums), "bwd_dx": regs(dxk)}
    # the plain batch norm (no activation) on the same input: forward keeping its record, backward
    y = cuda.device_array(shape, np.float32)
    if int_scale:
        rec = B.batchnorm_forward_train_int16(y, x, gamma, beta, None, None, 0.1, 1e-5, int_scale, stats)
        res["plain_bwd_ms"] = timed(lambda: B.batchnorm_backward_int16(dx, dgamma, dbeta, dout, rec, gamma), reps)
    else:
        xhat = cuda.device_array(shape, np.float32)
        inv = B.batchnorm_forward_train(y, xhat, x, gamma, beta, None, None, 0.1, 1e-5, stats)
        res["plain_bwd_ms"] = timed(lambda: B.batchnorm_backward(dx, dgamma, dbeta, dout, xhat, gamma, inv), reps)
    res["regs"].update(plain_sums=regs(B._bwd_sums_cuda), plain_dx=regs(B._bwd_dx_cuda))
    if pooling:
        k, st, pd = pooling
        oshape = pool.pool_out_shape(shape, k, st, pd)
        parg = cuda.device_array(oshape, np.uint8)
        pool.maxpool_forward(cuda.device_array(oshape, np.int8), parg, out, k, st, pd)
        pdout = cuda.to_device(rng.standard_normal(oshape).astype(np.float32))
        res["pool_bwd_ms"] = timed(lambda: pool.maxpool_backward(dout, pdout, parg, k, st, pd), reps)
        # the backward given the pool's gradient uncomputed (PoolGrad): its sums from the pool's
        # side, dx by pool_vec.cu's four-channel gather, and (the reference) by the numba gather
        grad = pool.PoolGrad(pdout, parg, k, st, pd, shape, False)
        res["bwd_pooled_ms"] = timed(lambda: B.bn_act_backward(dx, dgamma, dbeta, grad, t, gamma), reps)
        vec = dx.copy_to_host()
        real, B._bn_act_pool_dx_vec = B._bn_act_pool_dx_vec, lambda *a: False
        try:
            res["bwd_pooled_numba_ms"] = timed(lambda: B.bn_act_backward(dx, dgamma, dbeta, grad, t, gamma), reps)
        finally:
            B._bn_act_pool_dx_vec = real
        res["pooled_same_bits"] = bool((dx.copy_to_host().view(np.uint32) == vec.view(np.uint32)).all())
        g = B.bn_act_kernels(True, bool(t.s > 0), True)
        res["regs"].update(pooled_sums=regs(B.bn_act_pool_sums(True, bool(t.s > 0))), gather_dx=regs(g[2]))
    print(json.dumps(res), flush=True)
    return res.get("pooled_same_bits", True)


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    chunks = [int(a) for a in sys.argv[sys.argv.index("--chunks") + 1:]] if "--chunks" in sys.argv else []
    if not quick:
        cuda_memory.install()
        launch.install()
    shapes = ([("tiny stem", (2, 6, 7, 8), 0, (3, 2, 1)), ("tiny int16", (3, 4, 4, 16), 4, None)] if quick else
              [("resnet18-224 stem b256", (256, 112, 112, 64), 0, (3, 2, 1)),
               ("resnet18-224 layer1 b256", (256, 56, 56, 64), 4, None),
               ("vgg-gxnor conv2 b512", (512, 32, 32, 128), 4, None)])
    ok = all([run(name, shape, s, p, 1 if quick else 10, chunks) for name, shape, s, p in shapes])
    sys.exit(0 if ok else 1)
