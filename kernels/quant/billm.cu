// BiLLM 1-bit weights (issue 16, item 3): y = x . W^T read straight from the packed bits
// (src/quant/billm.rs, PackedBillm format 2), x and y bf16/f16, fp32 accumulation on tensor cores; and
// the unpack of the packed weight to a dense bf16/f16 matrix for large M.
//
// The maths. With s, t in {0, 1} a weight's first and second bits, a row-block (one output row, the 128
// columns of one block) is, over its salient columns S and the others N (t = 1: the sparse group),
//   sum_S (a1 (2s-1) + m1 + a2 (2t-1) + m2) x + sum_{N,t=0} (ac (2s-1) + mc) x + sum_{N,t=1} (ap (2s-1) + mp) x
//   = 2 a1 S(sx) + 2 a2 S(tx) + (m1 + m2 - a1 - a2) S(x)
//     + 2 ac N(sx) + 2 (ap - ac) N(stx) + (mp - ap - mc + ac) N(tx) + (mc - ac) N(x),
// where S(.) and N(.) sum over the salient and the other columns: seven dot products of the activations
// with 0/1 bit planes, then seven multiply-adds per row-block and token instead of work per weight.
//
// The dot products run on tensor cores (mma.sync m16n8k16, bf16 or f16 operands, fp32 accumulators):
//  - A (16 rows x 16 k) is a bit plane of 16 output rows: s, t, s AND t, or all ones, each bit turned
//    into 0 or 2.0 (0x4000, the same in bf16 and f16), so the accumulators hold exact-product sums times
//    two, and the 1/2 goes into the coefficients. Format 2 stores a column pair (2i, 2i+1) of each 32 at
//    bits (i, i+16), so one funnel-shift rotation and one AND (LOP3 for s AND t) give a register of two
//    operands: 5 instructions per two weights for the three planes, per 16-row tile and k step.
//  - B (16 k x 8) holds 4 tokens, each twice: column 2j is token j's activations in the salient columns
//    (0 elsewhere), column 2j+1 in the others. The salient mask is shared by every row, so it is applied
//    once per block while the activations are staged in shared memory, not per weight.
//  - D row g, columns 2q and 2q+1, is then S(.) and N(.) of token q for output row g (and g+8).
//
// A block of 4 warps owns 64 output rows (16 per warp) and 4 TG tokens, and walks its range of 128-column
// blocks (split-K over gridDim.y, as W4A16: several splits write fp32 partials that the tile's last
// block to arrive adds in split order in the same launch, fk_splitk.cuh, so the result depends on the
// plan only). Per block of columns: the 128 threads stage
// each token's 128 activations (thread = column; past K: 0) split by the salient mask into a
// double-buffered tile (one barrier per block); each warp loads its rows' signs, second bits and
// parameters (16-byte loads, one block ahead), forms the planes for each of the 8 k steps, and for each
// token group runs 4 MMAs on B fragments from ldmatrix.x4. Rows past N load nothing (all planes 0) and
// write nothing; tokens past M are zero rows of the tile and write nothing.
#include "fk_common.cuh"
#include "fk_mma.cuh"
#include "fk_splitk.cuh"
#include "quant_params.h"

// Dynamic shared memory (declared outside the anonymous namespace: the emulator provides the symbol).
extern __shared__ __align__(16) unsigned char fk_smem[];

namespace {

constexpr int BL = FK_BILLM_BLOCK;
constexpr int XP = BL + 8;       // staged row pitch in elements (272 bytes: ldmatrix rows on distinct banks)
constexpr int GROUP = 8 * XP;    // one token group: (salient, other) rows of 4 tokens
constexpr uint32_t TWO = 0x40004000u;  // bit 14 of both halves: 2.0 in bf16 and in f16

template <typename T>
__device__ __forceinline__ void bl_mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
template <>
__device__ __forceinline__ void bl_mma<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    fk_mma_m16n8k16_bf16(d, a, b, d);
}
template <>
__device__ __forceinline__ void bl_mma<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    fk_mma_m16n8k16_f16(d, a, b, d);
}

