// The online Hadamard transform of activations fused with per-token quantisation (issue 15, item 3):
// each row r = x . H_n, n = m * 2^k (src/quant/hadamard.rs), then either rounded to T or quantised to
// int4 / int8 codes with one fp32 scale and zero point per row (src/quant/act.rs). The parameters and
// the output layouts are in quant_params.h.
//
// One block of 128 threads per row; the row lives in shared memory as fp32 (4 n bytes):
//  1. Load. With 16-byte rows (vec = 1) each thread reads 8 consecutive elements with one load and does
//     the first three butterfly levels (strides 1, 2, 4) in registers before storing them; otherwise
//     elements are loaded one by one and every level is left to step 2.
//  2. The remaining butterfly levels over the low k index bits, up to three per pass (radix 8: each
//     thread loads 8 elements at stride 2^s, does three levels in registers, stores them back), one
//     barrier per pass. Consecutive threads take consecutive groups, so the accesses of a warp are
//     consecutive words (no bank conflicts) for every s >= 3.
//  3. The m x m Paley mix (m > 1): thread b owns lane b of every block, reads its m values into
//     registers and writes the m sums sum_a +-v[a]; the signs are compile-time constants
//     (fk_had_tables.h), so each sum is m - 1 FADD/FSUB. The 1/sqrt(n) and the row's min, max and a
//     non-finite flag are folded into the same pass.
//  4. Output: y in T, or the codes: a fixed-order block reduction of (min, max, non-finite), the scale
//     and zero point exactly as quantize_tokens computes them (same f32 operations, so the same values
//     give the same codes), then 8 codes per thread packed into one 32-bit store (int4) or 4 (int8).
//
// Memory: 2 bytes per element in, 2 (y), 1 (int8) or 0.5 (int4) out; everything else stays on chip.
#include "fk_common.cuh"
#include "fk_had_tables.h"
#include "fk_row.cuh"
#include "quant_params.h"

// Dynamic shared memory (declared outside the anonymous namespace: the emulator provides the symbol).
extern __shared__ __align__(16) unsigned char fk_smem[];

