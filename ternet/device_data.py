"""Batches on the GPU, two ways.

DeviceLoader, a GPU-resident dataset split: the uint8 pixels go to the device once, and each
batch is gathered, augmented (random crop with padding and flip, or random-resized-crop and flip)
and normalised by a CUDA kernel (cutout, when asked for, by a second one). The host only draws
the batch's plan -- the same indices and the same augmentation parameters, from the same seeded
streams, as ternet.loader.Loader -- so the batches equal the host loader's (up to float rounding
of the normalisation).

StreamLoader, for a split too large to keep there (ILSVRC2012 at 224 px): the host Loader's
batches, written into page-locked buffers and copied over asynchronously on a stream of their
own, one batch ahead, so that the copy can overlap the steps before it.
Exercise: pytest tests/test_device_data.py.
"""
import collections
import itertools
import math

import numpy as np
from numba import cuda, float32

from .kernels import SIMULATOR, grid1d


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


@cuda.jit
def _mirror_cuda(x, out):
    b_n, h, w, c = x.shape
    for t in range(cuda.grid(1), b_n * h * w, cuda.gridsize(1)):
        p = t // (h * w)
        y = (t // w) % h
        i = t % w
        for k in range(c):
            out[p, y, i, k] = x[p, y, w - 1 - i, k]


def mirror_cuda(x):
    """A device NHWC batch mirrored left to right (evaluation with --eval-tta flip)."""
    out = cuda.device_array(x.shape, x.dtype)
    _mirror_cuda[grid1d(x.shape[0] * x.shape[1] * x.shape[2])](x, out)
    return out


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


_COPY_STREAM = []


def _copy_stream():
    """The process's stream for host-to-device batch copies: one that does not synchronise with
    the legacy default stream the kernels run on (numba's own streams do), so a copy can run while
    a step's kernels do. The simulator has no such streams; its copies are synchronous anyway."""
    if not _COPY_STREAM:
        if SIMULATOR:
            _COPY_STREAM.append(cuda.stream())
        else:
            from cuda.bindings import driver as drv
            cuda.current_context()
            err, handle = drv.cuStreamCreate(drv.CUstream_flags.CU_STREAM_NON_BLOCKING.value)
            if err != drv.CUresult.CUDA_SUCCESS:
                raise RuntimeError(f"cuStreamCreate(non-blocking) failed: {err!r}")
            _COPY_STREAM.append(cuda.external_stream(int(handle)))    # kept for the process's life
    return _COPY_STREAM[0]


def _event():
    return cuda.event() if SIMULATOR else cuda.event(timing=False)


class StreamLoader:
    """Batches (x float32, y int32, on the device) of a host Loader's split that is not kept on
    the GPU: the host Loader's own batches, bit for bit, moved over without stalling the step.

    The host Loader augments and normalises on its threads straight into page-locked (pinned)
    buffers; each batch goes to the device by an asynchronous copy on a copy stream that does not
    synchronise with the default stream, and the default stream waits for that copy (an event)
    before the step's kernels read the batch. Batch i+1's copy is issued when batch i is handed
    out, so it can run while the GPU still works on the steps queued before it (not yet measured
    on a GPU). A synchronous copy per step (the trainer's path before) waits for the GPU's whole
    queue, then makes the GPU wait for the host's next launches.
    Device buffers: a ring of `depth` slots (>= 3), each written again only after the default
    stream has passed the step that read it (an event recorded there when the next batch is asked
    for). Host buffers: a ring of prefetch + 3, each refilled only after its copy has finished.
    Memory: depth device batches and prefetch + 3 pinned host batches."""

    def __init__(self, loader, depth=3):
        if depth < 3:
            raise ValueError(f"StreamLoader: depth={depth}; it needs >= 3 slots (one read, one copied, one free)")
        self.host, self.output_shape, self.depth = loader, loader.output_shape, depth
        self._rows = None           # rows of the largest batch the rings hold
        self._pinned = self._slots = None
        self._views = {}

    def __len__(self):
        return len(self.host)

    def _rings(self, rows):
        if self._rows == rows:
            return
        shape = (rows, *self.output_shape)
        self._pinned = [(cuda.pinned_array(shape, np.float32), cuda.pinned_array(rows, np.int32), _event())
                        for _ in range(self.host.prefetch + 3)]
        self._slots = [(cuda.device_array(shape, np.float32), cuda.device_array(rows, np.int32), _event(), _event())
                       for _ in range(self.depth)]
        self._rows, self._views = rows, {}

    def _device_view(self, j, n):
        v = self._views.get((j, n))
        if v is None:
            dx, dy = self._slots[j][:2]
            v = self._views[j, n] = (dx[:n], dy[:n])
        return v

    def batches(self, epoch, start=0, part=None):
        """As Loader.batches (part=(i, k): rows i B/k .. (i+1) B/k of each batch), on the device."""
        ld = self.host
        self._rings(ld.batch_size // (part[1] if part else 1))
        copy, handed = _copy_stream(), collections.deque()     # handed: pinned slots, in batch order
        turn = itertools.count()

        def take(shape, dtype):
            """The next pinned slot for the host Loader to fill, once its last copy is done."""
            assert dtype == np.float32 and shape[0] <= self._rows, (shape, dtype)
            k = next(turn) % len(self._pinned)
            px, _, done = self._pinned[k]
            done.synchronize()
            handed.append(k)
            return px[:shape[0]]

        def issue(x, y, i):
            px, py, done = self._pinned[handed.popleft()]
            j, n = i % self.depth, len(y)
            dx, dy = self._device_view(j, n)
            copied, used = self._slots[j][2:]
            used.wait(copy)                      # the step that last read slot j is past
            py[:n] = y
            dx.copy_to_device(x, stream=copy)
            dy.copy_to_device(py[:n], stream=copy)
            copied.record(copy)
            done.record(copy)                    # the pinned slot may be refilled after this
            return dx, dy, copied, used

        ahead, i = None, 0
        for x, y in ld.batches(epoch, start=start, part=part, out=take):
            nxt = issue(x, y, i)
            i += 1
            if ahead is not None:
                yield from self._hand_out(ahead)
            ahead = nxt
        if ahead is not None:
            yield from self._hand_out(ahead)

    @staticmethod
    def _hand_out(batch):
        dx, dy, copied, used = batch
        copied.wait(0)                           # the default stream: the step's kernels follow the copy
        try:
            yield dx, dy
        finally:                                 # also when the consumer stops early (close)
            used.record(0)                       # everything the step queued that reads dx comes before
