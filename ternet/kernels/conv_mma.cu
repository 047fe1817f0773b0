// Tensor-core implicit-GEMM convolutions for ternet (sm_80+: cp.async, ldmatrix, mma.sync),
// linked into numba kernels with cuda.declare_device(..., link=...) (see conv_tc.py).
// Each function below is a whole thread block's work, called once by a one-line numba kernel
// launched with 256 threads; the numba kernels in conv.py compute the same functions and are
// the reference these are tested against (tests/test_gpu_full.py, bench/mma_check.py).
//
//   conv_fwd_s8:   out[m, k]  = scale * sum_r x[patch(m, r)] * w[k, r]      int8 x int8 -> int32
//   conv_fwd_bf16: the same on bf16 operands, fp32 accumulation (used for the input gradient:
//                  dx = conv(dy dilated by the stride, flipped transposed w), stride 1)
//   conv_dw_bf16:  part[z, k, r] = sum over rows m of split z of dy[m, k] * x[patch(m, r)]
//                  (conv_dw_bf16_64: 64 output channels per block, for K <= 64)
//
// Data are NHWC. m = (n, oh, ow) and r = (i, j, c) as in conv.py. Forward: block tile 128 (m) x
// BN (k), 64 bytes of the reduction per stage (one im2col tap, so x rows are contiguous: C * elem
// % 64 == 0), 3-stage cp.async pipeline, 8 warps as 4 (m) x 2 (k), XOR-swizzled shared memory.
// The forward's main loop holds no division: addresses are stepped from one stage to the next (a
// loop of 412 SASS instructions for 32 mma per warp became 163: python bench/sass_count.py, sm_90).

typedef unsigned short bf16_t;

template <bool B, class T, class F> struct pick { typedef T type; };
template <class T, class F> struct pick<false, T, F> { typedef F type; };

struct Geom {        // mirrors conv_tc.GEOM
    int n, h, w, c, k, kh, kw, oh, ow, stride, pad, m, r, chunk, dil;
};

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
    // valid == false: 16 zero bytes (src-size 0 reads nothing) -- padding and tile edges
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"(smem_addr(smem)), "l"(gmem), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;\n" :: "n"(N)); }

__device__ __forceinline__ void ldm_x4(unsigned* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldm_x4_t(unsigned* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}

__device__ __forceinline__ void mma_s8(int* d, const unsigned* a, const unsigned* b) {
    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void mma_bf16(float* d, const unsigned* a, const unsigned* b) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// 64-byte rows hold 4 chunks of 16 bytes; swizzling the chunk by (row >> 1) & 3 makes the 8 rows
// an ldmatrix reads at one logical chunk hit 8 different bank groups.
__device__ __forceinline__ int swz64(int row, int chunk) { return row * 64 + ((chunk ^ ((row >> 1) & 3)) << 4); }

// a warp's accumulators: 2 m16 tiles x NT n8 tiles x 4 values
template <class T, int NT>
__device__ __forceinline__ void zero_acc(T (&acc)[2][NT][4]) {
    #pragma unroll
    for (int a = 0; a < 2; ++a)
        #pragma unroll
        for (int b = 0; b < NT; ++b)
            #pragma unroll
            for (int q = 0; q < 4; ++q) acc[a][b][q] = 0;
}

// a weight gradient's accumulators to dst (K, R): rows k0 + (m16 tiles), columns r0 + (n8 tiles)
template <int NT>
__device__ __forceinline__ void store_dw(float* dst, const float (&acc)[2][NT][4], int k0, int r0, const Geom& g) {
    const int lane = threadIdx.x & 31, gq = lane >> 2, tq = lane & 3;
    #pragma unroll
    for (int mt = 0; mt < 2; ++mt)
        #pragma unroll
        for (int nt = 0; nt < NT; ++nt)
            #pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                int k = k0 + mt * 16 + gq + hh * 8, r = r0 + nt * 8 + tq * 2;
                if (k >= g.k) continue;
                if (r < g.r) dst[(long)k * g.r + r] = acc[mt][nt][2 * hh];
                if (r + 1 < g.r) dst[(long)k * g.r + r + 1] = acc[mt][nt][2 * hh + 1];
            }
}

// ------------------------------------------------------------------------------------------------
// forward-style implicit GEMM: out (M, K) = scale * patches(x) (M, R) . w (K, R)^T
//
// The loader walks the reduction in order, one 64-byte stage at a time: its tap (ti, tj) and
// channel offset tc are counters stepped once per stage (no division in the main loop), each
// thread's two im2col rows keep their image's base pointer, and the weight rows a pointer that
// moves 64 bytes a stage. DIL is the dilation of the input as a template constant (1, or 2 for
// the input gradient of a stride-2 layer). With DIL == 2 the output rows are split by the parity
// of their (y, x), one parity per blockIdx.z: the rows of one parity see input pixels only
// through the taps (i, j) of one parity, so the other taps, whose products are all zero, are
// skipped (a 3x3 layer does 9 taps per 4 output pixels instead of 36).

constexpr int FWD_BM = 128, FWD_STAGES = 3;

// The integer forward's per-channel sums for the batch norm after it (conv_tc.ConvSums): this
// block's sum of acc and of acc^2 over its 128 rows (rows past M hold zeros: the loader fills them
// so), for each of its BN channels, to sums[(k * K + n) * gridDim.x + blockIdx.x], k = 0, 1.
// Integers: the batch norm's statistics come out the same whatever order they are added in. Each
// thread's 4 rows of a column in 32 bits (|a| <= 32767, conv_tc's bound: 4 a^2 < 2^32), the
// block's 32 row groups through shared memory (the first half of the columns in As, the second in
// Bs: free once the main loop is done), then one thread a (column, sum) adds them up. (Warp
// shuffles instead of the shared memory: 0.08 ms slower a resnet18 224 px step.)
constexpr int SUMS_PAD = 33;    // words per (column, sum) row: the readers' 32 loads without conflicts
template <int BN, int NT>
__device__ __forceinline__ void channel_sums(const int (&acc)[2][NT][4], long long* sums, char* as, char* bs,
                                             const Geom& g, int n0, int wn0) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gq = lane >> 2, tq = lane & 3;
    // [BN / 2 columns][2][SUMS_PAD] in each of As, Bs (16.9 KB of their 24 at BN = 128)
    auto red = [&](int col, int k) {
        unsigned* half = reinterpret_cast<unsigned*>(col < BN / 2 ? as : bs);
        return half + ((col % (BN / 2)) * 2 + k) * SUMS_PAD;
    };
    const int grp = (warp & 3) * 8 + gq;                     // this thread's row group, of 32
    __syncthreads();
    #pragma unroll
    for (int nt = 0; nt < NT; ++nt)
        #pragma unroll
        for (int e = 0; e < 2; ++e) {
            int s = 0;
            unsigned q = 0;
            #pragma unroll
            for (int mt = 0; mt < 2; ++mt)
                #pragma unroll
                for (int hh = 0; hh < 2; ++hh) {
                    int v = acc[mt][nt][2 * hh + e];
                    s += v;
                    q += unsigned(v * v);
                }
            int col = wn0 + nt * 8 + tq * 2 + e;
            red(col, 0)[grp] = unsigned(s);
            red(col, 1)[grp] = q;
        }
    __syncthreads();
    for (int i = tid; i < 2 * BN; i += 256) {
        int col = i >> 1, k = i & 1, n = n0 + col;
        if (n >= g.k) continue;
        long long t = 0;
        #pragma unroll 8
        for (int r = 0; r < 32; ++r) {
            unsigned u = red(col, k)[r];
            t += k ? (long long)u : (long long)int(u);
        }
        sums[((long)k * g.k + n) * gridDim.x + blockIdx.x] = t;
    }
}

