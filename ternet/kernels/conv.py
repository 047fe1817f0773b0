"""2-D convolution, NHWC activations and (K, KH, KW, C) int8 ternary weights.

CPU: im2col (numba, parallel over images) + float32 GEMM (BLAS); ternary values are exact in
float32 and so are their int sums below 2^24. CUDA kernels sit beside them (issue: GPU path).
Exercise: pytest tests/test_conv.py.
"""
import numba
import numpy as np
from numba import cuda, float32, int64

from . import MAX_BLOCKS, SIMULATOR, check, grid1d, on_device, scratch, stream_threads, view


def out_size(h, k, stride, pad):
    return (h + 2 * pad - k) // stride + 1


# ----------------------------------------------------------------------------------------------
# CPU implementation

@numba.njit(parallel=True, cache=True)
def _im2col(x, kh, kw, stride, pad, oh_n, ow_n, cols):
    # x (N, H, W, C) -> cols (N*OH*OW, KH*KW*C), column order (i, j, c) matches weight.reshape(K, -1).
    # Each image is converted to float32 once (int8 activations), then for one kernel row i the
    # in-bounds taps j are one contiguous run of it: copied as a slice (vectorised; an element
    # loop with the int8 conversion inside ran 4-5x slower).
    n_img, h, w, c = x.shape
    for n in numba.prange(n_img):
        xf = x[n].reshape(h * w * c).astype(np.float32)
        for oh in range(oh_n):
            for ow in range(ow_n):
                row = (n * oh_n + oh) * ow_n + ow
                iw0 = ow * stride - pad
                j0, j1 = max(0, -iw0), min(kw, w - iw0)
                for i in range(kh):
                    ih = oh * stride - pad + i
                    base = i * kw * c
                    lo, hi = base + j0 * c, base + max(j1, j0) * c
                    if ih < 0 or ih >= h:
                        lo = hi = base + kw * c
                    cols[row, base:lo] = 0
                    src = (ih * w + iw0) * c - base
                    cols[row, lo:hi] = xf[src + lo:src + hi]
                    cols[row, hi:base + kw * c] = 0


@numba.njit(parallel=True, cache=True)
def _im2col_taps(x, kh, kw, stride, pad, oh_n, ow_n, cols):
    # _im2col for few channels (the first layer): a kernel row's run of kw * c values is too short
    # to copy as a slice, so each tap (i, j, c) fills its column for one output row oh at a time
    n_img, h, w, c = x.shape
    for n in numba.prange(n_img):
        xf = x[n].astype(np.float32)
        for oh in range(oh_n):
            r0 = (n * oh_n + oh) * ow_n
            blk = cols[r0:r0 + ow_n]
            for i in range(kh):
                ih = oh * stride - pad + i
                for j in range(kw):
                    for ch in range(c):
                        e = (i * kw + j) * c + ch
                        if ih < 0 or ih >= h:
                            blk[:, e] = 0
                            continue
                        for ow in range(ow_n):
                            iw = ow * stride - pad + j
                            blk[ow, e] = xf[ih, iw, ch] if 0 <= iw < w else np.float32(0.0)


def _fill_cols(x, kh, kw, stride, pad, oh_n, ow_n, cols):
    """cols = im2col(x) by the faster kernel for this shape: tap-major for runs of kw * c below 8
    values (one channel), slices from 8 on (3 channels: slices as fast at 3x3, 1.6x faster at 5x5)."""
    fill = _im2col if kw * x.shape[3] >= 8 else _im2col_taps
    stream_threads(fill, x, kh, kw, stride, pad, oh_n, ow_n, cols)


@numba.njit(parallel=True, cache=True)
def _col2im(dcols, kh, kw, stride, pad, oh_n, ow_n, dx):
    # scatter-add dcols (N*OH*OW, KH*KW*C) back into dx (N, H, W, C); one image per thread (no
    # races), summed in a cache-resident buffer by slices, rows in order (deterministic)
    n_img, h, w, c = dx.shape
    for n in numba.prange(n_img):
        acc = np.zeros(h * w * c, np.float32)
        for oh in range(oh_n):
            for ow in range(ow_n):
                row = (n * oh_n + oh) * ow_n + ow
                iw0 = ow * stride - pad
                j0, j1 = max(0, -iw0), min(kw, w - iw0)
                for i in range(kh):
                    ih = oh * stride - pad + i
                    if ih < 0 or ih >= h or j1 <= j0:
                        continue
                    base = i * kw * c
                    dst = (ih * w + iw0) * c - base
                    lo, hi = base + j0 * c, base + j1 * c
                    acc[dst + lo:dst + hi] += dcols[row, lo:hi]
        dx[n] = acc.reshape(h, w, c)


