// W4A4: y = x . W^T with x quantised per token to int4 (the online Hadamard kernel's output,
// src/quant/online.rs) and W per output channel, symmetric int4 (src/quant/w4a4.rs, PackedW4A4,
// format 1); int32 accumulation on tensor cores.
//
// The maths (src/quant/DESIGN.md, W4A4): a token is s_x (q_x - z_x), a weight s_w (q_w - 8), with codes in
// 0..15. With a = q_x - 8 and b = q_w - 8 (signed int4, the MMA's operands: a is q_x XOR 8 per nibble,
// b is stored so),
//   y[m][n] = s_x[m] s_w[n] (sum_k a b - (z_x[m] - 8) colsum[n]),   colsum[n] = sum_k b,
// colsum stored with the weight, so the MMA loop has no zero-point term. The integer sums are exact, and
// so is the split-K sum of int32 partials: the result depends on neither the plan nor the path, and only
// the epilogue rounds (int32 -> f32 exact for |sum| < 2^24, two f32 multiplications, then T).
//
// Paths (one kernel each, the plan picks by compute capability):
//  - s4 (sm_80/86/89): mma.sync m16n8k64.s4, two per 128-deep chunk and 16 x 8 tile.
//  - s8 (sm_90, which has no int4 tensor cores): each word of 8 codes is widened into two words of 4 s8,
//    nibble << 4 (values 16 a and 16 b: one shift and one AND per word, no sign extension needed), for
//    mma.sync m16n8k32.s8; the sum, 256 times the true one, is shifted back exactly. K <= 65536 keeps
//    it inside int32 (at most 2^30; the plan and the packer refuse more). The k order inside the MMA differs from the s4 path's (even
//    codes, then odd), the same for A and B, so the dot product is the same.
//
// Layout: a block of 4 warps owns 64 output columns and 16 MT tokens; the 128-deep k chunks of its split
// are dealt to the warps in turn. Per chunk a lane loads, for each of the 8 column subtiles, one 16-byte
// word of weight row 8 j + g: the packed format stores each chunk's 16 words transposed 4 x 4, so lane t
// gets words t, t + 4, t + 8, t + 12 of its row, the B fragments of the chunk's two k64 tiles, in one
// load. Activations: 4-byte loads of words t + 4 i of token rows g and g + 8 (rows of x are K/2 bytes,
// K % 8 == 0: word aligned). Tokens past M and words past K load nothing and hold 0 (a = 0), and the
// weight's padding is b = 0, so tails need no masks in the MMAs. The warps' int32 sums are added in
// shared memory, then written through the epilogue (one split), or as int32 partials that the tile's
// last block to arrive adds (fk_splitk.cuh) before the epilogue.
#include "fk_common.cuh"
#include "fk_mma.cuh"
#include "fk_splitk.cuh"
#include "quant_params.h"

// Dynamic shared memory (declared outside the anonymous namespace: the emulator provides the symbol).
extern __shared__ __align__(16) unsigned char fk_smem[];

