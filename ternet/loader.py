"""Batches from a packed dataset: seeded shuffle, host-side augmentation, background prefetch,
exact mid-epoch resume. Every batch is a pure function of (seed, epoch, batch index).

Exercised by tests/test_loader.py; throughput in bench/bench_loader.py.
"""
import collections
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from . import augment as aug
from . import rng
from .shards import Dataset, open_dataset

AUGMENTS = ("none", "auto", "crop-flip", "crop", "rrc-flip")
CROPS = ("crop-flip", "crop")    # the augmentations that shift by up to crop_pad pixels
WINDOW_BYTES = 1 << 30   # streaming shuffle mixes this much data at a time (see _order)


@dataclass
class _Source:
    """Images of one shard (or of a whole split in memory), addressed flat for the kernels."""
    pixels: np.ndarray       # uint8 (total,)
    offs: np.ndarray         # int64 (n,): where image i starts in pixels
    hs: np.ndarray           # int32 (n,)
    ws: np.ndarray           # int32 (n,)


def _ram_available():
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 4 << 30


def resolve_augment(augment, ds):
    """The augmentation `augment` stands for on dataset ds: "auto" = crop-flip for fixed-size
    images <= 64 px, rrc-flip otherwise; any other name is itself."""
    h, w, _ = ds.image_shape
    if augment == "auto":
        return "crop-flip" if ds.layout == "fixed" and max(h, w) <= 64 else "rrc-flip"
    return augment