__device__ __forceinline__ uint32_t bl_word(const uint4 &v, int w) {
    return w == 0 ? v.x : w == 1 ? v.y : w == 2 ? v.z : v.w;
}

__device__ __forceinline__ float bl_f16(uint32_t bits) { return __half2float(__ushort_as_half((unsigned short)bits)); }

// A row-block's eight f16 parameters a1 m1 a2 m2 (salient, two residual orders), ac mc (concentrated),
// ap mp (sparse), low half of each word first.
struct BlParams {
    float a1, m1, a2, m2, ac, mc, ap, mp;
};
__device__ __forceinline__ BlParams bl_params(const uint4 &pw) {
    return BlParams{bl_f16(pw.x & 0xffffu), bl_f16(pw.x >> 16), bl_f16(pw.y & 0xffffu), bl_f16(pw.y >> 16),
                    bl_f16(pw.z & 0xffffu), bl_f16(pw.z >> 16), bl_f16(pw.w & 0xffffu), bl_f16(pw.w >> 16)};
}

// The seven coefficients of a row-block (the sums are doubled: see the top of the file).
__device__ __forceinline__ void bl_coef(const uint4 &pw, float (&c)[7]) {
    const BlParams q = bl_params(pw);
    const float a1 = q.a1, m1 = q.m1, a2 = q.a2, m2 = q.m2, ac = q.ac, mc = q.mc, ap = q.ap, mp = q.mp;
    c[0] = a1;                                   // x 2 S(sx)
    c[1] = a2;                                   // x 2 S(tx)
    c[2] = 0.5f * ((m1 + m2) - (a1 + a2));       // x 2 S(x)
    c[3] = ac;                                   // x 2 N(sx)
    c[4] = ap - ac;                              // x 2 N(stx)
    c[5] = 0.5f * ((mp - ap) - (mc - ac));       // x 2 N(tx)
    c[6] = 0.5f * (mc - ac);                     // x 2 N(x)
}

// Stages block b's activations of this block's tokens into buffer `dst` ([TG][8][XP]): thread = column.
template <int TG>
__device__ __forceinline__ void bl_stage(const fk_billm_params &p, uint16_t *dst, int b, int64_t m0, int tokens) {
    const int tid = threadIdx.x;
    const int64_t kg = (int64_t)b * BL + tid;
    const int c = tid & 31;
    const uint32_t mask = __ldg(p.salient + (int64_t)b * 4 + (tid >> 5));
    const bool sal = (mask >> ((c >> 1) + 16 * (c & 1))) & 1u;
    const uint16_t *x = reinterpret_cast<const uint16_t *>(p.x) + m0 * p.lda + kg;
    const bool in = kg < p.k;
    for (int j = 0; j < tokens; ++j, x += p.lda) {
        const uint16_t v = in ? *x : (uint16_t)0;
        uint16_t *d = dst + (j >> 2) * GROUP + 2 * (j & 3) * XP + tid;
        d[0] = sal ? v : (uint16_t)0;
        d[XP] = sal ? (uint16_t)0 : v;
    }
}

// A warp's rows (g and g + 8 of its 16) of one block: sign bits, second bits, parameters.
struct BlRows {
    uint4 s[2], t[2], p[2];
};

// Loads block b's words of rows ra (ok[0]) and ra + 8 (ok[1]); rows past N read nothing and hold 0.
__device__ __forceinline__ void bl_fetch(BlRows &r, const uint4 *const (&base)[3], int64_t b, int64_t n,
                                         const bool (&ok)[2]) {
    const int64_t at = b * n;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        r.s[h] = ok[h] ? __ldg(base[0] + at + 8 * h) : make_uint4(0u, 0u, 0u, 0u);
        r.t[h] = ok[h] ? __ldg(base[1] + at + 8 * h) : make_uint4(0u, 0u, 0u, 0u);
        r.p[h] = ok[h] ? __ldg(base[2] + at + 8 * h) : make_uint4(0u, 0u, 0u, 0u);
    }
}