# ----------------------------------------------------------------------------------------------
# CUDA kernels (pure numba: what the simulator runs, and the reference for faster kernels)
#
# Three implicit GEMMs over NHWC data, tiled 64 x 64 with a 16-deep reduction slice in shared
# memory and a 4 x 4 register tile per thread (256 threads):
#   forward      out[m, k] = sum_r patch(x)[m, r] * w[k, r]          m = (n, oh, ow), r = (i, j, c)
#   grad input   dx[p, c]  = sum_s dy[n, oh, ow, k] * w[k, i, j, c]  p = (n, h, w), s = (i, j, k),
#                            oh = (h + pad - i) / stride where that division is exact and in range
#   grad weight  dw[k, r]  = sum_m dy[m, k] * patch(x)[m, r], over fixed chunks of m whose partial
#                            sums a second kernel adds in a fixed order (deterministic)

TM, TN, TK = 64, 64, 16
TMP, TNP = TM + 1, TN + 1   # padded rows of the forward's tiles (shared-memory shapes must be constants)
DW_CHUNK = 1024      # rows of m per weight-gradient split, at least; a multiple of it, set by
DW_SPLITS = 512      # the shape alone (so every GPU sums alike), keeps the splits <= DW_SPLITS
                     # (512: a 3-channel first layer has 1-3 tiles of (K, R), and 128 splits left
                     # most of the GPU idle: ResNet-18's 224 px stem ran 378 blocks)
DW_MIN_BLOCKS = 264  # ... and where the (K, R) tiles times the splits are fewer blocks than this
DW_MIN_CHUNK = 64    # (two per SM of an H200), the chunk halves down to DW_MIN_CHUNK rows: a
                     # classifier's gradient (vgg-gxnor's 10 x 1024 from 512 rows: 16 tiles, one
                     # split) took 0.15 ms walking 512 rows a block


@cuda.jit(device=True, inline=True)
def _digits3(v, b, c):
    # (v // (b c), (v // c) % b, v % c): im2col row m -> (n, oh, ow) with (b, c) = (OH, OW),
    # column r -> (i, j, ch) with (b, c) = (KW, C)
    hi = v // (b * c)
    rem = v - hi * b * c
    mid = rem // c
    return hi, mid, rem - mid * c


@cuda.jit(device=True, inline=True)
def _advance3(hi, mid, lo, d, b, c):
    # the digits of v + d from those of v (as _digits3): adds and compares, no 64-bit division
    lo += d
    while lo >= c:
        lo -= c
        mid += 1
        if mid == b:
            mid = 0
            hi += 1
    return hi, mid, lo


@cuda.jit(device=True, inline=True)
def _x_at(x, n, oh, ow, i, j, ch, stride, pad):
    # im2col element (row (n, oh, ow), column (i, j, ch)); zero outside the image
    ih = oh * stride - pad + i
    iw = ow * stride - pad + j
    if ih < 0 or ih >= x.shape[1] or iw < 0 or iw >= x.shape[2]:
        return float32(0.0)
    return float32(x[n, ih, iw, ch])


@cuda.jit(device=True, inline=True)
def _dy_at(dy, p, s, h_n, w_n, kw, stride, pad):
    # element s = (i, j, k) of the transposed-conv row p = (n, h, w): dy[n, oh, ow, k] or zero
    oh_n, ow_n, k_n = dy.shape[1], dy.shape[2], dy.shape[3]
    n = p // (h_n * w_n)
    rem = p - n * h_n * w_n
    h = rem // w_n
    w = rem - h * w_n
    i = s // (kw * k_n)
    rem = s - i * kw * k_n
    j = rem // k_n
    k = rem - j * k_n
    th, tw = h + pad - i, w + pad - j
    if th < 0 or tw < 0 or th % stride != 0 or tw % stride != 0:
        return float32(0.0)
    oh, ow = th // stride, tw // stride
    if oh >= oh_n or ow >= ow_n:
        return float32(0.0)
    return dy[n, oh, ow, k]


@cuda.jit(device=True, inline=True)
def _tile_fma(As, Bs, acc, ty, tx):
    for kk in range(TK):
        a0, a1, a2, a3 = As[kk, ty * 4], As[kk, ty * 4 + 1], As[kk, ty * 4 + 2], As[kk, ty * 4 + 3]
        for q in range(4):
            b = Bs[kk, tx * 4 + q]
            acc[0, q] += a0 * b
            acc[1, q] += a1 * b
            acc[2, q] += a2 * b
            acc[3, q] += a3 * b