namespace {

constexpr int A4_NB = FK_W4A4_NBLOCK;
constexpr int A4_KC = FK_W4A4_KCHUNK;
constexpr int A4_WARPS = FK_W4A4_WARPS;
constexpr uint32_t A4_SIGN = 0x88888888u;  // q XOR 8 per nibble = q - 8 as signed int4

__device__ __forceinline__ uint32_t w4a4_word(const uint4 &v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// The s8 path's halves of a word of 8 signed codes: bytes 16 c_0, 16 c_2, 16 c_4, 16 c_6 and
// 16 c_1, 16 c_3, 16 c_5, 16 c_7.
__device__ __forceinline__ uint32_t w4a4_even(uint32_t w) { return (w << 4) & 0xf0f0f0f0u; }
__device__ __forceinline__ uint32_t w4a4_odd(uint32_t w) { return w & 0xf0f0f0f0u; }

// One k64 step of a 16 x 8 tile: A registers a (rows g, g + 8; words t and t + 4 of the step), B words
// b0, b1 (the same k as a's).
template <bool S8>
__device__ __forceinline__ void w4a4_mma(int32_t (&d)[4], const uint32_t (&a)[4], const uint32_t (&ae)[4],
                                         const uint32_t (&ao)[4], uint32_t b0, uint32_t b1) {
    if (S8) {
        // Slots 4t..4t+3 hold word t's even codes, 16+4t.. its odd ones, in A and B alike.
        const uint32_t x0[4] = {ae[0], ae[1], ao[0], ao[1]};
        const uint32_t y0[2] = {w4a4_even(b0), w4a4_odd(b0)};
        fk_mma_m16n8k32_s8(d, x0, y0, d);
        const uint32_t x1[4] = {ae[2], ae[3], ao[2], ao[3]};
        const uint32_t y1[2] = {w4a4_even(b1), w4a4_odd(b1)};
        fk_mma_m16n8k32_s8(d, x1, y1, d);
    } else {
        const uint32_t b[2] = {b0, b1};
        fk_mma_m16n8k64_s4(d, a, b, d);
    }
}

// The epilogue of one output from its exact int32 sum v = sum_k (q_x - 8)(q_w - 8): the zero-point
// correction in int32 (|v - (z - 8) colsum| <= 2^24 for K <= 65536, so the f32 conversion is exact), then
// the two scales.
__device__ __forceinline__ float w4a4_out(const fk_w4a4_params &p, int32_t v, int64_t row, int64_t col) {
    const int32_t i = v - ((int32_t)p.x_zeros[row] - 8) * p.colsum[col];
    return ((float)i * p.x_scales[row]) * p.w_scales[col];
}

template <typename T, int MT, bool S8>
__device__ void w4a4(const fk_w4a4_params &p) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int64_t nb = blockIdx.x, m0 = (int64_t)blockIdx.y * 16 * MT;
    const int chunks = p.k_pad / A4_KC;
    const int c_begin = blockIdx.z * p.chunks_per_split;
    const int c_end = min(chunks, c_begin + p.chunks_per_split);
    const int kwords = p.k >> 3;  // words of 8 codes per row of x (K % 8 == 0)

    // This lane's weight rows (8 j + g of the block) as 16-byte words, and its token rows as words.
    const uint4 *wrow = reinterpret_cast<const uint4 *>(p.codes) + (nb * A4_NB + g) * (int64_t)(p.k_pad / 32) + t;
    const int64_t wstride = 8 * (int64_t)(p.k_pad / 32);  // from subtile j to j + 1
    const uint32_t *xrow[MT][2];
    bool xin[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int64_t r = m0 + mt * 16 + g + 8 * h;
            xin[mt][h] = r < p.m;
            xrow[mt][h] = reinterpret_cast<const uint32_t *>(p.x) + (xin[mt][h] ? r : 0) * (int64_t)kwords;
        }

    int32_t acc[MT][8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[mt][j][c] = 0;

    for (int c = c_begin + warp; c < c_end; c += A4_WARPS) {
        uint4 bw[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) bw[j] = __ldg(wrow + j * wstride + c * 4);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            // Words t + 4 i of the chunk, rows g (h = 0) and g + 8 (h = 1): xw[h][i].
            uint32_t xw[2][4];
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int w = c * 16 + t + 4 * i;
                    xw[h][i] = xin[mt][h] && w < kwords ? __ldg(xrow[mt][h] + w) ^ A4_SIGN : 0u;
                }
#pragma unroll
            for (int kt = 0; kt < 2; ++kt) {
                const uint32_t a[4] = {xw[0][2 * kt], xw[1][2 * kt], xw[0][2 * kt + 1], xw[1][2 * kt + 1]};
                uint32_t ae[4], ao[4];
#pragma unroll
                for (int r = 0; r < 4; ++r) {
                    ae[r] = S8 ? w4a4_even(a[r]) : 0u;
                    ao[r] = S8 ? w4a4_odd(a[r]) : 0u;
                }
#pragma unroll
                for (int j = 0; j < 8; ++j)
                    w4a4_mma<S8>(acc[mt][j], a, ae, ao, w4a4_word(bw[j], 2 * kt), w4a4_word(bw[j], 2 * kt + 1));
            }
        }
    }