template <int BN, bool BF16, int DIL>
__device__ __forceinline__ void conv_fwd(const char* x, const char* w, float* out, const Geom& g, float scale,
                                         char (*As)[FWD_BM * 64], char (*Bs)[128 * 64], long long* sums) {
    constexpr int BM = FWD_BM, STAGES = FWD_STAGES, E = BF16 ? 2 : 1, STEP = 64 / E;
    constexpr int NT = BN / 16;                 // n8 tiles per warp (warp covers BN / 2 columns)
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm0 = (warp & 3) * 32, wn0 = (warp >> 2) * (BN / 2);
    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    const int chunk = tid & 3;
    constexpr int TSTEP = DIL == 2 ? 2 : 1;     // tap step
    // this block's output rows: all of them, or (DIL == 2) those of parity (py, px), hp x wp
    // per image; the taps (ti0 + TSTEP a, tj0 + TSTEP b) that reach them
    int py = 0, px = 0, hp = g.oh, wp = g.ow, rows = g.m, ti0 = 0, tj0 = 0, kt_n = (g.r * E) / 64;
    if (DIL == 2) {
        py = blockIdx.z >> 1;
        px = blockIdx.z & 1;
        hp = (g.oh - py + 1) >> 1;
        wp = (g.ow - px + 1) >> 1;
        rows = g.n * hp * wp;
        ti0 = (g.pad - py) & 1;                 // (y - pad + i) even for y of parity py
        tj0 = (g.pad - px) & 1;
        kt_n = ((g.kh - ti0 + 1) >> 1) * ((g.kw - tj0 + 1) >> 1) * (g.c * E / 64);
    }
    if (m0 >= rows) return;                     // (the whole block: parities differ in size)
    // output row of this block's row index m (m < rows)
    auto out_row = [&](int m) {
        if (DIL != 2) return m;
        int img = m / (hp * wp), rem = m - img * hp * wp, yy = rem / wp;
        return (img * g.oh + 2 * yy + py) * g.ow + 2 * (rem - yy * wp) + px;
    };

    // each thread copies the same two im2col rows (tid/4 and tid/4 + 64) at every stage
    const char* xrow[2];
    int oy[2], ox[2];
    bool live[2];
    #pragma unroll
    for (int h = 0; h < 2; ++h) {
        int m = m0 + (tid >> 2) + h * 64;
        live[h] = m < rows;
        int mo = out_row(live[h] ? m : 0);
        int img = mo / (g.oh * g.ow);
        int rem = mo - img * g.oh * g.ow;
        oy[h] = (rem / g.ow) * g.stride - g.pad;
        ox[h] = (rem % g.ow) * g.stride - g.pad;
        xrow[h] = x + (long)img * g.h * g.w * g.c * E + chunk * 16;
    }
    const char* wrow[BN / 64];
    bool wlive[BN / 64];
    #pragma unroll
    for (int h = 0; h < BN / 64; ++h) {
        int n = n0 + (tid >> 2) + h * 64;
        wlive[h] = n < g.k;
        wrow[h] = w + (long)(wlive[h] ? n : 0) * g.r * E + chunk * 16;
    }
    int ti = ti0, tj = tj0, tc = 0;             // the next stage's tap and channel offset

    auto load = [&](int stage) {
        const int wb = ((ti * g.kw + tj) * g.c + tc) * E;
        #pragma unroll
        for (int h = 0; h < 2; ++h) {
            int row = (tid >> 2) + h * 64;
            // DIL > 1: the input is seen dilated (DIL - 1 zeros between its pixels), which turns
            // the input gradient of a strided convolution into a stride-1 one
            int ih = oy[h] + ti, iw = ox[h] + tj;
            bool ok = live[h] && ih >= 0 && iw >= 0;
            if (DIL == 2) {
                ok = ok && ((ih | iw) & 1) == 0;
                ih >>= 1;
                iw >>= 1;
            }
            ok = ok && ih < g.h && iw < g.w;
            const char* src = ok ? xrow[h] + ((ih * g.w + iw) * g.c + tc) * E : x;
            cp_async16(&As[stage][swz64(row, chunk)], src, ok);
        }
        #pragma unroll
        for (int h = 0; h < BN / 64; ++h) {
            int row = (tid >> 2) + h * 64;
            cp_async16(&Bs[stage][swz64(row, chunk)], wlive[h] ? wrow[h] + wb : w, wlive[h]);
        }
        tc += STEP;
        if (tc == g.c) {
            tc = 0;
            tj += TSTEP;
            if (tj >= g.kw) {
                tj = tj0;
                ti += TSTEP;
            }
        }
    };

    typedef typename pick<BF16, float, int>::type acc_t;
    acc_t acc[2][NT][4];
    zero_acc(acc);

    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < kt_n) load(s);
        cp_commit();
    }
    int st = 0, ld = STAGES - 1;                // the stage computed and the stage loaded next
    for (int kt = 0; kt < kt_n; ++kt) {
        cp_wait<STAGES - 2>();
        __syncthreads();
        const char* a_st = As[st];
        const char* b_st = Bs[st];
        #pragma unroll
        for (int ks = 0; ks < 2; ++ks) {        // two 32-byte reduction steps per stage
            unsigned af[2][4], bfr[NT][2];
            #pragma unroll
            for (int mt = 0; mt < 2; ++mt) {
                int q = lane >> 3, row = wm0 + mt * 16 + (q & 1) * 8 + (lane & 7);
                ldm_x4(af[mt], a_st + swz64(row, 2 * ks + (q >> 1)));
            }
            #pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                int q = lane >> 3, row = wn0 + np * 16 + (q >> 1) * 8 + (lane & 7);
                unsigned t[4];
                ldm_x4(t, b_st + swz64(row, 2 * ks + (q & 1)));
                bfr[2 * np][0] = t[0]; bfr[2 * np][1] = t[1];
                bfr[2 * np + 1][0] = t[2]; bfr[2 * np + 1][1] = t[3];
            }
            #pragma unroll
            for (int mt = 0; mt < 2; ++mt)
                #pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    if constexpr (BF16) mma_bf16(acc[mt][nt], af[mt], bfr[nt]);
                    else mma_s8(acc[mt][nt], af[mt], bfr[nt]);
                }
        }
        if (kt + STAGES - 1 < kt_n) load(ld);
        cp_commit();
        st = st == STAGES - 1 ? 0 : st + 1;
        ld = ld == STAGES - 1 ? 0 : ld + 1;
    }
    cp_wait<0>();

    const int gq = lane >> 2, tq = lane & 3;
    #pragma unroll
    for (int mt = 0; mt < 2; ++mt)
        #pragma unroll
        for (int nt = 0; nt < NT; ++nt)
            #pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                int m = m0 + wm0 + mt * 16 + gq + hh * 8;
                int n = n0 + wn0 + nt * 8 + tq * 2;
                if (m >= rows) continue;
                long o = (long)out_row(m) * g.k + n;
                if (n < g.k) out[o] = float(acc[mt][nt][2 * hh]) * scale;
                if (n + 1 < g.k) out[o + 1] = float(acc[mt][nt][2 * hh + 1]) * scale;
            }
    if constexpr (!BF16)
        if (sums) channel_sums<BN>(acc, sums, As[0], Bs[0], g, n0, wn0);
}

