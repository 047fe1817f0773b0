"""Host-side augmentation kernels for the loader: crop with padding + flip, and random-resized-crop
+ flip, fused with the gather from the shard arrays and the normalisation, in one pass per image;
cutout on the filled batch.

Images are addressed flat (pixels, offset, h, w), so fixed-size and variable-size shards share
the kernels; one row of output is one flat loop (no per-channel modulo), which vectorises. Kernels are nogil, not parallel=True: the loader runs them on its own threads, which
stays safe next to the model's parallel kernels. Tested in tests/test_loader.py.
"""
import math

import numba
import numpy as np

# ----------------------------------------------------------------------------------------------
# CPU kernels


@numba.njit(nogil=True, cache=True)
def _per_value(scale, shift, ow):
    """scale and shift tiled along a row of ow pixels, so row loops index them without a modulo."""
    c = scale.size
    sc, sh = np.empty(ow * c, np.float32), np.empty(ow * c, np.float32)
    for i in range(ow * c):
        sc[i], sh[i] = scale[i % c], shift[i % c]
    return sc, sh


@numba.njit(nogil=True, cache=True)
def crop_flip(src, offs, hs, ws, rows, pos, oy, ox, flip, scale, shift, out):
    """out[p] = flip?(window of image rows[j] at (oy[p], ox[p]), zero outside) * scale + shift.

    src uint8 flat pixels; offs int64, hs/ws int32 (N,): where image r starts and its size.
    rows (k,): images to take; pos (k,): their batch positions. oy, ox int (B,): top-left of the
    output window in image coordinates (negative or past the edge reads zeros: the padding).
    flip bool (B,). scale, shift float32 (C,): 1/(255 std) and -mean/std normalise; 1 and 0 give
    the raw pixels (out uint8). out (B, OH, OW, C) C-contiguous, overwritten at positions pos.
    """
    # Loops run over slices from 0: with a possibly negative index numba must test for
    # wrap-around at every access, which stops LLVM vectorising (measured 8x slower).
    _, oh, ow, c = out.shape
    n = ow * c
    flat = out.reshape(-1)
    sc, sh = _per_value(scale, shift, ow)
    rev = np.empty(n, np.uint32)    # flip: where output value i reads from (unsigned, as above)
    for j in range(rows.size):
        r, p = rows[j], pos[j]
        base, h, w, dx = offs[r], hs[r], ws[r], ox[pos[j]]
        # output columns [x0, x1) read inside the image; the rest is padding
        if flip[p]:
            x0, x1 = max(0, ow + dx - w), min(ow, ow + dx)
        else:
            x0, x1 = max(0, -dx), min(ow, w - dx)
        x0 = min(x0, ow)
        x1 = max(x0, x1)
        a, b, m = x0 * c, x1 * c, (x1 - x0) * c
        if flip[p]:
            for x in range(x1 - x0):
                for k in range(c):
                    rev[x * c + k] = m - c - x * c + k
        for y in range(oh):
            orow = flat[(p * oh + y) * n:(p * oh + y + 1) * n]
            sy = y + oy[p]
            if sy < 0 or sy >= h:
                orow[:] = sh
                continue
            orow[:a] = sh[:a]
            orow[b:] = sh[b:]
            oseg, sseg, hseg = orow[a:b], sc[a:b], sh[a:b]
            if flip[p]:     # the same pixels, in reverse order
                at = base + (sy * w + ow - x1 + dx) * c
                srow = src[at:at + m]
                for i in range(m):
                    oseg[i] = srow[rev[i]] * sseg[i] + hseg[i]
            else:
                at = base + (sy * w + x0 + dx) * c
                srow = src[at:at + m]
                for i in range(m):
                    oseg[i] = srow[i] * sseg[i] + hseg[i]


@numba.njit(nogil=True, cache=True)
def resized_crop(src, offs, hs, ws, rows, pos, boxes, flip, scale, shift, out):
    """out[p] = flip?(bilinear resize of the box (y0, x0, bh, bw) = boxes[p] of image rows[j]
    to (OH, OW)) * scale + shift. Pixel centres map as in align_corners=False; an integer box of
    the output size is an exact copy. For raw uint8 out pass scale 1, shift 0.5 (rounds).
    Other arguments as crop_flip; boxes float64 (B, 4)."""
    _, oh, ow, c = out.shape
    n = ow * c
    flat = out.reshape(-1)
    sc, sh = _per_value(scale, shift, ow)
    ia, ib = np.empty(n, np.uint32), np.empty(n, np.uint32)   # unsigned: no wrap-around tests
    t = np.empty(n, np.float32)
    for j in range(rows.size):
        r, p = rows[j], pos[j]
        base, h, w = offs[r], hs[r], ws[r]
        y0, x0, bh, bw = boxes[p, 0], boxes[p, 1], boxes[p, 2], boxes[p, 3]
        for x in range(ow):     # the column taps are the same for every row: find them once
            xx = ow - 1 - x if flip[p] else x
            fx = min(max(x0 + (xx + 0.5) * bw / ow - 0.5, 0.0), w - 1.0)
            xa = int(math.floor(fx))
            for k in range(c):
                ia[x * c + k], ib[x * c + k] = xa * c + k, min(xa + 1, w - 1) * c + k
                t[x * c + k] = fx - xa
        for y in range(oh):
            fy = min(max(y0 + (y + 0.5) * bh / oh - 0.5, 0.0), h - 1.0)
            ya = int(math.floor(fy))
            ty = np.float32(fy - ya)
            top = src[base + ya * w * c:base + (ya + 1) * w * c]
            yb = min(ya + 1, h - 1)
            bot = src[base + yb * w * c:base + (yb + 1) * w * c]
            orow = flat[(p * oh + y) * n:(p * oh + y + 1) * n]
            for i in range(n):
                u = top[ia[i]] + t[i] * (np.float32(top[ib[i]]) - top[ia[i]])
                d = bot[ia[i]] + t[i] * (np.float32(bot[ib[i]]) - bot[ia[i]])
                orow[i] = (u + ty * (d - u)) * sc[i] + sh[i]


@numba.njit(nogil=True, cache=True)
def cutout(x, pos, cy, cx, size, fill):
    """Cutout (DeVries & Taylor 2017): in place, the size x size square centred at (cy[p], cx[p])
    of image p of x (B, H, W, C), for p in pos, set to fill (C,) -- the mean pixel: 0 in
    normalised batches. The square's top-left is (cy - size // 2, cx - size // 2); it is clipped
    at the image's edges, so a centre near an edge cuts out less."""
    _, h, w, c = x.shape
    for p in pos:
        y0, x0 = cy[p] - size // 2, cx[p] - size // 2
        for y in range(max(0, y0), min(h, y0 + size)):
            for xx in range(max(0, x0), min(w, x0 + size)):
                for k in range(c):
                    x[p, y, xx, k] = fill[k]


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


def draw_cutout(gen, n, out_hw):
    """(cy, cx) int64 (n,): cutout centres, uniform over the output image's pixels."""
    return gen.integers(0, out_hw[0], size=n), gen.integers(0, out_hw[1], size=n)


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

