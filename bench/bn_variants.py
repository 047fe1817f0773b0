"""The fused batch norm + activation kernels (kernels/batchnorm.py): GPU time of the forward, and
of the backward's two kernels against variants that load U elements (rows) before computing any
of them, so that U loads per thread are in flight instead of one (CUDA events, median of 10 after
2 warm-up calls), and whether the variants give the same bits. The forward loads ahead since the
fifteenth session (1.50 -> 1.20 ms on the stem); the backward's variants measured slower there
(sums 1.72 -> 1.91 ms, dx 2.30 -> 2.76 ms) and stay here to be measured again. Shapes: ResNet-18's
224 px stem at batch 256 (float32 record) and vgg-gxnor's conv2 at batch 512 (int16 record).

    python bench/bn_variants.py [--quick]      (--quick: tiny shapes, for the simulator)
"""
import json
import sys

import numba
import numpy as np
from numba import cuda

from ternet import cuda_memory
from ternet.kernels import batchnorm as B, launch
from ternet.kernels.batchnorm import LANES, TILE_C
from ternet.kernels.scalar import WINDOW_RECT, bn_dx

U = 4
U64 = np.uint64


@cuda.jit
def sums_u(dout, pd, pa, hw, pw, pk, ps, pp, xq, xf, s, mean, invstd, bits, height, cg, cb, r, a, shape, part):
    sh = cuda.shared.array((LANES, TILE_C), numba.float64)
    dl, vl = cuda.local.array(U, numba.float32), cuda.local.array(U, numba.float32)
    ql, wl = cuda.local.array(U, numba.int16), cuda.local.array(U, numba.uint32)
    c = mean.size
    m = xf.size // c if s == 0 else xq.size // c
    j = cuda.blockIdx.y * B.TILE_C + cuda.threadIdx.x
    a0, a1 = np.float64(0.0), np.float64(0.0)
    if j < c:
        i, end = B._lane_rows(m)
        ju, cu = U64(j), U64(c)
        e, de, e_end = i * cu + ju, U64(B.LANES) * cu, end * cu
        mean_j, invstd_j = mean[j], invstd[j]
        while e < e_end:
            ee, ii = e, i
            for u in range(U):
                if ee < e_end:
                    dl[u] = B._dout_at(ee, ii, ju, dout, pd, pa, hw, pw, pk, ps, pp)
                    ql[u], vl[u], wl[u] = B._bn_act_load(ee, xq, xf, s, bits, shape)
                ee += de
                ii += U64(B.LANES)
            for u in range(U):
                if e < e_end:
                    g, h = B._bn_act_point(e, ju, dl[u], ql[u], vl[u], wl[u], s, mean_j, invstd_j, height, cg, cb,
                                           r, a, shape)
                    a0 += np.float64(g)
                    a1 += np.float64(g * h)
                e += de
                i += U64(B.LANES)
    B._lanes_to_part(sh, a0, part, 0, c)
    B._lanes_to_part(sh, a1, part, 1, c)