namespace {

constexpr int HQ_THREADS = FK_HADQ_THREADS;

// Levels of stride 1, 2, ..., 2^(R-1) of the butterfly over the first E elements held in registers
// (E / 2^R independent groups of 2^R).
template <int R, int E = (1 << R)>
__device__ __forceinline__ void hq_bfly(float (&v)[8]) {
#pragma unroll
    for (int h = 1; h < (1 << R); h *= 2)
#pragma unroll
        for (int i = 0; i < E; i += 2 * h)
#pragma unroll
            for (int j = i; j < i + h; ++j) {
                const float a = v[j], b = v[j + h];
                v[j] = a + b;
                v[j + h] = a - b;
            }
}

// Levels s .. s + R - 1 of the butterfly over the whole row: groups of 2^R elements at stride 2^s.
template <int R>
__device__ __forceinline__ void hq_pass(float *s, int n, int sb) {
    const int groups = n >> R;
    const int low_mask = (1 << sb) - 1;
    for (int g = threadIdx.x; g < groups; g += HQ_THREADS) {
        const int base = ((g >> sb) << (sb + R)) | (g & low_mask);
        float v[8];
#pragma unroll
        for (int j = 0; j < (1 << R); ++j) v[j] = s[base + (j << sb)];
        hq_bfly<R>(v);
#pragma unroll
        for (int j = 0; j < (1 << R); ++j) s[base + (j << sb)] = v[j];
    }
}

struct HqMin {
    __device__ __forceinline__ float operator()(float a, float b) const { return fminf(a, b); }
};
struct HqMax {
    __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

struct HqStats {
    float lo, hi;
    int bad;
    __device__ __forceinline__ void push(float v) {
        lo = fminf(lo, v);
        hi = fmaxf(hi, v);
        bad |= !(fabsf(v) <= 3.402823466e38f);  // NaN or infinity
    }
};

// Step 3: the Paley mix of the blocks (M > 1).
template <int M>
__device__ __forceinline__ void hq_mix_blocks(float *s, int p, float norm, HqStats &st) {
    for (int b = threadIdx.x; b < p; b += HQ_THREADS) {
        float v[M];
#pragma unroll
        for (int a = 0; a < M; ++a) v[a] = s[a * p + b];
#pragma unroll
        for (int c = 0; c < M; ++c) {
            const uint64_t neg = fk_had_col<M>(c);
            float acc = (neg & 1) ? -v[0] : v[0];
#pragma unroll
            for (int a = 1; a < M; ++a) acc = ((neg >> a) & 1) ? acc - v[a] : acc + v[a];
            acc *= norm;
            s[c * p + b] = acc;
            st.push(acc);
        }
    }
}

// Step 3 with the 1/sqrt(n) scaling and the statistics (any M).
template <int M>
__device__ __forceinline__ void hq_mix(float *s, int p, float norm, HqStats &st) {
    if constexpr (M == 1) {
        for (int i = threadIdx.x; i < p; i += HQ_THREADS) {
            const float v = s[i] * norm;
            s[i] = v;
            st.push(v);
        }
    } else {
        hq_mix_blocks<M>(s, p, norm, st);
    }
}

// quantize_tokens' code for one value: (v / s).round() + z, clamped (NaN: 0).
__device__ __forceinline__ uint32_t hq_code(float v, float scale, float zero, float maxq) {
    const float q = roundf(v / scale) + zero;
    return (uint32_t)fminf(fmaxf(q, 0.0f), maxq);
}

template <typename T, int M>
__device__ void hadq(const fk_hadq_params &p) {
    float *s = reinterpret_cast<float *>(fk_smem);
    float *scratch = s + ((p.n + 31) & ~31);
    const int n = p.n, tid = threadIdx.x;
    const int pw = 1 << p.log2p;
    const int64_t row = blockIdx.x;
    const T *x = reinterpret_cast<const T *>(p.x) + row * (int64_t)n;

    // 1. Load (with levels 1, 2, 4 in registers on the vector path).
    int done = 0;
    if (p.vec) {
        const int r = p.log2p < 3 ? p.log2p : 3;
        for (int c = tid; c < n / 8; c += HQ_THREADS) {
            float v[8];
            fk_vec_to_f32<T>(*reinterpret_cast<const fk_vec16<T> *>(x + 8 * c), v);
            if (r == 3)
                hq_bfly<3, 8>(v);
            else if (r == 2)
                hq_bfly<2, 8>(v);
            else if (r == 1)
                hq_bfly<1, 8>(v);
            reinterpret_cast<float4 *>(s)[2 * c] = make_float4(v[0], v[1], v[2], v[3]);
            reinterpret_cast<float4 *>(s)[2 * c + 1] = make_float4(v[4], v[5], v[6], v[7]);
        }
        done = r;
    } else {
        for (int i = tid; i < n; i += HQ_THREADS) s[i] = fk_to_f32(x[i]);
    }
    __syncthreads();

    // 2. The remaining butterfly levels, three per pass.
    for (int sb = done; sb < p.log2p; sb += 3) {
        const int r = p.log2p - sb < 3 ? p.log2p - sb : 3;
        if (r == 3)
            hq_pass<3>(s, n, sb);
        else if (r == 2)
            hq_pass<2>(s, n, sb);
        else
            hq_pass<1>(s, n, sb);
        __syncthreads();
    }

    // 3. The Paley mix, 1/sqrt(n), statistics.
    HqStats st{0.0f, 0.0f, 0};
    hq_mix<M>(s, M == 1 ? n : pw, p.norm, st);
    __syncthreads();

    // 4. Output.
    if (p.bits == 0) {
        T *y = reinterpret_cast<T *>(p.y) + row * (int64_t)n;
        if (p.vec) {
            for (int c = tid; c < n / 8; c += HQ_THREADS) {
                fk_vec16<T> o;
#pragma unroll
                for (int j = 0; j < 8; ++j) o.v[j] = fk_from_f32<T>(s[8 * c + j]);
                *reinterpret_cast<fk_vec16<T> *>(y + 8 * c) = o;
            }
        } else {
            for (int i = tid; i < n; i += HQ_THREADS) y[i] = fk_from_f32<T>(s[i]);
        }
        return;
    }
    const float lo = fk_block_reduce(st.lo, HqMin{}, 0.0f, scratch);
    const float hi = fk_block_reduce(st.hi, HqMax{}, 0.0f, scratch);
    const float bad = fk_block_reduce((float)st.bad, HqMax{}, 0.0f, scratch);
    const float maxq = (float)((1 << p.bits) - 1);
    float scale, zero;
    if (p.symmetric) {
        const float amax = fmaxf(-lo, hi);
        scale = amax > 0.0f ? fmaxf(2.0f * amax / maxq, 1.17549435e-38f) : 1.0f;
        zero = (float)(1 << (p.bits - 1));
    } else {
        scale = hi > lo ? fmaxf((hi - lo) / maxq, 1.17549435e-38f) : 1.0f;
        zero = fminf(fmaxf(roundf(-lo / scale), 0.0f), maxq);
    }
    if (bad != 0.0f || !(scale <= 3.402823466e38f)) {
        // NaN never passes as a number: the row's scale says so, its codes are 0.
        scale = __int_as_float(0x7fffffff);
        zero = 0.0f;
    }
    if (tid == 0) {
        p.scales[row] = scale;
        p.zeros[row] = (uint8_t)zero;
    }
    if (p.bits == 4) {
        uint8_t *out = p.codes + row * (int64_t)((n + 1) / 2);
        if (p.vec) {
            for (int c = tid; c < n / 8; c += HQ_THREADS) {
                uint32_t w = 0;
#pragma unroll
                for (int j = 0; j < 8; ++j) w |= hq_code(s[8 * c + j], scale, zero, maxq) << (4 * j);
                reinterpret_cast<uint32_t *>(out)[c] = w;
            }
        } else {
            for (int j = tid; j < (n + 1) / 2; j += HQ_THREADS) {
                uint32_t b = hq_code(s[2 * j], scale, zero, maxq);
                if (2 * j + 1 < n) b |= hq_code(s[2 * j + 1], scale, zero, maxq) << 4;
                out[j] = (uint8_t)b;
            }
        }
    } else {
        uint8_t *out = p.codes + row * (int64_t)n;
        if (p.vec) {
            for (int c = tid; c < n / 4; c += HQ_THREADS) {
                uint32_t w = 0;
#pragma unroll
                for (int j = 0; j < 4; ++j) w |= hq_code(s[4 * c + j], scale, zero, maxq) << (8 * j);
                reinterpret_cast<uint32_t *>(out)[c] = w;
            }
        } else {
            for (int i = tid; i < n; i += HQ_THREADS) out[i] = (uint8_t)hq_code(s[i], scale, zero, maxq);
        }
    }
}

}  // namespace

// One kernel per activation type and Paley factor m (each with its own register allocation: the mix
// of m = 60 holds 60 values per thread, m = 1 none).
#define FK_HADQ_ENTRY(TN, T, M)                                                                      \
    extern "C" __global__ void __launch_bounds__(FK_HADQ_THREADS) fk_hadq_##TN##_m##M(const fk_hadq_params p) { \
        hadq<T, M>(p);                                                                              \
    }
#define FK_HADQ_ENTRIES(TN, T)                                                                       \
    FK_HADQ_ENTRY(TN, T, 1)                                                                          \
    FK_HADQ_ENTRY(TN, T, 12)                                                                         \
    FK_HADQ_ENTRY(TN, T, 20)                                                                         \
    FK_HADQ_ENTRY(TN, T, 28)                                                                         \
    FK_HADQ_ENTRY(TN, T, 36)                                                                         \
    FK_HADQ_ENTRY(TN, T, 44)                                                                         \
    FK_HADQ_ENTRY(TN, T, 60)
FK_HADQ_ENTRIES(bf16, __nv_bfloat16)
FK_HADQ_ENTRIES(f16, __half)
