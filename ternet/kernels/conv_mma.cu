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

template <int BN, bool BF16, int DIL>
__device__ __forceinline__ void conv_fwd(const char* x, const char* w, float* out, const Geom& g, float scale,
                                         char (*As)[FWD_BM * 64], char (*Bs)[128 * 64]) {
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
    #pragma unroll
    for (int a = 0; a < 2; ++a)
        #pragma unroll
        for (int b = 0; b < NT; ++b)
            #pragma unroll
            for (int q = 0; q < 4; ++q) acc[a][b][q] = 0;

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
    #pragma unroll
    for (int a = 0; a < 2; ++a)
        #pragma unroll
        for (int b = 0; b < NT; ++b)
            #pragma unroll
            for (int q = 0; q < 4; ++q) acc[a][b][q] = 0.f;

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

    const int gq = lane >> 2, tq = lane & 3;
    float* dst = part + (long)z * g.k * g.r;
    #pragma unroll
    for (int mt = 0; mt < 2; ++mt)
        #pragma unroll
        for (int nt = 0; nt < NT; ++nt)
            #pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                int k = k0 + wk0 + mt * 16 + gq + hh * 8;
                int r = r0 + wr0 + nt * 8 + tq * 2;
                if (k >= g.k) continue;
                if (r < g.r) dst[(long)k * g.r + r] = acc[mt][nt][2 * hh];
                if (r + 1 < g.r) dst[(long)k * g.r + r + 1] = acc[mt][nt][2 * hh + 1];
            }
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
                                               float scale) {
    __shared__ __align__(128) char As[FWD_STAGES][FWD_BM * 64];
    __shared__ __align__(128) char Bs[FWD_STAGES][128 * 64];   // BN = 64 uses the first half
    const Geom g = load_geom(geom);
    // the forward convolutions and stride-1 input gradients see dil == 1; a stride-2 layer's
    // input gradient dil == 2 (conv_tc.backward_input takes no larger stride)
    if (g.dil == 2) conv_fwd<BN, BF16, 2>(x, w, out, g, scale, As, Bs);
    else conv_fwd<BN, BF16, 1>(x, w, out, g, scale, As, Bs);
}

extern "C" __device__ int conv_fwd_s8_128(int* ret, const signed char* x, const signed char* w, float* out,
                                          const int* geom, float scale) {
    conv_fwd_entry<128, false>((const char*)x, (const char*)w, out, geom, scale);
    *ret = 0;
    return 0;
}
extern "C" __device__ int conv_fwd_s8_64(int* ret, const signed char* x, const signed char* w, float* out,
                                         const int* geom, float scale) {
    conv_fwd_entry<64, false>((const char*)x, (const char*)w, out, geom, scale);
    *ret = 0;
    return 0;
}
extern "C" __device__ int conv_fwd_bf16_128(int* ret, const bf16_t* x, const bf16_t* w, float* out,
                                            const int* geom, float scale) {
    conv_fwd_entry<128, true>((const char*)x, (const char*)w, out, geom, scale);
    *ret = 0;
    return 0;
}
extern "C" __device__ int conv_fwd_bf16_64(int* ret, const bf16_t* x, const bf16_t* w, float* out,
                                           const int* geom, float scale) {
    conv_fwd_entry<64, true>((const char*)x, (const char*)w, out, geom, scale);
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
