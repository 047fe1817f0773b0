"""On a real GPU: the tensor-core convolution kernels (kernels/conv_mma.cu) against the
pure-numba kernels of kernels/conv.py on random data, then the time of each on the layer shapes
of vgg-gxnor and resnet18. Prints one JSON line per check and per timing.

    python bench/mma_check.py            # checks and timings
    python bench/mma_check.py --quick    # checks only
"""
import json
import os
import sys
import time

import numpy as np
from numba import cuda

from ternet.kernels import conv, conv_tc


def emit(**k):
    print(json.dumps(k), flush=True)


def run(fn, tc):
    os.environ["TERNET_NO_TC"] = "0" if tc else "1"
    try:
        return fn()
    finally:
        os.environ["TERNET_NO_TC"] = "0"


def timed(fn, reps=10):
    fn()
    cuda.synchronize()
    e0, e1 = cuda.event(), cuda.event()
    ts = []
    for _ in range(reps):
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        ts.append(cuda.event_elapsed_time(e0, e1))
    ts.sort()
    return ts[len(ts) // 2]


def check(n, h, w, c, k, kk, s, p, rng):
    x = cuda.to_device(rng.integers(-1, 2, (n, h, w, c)).astype(np.int8))
    wq = cuda.to_device(rng.integers(-1, 2, (k, kk, kk, c)).astype(np.int8))
    oh, ow = conv.out_size(h, kk, s, p), conv.out_size(w, kk, s, p)
    dy = cuda.to_device(rng.standard_normal((n, oh, ow, k)).astype(np.float32))
    res = {}
    for tc in (False, True):
        out = cuda.device_array((n, oh, ow, k), np.float32)
        dx = cuda.device_array((n, h, w, c), np.float32)
        dw = cuda.device_array((k, kk, kk, c), np.float32)
        run(lambda: conv.conv2d_forward(out, x, wq, 1.0, s, p), tc)
        run(lambda: conv.conv2d_backward_input(dx, dy, wq, 1.0, s, p), tc)
        run(lambda: conv.conv2d_backward_weight(dw, dy, x, s, p), tc)
        res[tc] = (out.copy_to_host(), dx.copy_to_host(), dw.copy_to_host())
    f_ok = bool((res[True][0] == res[False][0]).all())
    rel = lambda a, b: float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
    emit(what="check", shape=[n, h, w, c, k, kk, s, p], fwd_exact=f_ok,
         fwd_mismatches=int((res[True][0] != res[False][0]).sum()),
         dx_rel=rel(res[True][1], res[False][1]), dw_rel=rel(res[True][2], res[False][2]),
         tc_fwd=x.dtype == np.int8 and c % 64 == 0, tc_dx=s <= 2 and k % 32 == 0, tc_dw=c % 16 == 0 and k % 8 == 0)
    return f_ok


def timing(name, n, h, w, c, k, kk, s, p, rng):
    x = cuda.to_device(rng.integers(-1, 2, (n, h, w, c)).astype(np.int8))
    wq = cuda.to_device(rng.integers(-1, 2, (k, kk, kk, c)).astype(np.int8))
    oh, ow = conv.out_size(h, kk, s, p), conv.out_size(w, kk, s, p)
    dy = cuda.to_device(rng.standard_normal((n, oh, ow, k)).astype(np.float32))
    out = cuda.device_array((n, oh, ow, k), np.float32)
    dx = cuda.device_array((n, h, w, c), np.float32)
    dw = cuda.device_array((k, kk, kk, c), np.float32)
    macs = n * oh * ow * k * kk * kk * c
    for tc in (True, False):
        t_f = timed(lambda: run(lambda: conv.conv2d_forward(out, x, wq, 1.0, s, p), tc))
        t_x = timed(lambda: run(lambda: conv.conv2d_backward_input(dx, dy, wq, 1.0, s, p), tc))
        t_w = timed(lambda: run(lambda: conv.conv2d_backward_weight(dw, dy, x, s, p), tc))
        emit(what="time", layer=name, tc=tc, fwd_ms=round(t_f, 3), dx_ms=round(t_x, 3), dw_ms=round(t_w, 3),
             fwd_tops=round(2 * macs / t_f / 1e9, 1), dx_tflops=round(2 * macs / t_x / 1e9, 1),
             dw_tflops=round(2 * macs / t_w / 1e9, 1))


if __name__ == "__main__":
    rng = np.random.default_rng(0)
    dev = cuda.get_current_device()
    emit(what="device", name=str(dev.name), cc=dev.compute_capability, tc=conv_tc.available())
    t0 = time.time()
    for shape in [(2, 8, 8, 64, 64, 3, 1, 1), (3, 9, 7, 128, 96, 3, 1, 1), (2, 16, 16, 64, 128, 3, 2, 1),
                  (2, 8, 8, 128, 256, 1, 2, 0), (1, 5, 5, 64, 40, 3, 1, 1), (4, 32, 32, 128, 128, 3, 1, 1),
                  (2, 14, 14, 256, 256, 3, 1, 1), (2, 7, 7, 512, 512, 3, 1, 1), (5, 1, 1, 512, 1024, 1, 1, 0)]:
        check(*shape, rng)
    emit(what="checks_done", seconds=round(time.time() - t0, 1))
    if "--quick" in sys.argv:
        sys.exit(0)
    for layer in [("vgg.conv2 b512", 512, 32, 32, 128, 128, 3, 1, 1), ("vgg.conv4 b512", 512, 16, 16, 256, 256, 3, 1, 1),
                  ("vgg.conv6 b512", 512, 8, 8, 512, 512, 3, 1, 1), ("r18.l1 224 b256", 256, 56, 56, 64, 64, 3, 1, 1),
                  ("r18.l4 224 b256", 256, 7, 7, 512, 512, 3, 1, 1), ("r18.l2.s2 224 b256", 256, 56, 56, 64, 128, 3, 2, 1),
                  ("r18.l2.proj 224 b256", 256, 56, 56, 64, 128, 1, 2, 0), ("vgg.conv3 b512", 512, 16, 16, 128, 256, 3, 1, 1)]:
        timing(*layer, rng)