// One 128-column block: stage its activations, fetch the next block's rows (into `nxt`, if any), form
// the bit planes of `cur` and run the MMAs, then the seven multiply-adds per row and token into `out`.
template <typename T, int TG>
__device__ __forceinline__ void bl_block(const fk_billm_params &p, uint16_t *buf, int b, bool more, int64_t m0,
                                         int tokens, const BlRows &cur, BlRows &nxt, const uint4 *const (&base)[3],
                                         const bool (&ok)[2], const uint32_t (&rot)[2][2], int lm, uint32_t two,
                                         float (&out)[TG][4]) {
    bl_stage<TG>(p, buf, b, m0, tokens);
    if (more) bl_fetch(nxt, base, b + 1, p.n, ok);
    __syncthreads();  // this block's tile is staged (the other buffer was last read before this barrier)

    // The ones plane in registers the MMAs do not overwrite (a constant would be rematerialised per MMA).
    const uint32_t ones[4] = {two, two, two, two};
    float acc[TG][4][4];  // [token group][plane: s, t, s AND t, ones][D register]
#pragma unroll
    for (int t = 0; t < TG; ++t)
#pragma unroll
        for (int pl = 0; pl < 4; ++pl)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[t][pl][c] = 0.0f;
#pragma unroll
    for (int sp = 0; sp < 4; ++sp) {
        uint32_t bf[TG][4];
#pragma unroll
        for (int t = 0; t < TG; ++t) fk_ldmatrix_x4(bf[t], buf + t * GROUP + lm + 32 * sp);
#pragma unroll
        for (int s2 = 0; s2 < 2; ++s2) {
            // k step st = 2 sp + s2: word sp of each row, column pairs 8 s2 + 4 h + q.
            uint32_t as[4], at[4], ast[4];
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const uint32_t sh = rot[s2][r >> 1];
                const uint32_t vs = bl_word(cur.s[r & 1], sp), vt = bl_word(cur.t[r & 1], sp);
                const uint32_t s = __funnelshift_l(vs, vs, sh), tt = __funnelshift_l(vt, vt, sh);
                as[r] = s & TWO;
                at[r] = tt & TWO;
                ast[r] = s & tt & TWO;
            }
#pragma unroll
            for (int t = 0; t < TG; ++t) {
                const uint32_t bb[2] = {bf[t][2 * s2], bf[t][2 * s2 + 1]};
                bl_mma<T>(acc[t][0], as, bb);
                bl_mma<T>(acc[t][1], at, bb);
                bl_mma<T>(acc[t][2], ast, bb);
                bl_mma<T>(acc[t][3], ones, bb);
            }
        }
    }
    // Seven multiply-adds per row-block and token: D[c] with c = 2 rr + (0: salient, 1: other).
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        float cf[7];
        bl_coef(cur.p[rr], cf);
#pragma unroll
        for (int t = 0; t < TG; ++t) {
            const int cs = 2 * rr, cn = 2 * rr + 1;
            float v = out[t][cs];
            v = fmaf(cf[0], acc[t][0][cs], v);
            v = fmaf(cf[1], acc[t][1][cs], v);
            v = fmaf(cf[2], acc[t][3][cs], v);
            v = fmaf(cf[3], acc[t][0][cn], v);
            v = fmaf(cf[4], acc[t][2][cn], v);
            v = fmaf(cf[5], acc[t][1][cn], v);
            v = fmaf(cf[6], acc[t][3][cn], v);
            out[t][cs] = v;
        }
    }
}

