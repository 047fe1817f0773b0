"""A GPU-resident dataset split: the uint8 pixels go to the device once, and each batch is
gathered, augmented (random crop with padding and flip, or random-resized-crop and flip) and
normalised by a CUDA kernel (cutout, when asked for, by a second one). The host only draws the
batch's plan -- the same indices and the same augmentation parameters, from the same seeded
streams, as ternet.loader.Loader -- so the batches equal the host loader's (up to float rounding
of the normalisation).
Exercise: pytest tests/test_device_data.py.
"""
import math

import numpy as np
from numba import cuda, float32

from .kernels import grid1d


@cuda.jit
def _crop_flip_cuda(src, offs, hs, ws, rows, oy, ox, flip, scale, shift, out):
    b_n, oh, ow, c = out.shape
    for t in range(cuda.grid(1), b_n * oh * ow, cuda.gridsize(1)):
        p = t // (oh * ow)
        y = (t // ow) % oh
        x = t % ow
        r = rows[p]
        h, w = hs[r], ws[r]
        sy = y + oy[p]
        sx = (ow - 1 - x if flip[p] else x) + ox[p]
        inside = 0 <= sy < h and 0 <= sx < w
        at = offs[r] + (sy * w + sx) * c
        for k in range(c):
            out[p, y, x, k] = float32(src[at + k]) * scale[k] + shift[k] if inside else shift[k]


@cuda.jit
def _resized_crop_cuda(src, offs, hs, ws, rows, boxes, flip, scale, shift, out):
    b_n, oh, ow, c = out.shape
    for t in range(cuda.grid(1), b_n * oh * ow, cuda.gridsize(1)):
        p = t // (oh * ow)
        y = (t // ow) % oh
        x = t % ow
        r = rows[p]
        base, h, w = offs[r], hs[r], ws[r]
        y0, x0, bh, bw = boxes[p, 0], boxes[p, 1], boxes[p, 2], boxes[p, 3]
        fy = min(max(y0 + (y + 0.5) * bh / oh - 0.5, 0.0), h - 1.0)
        ya = int(math.floor(fy))
        yb = min(ya + 1, h - 1)
        ty = fy - ya
        xx = ow - 1 - x if flip[p] else x
        fx = min(max(x0 + (xx + 0.5) * bw / ow - 0.5, 0.0), w - 1.0)
        xa = int(math.floor(fx))
        xb = min(xa + 1, w - 1)
        tx = fx - xa
        a, bb = base + (ya * w + xa) * c, base + (ya * w + xb) * c
        d, e = base + (yb * w + xa) * c, base + (yb * w + xb) * c
        for k in range(c):
            v = ((1 - ty) * ((1 - tx) * src[a + k] + tx * src[bb + k])
                 + ty * ((1 - tx) * src[d + k] + tx * src[e + k]))
            out[p, y, x, k] = float32(v) * scale[k] + shift[k]


@cuda.jit
def _cutout_cuda(cy, cx, size, fill, out):
    """augment.cutout on the device: the square of image p around (cy[p], cx[p]) set to fill."""
    b_n, oh, ow, c = out.shape
    for t in range(cuda.grid(1), b_n * oh * ow, cuda.gridsize(1)):
        p = t // (oh * ow)
        y = (t // ow) % oh
        x = t % ow
        y0, x0 = cy[p] - size // 2, cx[p] - size // 2
        if y0 <= y < y0 + size and x0 <= x < x0 + size:
            for k in range(c):
                out[p, y, x, k] = fill[k]


def fits_on_device(loader, fraction=0.25):
    """Does the split's pixel data fit comfortably (a fraction of the free device memory)?"""
    if not loader.in_memory:
        return False
    free, _ = cuda.current_context().get_memory_info()
    return loader.sources[0].pixels.nbytes <= fraction * free


class DeviceLoader:
    """Batches (x float32 on the device, y int32 on the device) of a host Loader's split."""

    def __init__(self, loader):
        if not loader.in_memory:
            raise ValueError("DeviceLoader needs the split in memory (Loader(in_memory=True))")
        self.host = loader
        src = loader.sources[0]
        self.pixels, self.offs = cuda.to_device(src.pixels), cuda.to_device(src.offs)
        self.hs, self.ws = cuda.to_device(src.hs), cuda.to_device(src.ws)
        self.labels = cuda.to_device(loader.labels.astype(np.int32))
        self.scale, self.shift = cuda.to_device(loader.scale), cuda.to_device(loader.shift)
        self.fill = cuda.to_device(np.zeros(loader.output_shape[-1], np.float32))   # cutout: the mean
        self.output_shape = loader.output_shape

    def __len__(self):
        return len(self.host)

    def batches(self, epoch, start=0, part=None):
        """As Loader.batches (part=(i, k): rows i B/k .. (i+1) B/k of each batch), on the device.

        The epoch's plan (every batch's rows, augmentation draws and labels, the same draws as the
        host Loader's) goes to the device in one copy per array at the start; each step then takes
        device views of it, so no step waits for a host-to-device copy (a synchronous copy would
        make the host wait for the GPU's queue once per step)."""
        ld = self.host
        order = ld._order(epoch)
        oh, ow, c = ld.output_shape
        plans = [ld.plan(epoch, b, order, part) for b in range(start, len(ld))]
        if not plans:
            return
        bounds = np.cumsum([0] + [len(idx) for idx, _ in plans])
        idx_all = np.concatenate([idx for idx, _ in plans])
        rows = cuda.to_device(idx_all.astype(np.int64))
        labels = cuda.to_device(ld.labels[idx_all].astype(np.int32))
        params = [cuda.to_device(np.ascontiguousarray(np.concatenate([p[k] for _, p in plans])))
                  for k in range(len(plans[0][1]))]
        kernel = _resized_crop_cuda if ld.augment == "rrc-flip" else _crop_flip_cuda
        params, cut = params[:ld.n_params], params[ld.n_params:]     # cut: cutout centres (cy, cx)
        for j in range(len(plans)):
            lo, hi = int(bounds[j]), int(bounds[j + 1])
            x = cuda.device_array((hi - lo, oh, ow, c), np.float32)
            grid = grid1d((hi - lo) * oh * ow)
            kernel[grid](self.pixels, self.offs, self.hs, self.ws, rows[lo:hi], *(a[lo:hi] for a in params),
                         self.scale, self.shift, x)
            if cut:
                _cutout_cuda[grid](cut[0][lo:hi], cut[1][lo:hi], ld.cutout, self.fill, x)
            yield x, labels[lo:hi]
