"""Host-side augmentation kernels for the loader: crop with padding + flip, and random-resized-crop
+ flip, fused with the gather from the shard arrays and the normalisation, in one pass per image.

Images are addressed flat (pixels, offset, h, w), so fixed-size and variable-size shards share
the kernels. Kernels are nogil, not parallel=True: the loader runs them on its own threads, which
stays safe next to the model's parallel kernels. Tested in tests/test_loader.py.
"""
import math

import numba
import numpy as np

# ----------------------------------------------------------------------------------------------
# CPU kernels


@numba.njit(nogil=True, cache=True)
def crop_flip(src, offs, hs, ws, rows, pos, oy, ox, flip, scale, shift, raw, out):
    """out[p] = normalize(flip?(window of image rows[j] at (oy[p], ox[p]), zero outside)).

    src uint8 flat pixels; offs int64, hs/ws int32 (N,): where image r starts and its size.
    rows (k,): images to take; pos (k,): their batch positions. oy, ox int (B,): top-left of the
    output window in image coordinates (negative or past the edge reads zeros: the padding).
    flip bool (B,). scale, shift float32 (C,): x/255 normalised is v * scale + shift; raw=True
    writes v itself. out (B, OH, OW, C) float32 or uint8 (raw); overwritten at positions pos.
    """
    _, oh, ow, c = out.shape
    for j in range(rows.size):
        r, p = rows[j], pos[j]
        base, h, w = offs[r], hs[r], ws[r]
        for y in range(oh):
            sy = y + oy[p]
            inside_y = 0 <= sy < h
            for x in range(ow):
                sx = (ow - 1 - x if flip[p] else x) + ox[p]
                at = base + (sy * w + sx) * c
                inside = inside_y and 0 <= sx < w
                if raw:
                    for k in range(c):
                        out[p, y, x, k] = src[at + k] if inside else 0
                else:
                    for k in range(c):
                        out[p, y, x, k] = src[at + k] * scale[k] + shift[k] if inside else shift[k]


@numba.njit(nogil=True, cache=True)
def resized_crop(src, offs, hs, ws, rows, pos, boxes, flip, scale, shift, raw, out):
    """out[p] = normalize(flip?(bilinear resize of the box (y0, x0, bh, bw) = boxes[p] of image
    rows[j] to (OH, OW))). Pixel centres map as in align_corners=False; an integer box of the
    output size is an exact copy. Other arguments as crop_flip; boxes float64 (B, 4)."""
    _, oh, ow, c = out.shape
    for j in range(rows.size):
        r, p = rows[j], pos[j]
        base, h, w = offs[r], hs[r], ws[r]
        y0, x0, bh, bw = boxes[p, 0], boxes[p, 1], boxes[p, 2], boxes[p, 3]
        for y in range(oh):
            fy = min(max(y0 + (y + 0.5) * bh / oh - 0.5, 0.0), h - 1.0)
            ya = int(math.floor(fy))
            yb = min(ya + 1, h - 1)
            ty = fy - ya
            for x in range(ow):
                xx = ow - 1 - x if flip[p] else x
                fx = min(max(x0 + (xx + 0.5) * bw / ow - 0.5, 0.0), w - 1.0)
                xa = int(math.floor(fx))
                xb = min(xa + 1, w - 1)
                tx = fx - xa
                a, b = base + (ya * w + xa) * c, base + (ya * w + xb) * c
                d, e = base + (yb * w + xa) * c, base + (yb * w + xb) * c
                for k in range(c):
                    v = ((1 - ty) * ((1 - tx) * src[a + k] + tx * src[b + k])
                         + ty * ((1 - tx) * src[d + k] + tx * src[e + k]))
                    out[p, y, x, k] = v + 0.5 if raw else v * scale[k] + shift[k]


# ----------------------------------------------------------------------------------------------
# parameter draws (host, vectorised; every draw comes from the batch's own generator)


def draw_crop_flip(gen, hw, out_hw, pad, flip=True):
    """(oy, ox, flip) for random crops of out_hw from images of sizes hw (B, 2) padded by pad:
    the window's top-left is the centred position shifted by up to +-pad in each axis."""
    oh, ow = out_hw
    shift = gen.integers(-pad, pad + 1, size=(len(hw), 2)) if pad else np.zeros((len(hw), 2), int)
    oy = (hw[:, 0] - oh) // 2 + shift[:, 0]
    ox = (hw[:, 1] - ow) // 2 + shift[:, 1]
    flips = gen.random(len(hw)) < 0.5 if flip else np.zeros(len(hw), bool)
    return oy.astype(np.int64), ox.astype(np.int64), flips


def draw_resized_crop(gen, hw, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), tries=10):
    """(boxes float64 (B, 4) = y0, x0, bh, bw; flip bool (B,)): random-resized-crop boxes as in
    Szegedy et al. 2015 / torchvision: area fraction U(scale), log aspect ratio U(log ratio), the
    first of `tries` draws that fits, else the whole image with its ratio clamped to `ratio`."""
    n = len(hw)
    h, w = hw[:, 0:1].astype(np.float64), hw[:, 1:2].astype(np.float64)
    area = h * w * gen.uniform(scale[0], scale[1], size=(n, tries))
    ar = np.exp(gen.uniform(math.log(ratio[0]), math.log(ratio[1]), size=(n, tries)))
    bw, bh = np.round(np.sqrt(area * ar)), np.round(np.sqrt(area / ar))
    ok = (bw >= 1) & (bh >= 1) & (bw <= w) & (bh <= h)
    first = np.argmax(ok, axis=1)
    found = ok[np.arange(n), first]
    bh, bw = bh[np.arange(n), first], bw[np.arange(n), first]
    h, w = h[:, 0], w[:, 0]
    fh = np.where(w / h < ratio[0], np.round(w / ratio[0]), h)
    fw = np.where(w / h > ratio[1], np.round(h * ratio[1]), w)
    bh, bw = np.where(found, bh, np.minimum(fh, h)), np.where(found, bw, np.minimum(fw, w))
    u = gen.random((n, 2))
    y0 = np.where(found, np.floor(u[:, 0] * (h - bh + 1)), (h - bh) // 2)
    x0 = np.where(found, np.floor(u[:, 1] * (w - bw + 1)), (w - bw) // 2)
    flips = gen.random(n) < 0.5
    return np.stack([y0, x0, bh, bw], axis=1), flips