template <typename T, int TG>
__device__ void billm(const fk_billm_params &p) {
    static_assert(FK_BILLM_THREADS == BL, "staging gives each thread one column of a block");
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, q = lane & 3;
    constexpr int BUF = TG * GROUP;
    uint16_t *xs = reinterpret_cast<uint16_t *>(fk_smem);
    const int64_t m0 = (int64_t)blockIdx.z * (4 * TG);
    const int tokens = (int)(p.m - m0 < 4 * TG ? p.m - m0 : 4 * TG);
    const int64_t ra = (int64_t)blockIdx.x * FK_BILLM_ROWS + warp * 16 + g;
    const bool ok[2] = {ra < p.n, ra + 8 < p.n};
    const uint4 *const base[3] = {reinterpret_cast<const uint4 *>(p.signs) + ra,
                                  reinterpret_cast<const uint4 *>(p.second) + ra,
                                  reinterpret_cast<const uint4 *>(p.params) + ra};
    const int b0 = blockIdx.y * p.blocks_per_split;
    const int b1 = min(p.blocks, b0 + p.blocks_per_split);

    // Both buffers zeroed once: the rows of tokens past M stay zero (the pad columns are never read).
    for (int i = tid; i < 2 * BUF / 8; i += FK_BILLM_THREADS) reinterpret_cast<uint4 *>(xs)[i] = make_uint4(0u, 0u, 0u, 0u);
    // Rotation bringing column pair i = 8 (st & 1) + 4 h + q of a word to bits (14, 30).
    uint32_t rot[2][2];
#pragma unroll
    for (int s2 = 0; s2 < 2; ++s2)
#pragma unroll
        for (int h = 0; h < 2; ++h) rot[s2][h] = (uint32_t)(14 - 8 * s2 - 4 * h - q) & 31u;
    // ldmatrix.x4 row address of this lane (matrix lane >> 3, row lane & 7) within a token group.
    const int lm = (lane & 7) * XP + 8 * (lane >> 3);
    // 2.0 in both halves, from a kernel argument so that the compiler keeps it in registers.
    const uint32_t two = TWO | (uint32_t)(p.k < 0);

    float out[TG][4];
#pragma unroll
    for (int t = 0; t < TG; ++t)
#pragma unroll
        for (int c = 0; c < 4; ++c) out[t][c] = 0.0f;

    // Rows are fetched one block ahead into two register sets used in turn (no copies between them).
    BlRows ra_rows, rb_rows;
    if (b0 < b1) bl_fetch(ra_rows, base, b0, p.n, ok);
    __syncthreads();  // the zeroed buffers before any staging
    for (int b = b0; b < b1; b += 2) {
        bl_block<T, TG>(p, xs, b, b + 1 < b1, m0, tokens, ra_rows, rb_rows, base, ok, rot, lm, two, out);
        if (b + 1 < b1)
            bl_block<T, TG>(p, xs + BUF, b + 1, b + 2 < b1, m0, tokens, rb_rows, ra_rows, base, ok, rot, lm, two,
                            out);
    }

    // This thread's outputs: out[t][2 rr] is token 4t + q, row ra + 8 rr; f(t, rr, token, row) for those
    // inside M x N.
    const auto each_output = [&](auto &&f) {
#pragma unroll
        for (int t = 0; t < TG; ++t) {
            const int64_t m = m0 + 4 * t + q;
#pragma unroll
            for (int rr = 0; rr < 2; ++rr) {
                const int64_t row = ra + 8 * rr;
                if (m < p.m && row < p.n) f(t, rr, m, row);
            }
        }
    };
    each_output([&](int t, int rr, int64_t m, int64_t row) {
        const float v = out[t][2 * rr];
        if (p.ws != nullptr)
            p.ws[((int64_t)blockIdx.y * p.m + m) * p.n + row] = v;
        else
            reinterpret_cast<T *>(p.y)[m * p.n + row] = fk_from_f32<T>(v);
    });
    if (p.ws == nullptr) return;

    // Several splits: the tile's last block to arrive adds them in split order (fk_splitk.cuh), each
    // thread the outputs it wrote.
    if (!fk_splitk_arrive(p.counters + blockIdx.z * gridDim.x + blockIdx.x, gridDim.y)) return;
    each_output([&](int, int, int64_t m, int64_t row) {
        reinterpret_cast<T *>(p.y)[m * p.n + row] =
            fk_from_f32<T>(fk_splitk_sum(p.ws, p.m * p.n, m * p.n + row, gridDim.y));
    });
}