// ------------------------------------------------------------------------------------------------
// weight gradient: part[z] (K, R) = dy[rows of split z]^T (K, M) . patches(x) (M, R)
// Both operands arrive reduction-major (rows m), so fragments come from ldmatrix.trans.
// BM (64 or 128) output channels per block: 8 warps as BM/32 (k) x 256/BM (r).

template <int ROWB>
__device__ __forceinline__ int swz(int row, int chunk) { return row * ROWB + ((chunk ^ (row & 7)) << 4); }

__device__ __forceinline__ unsigned bf16pair(int lo, int hi) {
    // small integers are exact in bf16: the bf16 bits are the top half of the float's bits
    return (__float_as_uint(float(lo)) >> 16) | (__float_as_uint(float(hi)) & 0xffff0000u);
}

template <int BM>
__device__ __forceinline__ void conv_dw(const bf16_t* dy, const signed char* x, float* part, const Geom& g) {
    constexpr int BN = 128, BK = 32, STAGES = 2, AROW = BM * 2;  // AROW: bytes of one dy row in As
    constexpr int WK = BM / 32, RW = BN / (8 / WK), NT = RW / 8;  // warps along k, r per warp, n8 tiles
    __shared__ __align__(128) char As[STAGES][BK * AROW];   // dy rows m: BM k values, bf16
    __shared__ __align__(128) char Bs[STAGES][BK * 256];    // x patch rows m: 128 r values, bf16
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wk0 = (warp % WK) * 32, wr0 = (warp / WK) * RW;
    const int k0 = blockIdx.x * BM, r0 = blockIdx.y * BN, z = blockIdx.z;
    const int mbeg = z * g.chunk, mend = min(g.m, mbeg + g.chunk);
    // this thread's 16 patch values r = r0 + (tid & 7) * 16 .. + 15 lie in one tap (c % 16 == 0)
    const int rr = r0 + (tid & 7) * 16;
    const bool rlive = rr < g.r;
    const int tap = rlive ? rr / g.c : 0, cc = rlive ? rr - tap * g.c : 0;
    const int ti = tap / g.kw, tj = tap - ti * g.kw;
    const int xrow = tid >> 3;                              // 0..31

    auto load_a = [&](int stage, int mb) {
        #pragma unroll
        for (int h = 0; h < BK * BM / 8 / 256; ++h) {
            int e = tid + h * 256, row = e / (BM / 8), ch = e % (BM / 8);
            int m = mb + row, k = k0 + ch * 8;
            bool ok = m < mend && k < g.k;
            const bf16_t* src = ok ? dy + (long)m * g.k + k : dy;
            cp_async16(&As[stage][swz<AROW>(row, ch)], src, ok);
        }
    };
    // (the divisions here measured faster than counters stepped BK rows a stage: 0.91 against
    // 1.18 ms on vgg-gxnor's conv2, fourteenth session, bench/mma_check.py)
    auto fetch_b = [&](int mb, int4& v) {
        int m = mb + xrow;
        v = make_int4(0, 0, 0, 0);
        if (m < mend && rlive) {
            int n = m / (g.oh * g.ow), rem = m - n * g.oh * g.ow;
            int ih = (rem / g.ow) * g.stride - g.pad + ti, iw = (rem % g.ow) * g.stride - g.pad + tj;
            if (ih >= 0 && ih < g.h && iw >= 0 && iw < g.w)
                v = *reinterpret_cast<const int4*>(x + (((long)n * g.h + ih) * g.w + iw) * g.c + cc);
        }
    };
    auto store_b = [&](int stage, const int4& v) {
        const signed char* b = reinterpret_cast<const signed char*>(&v);
        unsigned p[8];
        #pragma unroll
        for (int q = 0; q < 8; ++q) p[q] = bf16pair(b[2 * q], b[2 * q + 1]);
        int ch = (tid & 7) * 2;
        *reinterpret_cast<uint4*>(&Bs[stage][swz<256>(xrow, ch)]) = make_uint4(p[0], p[1], p[2], p[3]);
        *reinterpret_cast<uint4*>(&Bs[stage][swz<256>(xrow, ch + 1)]) = make_uint4(p[4], p[5], p[6], p[7]);
    };

    float acc[2][NT][4];
    zero_acc(acc);

    int4 nextb;
    load_a(0, mbeg);
    cp_commit();
    fetch_b(mbeg, nextb);
    store_b(0, nextb);
    int stage = 0;
    for (int mb = mbeg; mb < mend; mb += BK) {
        bool more = mb + BK < mend;
        if (more) {
            load_a(stage ^ 1, mb + BK);
            fetch_b(mb + BK, nextb);         // global loads in flight while this stage computes
        }
        cp_commit();
        cp_wait<1>();
        __syncthreads();
        #pragma unroll
        for (int ks = 0; ks < 2; ++ks) {
            unsigned af[2][4], bfr[NT][2];
            #pragma unroll
            for (int mt = 0; mt < 2; ++mt) {
                int q = lane >> 3, row = ks * 16 + (q >> 1) * 8 + (lane & 7);
                ldm_x4_t(af[mt], &As[stage][swz<AROW>(row, (wk0 + mt * 16) / 8 + (q & 1))]);
            }
            #pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                int q = lane >> 3, row = ks * 16 + (q & 1) * 8 + (lane & 7);
                unsigned t[4];
                ldm_x4_t(t, &Bs[stage][swz<256>(row, wr0 / 8 + np * 2 + (q >> 1))]);
                bfr[2 * np][0] = t[0]; bfr[2 * np][1] = t[1];
                bfr[2 * np + 1][0] = t[2]; bfr[2 * np + 1][1] = t[3];
            }
            #pragma unroll
            for (int mt = 0; mt < 2; ++mt)
                #pragma unroll
                for (int nt = 0; nt < NT; ++nt) mma_bf16(acc[mt][nt], af[mt], bfr[nt]);
        }
        __syncthreads();
        if (more) store_b(stage ^ 1, nextb);
        stage ^= 1;
    }
    cp_wait<0>();

    store_dw(part + (long)z * g.k * g.r, acc, k0 + wk0, r0 + wr0, g);
}

