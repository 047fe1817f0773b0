// Max pooling four channels at a time (32-bit loads of int8 activations, 16-byte loads of float32
// gradients), linked into numba kernels with cuda.declare_device(..., link=...) (pool.py: the
// numba kernels there compute the same bits and remain the reference and the simulator's path).
// NHWC, C % 4 == 0; each thread takes a group of 4 channels of one element, grid-stride.
//
//   maxpool_fwd_s8x4: out[n, oh, ow, c] = max over the window (first maximum wins, window order),
//                     arg = i * k + j of that first maximum (int8 input, as ternary activations;
//                     maxpool_fwd_f32x4 the same on float32, as a convolution's output)
//   maxpool_bwd_x4:   dx[n, ih, iw, c] = 0 + the douts of the windows covering (ih, iw) whose
//                     argmax it is, added in window order (oh, then ow): pool.pool_grad_at's sum;
//                     maxpool_bwd_x4_bf16 also writes dx's bf16 bits (for conv_tc.adopt_bf16)
//   bn_act_pool_dx_*: the input gradient of the fused batch norm + activation before the pool,
//                     from the pool's output gradient (batchnorm.py's bwd_dx with gather=True)
// Element indices are 32-bit (pool.py sends only arrays of fewer than 2^31 channel groups): a
// 64-bit division per element is a long emulated one.

struct PoolGeom {    // mirrors pool.POOL_GEOM
    int n, h, w, c, oh, ow, k, stride, pad;
};

__device__ __forceinline__ PoolGeom load_pool_geom(const int* p) {
    PoolGeom g;
    int* d = reinterpret_cast<int*>(&g);
    for (int i = 0; i < int(sizeof(PoolGeom) / sizeof(int)); ++i) d[i] = p[i];
    return g;
}

// four consecutive channels as floats (int8 values are exact and keep their order)
__device__ __forceinline__ void load4(const signed char* p, float* v) {
    const int w = *reinterpret_cast<const int*>(p);
    #pragma unroll
    for (int b = 0; b < 4; ++b) v[b] = float((signed char)(w >> (8 * b)));
}
__device__ __forceinline__ void load4(const float* p, float* v) {
    const float4 w = *reinterpret_cast<const float4*>(p);
    v[0] = w.x; v[1] = w.y; v[2] = w.z; v[3] = w.w;
}
__device__ __forceinline__ void store4(signed char* p, const float* v) {
    unsigned w = 0;
    #pragma unroll
    for (int b = 0; b < 4; ++b) w |= (unsigned)((int)v[b] & 0xff) << (8 * b);
    *reinterpret_cast<unsigned*>(p) = w;
}
__device__ __forceinline__ void store4(float* p, const float* v) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}

template <class T>
__device__ __forceinline__ void maxpool_fwd_x4(const T* x, T* out, unsigned char* arg, const PoolGeom& g) {
    const int c4 = g.c >> 2;
    const unsigned groups = (unsigned)g.n * g.oh * g.ow * c4;
    for (unsigned o = blockIdx.x * blockDim.x + threadIdx.x; o < groups; o += gridDim.x * blockDim.x) {
        const unsigned pix = o / c4, t = pix / g.ow;     // (n, oh, ow), (n, oh)
        const int q = o - pix * c4, ow = pix - t * g.ow, n = t / g.oh, oh = t - n * g.oh;
        float best[4] = {0.f, 0.f, 0.f, 0.f};
        int pos[4] = {0, 0, 0, 0};
        bool first = true;
        for (int i = 0; i < g.k; ++i) {
            const int ih = oh * g.stride - g.pad + i;
            if (ih < 0 || ih >= g.h) continue;
            for (int j = 0; j < g.k; ++j) {
                const int iw = ow * g.stride - g.pad + j;
                if (iw < 0 || iw >= g.w) continue;
                float v[4];
                load4(x + (((long)n * g.h + ih) * g.w + iw) * g.c + 4 * q, v);
                #pragma unroll
                for (int b = 0; b < 4; ++b)
                    if (first || v[b] > best[b]) {      // the first maximum wins
                        best[b] = v[b];
                        pos[b] = i * g.k + j;
                    }
                first = false;
            }
        }
        store4(out + 4 * (long)o, best);
        reinterpret_cast<unsigned*>(arg)[o] = pos[0] | pos[1] << 8 | pos[2] << 16 | pos[3] << 24;
    }
}

extern "C" __device__ int maxpool_fwd_s8x4(int* ret, const signed char* x, signed char* out, unsigned char* arg,
                                           const int* geom) {
    maxpool_fwd_x4(x, out, arg, load_pool_geom(geom));
    *ret = 0;
    return 0;
}