@cuda.jit
def dx_u(dout, pd, pa, hw, pw, pk, ps, pp, xq, xf, s, mean, invstd, bits, height, cg, cb, r, a, shape, gamma, sdy,
         sdyx, m, dx):
    dl, vl = cuda.local.array(U, numba.float32), cuda.local.array(U, numba.float32)
    ql, wl = cuda.local.array(U, numba.int16), cuda.local.array(U, numba.uint32)
    i, step, n, j, dj, c = B._walk(dx.size, mean.size)
    while i < n:
        e, jj = i, j
        for u in range(U):
            if e < n:
                dl[u] = B._dout_at(e, e // c if pk > 0 else U64(0), jj, dout, pd, pa, hw, pw, pk, ps, pp)
                ql[u], vl[u], wl[u] = B._bn_act_load(e, xq, xf, s, bits, shape)
            e, jj = e + step, B._next_channel(jj, dj, c)
        for u in range(U):
            if i < n:
                g, h = B._bn_act_point(i, j, dl[u], ql[u], vl[u], wl[u], s, mean[j], invstd[j], height, cg, cb, r, a,
                                       shape)
                dx[i] = bn_dx(g, h, gamma[j], invstd[j], sdy[j], sdyx[j], m)
            i, j = i + step, B._next_channel(j, dj, c)


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
    return float(np.median(ms))


def run(name, shape, int_scale, reps):
    rng = np.random.default_rng(0)
    c = shape[-1]
    if int_scale:
        xh = (rng.integers(-40, 41, shape) / int_scale).astype(np.float32)
    else:
        xh = rng.standard_normal(shape).astype(np.float32)
    x = cuda.to_device(xh)
    out = cuda.device_array(shape, np.int8)
    gamma, beta = cuda.to_device(np.ones(c, np.float32)), cuda.to_device(np.zeros(c, np.float32))
    rm, rv = cuda.to_device(np.zeros(c, np.float32)), cuda.to_device(np.ones(c, np.float32))
    stats = cuda.device_array((2, c), np.float32)
    saved = B.bn_act_forward_train(out, x, gamma, beta, rm, rv, 0.1, 1e-5, 1.0, 1.0, WINDOW_RECT, int_scale, stats)
    t = saved
    n = x.size
    args = (t.xq, t.xf, t.s, t.mean, t.invstd, t.bits, t.r, t.a, t.shape)
    fargs = (B.flat(x), t.mean, t.invstd, gamma, beta, t.r, t.a, t.shape, t.s)
    res = {"shape": name, "elements": n, "record": "int16" if t.s > 0 else "float32"}
    outs = {}
    z = lambda size, dt: cuda.to_device(np.zeros(size, dt))
    o, xq, bits = z(n, np.int8), z(t.xq.size, np.int16), z(t.bits.size, np.uint32)
    xf = z(t.xf.size if t.xf is not None else 1, np.float32)
    res["fwd_ms"] = round(timed(lambda: B._bn_act_fwd_cuda[B.grid1d(n)](*fargs, o, xq, xf, bits), reps), 3)
    dout = cuda.to_device(rng.standard_normal(n).astype(np.float32))
    pool = (B.scratch("bn_act.pd", (1, 1, 1, 1), np.float32), B.scratch("bn_act.pa", (1, 1, 1, 1), np.uint8),
            np.int64(0), np.int64(0), 0, 0, 0)
    rest = (t.xq, t.xf, t.s, t.mean, t.invstd, t.bits, t.height, t.cg, t.cb, t.r, t.a, t.shape)
    grid, block = B._reduce_grid(n // c, c)
    sdy, sdyx = cuda.to_device(rng.standard_normal(c).astype(np.float32)), cuda.to_device(rng.standard_normal(c).astype(np.float32))
    for tag, ks, kd in (("now", B._bn_act_bwd_sums_cuda, B._bn_act_bwd_dx_cuda), ("u4", sums_u, dx_u)):
        part = cuda.device_array((grid[0], 2, c), np.float64)
        dx = cuda.device_array(n, np.float32)
        res[f"sums_{tag}_ms"] = round(timed(lambda: ks[grid, block](dout, *pool, *rest, part), reps), 3)
        res[f"dx_{tag}_ms"] = round(timed(lambda: kd[B.grid1d(n)](dout, *pool, *rest, gamma, sdy, sdyx,
                                                                 np.float64(n // c), dx), reps), 3)
        outs[tag] = [part.copy_to_host(), dx.copy_to_host()]
    res["bwd_same_bits"] = all((a.view(np.uint8) == b.view(np.uint8)).all() for a, b in zip(outs["now"], outs["u4"]))
    print(json.dumps(res), flush=True)
    del args
    return res["bwd_same_bits"]


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    if not quick:
        cuda_memory.install()
        launch.install()
    shapes = ([("tiny float", (2, 5, 7, 8), 0), ("tiny int16", (3, 4, 4, 16), 4)] if quick else
              [("resnet18-224 stem b256", (256, 112, 112, 64), 0), ("vgg-gxnor conv2 b512", (512, 32, 32, 128), 4)])
    ok = all([run(name, shape, s, 1 if quick else 10) for name, shape, s in shapes])
    sys.exit(0 if ok else 1)