class Loader:
    """Batches (x, y) of one split of a packed dataset.

    augment: "none" (eval: center crop if the stored image is larger than the output), "auto",
    "crop-flip" (pad by crop_pad - random crop, horizontal flip), "crop" (the same shifts,
    no flip: for digits and other images that must not be mirrored), "rrc-flip" (random
    resized crop to the output size, flip). "auto" = crop-flip for fixed-size images <= 64 px,
    rrc-flip otherwise (resolve_augment). crop_pad: largest shift of crop-flip and crop in
    pixels; 0 = round(H/8), at least 1 (4 at 32 px); an error with the other augmentations.
    cutout: side in pixels of a square set to the mean pixel in every image (augment.cutout),
    after any of the augmentations; 0 = none. drop_last defaults to shuffle. in_memory None =
    when the split fits in half the available RAM (divided by ram_share: processes of one host that each hold a copy);
    otherwise shards are memory-mapped and read on demand. prefetch:
    batches computed ahead on background threads. output_size: side of x (default: the stored
    size). shuffle_window: images mixed at a time by the shuffle (default: all that fit in 1 GiB;
    it depends on the dataset only, so in-memory and streaming runs give the same batches).
    """

    def __init__(self, dataset, split, batch_size, *, shuffle=True, augment="auto", seed=0,
                 drop_last=None, in_memory=None, prefetch=2, threads=None, output_size=None,
                 shuffle_window=None, rrc_scale=(0.08, 1.0), ram_share=1, crop_pad=0, cutout=0):
        self.dataset = dataset if isinstance(dataset, Dataset) else open_dataset(dataset)
        ds = self.dataset
        self.split, self.batch_size, self.seed = split, int(batch_size), seed
        self.shuffle, self.prefetch = shuffle, prefetch
        self.drop_last = shuffle if drop_last is None else drop_last
        self.threads = threads or len(os.sched_getaffinity(0))
        if augment not in AUGMENTS:
            raise ValueError(f"augment={augment!r}: choose one of {AUGMENTS}")
        h, w, c = ds.image_shape
        augment = resolve_augment(augment, ds)
        if crop_pad < 0 or crop_pad and augment not in CROPS:
            raise ValueError(f"crop_pad={crop_pad}: a shift of >= 0 pixels, for augment crop-flip or crop "
                             f"(here {augment!r})")
        self.augment, self.rrc_scale = augment, rrc_scale
        if cutout < 0:
            raise ValueError(f"cutout={cutout}: the side of the square, in pixels (0 = none)")
        self.cutout = int(cutout)
        self.n_params = 2 if augment == "rrc-flip" else 3    # the crop draws; cutout's centres follow them
        self.pad = (int(crop_pad) or max(1, int(round(h / 8)))) if augment in CROPS else 0
        side = output_size or None
        self.output_shape = (side or h, side or w, c)
        ds.shards(split)    # a KeyError naming the splits there are, for a wrong name
        count = self.num_images = ds.splits[split]
        # bytes per image in RAM: the file sizes for variable-size images, pixels for fixed ones
        on_disk = sum(s["bytes"] for s in ds.manifest["splits"][split]["shards"])
        per_image = max(h * w * c, on_disk // max(count, 1))
        self.in_memory = (count * per_image <= _ram_available() // (2 * ram_share)) if in_memory is None \
            else bool(in_memory)
        self.window = shuffle_window or max(1, WINDOW_BYTES // per_image)
        self._load()
        # (scale, shift) of the kernels: x = v * scale + shift
        std = np.maximum(ds.std, 1e-6)   # a constant channel must not divide by zero
        self._norm = ((1.0 / (255.0 * std)).astype(np.float32), (-ds.mean / std).astype(np.float32))
        self._raw = (np.ones(c, np.float32), np.zeros(c, np.float32))
        self._raw_half = (np.ones(c, np.float32), np.full(c, 0.5, np.float32))
        # cutout's fill, the mean pixel: 0 once normalised, the rounded mean in raw uint8 batches
        self._cut_fill = {False: np.zeros(c, np.float32), True: np.round(255 * ds.mean).astype(np.uint8)}
        self._pool = None

    @property
    def scale(self):
        """Normalisation: x = pixel * scale + shift (float32 (C,)), as the augmentation kernels do."""
        return self._norm[0]

    @property
    def shift(self):
        return self._norm[1]

    def __len__(self):
        n, b = self.num_images, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    @property
    def num_classes(self):
        return self.dataset.num_classes

    def close(self):
        """Stop the background threads (they also end with the process)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    # ------------------------------------------------------------------------------------------

    def _load(self):
        """Labels, image sizes and one _Source per shard (memory-mapped), or one for the split."""
        ds, parts = self.dataset, []
        for i in range(len(ds.shards(self.split))):
            parts.append(ds.read_shard(self.split, i, mmap=True))
        self.labels = np.concatenate([p["labels"] for p in parts] + [np.zeros(0, np.int32)])
        self.shard_counts = [len(p["labels"]) for p in parts]
        sources = [self._source(p) for p in parts]
        self.hw = np.concatenate([np.stack([s.hs, s.ws], 1) for s in sources]
                                 + [np.zeros((0, 2), np.int32)])
        if self.in_memory:
            sources = [_concat(sources)]
        self.sources = sources
        self.starts = np.cumsum([0] + [len(s.offs) for s in sources])

    def _source(self, part):
        if "images" in part:
            im = part["images"]
            n, h, w, c = im.shape
            return _Source(np.asarray(im).reshape(-1), np.arange(n, dtype=np.int64) * (h * w * c),
                           np.full(n, h, np.int32), np.full(n, w, np.int32))
        shapes = np.asarray(part["shapes"])
        return _Source(np.asarray(part["pixels"]), np.asarray(part["offsets"][:-1], np.int64),
                       shapes[:, 0].astype(np.int32), shapes[:, 1].astype(np.int32))

    def _order(self, epoch):
        """The epoch's image order. Shards are visited in a seeded random order and grouped into
        windows of >= self.window images, each shuffled as a whole (one window = a full
        permutation). Streaming then touches one window's shards at a time; the packer's own
        seeded order keeps windows class-mixed."""
        n = self.num_images
        if not self.shuffle:
            return np.arange(n)
        gen = rng.generator(self.seed, "shuffle", epoch)
        if self.window >= n:
            return gen.permutation(n)
        starts = np.cumsum([0] + self.shard_counts)
        order, window = [], []
        for s in gen.permutation(len(self.shard_counts)):
            window.append(np.arange(starts[s], starts[s + 1]))
            if sum(len(w) for w in window) >= self.window:
                order.append(gen.permutation(np.concatenate(window)))
                window = []
        if window:
            order.append(gen.permutation(np.concatenate(window)))
        return np.concatenate(order)

    def batch_indices(self, epoch, batch, order=None):
        """Dataset indices (file order) of batch `batch` of `epoch`."""
        order = self._order(epoch) if order is None else order
        return order[batch * self.batch_size:(batch + 1) * self.batch_size]

    # ------------------------------------------------------------------------------------------

    def batches(self, epoch, start=0, raw=False, part=None, out=None):
        """Yield (x, y) for batches start..len-1 of `epoch`: x float32 (B, H, W, C) normalised
        ((x/255 - mean)/std), or uint8 un-normalised with raw=True (still augmented); y int32 (B,).
        batches(e, start=k) yields exactly what batches(e) yields from batch k on. part=(i, k):
        only rows [i B/k, (i+1) B/k) of each batch, with the augmentation drawn for the whole batch,
        so the k parts put side by side are the batch (one data-parallel rank reads one part).
        out(shape, dtype): where each batch's x is written (default: a new array), called in batch
        order, e.g. page-locked buffers for asynchronous copies to a GPU (device_data.StreamLoader)."""
        if not 0 <= start <= len(self):
            raise ValueError(f"start={start}: an epoch has {len(self)} batches")
        order = self._order(epoch)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="ternet-loader")
        pending = collections.deque()
        nxt = start
        try:
            while nxt < len(self) or pending:
                while nxt < len(self) and len(pending) <= self.prefetch:
                    pending.append(self._submit(epoch, nxt, order, raw, part, out))
                    nxt += 1
                futures, x, y = pending.popleft()
                for f in futures:
                    f.result()
                yield x, y
        finally:
            for futures, _, _ in pending:
                for f in futures:
                    f.cancel()
                    if not f.cancelled():
                        f.result()

    def plan(self, epoch, batch, order, part=None):
        """(dataset indices, augmentation parameters) of a batch, or of its part (i, k): the
        draws are made for the whole batch, then rows [i B/k, (i+1) B/k) are kept."""
        idx = self.batch_indices(epoch, batch, order)
        gen = rng.generator(self.seed, "augment", epoch, batch)
        hw = self.hw[idx]
        if self.augment == "rrc-flip":
            params = aug.draw_resized_crop(gen, hw, scale=self.rrc_scale)
        else:
            params = aug.draw_crop_flip(gen, hw, self.output_shape[:2], self.pad, self.augment == "crop-flip")
        if self.cutout:      # drawn after the crops: the crops stay those of a run without cutout
            params = (*params, *aug.draw_cutout(gen, len(idx), self.output_shape[:2]))
        if part is None:
            return idx, params
        i, k = part
        if len(idx) % k:
            raise ValueError(f"a batch of {len(idx)} does not split into {k} equal parts")
        lo, hi = i * len(idx) // k, (i + 1) * len(idx) // k
        return idx[lo:hi], tuple(a[lo:hi] for a in params)

    def _submit(self, epoch, batch, order, raw, part=None, out=None):
        """Draw the batch's augmentation, then fill x on the thread pool (split by positions)."""
        idx, params = self.plan(epoch, batch, order, part)
        oh, ow, c = self.output_shape
        x = (out or np.empty)((len(idx), oh, ow, c), np.uint8 if raw else np.float32)
        y = self.labels[idx]
        sid = np.searchsorted(self.starts, idx, side="right") - 1
        chunks = np.array_split(np.arange(len(idx)), min(self.threads, max(1, len(idx))))
        futures = [self._pool.submit(self._fill, x, idx, sid, pos, params, raw)
                   for pos in chunks if len(pos)]
        return futures, x, y

    def _fill(self, x, idx, sid, pos, params, raw):
        params, cut = params[:self.n_params], params[self.n_params:]
        for s in np.unique(sid[pos]):
            p = pos[sid[pos] == s]
            src = self.sources[s]
            rows = idx[p] - self.starts[s]
            args = (src.pixels, src.offs, src.hs, src.ws, rows, p, *params)
            if self.augment == "rrc-flip":
                # raw: scale 1, shift 0.5 rounds the interpolated value to the nearest uint8
                aug.resized_crop(*args, *(self._raw_half if raw else self._norm), x)
            else:
                aug.crop_flip(*args, *(self._raw if raw else self._norm), x)
        if cut:
            aug.cutout(x, pos, *cut, self.cutout, self._cut_fill[raw])


def _concat(sources):
    """One in-RAM _Source from several (memory-mapped) ones, copied once into a preallocation."""
    total = sum(len(s.pixels) for s in sources)
    pixels = np.empty(total, np.uint8)
    offs, at = [], 0
    for s in sources:
        pixels[at:at + len(s.pixels)] = s.pixels
        offs.append(s.offs + at)
        at += len(s.pixels)
    cat = lambda arrs, dt: np.concatenate(arrs + [np.zeros(0, dt)])   # noqa: E731
    return _Source(pixels, cat(offs, np.int64), cat([s.hs for s in sources], np.int32),
                   cat([s.ws for s in sources], np.int32))