extern "C" __device__ int maxpool_fwd_f32x4(int* ret, const float* x, float* out, unsigned char* arg,
                                            const int* geom) {
    maxpool_fwd_x4(x, out, arg, load_pool_geom(geom));
    *ret = 0;
    return 0;
}

// float32 -> bf16 bits, round to nearest even, NaN kept quiet: conv_mma.cu's to_bf16 (the -m gpu
// test of the bf16 output compares the two)
__device__ __forceinline__ unsigned short bf16_bits(float v) {
    unsigned u = __float_as_uint(v);
    unsigned r = ((u & 0x7fffffffu) > 0x7f800000u) ? (u | 0x00400000u) : u + 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(r >> 16);
}

// The max pool's input gradient at four channels (group q) of input pixel (n, ih, iw): 0 + the
// douts of the windows covering it whose argmax it is, in window order (oh, then ow)
__device__ __forceinline__ void pool_grad4(const float* dout, const unsigned char* arg, const PoolGeom& g, int n,
                                           int ih, int iw, int q, float* s) {
    const int c4 = g.c >> 2;
    // the output rows / columns whose windows cover ih / iw (pool._covering)
    const int th = ih + g.pad - g.k + 1, tw = iw + g.pad - g.k + 1;
    const int oh0 = th <= 0 ? 0 : (th + g.stride - 1) / g.stride, oh1 = min(g.oh, (ih + g.pad) / g.stride + 1);
    const int ow0 = tw <= 0 ? 0 : (tw + g.stride - 1) / g.stride, ow1 = min(g.ow, (iw + g.pad) / g.stride + 1);
    s[0] = s[1] = s[2] = s[3] = 0.f;
    for (int oh = oh0; oh < oh1; ++oh)
        for (int ow = ow0; ow < ow1; ++ow) {
            const long o = (((long)n * g.oh + oh) * g.ow + ow) * c4 + q;
            const float4 d = reinterpret_cast<const float4*>(dout)[o];
            const unsigned a = reinterpret_cast<const unsigned*>(arg)[o];
            const unsigned tap = (ih - oh * g.stride + g.pad) * g.k + (iw - ow * g.stride + g.pad);
            if ((a & 0xff) == tap) s[0] += d.x;
            if (((a >> 8) & 0xff) == tap) s[1] += d.y;
            if (((a >> 16) & 0xff) == tap) s[2] += d.z;
            if ((a >> 24) == tap) s[3] += d.w;
        }
}

// the digits of channel group e of an (n, h, w, c / 4) walk: (q, iw, n, ih)
struct Pix { int q, iw, n, ih; };
__device__ __forceinline__ Pix pix_of(unsigned e, const PoolGeom& g) {
    const int c4 = g.c >> 2;
    const unsigned pix = e / c4, t = pix / g.w;      // (n, ih, iw), (n, ih)
    Pix p;
    p.q = e - pix * c4;
    p.iw = pix - t * g.w;
    p.n = t / g.h;
    p.ih = t - p.n * g.h;
    return p;
}

// with BF16 also dx's bf16 copy in dx16 (the convolution before the pool reads it so), and dx
// itself unless it is null (a convolution that reads its dy in bf16 alone)
template <bool BF16>
__device__ __forceinline__ void maxpool_bwd(const float* dout, const unsigned char* arg, float* dx,
                                            unsigned short* dx16, const int* geom) {
    const PoolGeom g = load_pool_geom(geom);
    const unsigned groups = (unsigned)g.n * g.h * g.w * (g.c >> 2);
    for (unsigned e = blockIdx.x * blockDim.x + threadIdx.x; e < groups; e += gridDim.x * blockDim.x) {
        const Pix p = pix_of(e, g);
        float s[4];
        pool_grad4(dout, arg, g, p.n, p.ih, p.iw, p.q, s);
        if (!BF16 || dx) reinterpret_cast<float4*>(dx)[e] = make_float4(s[0], s[1], s[2], s[3]);
        if (BF16) {
            const unsigned lo = bf16_bits(s[0]) | ((unsigned)bf16_bits(s[1]) << 16);
            const unsigned hi = bf16_bits(s[2]) | ((unsigned)bf16_bits(s[3]) << 16);
            reinterpret_cast<uint2*>(dx16)[e] = make_uint2(lo, hi);
        }
    }
}

extern "C" __device__ int maxpool_bwd_x4(int* ret, const float* dout, const unsigned char* arg, float* dx,
                                         const int* geom) {
    maxpool_bwd<false>(dout, arg, dx, nullptr, geom);
    *ret = 0;
    return 0;
}