// ------------------------------------------------------------------------------------------------
// first layers: float32 images (3 channels), int8 weights, a short reduction R = KH*KW*C <= FL_RP
// (ResNet's 7x7x3 stem: 147; vgg-gxnor's 3x3x3: 27). Channels too few for the loaders above, so
// these work like conv.py's direct kernels: a block takes a tile of FL_DH x FL_DW output positions
// of one image, loads the input patch the tile reads (zero padding included) into shared memory
// as float32, and builds every mma fragment from it through a table of where column r sits in a
// position's patch (roff). Forward: x as the sum of three bf16 numbers (x's 24 bits of mantissa,
// 8 at a time: exact), each times the exact bf16 weight values, fp32 accumulation: float32 sums
// in another order. (Two numbers, 16 bits, measured 3e-6 from float32 and flipped enough ternary
// activations downstream to change a small network's gradients.) Weight gradient: dy and x
// rounded to bf16 once, as the other layers' dy.

constexpr int FL_DH = 8, FL_DW = 16, FL_RP = 160, FL_PATCH = 2336, FL_WROW = FL_RP + 8;

__device__ __forceinline__ unsigned bf16x2(float lo, float hi) {   // round to nearest even
    unsigned d;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
}

// xs[a * run + e] = image n's x[ih0 + a, iw0 * C + e] (run = pw * C floats of a patch row), zero
// outside the image; four loads issued before their stores
__device__ __forceinline__ void fl_load_patch(const float* x, float* xs, const Geom& g, int n, int ih0, int iw0,
                                              int ph, int run) {
    const int wc = g.w * g.c, f0 = iw0 * g.c, total = ph * run;
    const float* img = x + (long)n * g.h * wc;
    for (int i0 = threadIdx.x; i0 < total; i0 += 4 * 256) {
        float v[4];
        #pragma unroll
        for (int u = 0; u < 4; ++u) {
            int i = i0 + u * 256, a = i / run, f = f0 + i - a * run, ih = ih0 + a;
            v[u] = i < total && ih >= 0 && ih < g.h && f >= 0 && f < wc ? img[(long)ih * wc + f] : 0.f;
        }
        #pragma unroll
        for (int u = 0; u < 4; ++u)
            if (i0 + u * 256 < total) xs[i0 + u * 256] = v[u];
    }
}