@cuda.jit(device=True, inline=True)
def _zero_acc(acc):
    for a in range(4):
        for b in range(4):
            acc[a, b] = float32(0.0)


@cuda.jit
def _conv_fwd_cuda(x, w, out, scale, oh_n, ow_n, kw, stride, pad):
    # x (N, H, W, C) int8 or float32; w (K, R) int8; out (M, K) float32. Each thread loads the
    # same 4 rows m of the patch tile at every step of r (rows tid // TK + 16 q) and the column
    # r0 + tid % TK: the rows' positions are found once, the column's advanced by TK per step.
    As = cuda.shared.array((TK, TMP), float32)   # + 1: the stores below run down a column
    Bs = cuda.shared.array((TK, TNP), float32)   # (16 threads a row apart): no bank conflicts
    acc = cuda.local.array((4, 4), float32)
    pos = cuda.local.array((4, 3), int64)
    tid = cuda.threadIdx.x
    ty, tx = tid // 16, tid % 16
    m0, k0 = cuda.blockIdx.x * TM, cuda.blockIdx.y * TN
    m_n, k_n, r_n = out.shape[0], out.shape[1], w.shape[1]
    c = x.shape[3]
    rr = tid % TK
    for q in range(4):
        m = min(m0 + q * 16 + tid // TK, m_n - 1)
        pos[q, 0], pos[q, 1], pos[q, 2] = _digits3(m, oh_n, ow_n)
    i, j, ch = _digits3(rr, kw, c)
    _zero_acc(acc)
    for r0 in range(0, r_n, TK):
        r = r0 + rr
        for q in range(4):
            row = q * 16 + tid // TK       # consecutive threads take consecutive r: coalesced channels
            m = m0 + row
            As[rr, row] = (_x_at(x, pos[q, 0], pos[q, 1], pos[q, 2], i, j, ch, stride, pad)
                           if m < m_n and r < r_n else float32(0.0))
            kc = k0 + row
            Bs[rr, row] = float32(w[kc, r]) if kc < k_n and r < r_n else float32(0.0)
        cuda.syncthreads()
        _tile_fma(As, Bs, acc, ty, tx)
        cuda.syncthreads()
        i, j, ch = _advance3(i, j, ch, TK, kw, c)
    for a in range(4):
        m = m0 + ty * 4 + a
        for b in range(4):
            k = k0 + tx * 4 + b
            if m < m_n and k < k_n:
                out[m, k] = acc[a, b] * scale


@cuda.jit
def _conv_dx_cuda(dy, w, dx, scale, h_n, w_n, kw, stride, pad, chunk):
    # dy (N, OH, OW, K) float32; w (K, KH, KW, C) int8; dx (splits, N*H*W, C) float32: grid layer
    # z sums the reduction's entries [z chunk, (z + 1) chunk) (all of them when there is one split)
    As = cuda.shared.array((TK, TMP), float32)   # padded as in _conv_fwd_cuda
    Bs = cuda.shared.array((TK, TN), float32)
    acc = cuda.local.array((4, 4), float32)
    tid = cuda.threadIdx.x
    ty, tx = tid // 16, tid % 16
    p0, c0, z = cuda.blockIdx.x * TM, cuda.blockIdx.y * TN, cuda.blockIdx.z
    p_n, c_n = dx.shape[1], dx.shape[2]
    k_n = dy.shape[3]
    s_lo = z * chunk
    s_n = min(w.shape[1] * kw * k_n, s_lo + chunk)
    _zero_acc(acc)
    for s0 in range(s_lo, s_n, TK):
        for q in range(4):
            e = q * 256 + tid
            ss, row = e % TK, e // TK
            p, s = p0 + row, s0 + ss
            As[ss, row] = _dy_at(dy, p, s, h_n, w_n, kw, stride, pad) if p < p_n and s < s_n else float32(0.0)
            col, ss = e % TN, e // TN     # consecutive threads take consecutive channels of w
            ch, s = c0 + col, s0 + ss
            v = float32(0.0)
            if ch < c_n and s < s_n:
                i = s // (kw * k_n)
                rem = s - i * kw * k_n
                j = rem // k_n
                v = float32(w[rem - j * k_n, i, j, ch])
            Bs[ss, col] = v
        cuda.syncthreads()
        _tile_fma(As, Bs, acc, ty, tx)
        cuda.syncthreads()
    for a in range(4):
        p = p0 + ty * 4 + a
        for b in range(4):
            ch = c0 + tx * 4 + b
            if p < p_n and ch < c_n:
                dx[z, p, ch] = acc[a, b] * scale


@cuda.jit
def _conv_dw_cuda(dy, x, part, oh_n, ow_n, kw, stride, pad, chunk):
    # dy (M, K) float32; x (N, H, W, C); part (splits, K, R) float32: split z sums its chunk of m.
    # Each thread loads the same column (tid % TM) of both tiles at every step and rows
    # tid // TM + 4 q: the column's patch position is found once, the rows' advanced by TK per step.
    As = cuda.shared.array((TK, TM), float32)
    Bs = cuda.shared.array((TK, TN), float32)
    acc = cuda.local.array((4, 4), float32)
    pos = cuda.local.array((4, 3), int64)
    tid = cuda.threadIdx.x
    ty, tx = tid // 16, tid % 16
    k0, r0, z = cuda.blockIdx.x * TM, cuda.blockIdx.y * TN, cuda.blockIdx.z
    m_n, k_n = dy.shape[0], dy.shape[1]
    r_n = part.shape[2]
    m_end = min(m_n, (z + 1) * chunk)
    col = tid % TM
    k, r = k0 + col, r0 + col
    i, j, ch = _digits3(min(r, r_n - 1), kw, x.shape[3])
    for q in range(4):
        pos[q, 0], pos[q, 1], pos[q, 2] = _digits3(z * chunk + q * 4 + tid // TM, oh_n, ow_n)
    _zero_acc(acc)
    for mb in range(z * chunk, m_end, TK):
        for q in range(4):
            mm = q * 4 + tid // TM         # consecutive threads: consecutive k of dy, r of the patch
            m = mb + mm
            As[mm, col] = dy[m, k] if m < m_end and k < k_n else float32(0.0)
            Bs[mm, col] = (_x_at(x, pos[q, 0], pos[q, 1], pos[q, 2], i, j, ch, stride, pad)
                           if m < m_end and r < r_n else float32(0.0))
            pos[q, 0], pos[q, 1], pos[q, 2] = _advance3(pos[q, 0], pos[q, 1], pos[q, 2], TK, oh_n, ow_n)
        cuda.syncthreads()
        _tile_fma(As, Bs, acc, ty, tx)
        cuda.syncthreads()
    for a in range(4):
        k = k0 + ty * 4 + a
        for b in range(4):
            r = r0 + tx * 4 + b
            if k < k_n and r < r_n:
                part[z, k, r] = acc[a, b]


@cuda.jit
def _sum_splits_cuda(part, out):
    # out[i] = sum over splits of part[z, i], in split order
    flat = out.size
    for i in range(cuda.grid(1), flat, cuda.gridsize(1)):
        k, r = i // out.shape[1], i % out.shape[1]
        s = float32(0.0)
        for z in range(part.shape[0]):
            s += part[z, k, r]
        out[k, r] = s


# Direct kernels for a first layer: few input channels, a short reduction (R = KH*KW*C <= DR_MAX:
# ResNet's 7x7x3 stem is 147, vgg-gxnor's 3x3x3 is 27). The tiled kernels above gather every
# operand from global memory with its own index arithmetic and reach ~7 TFLOP/s on the 224 px
# stem. Here a block takes a tile of DH x DW output positions of one image; the input patch the
# tile reads (zero padding included) is loaded into shared memory once, as whole contiguous image
# rows, and every product then comes from shared memory: the forward holds the layer's weights for
# DK output channels there too, the weight gradient the tile's dy. Each thread keeps 8 x 8
# (forward) or 8 x 5 (weight gradient) sums in registers. Same sums as the tiled kernels up to the
# order of the float32 additions (r in (i, j, ch) order; positions tile by tile).

DH, DW, DK = 8, 16, 64     # output rows x columns per tile, output channels per block
DR_MAX = 148               # reduction length R the kernels take (the forward's weights: DR_MAX x DK)
DX_MAX = 2336              # floats of a tile's input patch: ((DH-1) s + KH) * ((DW-1) s + KW) * C
DW_TILE_SPLITS = 512       # weight gradient: at most this many blocks of consecutive tiles per K chunk
DR_Q = 5                   # ceil(DR_MAX / 32): reduction columns per thread in the weight gradient
DW_DIRECT_MIN_R = 120      # the weight gradient's threads hold DR_Q * 32 = 160 columns: shorter
                           # reductions leave most idle and run faster tiled (vgg-gxnor's R = 27)
WS_N, DYS_N = DR_MAX * DK, DH * DW * DK     # shared-memory sizes (numba wants plain constants)


def _direct_fits(c, kh, kw, stride):
    return kh * kw * c <= DR_MAX and ((DH - 1) * stride + kh) * ((DW - 1) * stride + kw) * c <= DX_MAX


@cuda.jit(device=True, inline=True)
def _load_patch(x2, xs, row0, h, ih0, iw0, ph, pw, c, tmp):
    # xs[a * pw * c + e] = x[n, ih0 + a, iw0 + e // c, e % c] for a < ph, e < pw * c; zero outside
    # the image. x2 is x viewed (N * H, W * C) and row0 = n * H: each patch row is a contiguous run
    # of an image row, so consecutive threads read consecutive floats and nothing is divided.
    # Four rows' loads are issued before their stores (tmp: 4 floats of the thread's own).
    tid, nt = cuda.threadIdx.x, cuda.blockDim.x
    run, f0, wc = pw * c, iw0 * c, x2.shape[1]
    for e in range(tid, run, nt):
        f = f0 + e
        fok = f >= 0 and f < wc
        for a0 in range(0, ph, 4):
            for u in range(4):
                ih = ih0 + a0 + u
                v = float32(0.0)
                if a0 + u < ph and fok and ih >= 0 and ih < h:
                    v = float32(x2[row0 + ih, f])
                tmp[u] = v
            for u in range(4):
                if a0 + u < ph:
                    xs[(a0 + u) * run + e] = tmp[u]


@cuda.jit(device=True, inline=True)
def _tile_at(t, tiles_h, tiles_w):
    # tile number t -> (image, first output row, first output column)
    per = tiles_h * tiles_w
    n = t // per
    rem = t - n * per
    th = rem // tiles_w
    return n, th * DH, (rem - th * tiles_w) * DW


@cuda.jit
def _conv_fwd_direct_cuda(x2, w2, out2, scale, h, c, kh, kw, stride, pad, oh_n, ow_n, tiles_h, tiles_w):
    # x2 (N*H, W*C) float32 or int8; w2 (K, R) int8; out2 (N*OH*OW, K) float32. 128 threads:
    # thread (tp, tk) = (tid // 8, tid % 8) computes output column tp of the tile's 8 rows for
    # channels k0 + tk + 8 jj; a block strides over the tiles of all images. (Each thread's 8
    # channels side by side instead, for 16-byte shared loads, measured slower: 4.98 -> 5.20 ms on
    # the 224 px stem, 0.51 -> 0.73 ms on vgg-gxnor's first layer, thirteenth session.)
    xs = cuda.shared.array(DX_MAX, float32)
    ws = cuda.shared.array(WS_N, float32)
    acc = cuda.local.array((DH, 8), float32)
    wv = cuda.local.array(8, float32)
    tmp = cuda.local.array(4, float32)
    tid = cuda.threadIdx.x
    tk, tp = tid % 8, tid // 8
    k0, k_n, r_n = cuda.blockIdx.y * DK, w2.shape[0], w2.shape[1]
    ph, pw = (DH - 1) * stride + kh, (DW - 1) * stride + kw
    for e in range(tid, r_n * DK, cuda.blockDim.x):      # ws[r, kk] = w[k0 + kk, r]
        r = e // DK
        kk = e - r * DK
        ws[e] = float32(w2[k0 + kk, r]) if k0 + kk < k_n else float32(0.0)
    n_img = x2.shape[0] // h
    rs = stride * pw * c                                  # one output row further down the patch
    for t in range(cuda.blockIdx.x, n_img * tiles_h * tiles_w, cuda.gridDim.x):
        n, oh0, ow0 = _tile_at(t, tiles_h, tiles_w)
        cuda.syncthreads()                                # the last tile's reads are done
        _load_patch(x2, xs, n * h, h, oh0 * stride - pad, ow0 * stride - pad, ph, pw, c, tmp)
        cuda.syncthreads()
        for q in range(DH):
            for jj in range(8):
                acc[q, jj] = float32(0.0)
        r = 0
        for i in range(kh):
            for j in range(kw):
                off = (i * pw + (tp * stride + j)) * c
                for ch in range(c):
                    for jj in range(8):
                        wv[jj] = ws[r * DK + tk + 8 * jj]
                    for q in range(DH):
                        xv = xs[off + ch + q * rs]
                        for jj in range(8):
                            acc[q, jj] += xv * wv[jj]
                    r += 1
        ow = ow0 + tp
        for q in range(DH):
            oh = oh0 + q
            if oh < oh_n and ow < ow_n:
                m = (n * oh_n + oh) * ow_n + ow
                for jj in range(8):
                    k = k0 + tk + 8 * jj
                    if k < k_n:
                        out2[m, k] = acc[q, jj] * scale


@cuda.jit
def _conv_dw_direct_cuda(dy2, x2, part, h, c, kh, kw, stride, pad, oh_n, ow_n, tiles_h, tiles_w, chunk):
    # dy2 (N*OH*OW, K) float32; x2 (N*H, W*C); part (splits, K, R): block (k chunk y, split z) sums
    # tiles [z chunk, (z+1) chunk) in order. 256 threads: thread (tr, tk) = (tid // 8, tid % 8)
    # sums channels k0 + tk + 8 jj against reduction columns tr + 32 q.
    xs = cuda.shared.array(DX_MAX, float32)
    dys = cuda.shared.array(DYS_N, float32)
    acc = cuda.local.array((8, DR_Q), float32)
    roff = cuda.local.array(DR_Q, int64)
    dv = cuda.local.array(8, float32)
    tmp = cuda.local.array(4, float32)
    tid = cuda.threadIdx.x
    tk, tr = tid % 8, tid // 8
    k0, k_n, r_n = cuda.blockIdx.y * DK, dy2.shape[1], part.shape[2]
    kk, p0, pstep = tid % DK, tid // DK, cuda.blockDim.x // DK     # the dy tile's loads (256 threads)
    kok = k0 + kk < k_n
    z = cuda.blockIdx.z
    ph, pw = (DH - 1) * stride + kh, (DW - 1) * stride + kw
    for q in range(DR_Q):                                 # where column r sits in a position's patch
        r = min(tr + 32 * q, r_n - 1)
        i = r // (kw * c)
        rem = r - i * kw * c
        roff[q] = i * pw * c + rem                        # rem = j * c + ch
        for jj in range(8):
            acc[jj, q] = float32(0.0)
    n_img = x2.shape[0] // h
    t_end = min(n_img * tiles_h * tiles_w, (z + 1) * chunk)
    for t in range(z * chunk, t_end):
        n, oh0, ow0 = _tile_at(t, tiles_h, tiles_w)
        cuda.syncthreads()
        _load_patch(x2, xs, n * h, h, oh0 * stride - pad, ow0 * stride - pad, ph, pw, c, tmp)
        for pb in range(p0, DH * DW, 4 * pstep):        # dys[p, kk], zero off the image: four
            for u in range(4):                           # positions' loads before their stores
                p = pb + u * pstep
                oh, ow = oh0 + p // DW, ow0 + p % DW
                v = float32(0.0)
                if p < DH * DW and oh < oh_n and ow < ow_n and kok:
                    v = dy2[(n * oh_n + oh) * ow_n + ow, k0 + kk]
                tmp[u] = v
            for u in range(4):
                p = pb + u * pstep
                if p < DH * DW:
                    dys[p * DK + kk] = tmp[u]
        cuda.syncthreads()
        for a in range(DH):
            for b in range(DW):
                xo = (a * stride * pw + b * stride) * c
                for jj in range(8):
                    dv[jj] = dys[(a * DW + b) * DK + tk + 8 * jj]
                for q in range(DR_Q):
                    xv = xs[xo + roff[q]]
                    for jj in range(8):
                        acc[jj, q] += dv[jj] * xv
    for jj in range(8):
        k = k0 + tk + 8 * jj
        for q in range(DR_Q):
            r = tr + 32 * q
            if k < k_n and r < r_n:
                part[z, k, r] = acc[jj, q]


def _direct_grid(n, oh, ow):
    tiles_h, tiles_w = (oh + DH - 1) // DH, (ow + DW - 1) // DW
    return tiles_h, tiles_w, n * tiles_h * tiles_w


def _grid2(rows, cols):
    return ((rows + TM - 1) // TM, (cols + TN - 1) // TN)


def _conv2d_forward_cuda(out, inp, weight, scale, stride, pad, sums=False):
    from . import conv_tc
    done = conv_tc.forward(out, inp, weight, scale, stride, pad, sums)
    if done:
        return done if isinstance(done, conv_tc.ConvSums) else None
    n, oh, ow, k = out.shape
    _, kh, kw, c = weight.shape
    out2 = view(out, n * oh * ow, k)
    w2 = view(weight, k, weight.size // k)
    h = inp.shape[1]
    if _direct_fits(c, kh, kw, stride):
        tiles_h, tiles_w, tiles = _direct_grid(n, oh, ow)
        blocks = min(tiles, MAX_BLOCKS)
        _conv_fwd_direct_cuda[(blocks, (k + DK - 1) // DK), 128](
            view(inp, n * h, inp.shape[2] * c), w2, out2, np.float32(scale), h, c, kh, kw, stride, pad, oh, ow,
            tiles_h, tiles_w)
        return
    _conv_fwd_cuda[_grid2(n * oh * ow, k), 256](inp, w2, out2, np.float32(scale), oh, ow, kw, stride, pad)


def _conv2d_backward_input_cuda(dinp, dout, weight, scale, stride, pad):
    from . import conv_tc
    if isinstance(dout, conv_tc.Bf16Grad):
        check(conv_tc.backward_input(dinp, dout, weight, scale, stride, pad, dout.bits),
              "conv2d_backward_input: a bf16-only gradient needs the tensor-core path (conv_tc.takes_bf16_grad)")
        return
    if conv_tc.backward_input(dinp, dout, weight, scale, stride, pad):
        return
    n, h, w, c = dinp.shape
    kw = weight.shape[2]
    gx, gy = _grid2(n * h * w, c)
    splits, chunk = _dx_splits(gx * gy, weight.shape[0] * weight.shape[1] * kw)
    if splits == 1:
        _conv_dx_cuda[(gx, gy, 1), 256](dout, weight, view(dinp, 1, n * h * w, c), np.float32(scale), h, w, kw, stride,
                                        pad, chunk)
        return
    part = scratch("conv.dx_part", (splits, n * h * w, c), np.float32)
    _conv_dx_cuda[(gx, gy, splits), 256](dout, weight, part, np.float32(scale), h, w, kw, stride, pad, chunk)
    _sum_splits_cuda[grid1d(n * h * w * c)](part, view(dinp, n * h * w, c))


DX_BLOCKS = 2 if SIMULATOR else 264   # the tiled input gradient splits its reduction below this many tiles


def _dx_splits(blocks, s_n):
    """(splits, entries per split) of the tiled input gradient's reduction of s_n entries over
    `blocks` output tiles: one split when the tiles fill DX_BLOCKS blocks, else enough (each of at
    least 4 TK entries) to. ResNet-18's classifier (256 x 512 from 1,000 classes, 32 tiles): one
    split took 0.56 ms of a 224 px step on the H200 (sixteenth session)."""
    if blocks >= DX_BLOCKS:
        return 1, s_n
    splits = max(1, min(-(-DX_BLOCKS // blocks), -(-s_n // (4 * TK))))
    per = -(-s_n // splits)
    chunk = -(-per // TK) * TK          # whole TK tiles a split
    return -(-s_n // chunk), chunk


def _conv2d_backward_weight_cuda(dweight, dout, inp, stride, pad):
    from . import conv_tc
    n, oh, ow, k = dout.shape
    kh, kw = dweight.shape[1], dweight.shape[2]
    m, r = n * oh * ow, dweight.size // k
    only16 = isinstance(dout, conv_tc.Bf16Grad)
    part = conv_tc.backward_weight_partials(dout, inp, stride, pad, kh, kw, dout.bits if only16 else None)
    check(part is not None or not only16,
          "conv2d_backward_weight: a bf16-only gradient needs the tensor-core path (conv_tc.takes_bf16_grad)")
    c, h = inp.shape[3], inp.shape[1]
    if part is None and _direct_fits(c, kh, kw, stride) and r >= DW_DIRECT_MIN_R:
        tiles_h, tiles_w, tiles = _direct_grid(n, oh, ow)
        chunk = -(-tiles // DW_TILE_SPLITS)
        splits = -(-tiles // chunk)
        part = scratch("conv.dw_part", (splits, k, r), np.float32)
        _conv_dw_direct_cuda[(1, (k + DK - 1) // DK, splits), 256](
            view(dout, m, k), view(inp, n * h, inp.shape[2] * c), part, h, c, kh, kw, stride, pad, oh, ow,
            tiles_h, tiles_w, chunk)
    elif part is None:
        gx, gy = _grid2(k, r)
        chunk = DW_CHUNK * -(-m // (DW_CHUNK * DW_SPLITS))
        while chunk > DW_MIN_CHUNK and gx * gy * -(-m // chunk) < DW_MIN_BLOCKS:
            chunk //= 2
        splits = (m + chunk - 1) // chunk
        part = scratch("conv.dw_part", (splits, k, r), np.float32)
        _conv_dw_cuda[(gx, gy, splits), 256](view(dout, m, k), inp, part, oh, ow, kw, stride, pad, chunk)
    dw2 = view(dweight, k, r)
    _sum_splits_cuda[grid1d(k * r)](part, dw2)


def _as_float_weight(weight, scale):
    # BLAS wants float operands: a transient float32 expansion of the int8 states (exact values)
    wf = weight.reshape(weight.shape[0], -1).astype(np.float32)
    if scale != 1.0:
        wf *= np.float32(scale)
    return wf


# ----------------------------------------------------------------------------------------------
# launchers

def conv2d_forward(out, inp, weight, scale, stride, pad, cols=None, sums=False):
    """out = conv(inp, scale * weight); overwrites out.

    inp (N, H, W, C) float32, or int8 for ternary activations; weight (K, KH, KW, C) int8 states; out (N, OH, OW, K) float32.
    cols: optional (N*OH*OW, KH*KW*C) float32 buffer; when given it is left holding the im2col
    matrix, which conv2d_backward_weight can reuse (the host path returns it).
    sums (device): returns out's per-channel sums (conv_tc.ConvSums) for the batch norm after it
    where the tensor-core int8 kernel ran (ternary inputs; exact) or the first-layer one (float32
    images; float64 sums), else None.
    """
    n, h, w, c = inp.shape
    k, kh, kw, wc = weight.shape
    check(wc == c, f"conv2d: input has {c} channels, weight expects {wc}")
    oh, ow = out_size(h, kh, stride, pad), out_size(w, kw, stride, pad)
    check(out.shape == (n, oh, ow, k), f"conv2d: out shape {out.shape} != {(n, oh, ow, k)}")
    if on_device(out, inp, weight):
        return _conv2d_forward_cuda(out, inp, weight, scale, stride, pad, sums)
    if cols is None:
        cols = np.empty((n * oh * ow, kh * kw * c), np.float32)
    _fill_cols(inp, kh, kw, stride, pad, oh, ow, cols)
    np.matmul(cols, _as_float_weight(weight, scale).T, out=out.reshape(n * oh * ow, k))
    return cols


def _grad_array(a):
    from .conv_tc import grad_array       # (imported where used, as conv_tc is throughout this module)
    return grad_array(a)


def conv2d_backward_input(dinp, dout, weight, scale, stride, pad, dcols=None):
    """dinp = conv_transpose(dout, scale * weight); overwrites dinp (N, H, W, C) float32.
    dcols: optional (N*OH*OW, KH*KW*C) float32 scratch for the host path. dout may be a
    conv_tc.Bf16Grad (device)."""
    n, oh, ow, k = dout.shape
    _, kh, kw, c = weight.shape
    check(dinp.shape[0] == n and dinp.shape[3] == c, "conv2d_backward_input: shape mismatch")
    if on_device(dinp, _grad_array(dout), weight):
        return _conv2d_backward_input_cuda(dinp, dout, weight, scale, stride, pad)
    if dcols is None:
        dcols = np.empty((n * oh * ow, kh * kw * c), np.float32)
    np.matmul(dout.reshape(n * oh * ow, k), _as_float_weight(weight, scale), out=dcols)
    stream_threads(_col2im, dcols, kh, kw, stride, pad, oh, ow, dinp)


def conv2d_backward_weight(dweight, dout, inp, stride, pad, cols=None):
    """dweight = d loss / d (weight value) = sum over positions of dout x patch; overwrites
    dweight (K, KH, KW, C) float32. inp may be float32 or int8 (ternary activations).

    cols: the im2col matrix left by conv2d_forward for this input (recomputed when None). dout
    may be a conv_tc.Bf16Grad (device).
    """
    n, oh, ow, k = dout.shape
    _, kh, kw, c = dweight.shape
    if on_device(dweight, _grad_array(dout), inp):
        return _conv2d_backward_weight_cuda(dweight, dout, inp, stride, pad)
    if cols is None:
        cols = np.empty((n * oh * ow, kh * kw * c), np.float32)
        _fill_cols(inp, kh, kw, stride, pad, oh, ow, cols)
    dw = dweight.reshape(k, kh * kw * c)
    np.matmul(dout.reshape(n * oh * ow, k).T, cols, out=dw)
