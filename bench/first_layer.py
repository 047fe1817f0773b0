"""The first layer's kernels on the benchmark shapes: the tensor-core kernels (conv_mma.cu's
conv_fwd_first / conv_dw_first), the pure-numba direct kernels (the input patch in shared memory)
and the tiled ones; GPU time of the forward and the weight gradient (CUDA events, median of 10
after 2 warm-up calls), and how far each is from the direct kernels' results (the largest
difference relative to the largest magnitude: float32 sums in other orders, or bf16 operands).

    python bench/first_layer.py
"""
import json
import os

import numpy as np
from numba import cuda

from ternet import cuda_memory
from ternet.kernels import conv, launch

SHAPES = {   # name: (input NHWC, weight KHWC, stride, pad)
    "resnet18-224 stem, batch 256": ((256, 224, 224, 3), (64, 7, 7, 3), 2, 3),
    "resnet18-64 stem, batch 512": ((512, 64, 64, 3), (64, 7, 7, 3), 2, 3),
    "vgg-gxnor conv1, batch 512": ((512, 32, 32, 3), (128, 3, 3, 3), 1, 1),
}


def timed(fn, reps=10):
    for _ in range(2):
        fn()
    ms = []
    for _ in range(reps):
        a, b = cuda.event(), cuda.event()
        a.record()
        fn()
        b.record()
        b.synchronize()
        ms.append(cuda.event_elapsed_time(a, b))
    return float(np.median(ms))


def run(name, xs, ws, stride, pad):
    rng = np.random.default_rng(0)
    n, h, w, c = xs
    k, kh, kw, _ = ws
    oh, ow = conv.out_size(h, kh, stride, pad), conv.out_size(w, kw, stride, pad)
    x = cuda.to_device(rng.standard_normal(xs).astype(np.float32))
    wq = cuda.to_device(rng.integers(-1, 2, ws).astype(np.int8))
    dy = cuda.to_device(rng.standard_normal((n, oh, ow, k)).astype(np.float32))
    res, outs = {"shape": name, "gflop": round(2 * n * oh * ow * k * kh * kw * c / 1e9, 1)}, {}
    for path, dr_max, tc in (("tc", conv.DR_MAX, "0"), ("tiled", 0, "1"), ("direct", conv.DR_MAX, "1")):
        saved, conv.DR_MAX = conv.DR_MAX, dr_max
        os.environ["TERNET_NO_TC"] = tc
        try:
            y = cuda.device_array((n, oh, ow, k), np.float32)
            dw = cuda.device_array(ws, np.float32)
            res[f"{path}_fwd_ms"] = round(timed(lambda: conv.conv2d_forward(y, x, wq, 1.0, stride, pad)), 3)
            res[f"{path}_dw_ms"] = round(timed(lambda: conv.conv2d_backward_weight(dw, dy, x, stride, pad)), 3)
            outs[path] = (y.copy_to_host(), dw.copy_to_host())
        finally:
            conv.DR_MAX = saved
            os.environ["TERNET_NO_TC"] = "0"
    for i, what in enumerate(("fwd", "dw")):
        b = outs["direct"][i]
        for path in ("tc", "tiled"):
            res[f"{what}_{path}_max_rel_diff"] = float(np.abs(outs[path][i] - b).max() / np.abs(b).max())
    for what in ("fwd", "dw"):
        for path in ("tc", "direct"):
            res[f"{what}_tflops_{path}"] = round(res["gflop"] / res[f"{path}_{what}_ms"], 1)
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    cuda_memory.install()
    launch.install()
    for name, args in SHAPES.items():
        run(name, *args)
    for kern in (conv._conv_fwd_direct_cuda, conv._conv_dw_direct_cuda, conv._conv_fwd_cuda, conv._conv_dw_cuda):
        print(kern.__name__, "registers", list(kern.get_regs_per_thread().values()), "local bytes",
              list(kern.get_local_mem_per_thread().values()), flush=True)