// roff[r] = where column r = (i, j, ch) of a patch sits relative to its position's corner; 0 past R
__device__ __forceinline__ void fl_roff(int* roff, const Geom& g, int run, int rp) {
    const int kwc = g.kw * g.c;
    for (int r = threadIdx.x; r < rp; r += 256) {
        int i = r / kwc;
        roff[r] = r < g.r ? i * run + r - i * kwc : 0;
    }
}

struct FlTile { int n, oh0, ow0; };
__device__ __forceinline__ FlTile fl_tile(int t, int tiles_h, int tiles_w) {
    int per = tiles_h * tiles_w, n = t / per, rem = t - n * per, th = rem / tiles_w;
    return {n, th * FL_DH, (rem - th * tiles_w) * FL_DW};
}

// out[m, k] = scale * sum_r x[patch(m, r)] * w[k, r]; block (tile stride, 64 channels of K).
// 8 warps as 4 (tile rows 2 wm, 2 wm + 1: one m16 tile each) x 2 (32 channels).
// SUMS: also each output channel's sum of out and of out^2 over the block's tiles, in float64, for
// the batch norm after the layer (conv_tc.ConvSums with float64 parts: its statistics without a
// pass over the output). The order is fixed: a thread adds its four positions of a column, the
// warp's eight row groups are added by a butterfly (xor 4, 8, 16: every lane the same bits), the
// tile's sums are added to the block's in tile order, one shared slot per (warp row, column), and
// the four warp rows in order at the end: part[(s * K + k) * gridDim.x + blockIdx.x], s = 0, 1.
template <bool SUMS>
__device__ __forceinline__ void conv_fwd_first(const float* x, const signed char* w, float* out, const Geom& g,
                                               float scale, double* sums) {
    __shared__ __align__(16) float xs[FL_PATCH];
    __shared__ __align__(16) bf16_t ws[64 * FL_WROW];      // ws[nn][r] = w[k0 + nn, r], 0 past K or R
    __shared__ int roff[FL_RP];
    __shared__ double fsum[SUMS ? 4 * 64 * 2 : 1];         // [warp row wm][column][s]
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gq = lane >> 2, tq = lane & 3;
    const int wm = warp & 3, wn = warp >> 2, k0 = blockIdx.y * 64, rs = (g.r + 15) / 16;
    const int ph = (FL_DH - 1) * g.stride + g.kh, run = ((FL_DW - 1) * g.stride + g.kw) * g.c;
    const int tiles_h = (g.oh + FL_DH - 1) / FL_DH, tiles_w = (g.ow + FL_DW - 1) / FL_DW;
    if (SUMS)
        for (int e = tid; e < 4 * 64 * 2; e += 256) fsum[e] = 0.0;     // (the tile loop syncs first)
    for (int e = tid; e < 64 * rs * 16; e += 256) {
        int nn = e / (rs * 16), r = e - nn * rs * 16;
        int v = k0 + nn < g.k && r < g.r ? w[(long)(k0 + nn) * g.r + r] : 0;
        ws[nn * FL_WROW + r] = (bf16_t)(__float_as_uint(float(v)) >> 16);     // small integers: exact
    }
    fl_roff(roff, g, run, rs * 16);
    int po[2][2];                               // the patch offsets of this thread's four positions
    #pragma unroll
    for (int mt = 0; mt < 2; ++mt)
        #pragma unroll
        for (int hh = 0; hh < 2; ++hh) po[mt][hh] = g.stride * ((2 * wm + mt) * run + (gq + 8 * hh) * g.c);
    for (int t = blockIdx.x; t < g.n * tiles_h * tiles_w; t += gridDim.x) {
        const FlTile tl = fl_tile(t, tiles_h, tiles_w);
        __syncthreads();                        // the last tile's reads are done
        fl_load_patch(x, xs, g, tl.n, tl.oh0 * g.stride - g.pad, tl.ow0 * g.stride - g.pad, ph, run);
        __syncthreads();
        float acc[2][4][4];
        zero_acc(acc);
        #pragma unroll 2
        for (int ks = 0; ks < rs; ++ks) {
            const int c0 = ks * 16 + tq * 2;
            const int ro[4] = {roff[c0], roff[c0 + 1], roff[c0 + 8], roff[c0 + 9]};
            unsigned a3[3][2][4], bfr[4][2];     // x = a3[0] + a3[1] + a3[2], exactly
            #pragma unroll
            for (int mt = 0; mt < 2; ++mt)
                #pragma unroll
                for (int q = 0; q < 4; ++q) {   // register q: row gq + 8 (q & 1), columns c0 + 8 (q >> 1) + {0, 1}
                    const int base = po[mt][q & 1];
                    float v0 = xs[base + ro[2 * (q >> 1)]], v1 = xs[base + ro[2 * (q >> 1) + 1]];
                    #pragma unroll
                    for (int part = 0; part < 3; ++part) {     // each residual is exact in float32
                        unsigned h = bf16x2(v0, v1);
                        a3[part][mt][q] = h;
                        v0 -= __uint_as_float(h << 16);
                        v1 -= __uint_as_float(h & 0xffff0000u);
                    }
                }
            #pragma unroll
            for (int nt = 0; nt < 4; ++nt) {
                const bf16_t* wr = ws + (wn * 32 + nt * 8 + gq) * FL_WROW + c0;
                bfr[nt][0] = *reinterpret_cast<const unsigned*>(wr);
                bfr[nt][1] = *reinterpret_cast<const unsigned*>(wr + 8);
            }
            #pragma unroll
            for (int mt = 0; mt < 2; ++mt)
                #pragma unroll
                for (int nt = 0; nt < 4; ++nt)
                    #pragma unroll
                    for (int part = 0; part < 3; ++part) mma_bf16(acc[mt][nt], a3[part][mt], bfr[nt]);
        }
        #pragma unroll
        for (int mt = 0; mt < 2; ++mt)
            #pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                int oh = tl.oh0 + 2 * wm + mt, ow = tl.ow0 + gq + 8 * hh;
                if (oh >= g.oh || ow >= g.ow) continue;
                float* o = out + (((long)tl.n * g.oh + oh) * g.ow + ow) * g.k;
                #pragma unroll
                for (int nt = 0; nt < 4; ++nt) {
                    int k = k0 + wn * 32 + nt * 8 + tq * 2;        // K % 8 == 0: k + 1 < K with k
                    if (k < g.k)
                        *reinterpret_cast<float2*>(o + k) =
                            make_float2(acc[mt][nt][2 * hh] * scale, acc[mt][nt][2 * hh + 1] * scale);
                }
            }
        if (SUMS) {
            #pragma unroll
            for (int nt = 0; nt < 4; ++nt)
                #pragma unroll
                for (int e = 0; e < 2; ++e) {
                    double s1 = 0.0, s2 = 0.0;
                    #pragma unroll
                    for (int mt = 0; mt < 2; ++mt)
                        #pragma unroll
                        for (int hh = 0; hh < 2; ++hh)
                            if (tl.oh0 + 2 * wm + mt < g.oh && tl.ow0 + gq + 8 * hh < g.ow) {
                                const double v = acc[mt][nt][2 * hh + e] * scale;   // the value stored
                                s1 += v;
                                s2 += v * v;                // exact in float64: fma or not, the same
                            }
                    #pragma unroll
                    for (int o = 4; o < 32; o <<= 1) {
                        s1 += __shfl_xor_sync(0xffffffffu, s1, o);
                        s2 += __shfl_xor_sync(0xffffffffu, s2, o);
                    }
                    if (gq == 0) {
                        double* f = fsum + (wm * 64 + wn * 32 + nt * 8 + tq * 2 + e) * 2;
                        f[0] += s1;
                        f[1] += s2;
                    }
                }
        }
    }
    if (SUMS) {
        __syncthreads();
        if (tid < 64 && k0 + tid < g.k)
            #pragma unroll
            for (int q = 0; q < 2; ++q) {
                double t = fsum[tid * 2 + q];
                #pragma unroll
                for (int r = 1; r < 4; ++r) t += fsum[(r * 64 + tid) * 2 + q];
                sums[((long)q * g.k + k0 + tid) * gridDim.x + blockIdx.x] = t;
            }
    }
}