extern "C" __device__ int maxpool_bwd_x4_bf16(int* ret, const float* dout, const unsigned char* arg, float* dx,
                                              unsigned short* dx16, const int* geom) {
    maxpool_bwd<true>(dout, arg, dx, dx16, geom);
    *ret = 0;
    return 0;
}

// The input gradient of a fused batch norm + activation (rectangular window) followed by this max
// pool (ResNet's stem), four channels a thread: dx = bn_dx(g, xhat) with g = the pool's input
// gradient (pool_grad4) * (height where the element's window bit is set, else 0) and xhat =
// (x - mean) * invstd, x the record (float32 xf, or INT16: xq / s). scalar.bn_dx's operations in
// its order and precision (float32 gamma * invstd; float64 for the rest: products of two float32
// values are exact there, so a contraction into an fma changes nothing): the bits of the numba
// kernel batchnorm.bn_act_kernels(True, int16, gather=True)'s bwd_dx, its reference. dx may be
// xf itself (each element read before it is written); geom is the pool's (its input = dx's shape).
struct BnPoolArgs {  // the per-channel float32 arrays
    const float *mean, *invstd, *gamma, *sdy, *sdyx;
};

__device__ __forceinline__ float bn_dx1(float dy, float xhat, float gamma, float invstd, float sdy, float sdyx,
                                        double m) {
    const float gi = gamma * invstd;
    const float af = (float)((double)xhat * (double)sdyx + (double)sdy);
    return (float)((double)gi * ((double)dy - (double)af / m));
}

template <bool INT16>
__device__ __forceinline__ void bn_act_pool_dx(const float* dout, const unsigned char* arg, const void* rec,
                                               float s_int, const unsigned* bits, const BnPoolArgs& c, double m,
                                               float height, float* dx, const int* geom) {
    const PoolGeom g = load_pool_geom(geom);
    const unsigned groups = (unsigned)g.n * g.h * g.w * (g.c >> 2);
    for (unsigned e = blockIdx.x * blockDim.x + threadIdx.x; e < groups; e += gridDim.x * blockDim.x) {
        const Pix p = pix_of(e, g);
        float d[4], x[4];
        pool_grad4(dout, arg, g, p.n, p.ih, p.iw, p.q, d);
        if (INT16) {
            const uint2 w = reinterpret_cast<const uint2*>(rec)[e];
            x[0] = (float)(short)(w.x & 0xffff) / s_int;
            x[1] = (float)(short)(w.x >> 16) / s_int;
            x[2] = (float)(short)(w.y & 0xffff) / s_int;
            x[3] = (float)(short)(w.y >> 16) / s_int;
        } else {
            load4(reinterpret_cast<const float*>(rec) + 4 * (long)e, x);
        }
        const unsigned flags = bits[e >> 3] >> ((e & 7) * 4);   // the window bits of elements 4e .. 4e + 3
        float v[4];
        #pragma unroll
        for (int b = 0; b < 4; ++b) {
            const int j = 4 * p.q + b;
            const float win = (flags >> b) & 1u ? height : 0.f;
            const float h = (x[b] - c.mean[j]) * c.invstd[j];
            v[b] = bn_dx1(d[b] * win, h, c.gamma[j], c.invstd[j], c.sdy[j], c.sdyx[j], m);
        }
        store4(dx + 4 * (long)e, v);
    }
}

extern "C" __device__ int bn_act_pool_dx_f32(int* ret, const float* dout, const unsigned char* arg, const float* xf,
                                             const unsigned* bits, const float* mean, const float* invstd,
                                             const float* gamma, const float* sdy, const float* sdyx, double m,
                                             float height, float* dx, const int* geom) {
    bn_act_pool_dx<false>(dout, arg, xf, 0.f, bits, BnPoolArgs{mean, invstd, gamma, sdy, sdyx}, m, height, dx, geom);
    *ret = 0;
    return 0;
}

extern "C" __device__ int bn_act_pool_dx_s16(int* ret, const float* dout, const unsigned char* arg, const short* xq,
                                             float s_int, const unsigned* bits, const float* mean,
                                             const float* invstd, const float* gamma, const float* sdy,
                                             const float* sdyx, double m, float height, float* dx, const int* geom) {
    bn_act_pool_dx<true>(dout, arg, xq, s_int, bits, BnPoolArgs{mean, invstd, gamma, sdy, sdyx}, m, height, dx,
                         geom);
    *ret = 0;
    return 0;
}