// The dense weight, one thread per 8 consecutive columns of a row (row-major order, so a warp's stores
// are consecutive: one 16-byte store each when rows are 16-byte aligned).
template <typename T>
__device__ void billm_unpack(const fk_billm_unpack_params &p) {
    const uint64_t chunks = (uint64_t)p.n * p.blocks * 16;
    for (uint64_t i = fk_global_thread(); i < chunks; i += fk_grid_threads()) {
        const int ch = (int)(i & 15);
        const uint64_t rowblock = i >> 4;
        const int64_t r = (int64_t)(rowblock / (uint64_t)p.blocks);
        const int b = (int)(rowblock % (uint64_t)p.blocks);
        const int64_t c0 = (int64_t)b * BL + 8 * ch;
        if (c0 >= p.k) continue;
        const int64_t pk = (int64_t)b * p.n + r;  // the packed (block, row) index
        const int w = ch >> 2, o = 8 * (ch & 3);   // word of the block, first column in it
        const uint32_t s = __ldg(p.signs + pk * 4 + w), t = __ldg(p.second + pk * 4 + w);
        const uint32_t sal = __ldg(p.salient + (int64_t)b * 4 + w);
        const BlParams q = bl_params(__ldg(reinterpret_cast<const uint4 *>(p.params) + pk));
        const float a1 = q.a1, m1 = q.m1, a2 = q.a2, m2 = q.m2, ac = q.ac, mc = q.mc, ap = q.ap, mp = q.mp;
        alignas(16) T v[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int c = o + j, bit = (c >> 1) + 16 * (c & 1);
            const bool bs = (s >> bit) & 1u, bt = (t >> bit) & 1u;
            float f;
            if ((sal >> bit) & 1u) {
                // Four f16 terms: summed in f64 (exact), rounded once, as PackedBillm::dequantize.
                f = (float)(((double)(bs ? a1 : -a1) + (double)m1) + ((double)(bt ? a2 : -a2) + (double)m2));
            } else if (bt) {
                f = (bs ? ap : -ap) + mp;  // one rounding of the exact sum
            } else {
                f = (bs ? ac : -ac) + mc;
            }
            v[j] = fk_from_f32<T>(f);
        }
        T *out = reinterpret_cast<T *>(p.w) + r * p.k + c0;
        if (p.vec && c0 + 8 <= p.k) {
            *reinterpret_cast<uint4 *>(out) = *reinterpret_cast<const uint4 *>(v);
        } else {
            for (int j = 0; j < 8 && c0 + j < p.k; ++j) out[j] = v[j];
        }
    }
}

}  // namespace

#define FK_BILLM_ENTRY(TN, T, TG)                                                                       \
    extern "C" __global__ void __launch_bounds__(FK_BILLM_THREADS) fk_billm_##TN##_t##TG(const fk_billm_params p) { \
        billm<T, TG>(p);                                                                               \
    }
// Tokens per block: 4, 8 or 16 (the plan picks the smallest that covers M, up to 16; more M: grid z).
FK_BILLM_ENTRY(bf16, __nv_bfloat16, 1)
FK_BILLM_ENTRY(bf16, __nv_bfloat16, 2)
FK_BILLM_ENTRY(bf16, __nv_bfloat16, 4)
FK_BILLM_ENTRY(f16, __half, 1)
FK_BILLM_ENTRY(f16, __half, 2)
FK_BILLM_ENTRY(f16, __half, 4)

extern "C" __global__ void __launch_bounds__(256) fk_billm_unpack_bf16(const fk_billm_unpack_params p) {
    billm_unpack<__nv_bfloat16>(p);
}
extern "C" __global__ void __launch_bounds__(256) fk_billm_unpack_f16(const fk_billm_unpack_params p) {
    billm_unpack<__half>(p);
}