// part[z, k, r] = sum over the tiles of split z (g.chunk tiles each, in order) of dy[m, k] * x[patch(m, r)];
// block (1, 64 channels of K, split z). 8 warps as 2 (32 channels) x 4 (NT * 8 columns r).
template <int NT>
__device__ __forceinline__ void conv_dw_first(const float* dy, const float* x, float* part, const Geom& g) {
    __shared__ __align__(16) float xs[FL_PATCH];
    __shared__ __align__(128) char dys[FL_DH * FL_DW * 128];   // dys[p] = bf16(dy[position p, k0 .. k0 + 63])
    __shared__ int roff[FL_RP];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gq = lane >> 2, tq = lane & 3;
    const int wk = warp & 1, wr = warp >> 1, k0 = blockIdx.y * 64, z = blockIdx.z;
    const int ph = (FL_DH - 1) * g.stride + g.kh, run = ((FL_DW - 1) * g.stride + g.kw) * g.c;
    const int tiles_h = (g.oh + FL_DH - 1) / FL_DH, tiles_w = (g.ow + FL_DW - 1) / FL_DW;
    const int t_end = min(g.n * tiles_h * tiles_w, (z + 1) * g.chunk);
    fl_roff(roff, g, run, NT * 32);
    float acc[2][NT][4];
    zero_acc(acc);
    const int q4 = tid & 15, kq = k0 + q4 * 4;  // this thread's 4 channels of the dy rows it loads
    for (int t = z * g.chunk; t < t_end; ++t) {
        const FlTile tl = fl_tile(t, tiles_h, tiles_w);
        __syncthreads();
        float4 v[8];
        #pragma unroll
        for (int h = 0; h < 8; ++h) {          // position p = tid / 16 + 16 h: tile row h
            int oh = tl.oh0 + h, ow = tl.ow0 + (tid >> 4);
            v[h] = make_float4(0.f, 0.f, 0.f, 0.f);   // zero off the image: those products vanish
            if (oh < g.oh && ow < g.ow && kq < g.k)
                v[h] = *reinterpret_cast<const float4*>(dy + (((long)tl.n * g.oh + oh) * g.ow + ow) * g.k + kq);
        }
        fl_load_patch(x, xs, g, tl.n, tl.oh0 * g.stride - g.pad, tl.ow0 * g.stride - g.pad, ph, run);
        #pragma unroll
        for (int h = 0; h < 8; ++h) {
            int p = (tid >> 4) + 16 * h;
            *reinterpret_cast<uint2*>(&dys[swz<128>(p, q4 >> 1) + (q4 & 1) * 8]) =
                make_uint2(bf16x2(v[h].x, v[h].y), bf16x2(v[h].z, v[h].w));
        }
        __syncthreads();
        #pragma unroll 2
        for (int ks = 0; ks < FL_DH; ++ks) {    // 16 positions: tile row ks
            unsigned af[2][4], bfr[NT][2];
            #pragma unroll
            for (int mt = 0; mt < 2; ++mt) {
                int q = lane >> 3, row = ks * 16 + (q >> 1) * 8 + (lane & 7);
                ldm_x4_t(af[mt], &dys[swz<128>(row, (wk * 32 + mt * 16) / 8 + (q & 1))]);
            }
            const int pb = g.stride * (ks * run + tq * 2 * g.c), pc = g.stride * g.c, p8 = 8 * pc;
            #pragma unroll
            for (int nt = 0; nt < NT; ++nt) {   // column r = wr NT 8 + nt 8 + gq; positions tq 2 + {0, 1, 8, 9}
                const float* xp = xs + pb + roff[wr * NT * 8 + nt * 8 + gq];
                bfr[nt][0] = bf16x2(xp[0], xp[pc]);
                bfr[nt][1] = bf16x2(xp[p8], xp[p8 + pc]);
            }
            #pragma unroll
            for (int mt = 0; mt < 2; ++mt)
                #pragma unroll
                for (int nt = 0; nt < NT; ++nt) mma_bf16(acc[mt][nt], af[mt], bfr[nt]);
        }
    }
    store_dw(part + (long)z * g.k * g.r, acc, k0 + wk * 32, wr * NT * 8, g);
}