    // Cross-warp sum (exact): red[warp][mt][j][c][lane].
    int32_t *red = reinterpret_cast<int32_t *>(fk_smem);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) red[(((warp * MT + mt) * 8 + j) * 4 + c) * 32 + lane] = acc[mt][j][c];
    __syncthreads();
    constexpr int PER_WARP = MT * 8 * 4 * 32;
    const bool split = p.ws != nullptr;
    for (int e = tid; e < PER_WARP; e += FK_W4A4_THREADS) {
        int32_t v = 0;
#pragma unroll
        for (int w = 0; w < A4_WARPS; ++w) v += red[w * PER_WARP + e];
        if (S8) v >>= 8;  // exact: the widened codes carry a factor 16 each
        const int l = e & 31, c = (e >> 5) & 3, j = (e >> 7) & 7, mt = e >> 10;
        const int64_t row = m0 + mt * 16 + (l >> 2) + 8 * (c >> 1);
        const int64_t col = nb * A4_NB + 8 * j + 2 * (l & 3) + (c & 1);
        if (row < p.m && col < p.n) {
            if (split)
                p.ws[((int64_t)blockIdx.z * p.m + row) * p.n + col] = v;
            else
                reinterpret_cast<T *>(p.y)[row * p.n + col] = fk_from_f32<T>(w4a4_out(p, v, row, col));
        }
    }
    if (!split) return;

    // Several splits: the tile's last block to arrive adds the int32 partials (exact) and finishes.
    if (!fk_splitk_arrive(p.counters + blockIdx.y * gridDim.x + blockIdx.x, gridDim.z)) return;
    for (int e = tid; e < PER_WARP; e += FK_W4A4_THREADS) {
        const int l = e & 31, c = (e >> 5) & 3, j = (e >> 7) & 7, mt = e >> 10;
        const int64_t row = m0 + mt * 16 + (l >> 2) + 8 * (c >> 1);
        const int64_t col = nb * A4_NB + 8 * j + 2 * (l & 3) + (c & 1);
        if (row < p.m && col < p.n) {
            const int32_t v = fk_splitk_sum_s32(p.ws, p.m * p.n, row * p.n + col, gridDim.z);
            reinterpret_cast<T *>(p.y)[row * p.n + col] = fk_from_f32<T>(w4a4_out(p, v, row, col));
        }
    }
}

}  // namespace

#define FK_W4A4_ENTRY(PATH, S8, TN, T, MT, ROWS)                                                        \
    extern "C" __global__ void __launch_bounds__(FK_W4A4_THREADS)                                     \
        fk_w4a4_##PATH##_##TN##_m##ROWS(const fk_w4a4_params p) {                                     \
        w4a4<T, MT, S8>(p);                                                                            \
    }
// Tokens per block: 16 or 64 (the plan picks 16 up to M = 16); s4: sm_80/86/89, s8: sm_90.
FK_W4A4_ENTRY(s4, false, bf16, __nv_bfloat16, 1, 16)
FK_W4A4_ENTRY(s4, false, bf16, __nv_bfloat16, 4, 64)
FK_W4A4_ENTRY(s4, false, f16, __half, 1, 16)
FK_W4A4_ENTRY(s4, false, f16, __half, 4, 64)
FK_W4A4_ENTRY(s8, true, bf16, __nv_bfloat16, 1, 16)
FK_W4A4_ENTRY(s8, true, bf16, __nv_bfloat16, 4, 64)
FK_W4A4_ENTRY(s8, true, f16, __half, 1, 16)
FK_W4A4_ENTRY(s8, true, f16, __half, 4, 64)