// ------------------------------------------------------------------------------------------------
// entry points (numba ABI: the first argument receives the return value)

__device__ __forceinline__ Geom load_geom(const int* p) {
    Geom g;
    int* d = reinterpret_cast<int*>(&g);
    for (int i = 0; i < int(sizeof(Geom) / sizeof(int)); ++i) d[i] = p[i];
    return g;
}

template <int BN, bool BF16>
__device__ __forceinline__ void conv_fwd_entry(const char* x, const char* w, float* out, const int* geom,
                                               float scale, long long* sums) {
    // (one array for both measured 157 registers a thread instead of 126 in the bf16 kernel, ptxas
    // for sm_90: half the blocks an SM holds, ~0.9 ms more a vgg-gxnor step)
    __shared__ __align__(128) char As[FWD_STAGES][FWD_BM * 64];
    __shared__ __align__(128) char Bs[FWD_STAGES][128 * 64];   // BN = 64 uses the first half
    const Geom g = load_geom(geom);
    // the forward convolutions and stride-1 input gradients see dil == 1; a stride-2 layer's
    // input gradient dil == 2 (conv_tc.backward_input takes no larger stride)
    if (g.dil == 2) conv_fwd<BN, BF16, 2>(x, w, out, g, scale, As, Bs, sums);
    else conv_fwd<BN, BF16, 1>(x, w, out, g, scale, As, Bs, sums);
}

extern "C" __device__ int conv_fwd_s8_128(int* ret, const signed char* x, const signed char* w, float* out,
                                          const int* geom, float scale, long long* sums) {
    conv_fwd_entry<128, false>((const char*)x, (const char*)w, out, geom, scale, sums);   // sums: null for none
    *ret = 0;
    return 0;
}
extern "C" __device__ int conv_fwd_s8_64(int* ret, const signed char* x, const signed char* w, float* out,
                                         const int* geom, float scale, long long* sums) {
    conv_fwd_entry<64, false>((const char*)x, (const char*)w, out, geom, scale, sums);   // sums: null for none
    *ret = 0;
    return 0;
}
extern "C" __device__ int conv_fwd_bf16_128(int* ret, const bf16_t* x, const bf16_t* w, float* out,
                                            const int* geom, float scale) {
    conv_fwd_entry<128, true>((const char*)x, (const char*)w, out, geom, scale, nullptr);
    *ret = 0;
    return 0;
}
extern "C" __device__ int conv_fwd_bf16_64(int* ret, const bf16_t* x, const bf16_t* w, float* out,
                                           const int* geom, float scale) {
    conv_fwd_entry<64, true>((const char*)x, (const char*)w, out, geom, scale, nullptr);
    *ret = 0;
    return 0;
}
extern "C" __device__ int conv_dw_bf16(int* ret, const bf16_t* dy, const signed char* x, float* part,
                                       const int* geom) {
    conv_dw<128>(dy, x, part, load_geom(geom));
    *ret = 0;
    return 0;
}
extern "C" __device__ int conv_dw_bf16_64(int* ret, const bf16_t* dy, const signed char* x, float* part,
                                          const int* geom) {
    conv_dw<64>(dy, x, part, load_geom(geom));
    *ret = 0;
    return 0;
}

extern "C" __device__ int conv_fwd_first_f32(int* ret, const float* x, const signed char* w, float* out,
                                             const int* geom, float scale) {
    conv_fwd_first<false>(x, w, out, load_geom(geom), scale, nullptr);
    *ret = 0;
    return 0;
}
extern "C" __device__ int conv_fwd_first_f32_sums(int* ret, const float* x, const signed char* w, float* out,
                                                  const int* geom, float scale, double* sums) {
    conv_fwd_first<true>(x, w, out, load_geom(geom), scale, sums);
    *ret = 0;
    return 0;
}
extern "C" __device__ int conv_dw_first_f32(int* ret, const float* dy, const float* x, float* part,
                                            const int* geom) {
    const Geom g = load_geom(geom);
    switch ((g.r + 31) / 32) {              // the reduction padded to 32 columns per r-warp group
        case 1: conv_dw_first<1>(dy, x, part, g); break;
        case 2: conv_dw_first<2>(dy, x, part, g); break;
        case 3: conv_dw_first<3>(dy, x, part, g); break;
        case 4: conv_dw_first<4>(dy, x, part, g); break;
        default: conv_dw_first<5>(dy, x, part, g); break;
    }
    *ret = 0;
    return 0;
}

// float32 -> bf16 (round to nearest even; NaN kept quiet), grid-stride over n elements
extern "C" __device__ int to_bf16(int* ret, const float* src, bf16_t* dst, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x, step = (long)gridDim.x * blockDim.x;
    for (; i < n; i += step) {
        unsigned u = __float_as_uint(src[i]);
        unsigned r = ((u & 0x7fffffffu) > 0x7f800000u) ? (u | 0x00400000u) : u + 0x7fffu + ((u >> 16) & 1u);
        dst[i] = (bf16_t)(r >> 16);
    }
    *ret = 0;
    return 0;
}
