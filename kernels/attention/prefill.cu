// kernels/attention/prefill.cu: causal flash attention of a batch of new tokens (ragged query lengths)
// over a paged bf16/f16 KV cache that already holds them.
//
// Sequence b has seq_lens[b] = L tokens in its pages, of which the last Q = qo_indptr[b+1] - qo_indptr[b]
// are its new tokens (the queries). Query i (0-based among the new ones) sits at position L - Q + i and
// attends to cache tokens j in [lo_i, L - Q + i] (bottom-right aligned causal mask: chunked prefill over
// a cached prefix), lo_i = max(0, L - Q + i + 1 - window) with a window, else 0:
//   s_ij = scale · q_i·k_j (softcap c: c·tanh(s/c)),  o_i = Σ_j softmax_j(s_i) v_j,  lse_i = ln Σ_j e^(s_ij).
//
// Launch: one CTA of 4 warps per (tile of 64 packed rows, KV head, sequence). A packed row is (new token,
// query head of the KV head's GQA group), row r = token · group + head, so each K/V tile is read once for
// the whole group. Warp w owns rows 16w..16w+15 (one m16 tile). K/V tiles of BKV tokens (64; 32 at head
// dim 256) are gathered token by token through the page table (any page size) into shared memory with
// 16-byte cp.async, in a 2-stage pipeline: tile j+1 loads while tile j is computed. Shared tiles are
// [rows][head_dim] with the 16-byte chunks of a row XOR-swizzled by (row mod 8), so ldmatrix reads and
// cp.async writes are free of bank conflicts.
//   S = Q Kᵀ: mma.sync m16n8k16, A = Q (ldmatrix; kept in registers for head dim <= 128), B = K (ldmatrix).
//   online softmax in base 2 per row (fk_ex2 of s·c − m·c, one FFMA + one MUFU per score), fp32 state;
//   O += P V: P rounded to T in registers (the S accumulators are already the A fragment), B = V
//   (ldmatrix.trans).
// RoPE (fk_attn_prefill_rope_*, rope_q / rope_k): the Q tile is rotated in shared memory once, each K
// tile after it lands (keys cached before RoPE), both rounded to T there; one more barrier per tile with
// rope_k. A separate instantiation, so the kernel without RoPE keeps its hot loop as it was.
// KIVI int8/int4 caches (fk_attn_prefill_q{8,4}_*): the code rows of a tile's tokens, the K parameters of
// the token groups it touches and the V parameters of its tokens are copied (cp.async) into two stages
// of staging; after they land, the CTA dequantises the tile (fmaf(code, scale, zero) in f32, rounded to
// T, the tokens past the last complete group copied from the sequence's residual slot) into one stage of
// T tiles, and the mma loop runs on those unchanged. Per tile: 2 · BKV · D conversions over 128 threads
// against 64 · BKV · D · 4 mma FLOPs, and the codes load while the previous tile computes. Head dim 256
// takes tiles of 16 tokens (shared memory). RoPE is a runtime choice there.
// The causal/window mask is applied only to tiles that cross a row's range (a second copy of the
// softmax); O is rescaled only when a row's max passes the running reference by more than 2^8. CTAs are
// launched heaviest first (the last query tiles attend to the most tokens).
//
// Floor: FLOPs 4 · Σ_rows attended tokens · head_dim (two GEMMs), bytes: Q and O once, K and V of the
// attended tokens once per (query tile, KV head). Compute-bound for query tiles of 64 rows.
//
// A page table or qo_indptr on the device that disagrees with the plan is never read or written out of
// bounds: a sequence whose lengths, pages or query rows do not fit is written NaN (where its rows are
// inside the output) and recorded in the status word (so is a residual slot outside [0, n_slots) over
// a quantised cache); a page index outside the cache makes the rows of the CTA that met it NaN, and is
// recorded too.
#include "attention_params.h"
#include "fk_common.cuh"
#include "fk_kivi.cuh"
#include "fk_mma.cuh"
#include "fk_rope.cuh"

#include <type_traits>

namespace fk_prefill {

constexpr int THREADS = FK_ATTN_PREFILL_THREADS;
constexpr int BQ = FK_ATTN_PREFILL_ROWS;
static_assert(THREADS == 128 && BQ == 64, "4 warps of one m16 row tile each");

template <int D, bool QUANT = false>
struct tiles {
    static constexpr int BKV = D == 64    ? FK_ATTN_PREFILL_KV_TILE_D64
                               : D == 128 ? FK_ATTN_PREFILL_KV_TILE_D128
                               : QUANT    ? FK_ATTN_PREFILL_KV_TILE_Q_D256
                                          : FK_ATTN_PREFILL_KV_TILE_D256;
    // Head dim 256: 128 accumulator registers for O leave no room for Q's 64; it is re-read by ldmatrix.
    static constexpr bool Q_IN_REGS = D <= 128;
    static constexpr int CPR = D / 8;                // 16-byte chunks per row
    static constexpr int ROWS_PER_PASS = THREADS / CPR;
    static_assert(D == 64 || D == 128 || D == 256, "head dims 64, 128, 256");
    static_assert(BKV % 16 == 0 && BKV % ROWS_PER_PASS == 0 && BQ % ROWS_PER_PASS == 0, "tile shapes");
};

// The staging of a quantised cache's tiles (BITS = 8 or 4): per stage, the K and V code rows of BKV
// tokens, the K parameters of the (at most NGK) token groups the tile touches, and the V parameters of
// its tokens (VGM words per token at most). Dynamic shared memory after Q and one stage of K and V in T:
// codes [2 stages][K, V][BKV][CROW] bytes, K params [2][NGK][D] words, V params [2][BKV][VGM] words
// (PrefillPlan::shared_mem_bytes computes the same).
template <int D, int BITS>
struct qtiles {
    static constexpr int BKV = tiles<D, true>::BKV;
    static constexpr int CROW = D * BITS / 8;          // code bytes of one token and head
    static constexpr int CCH = CROW / 16;              // its 16-byte chunks
    static constexpr int NGK = (BKV - 1) / 32 + 2;     // K groups of >= 32 tokens that BKV tokens can touch
    static constexpr int VGM = D / 32;                 // V groups (>= 32 channels) per token
    static_assert(BKV * CCH % THREADS == 0 && BKV + NGK <= THREADS, "copies and lookups per thread");
};

// Element offset of 16-byte chunk `c` of row `row` in a swizzled [rows][D] tile.
template <int D>
__device__ __forceinline__ int swz(int row, int c) {
    return row * D + ((c ^ (row & 7)) << 3);
}

// One lane's ldmatrix rows: row `row0 + row` (row0 a multiple of 8), chunk 2k + c (c = 0 or 1). With
// x = c ^ (row % 8), the swizzled chunk is (2k & ~7) + ((2k & 7) ^ x): four lane offsets, one per
// k mod 4, and the rest is a constant the compiler folds into the instruction.
template <int D>
struct lane_rows {
    int off[4];
    __device__ __forceinline__ lane_rows(int row, int c) {
#pragma unroll
        for (int i = 0; i < 4; ++i) off[i] = row * D + (((2 * i) ^ c ^ (row & 7)) << 3);
    }
    __device__ __forceinline__ int at(int row0, int k) const { return row0 * D + (k >> 2) * 64 + off[k & 3]; }
};

template <typename T>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    const uint32_t b[2] = {b0, b1};
    fk_mma_m16n8k16_bf16(d, a, b, d);
}
template <>
__device__ __forceinline__ void mma<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    const uint32_t b[2] = {b0, b1};
    fk_mma_m16n8k16_f16(d, a, b, d);
}

// Two floats rounded to T, packed as an mma operand register (the first in the low half).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float x, float y);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float x, float y) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(x, y);
    uint32_t u;
    memcpy(&u, &v, 4);
    return u;
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float x, float y) {
    const __half2 v = __floats2half2_rn(x, y);
    uint32_t u;
    memcpy(&u, &v, 4);
    return u;
}

// Eight floats rounded to T as one 16-byte chunk.
template <typename T>
__device__ __forceinline__ uint4 pack8(const float (&f)[8]) {
    return make_uint4(pack2<T>(f[0], f[1]), pack2<T>(f[2], f[3]), pack2<T>(f[4], f[5]), pack2<T>(f[6], f[7]));
}

// RoPE of rows [0, ROWS) of a swizzled [ROWS][D] tile of T, in place: row r at position
// min(first + (row0 + r) / div, last). Each thread turns pairs (c1, c2) of channels (half style: i and
// i + D/2; interleaved: 2i and 2i + 1) with the f32 angle and the MUFU sine/cosine of fk_rope.cuh.
template <typename T, int D, int ROWS>
__device__ __forceinline__ void rope_tile(T *tile, const fk_attn_prefill_params &p, int64_t first, int row0, int div,
                                          int64_t last) {
    constexpr int PAIRS = D / 2;
    for (int idx = threadIdx.x; idx < ROWS * PAIRS; idx += THREADS) {
        const int row = idx / PAIRS, i = idx % PAIRS;
        const int c1 = p.rope_style == 0 ? i : 2 * i, c2 = p.rope_style == 0 ? i + PAIRS : 2 * i + 1;
        T *const a = tile + swz<D>(row, c1 >> 3) + (c1 & 7);
        T *const b = tile + swz<D>(row, c2 >> 3) + (c2 & 7);
        const float pos = (float)min(first + (int64_t)((row0 + row) / div), last);
        const float inv = exp2f(-2.0f * (float)i / (float)D * p.rope_log2_theta);
        float sn, cs;
        fk_rope_sincos(pos * inv, &sn, &cs);
        const float x1 = fk_to_f32(*a), x2 = fk_to_f32(*b);
        *a = fk_from_f32<T>(x1 * cs - x2 * sn);
        *b = fk_from_f32<T>(fmaf(x2, cs, x1 * sn));
    }
}

__device__ __forceinline__ void flag(const fk_attn_prefill_params &p, int b) {
    if (threadIdx.x == 0 && p.status) atomicMax(p.status, (unsigned long long)(p.batch - b));
}

}  // namespace fk_prefill

// (At global scope: the dynamic shared buffer fk_smem is the global one, on the device and the emulator.)
// BITS = 0: a bf16/f16 cache (K/V tiles of T in two stages). BITS = 8 or 4: a KIVI cache; its code tiles
// and parameters are staged in two stages and dequantised into one stage of T tiles (see the top).
template <typename T, int D, bool ROPE, int BITS = 0>
__device__ __forceinline__ void attn_prefill(const fk_attn_prefill_params &p) {
    using namespace fk_prefill;
    constexpr bool QUANT = BITS != 0;
    using C = tiles<D, QUANT>;
    using QT = qtiles<D, QUANT ? BITS : 8>;
    constexpr int CROW = QT::CROW, CCH = QT::CCH, NGK = QT::NGK, VGM = QT::VGM;
    constexpr int TSTAGES = QUANT ? 1 : 2;  // stages of T tiles
    constexpr int BKV = C::BKV, CPR = C::CPR, RPP = C::ROWS_PER_PASS;
    constexpr int KSTEPS = D / 16;     // k-steps of S = Q Kᵀ
    constexpr int NT_S = BKV / 8;      // n-tiles of S (tokens)
    constexpr int NT_O = D / 8;        // n-tiles of O (dims)
    constexpr int KSTEPS_PV = BKV / 16;
    extern __shared__ __align__(16) unsigned char fk_smem[];
    T *const sQ = reinterpret_cast<T *>(fk_smem);  // [BQ][D], swizzled; O is staged here at the end
    T *const sK = sQ + BQ * D;                      // [TSTAGES][BKV][D]
    T *const sV = sK + TSTAGES * BKV * D;           // [TSTAGES][BKV][D]
    // Quantised: codes [2][2][BKV][CROW] bytes, K params [2][NGK][D] and V params [2][BKV][VGM] words.
    uint8_t *const sC = reinterpret_cast<uint8_t *>(sV + TSTAGES * BKV * D);
    uint32_t *const sKp = reinterpret_cast<uint32_t *>(sC + 4 * BKV * CROW);
    uint32_t *const sVp = sKp + 2 * NGK * D;
    // Byte offset of each tile token's K row (quantised: K code row; -1 for a residual token) in the
    // cache; quantised: of its V parameters, and of the K parameters of the groups the tile touches
    // (-1: a group the tile does not use).
    __shared__ int64_t s_off[2][BKV];
    __shared__ int64_t s_voff[QUANT ? 2 : 1][QUANT ? BKV : 1];
    __shared__ int64_t s_koff[QUANT ? 2 : 1][QUANT ? NGK : 1];

    const int tile = gridDim.x - 1 - blockIdx.x;  // heaviest tiles first
    const int kvh = blockIdx.y, b = blockIdx.z;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t4 = lane & 3;
    const int group = p.num_qo_heads / p.num_kv_heads;
    const int ps = p.page_size;
    const T *const cache = reinterpret_cast<const T *>(p.cache);
    const T *const q = reinterpret_cast<const T *>(p.q);
    T *const out = reinterpret_cast<T *>(p.o);

    // The sequence as the device sees it, checked before any read of the cache, q or o. Every thread
    // reads the same words, so the decision is uniform without a barrier.
    const int64_t qo0 = p.qo_indptr[b], qo1 = p.qo_indptr[b + 1];
    const int32_t pg0 = p.page_indptr[b], pg1 = p.page_indptr[b + 1];
    const int64_t len = p.seq_lens[b];
    const int64_t qlen = qo1 - qo0, pages = (int64_t)pg1 - pg0;
    const bool rows_ok = qo0 >= 0 && qlen >= 0 && qo1 <= p.total_q;
    int32_t rslot = 0;  // quantised: the sequence's residual slot
    bool slot_ok = true;
    if constexpr (QUANT) {
        rslot = p.residual_slots[b];
        slot_ok = rslot >= 0 && rslot < p.n_slots;
    }
    if (!rows_ok || pg0 < 0 || pages < 0 || pg1 > p.n_page_indices || len < 1 || pages != (len + ps - 1) / ps ||
        qlen > len || qlen * group > (int64_t)gridDim.x * BQ || !slot_ok) {
        if (tile == 0) {
            flag(p, b);
            if (rows_ok) {  // NaN over the sequence's rows of this KV head's query heads
                const int64_t n = qlen * group * D;
                for (int64_t i = tid; i < n; i += THREADS) {
                    const int64_t r = i / D, row = (qo0 + r / group) * p.num_qo_heads + kvh * group + r % group;
                    out[row * D + i % D] = fk_from_f32<T>(NAN);
                    if (i % D == 0) p.lse[row] = NAN;
                }
            }
        }
        return;
    }
    // Packed rows of the sequence: fewer than 2^31 (the plan's grid bound, checked above), so row
    // arithmetic is 32-bit.
    const int nrows = (int)(qlen * group);
    const int R0 = tile * BQ;
    if (R0 >= nrows) return;  // a shorter sequence than the grid's longest

    // Token ranges: every row of the CTA attends inside [kv_lo, kv_hi); all of them attend to
    // [full_lo, full_hi), where a tile needs no mask.
    const int64_t base = len - qlen;  // position of the first new token
    const int qi_first = R0 / group, qi_last = min(nrows - 1, R0 + BQ - 1) / group;
    const int64_t kv_hi = base + qi_last + 1, full_hi = base + qi_first + 1;
    const int64_t kv_lo = p.window > 0 ? max((int64_t)0, base + qi_first + 1 - p.window) : 0;
    const int64_t full_lo = p.window > 0 ? max((int64_t)0, base + qi_last + 1 - p.window) : 0;
    const int n_tiles = (int)((kv_hi - kv_lo + BKV - 1) / BKV);

    // This thread's two rows of the accumulator layout (g and g + 8 of its warp's 16): last and first
    // token attended. A row past the sequence attends to nothing that is written out.
    int64_t lim[2], lo[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int r = R0 + warp * 16 + g + 8 * i;
        lim[i] = r < nrows ? base + r / group : -1;
        lo[i] = p.window > 0 ? max((int64_t)0, lim[i] + 1 - p.window) : 0;
    }
    // Output row (in [total_q, num_qo_heads]) of packed row r.
    auto qo_row = [&](int r) -> int64_t {
        const int qi = r / group;
        return (qo0 + qi) * p.num_qo_heads + kvh * group + (r - qi * group);
    };

    const int64_t page_elems = 2 * (int64_t)p.num_kv_heads * ps * D;
    const int64_t head_run = (int64_t)ps * D;
    const int64_t v_delta = (int64_t)p.num_kv_heads * head_run * (int64_t)sizeof(T);  // bytes, K to V
    // Quantised: the sequence's tokens below nq (complete groups) are codes in the pages, the rest in
    // its residual slot; groups are powers of two (32, 64, 128).
    const int lg = QUANT ? __ffs(p.group) - 1 : 0;
    const int64_t nq = QUANT ? (int64_t)(((uint32_t)len >> lg) << lg) : 0;
    const int vgroups = QUANT ? D / p.v_group : 0;
    const int64_t head_codes = (int64_t)kvh * ps * CROW;
    // Threads < BKV look up one token each of tile j's page: the byte offset of its K row (quantised:
    // of its code row and V parameters; a residual token: -1), and, quantised, threads BKV .. BKV + NGK
    // the K parameters of the tile's groups (in the page of a group's first token). Tiles past the
    // last are the last one again, tokens past the range the range's last token: every tile copy reads
    // real rows (the mask discards the extra ones), so the loop's copies need no zero fill and no
    // branch. A page outside the cache is never read (offset 0 instead); it returns true. Tokens are
    // below 2^32 (u32 lengths). K groups are at least 32 tokens and V groups 32 channels (NGK, VGM;
    // src/attention/cache.rs asserts it of KIVI_GROUPS).
    auto tile_offsets = [&](int j, int stage) -> bool {
        bool bad = false;
        const int64_t tfirst = kv_lo + (int64_t)min(j, n_tiles - 1) * BKV;
        if (tid < BKV) {
            const int64_t t = min(tfirst + tid, kv_hi - 1);
            const uint32_t pi = (uint32_t)t / (uint32_t)ps, slot = (uint32_t)t - pi * (uint32_t)ps;
            int64_t off = 0;
            if (!QUANT || t < nq) {
                const int32_t page = p.page_indices[pg0 + pi];
                if (page >= 0 && page < p.num_pages) {
                    if constexpr (QUANT) {
                        off = page * p.page_bytes + head_codes + (int64_t)slot * CROW;
                        s_voff[stage][tid] = page * p.page_bytes + p.v_params_start +
                                             ((int64_t)kvh * ps + slot) * vgroups * 4;
                    } else {
                        off = (page * page_elems + kvh * head_run + (int64_t)slot * D) * (int64_t)sizeof(T);
                    }
                } else {
                    bad = true;
                    if constexpr (QUANT) s_voff[stage][tid] = 0;
                }
            } else {
                off = -1;
            }
            s_off[stage][tid] = off;
        } else if (QUANT && tid < BKV + NGK) {
            const int64_t tlast = min(tfirst + BKV - 1, kv_hi - 1);
            const int64_t first = ((int64_t)((uint32_t)tfirst >> lg) + (tid - BKV)) << lg;
            int64_t off = -1;
            if (first <= tlast && first + p.group <= nq) {
                const uint32_t fp = (uint32_t)first / (uint32_t)ps;
                const int32_t gp = p.page_indices[pg0 + fp];
                const int gslot = (int)(((uint32_t)first - fp * (uint32_t)ps) >> lg);
                if (gp >= 0 && gp < p.num_pages) {
                    off = gp * p.page_bytes + p.k_params_start + ((int64_t)kvh * p.k_param_slots + gslot) * D * 4;
                } else {
                    bad = true;
                    off = 0;
                }
            }
            s_koff[QUANT ? stage : 0][QUANT ? tid - BKV : 0] = off;
        }
        return bad;
    };
    // Each thread copies one 16-byte chunk column (tid % CPR) of every RPP-th row of the K and V tiles.
    const char *const kv_col = reinterpret_cast<const char *>(cache) + (tid % CPR) * 16;
    auto issue_kv = [&](int stage) {
        const int c = tid % CPR;
#pragma unroll
        for (int u = 0; u < BKV / RPP; ++u) {
            const int row = tid / CPR + u * RPP;
            const char *src = kv_col + s_off[stage][row];
            fk_cp_async_16(sK + stage * BKV * D + swz<D>(row, c), src);
            fk_cp_async_16(sV + stage * BKV * D + swz<D>(row, c), src + v_delta);
        }
    };

    // Quantised: the code rows of K and V (16-byte chunks; none for a residual token), the K parameters of
    // the tile's groups, the V parameters of its tokens (4-byte words) into codes stage `stage`.
    const uint8_t *const cbytes = reinterpret_cast<const uint8_t *>(p.cache);
    auto issue_codes = [&](int stage) {
        uint8_t *const codes = sC + stage * 2 * BKV * CROW;
#pragma unroll
        for (int u = 0; u < BKV * CCH / THREADS; ++u) {
            const int idx = tid + u * THREADS, row = idx / CCH, c = idx % CCH;
            const int64_t off = s_off[stage][row];
            if (off >= 0) {
                const uint8_t *src = cbytes + off + c * 16;
                fk_cp_async_16(codes + row * CROW + c * 16, src);
                fk_cp_async_16(codes + (BKV + row) * CROW + c * 16, src + p.v_codes_start);
            }
        }
        for (int idx = tid; idx < NGK * (D / 4); idx += THREADS) {
            const int gk = idx / (D / 4), c = idx % (D / 4);
            const int64_t off = s_koff[QUANT ? stage : 0][QUANT ? gk : 0];
            if (off >= 0) fk_cp_async_16(sKp + (stage * NGK + gk) * D + c * 4, cbytes + off + c * 16);
        }
        for (int idx = tid; idx < BKV * vgroups; idx += THREADS) {
            const int row = idx / vgroups, i = idx - row * vgroups;
            if (s_off[stage][row] >= 0)
                fk_cp_async_4(sVp + (stage * BKV + row) * VGM + i, cbytes + s_voff[QUANT ? stage : 0][QUANT ? row : 0] + i * 4);
        }
    };
    // Quantised: tile tokens t0 .. t0 + BKV (clamped to the last) into the T tiles sK, sV: codes as
    // fmaf(code, scale, zero) in f32 rounded to T, residual tokens copied. Each thread converts chunk
    // tid % CPR (8 channels) of every RPP-th row; a row's K group changes at most NGK - 1 times.
    const T *const res = QUANT ? reinterpret_cast<const T *>(p.residual) +
                                     ((int64_t)rslot * 2 * p.num_kv_heads + kvh) * ((int64_t)p.group * D)
                               : nullptr;
    const int64_t res_v = (int64_t)p.num_kv_heads * p.group * D;  // elements, K to V in a slot
    auto dequant = [&](int stage, int64_t t0) {
        const int c = tid % CPR;
        const uint8_t *const codes = sC + stage * 2 * BKV * CROW;
        const int g_first = (int)((uint32_t)t0 >> lg);
        const int vgi = QUANT ? c * 8 / p.v_group : 0;
        int cur = -1;
        float ks[8], kz[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) ks[e] = kz[e] = 0.0f;
#pragma unroll
        for (int u = 0; u < BKV / RPP; ++u) {
            const int row = tid / CPR + u * RPP;
            const int64_t t = min(t0 + row, kv_hi - 1);
            uint4 kw, vw;
            if (t >= nq) {
                const T *r = res + ((uint32_t)t & (uint32_t)(p.group - 1)) * D + c * 8;
                kw = *reinterpret_cast<const uint4 *>(r);
                vw = *reinterpret_cast<const uint4 *>(r + res_v);
            } else {
                const int gk = (int)((uint32_t)t >> lg) - g_first;
                if (gk != cur) {
                    cur = gk;
                    const uint4 *kp = reinterpret_cast<const uint4 *>(sKp + (stage * NGK + gk) * D + c * 8);
                    attn_params4(kp[0], ks, kz, 0);
                    attn_params4(kp[1], ks, kz, 4);
                }
                float kc[8], vc[8];
                attn_unpack8<QUANT ? BITS : 8>(codes + row * CROW + c * (QUANT ? BITS : 8), kc);
                attn_unpack8<QUANT ? BITS : 8>(codes + (BKV + row) * CROW + c * (QUANT ? BITS : 8), vc);
                const float2 vsz = attn_param(sVp[(stage * BKV + row) * VGM + vgi]);
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    kc[e] = fmaf(kc[e], ks[e], kz[e]);
                    vc[e] = fmaf(vc[e], vsz.x, vsz.y);
                }
                kw = pack8<T>(kc);
                vw = pack8<T>(vc);
            }
            *reinterpret_cast<uint4 *>(sK + swz<D>(row, c)) = kw;
            *reinterpret_cast<uint4 *>(sV + swz<D>(row, c)) = vw;
        }
    };

    bool bad_page = tile_offsets(0, 0);
    bad_page |= tile_offsets(1, 1);
    // Q tile: packed row r is token r / group's query head kvh · group + r % group; rows past the
    // sequence are zeros.
    {
        const int c = tid % CPR;
#pragma unroll
        for (int u = 0; u < BQ / RPP; ++u) {
            const int row = tid / CPR + u * RPP;
            const bool ok = R0 + row < nrows;
            const T *src = ok ? q + qo_row(R0 + row) * D + c * 8 : q;
            fk_cp_async_16(sQ + swz<D>(row, c), src, ok ? 16 : 0);
        }
    }
    __syncthreads();  // s_off of tiles 0 and 1
    if constexpr (QUANT)
        issue_codes(0);
    else
        issue_kv(0);
    fk_cp_async_commit();

    const float LOG2E = FK_LOG2E_F;
    const bool capped = p.softcap > 0.0f;
    // Base-2 score = raw · c; with a softcap the raw score is already base 2 (c = 1).
    const float c2 = capped ? 1.0f : p.scale * LOG2E;
    const float cap_in = capped ? p.scale / p.softcap : 0.0f, cap_out = p.softcap * LOG2E;

    float o[NT_O][4];
#pragma unroll
    for (int n = 0; n < NT_O; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
    uint32_t qf[C::Q_IN_REGS ? KSTEPS : 1][4];

    // ldmatrix row addresses. Q (A, x4): row lane % 16, chunk 2ks + lane / 16. K (B, x4): token
    // 16np + (lane / 16) · 8 + lane % 8, chunk 2ks + (lane / 8) % 2. V (B, x4.trans): token
    // 16kk + ((lane / 8) % 2) · 8 + lane % 8, chunk 2dn + lane / 16.
    const lane_rows<D> qa(warp * 16 + (lane & 15), lane >> 4);
    const lane_rows<D> ka(((lane >> 4) << 3) + (lane & 7), (lane >> 3) & 1);
    const lane_rows<D> va((((lane >> 3) & 1) << 3) + (lane & 7), lane >> 4);

    for (int j = 0; j < n_tiles; ++j) {
        const int stage = j & 1;
        // Tile j + 1 (the last trip: the last tile again, into the free stage). Quantised: its codes,
        // into the codes stage that tile j - 1's dequantisation read (before the last barrier).
        if constexpr (QUANT)
            issue_codes(stage ^ 1);
        else
            issue_kv(stage ^ 1);
        fk_cp_async_commit();
        fk_cp_async_wait<1>();
        // Tile j (and Q) landed for every thread's copies; quantised: every warp is done with the T tiles
        // of tile j - 1.
        __syncthreads();
        bad_page |= tile_offsets(j + 2, stage);  // s_off[stage] was last read before this barrier
        T *const kst = sK + (QUANT ? 0 : stage) * BKV * D;
        const T *const kt = kst;
        const T *const vt = sV + (QUANT ? 0 : stage) * BKV * D;
        const int64_t t0 = kv_lo + (int64_t)j * BKV;
        if constexpr (QUANT) {
            dequant(stage, t0);
            __syncthreads();  // the T tiles, and s_off[stage] for the next trip's copies
        }
        // RoPE in shared memory: q once (at its token's position), keys cached before RoPE at their index
        // (the tile's clamped extra rows at the last token's, as loaded); then a barrier before ldmatrix.
        if constexpr (ROPE) {
            const bool rq = p.rope_q && j == 0;
            if (rq) rope_tile<T, D, BQ>(sQ, p, base, R0, group, (int64_t)0x7fffffffffffffffLL);
            if (p.rope_k) rope_tile<T, D, BKV>(kst, p, t0, 0, 1, kv_hi - 1);
            if (rq || p.rope_k) __syncthreads();
        }
        if (C::Q_IN_REGS && j == 0) {
#pragma unroll
            for (int ks = 0; ks < KSTEPS; ++ks) fk_ldmatrix_x4(qf[ks], sQ + qa.at(0, ks));
        }

        // S = Q Kᵀ (16 rows x BKV tokens per warp)
        float s[NT_S][4];
#pragma unroll
        for (int n = 0; n < NT_S; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < KSTEPS; ++ks) {
            uint32_t a[4];
            if (C::Q_IN_REGS) {
                a[0] = qf[ks][0], a[1] = qf[ks][1], a[2] = qf[ks][2], a[3] = qf[ks][3];
            } else {
                fk_ldmatrix_x4(a, sQ + qa.at(0, ks));
            }
#pragma unroll
            for (int np = 0; np < NT_S / 2; ++np) {
                uint32_t kb[4];
                fk_ldmatrix_x4(kb, kt + ka.at(16 * np, ks));
                mma<T>(s[2 * np], a, kb[0], kb[1]);
                mma<T>(s[2 * np + 1], a, kb[2], kb[3]);
            }
        }

        if (capped) {
#pragma unroll
            for (int n = 0; n < NT_S; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[n][e] = cap_out * tanhf(s[n][e] * cap_in);
        }
        // Online softmax, rows g (i = 0) and g + 8 (i = 1); the 4 lanes of a quad share a row. Two copies:
        // with the causal/window mask (tiles that cross a row's range) and without, so the common tile
        // runs no compare (one copy with selects would).
        auto softmax = [&](auto masked) {
            constexpr bool MASKED = decltype(masked)::value;
            float mx[2];
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                if (MASKED) {
                    // Column index relative to the tile against the row's range, clamped to [-1, BKV].
                    const int hi_rel = (int)max((int64_t)-1, min((int64_t)BKV, lim[i] - t0));
                    const int lo_rel = (int)max((int64_t)-1, min((int64_t)BKV, lo[i] - t0));
#pragma unroll
                    for (int n = 0; n < NT_S; ++n)
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            const int col = 8 * n + 2 * t4 + e;
                            if (col > hi_rel || col < lo_rel) s[n][2 * i + e] = -INFINITY;
                        }
                }
                mx[i] = -INFINITY;
#pragma unroll
                for (int n = 0; n < NT_S; ++n) mx[i] = fmaxf(mx[i], fmaxf(s[n][2 * i], s[n][2 * i + 1]));
                mx[i] = fmaxf(mx[i], __shfl_xor_sync(FK_FULL_MASK, mx[i], 1));
                mx[i] = fmaxf(mx[i], __shfl_xor_sync(FK_FULL_MASK, mx[i], 2));
            }
            // The running max m is only a reference: o and l are scaled by the same 2^(-m·c), so any m
            // gives the same o / l and lse. It is moved (and o, l rescaled) only when a row's max
            // passes it by more than 2^RESCALE_LOG2, so probabilities stay <= 2^8 (no fp32 or bf16
            // overflow) and most tiles skip the rescale of O (FlashAttention-4's conditional
            // rescaling). The first finite max always moves it (from -inf: an infinite step).
            constexpr float RESCALE_LOG2 = 8.0f;
            const bool grow = (mx[0] - m[0]) * c2 > RESCALE_LOG2 || (mx[1] - m[1]) * c2 > RESCALE_LOG2;
            if (__any_sync(FK_FULL_MASK, grow)) {
#pragma unroll
                for (int i = 0; i < 2; ++i) {
                    const float m_new = fmaxf(m[i], mx[i]);
                    // While every score so far is -inf, l and o are 0: any finite reference will do.
                    const float mc = (m_new == -INFINITY ? 0.0f : m_new) * c2;
                    const float alpha = fk_ex2(fmaf(m[i], c2, -mc));  // 0 when m was -inf
                    m[i] = m_new;
                    l[i] *= alpha;
#pragma unroll
                    for (int n = 0; n < NT_O; ++n) {
                        o[n][2 * i] *= alpha;
                        o[n][2 * i + 1] *= alpha;
                    }
                }
            }
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                const float mc = (m[i] == -INFINITY ? 0.0f : m[i]) * c2;
                float sum = 0.0f;
#pragma unroll
                for (int n = 0; n < NT_S; ++n)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        // -inf (masked) gives 0; a NaN score makes the row NaN through l and o.
                        const float pe = fk_ex2(fmaf(s[n][2 * i + e], c2, -mc));
                        s[n][2 * i + e] = pe;
                        sum += pe;
                    }
                l[i] += sum;
            }
        };
        if (t0 < full_lo || t0 + BKV > full_hi)
            softmax(std::true_type{});
        else
            softmax(std::false_type{});

        // O += P V: the S accumulators of tokens 16kk..16kk+15 are the A fragment of k-step kk.
#pragma unroll
        for (int kk = 0; kk < KSTEPS_PV; ++kk) {
            const uint32_t a[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                                   pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                   pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
            for (int dn = 0; dn < NT_O / 2; ++dn) {
                uint32_t vb[4];
                fk_ldmatrix_x4_trans(vb, vt + va.at(16 * kk, dn));
                mma<T>(o[2 * dn], a, vb[0], vb[1]);
                mma<T>(o[2 * dn + 1], a, vb[2], vb[3]);
            }
        }
        // Stage j & 1 and s_off[j & 1] are rewritten by the next iteration (quantised: the barrier after
        // the dequantisation and the next trip's first one cover both).
        if constexpr (!QUANT) __syncthreads();
    }

    fk_cp_async_wait<0>();  // the last trip's copy: nothing in flight at exit
    // Rows of a CTA that met a page outside the cache are NaN (that page was never read).
    const bool bad = __syncthreads_or(bad_page) != 0;
    if (bad) flag(p, b);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        l[i] += __shfl_xor_sync(FK_FULL_MASK, l[i], 1);
        l[i] += __shfl_xor_sync(FK_FULL_MASK, l[i], 2);
    }

    // O / l as T, staged in the warp's own rows of sQ (only this warp read them), then written out in
    // 16-byte rows; lse by the first lane of each quad.
    const float inv[2] = {bad ? NAN : 1.0f / l[0], bad ? NAN : 1.0f / l[1]};
#pragma unroll
    for (int n = 0; n < NT_O; ++n)
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int row = warp * 16 + g + 8 * i;
            const uint32_t v = pack2<T>(o[n][2 * i] * inv[i], o[n][2 * i + 1] * inv[i]);
            memcpy(sQ + swz<D>(row, n) + 2 * t4, &v, 4);
        }
    if (t4 == 0) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int r = R0 + warp * 16 + g + 8 * i;
            if (r < nrows) {
                const float mm = m[i] == -INFINITY ? 0.0f : m[i];
                p.lse[qo_row(r)] = bad ? NAN : (mm * c2 + log2f(l[i])) * 0.69314718055994531f;
            }
        }
    }
    __syncwarp();
#pragma unroll
    for (int u = 0; u < 16 * CPR / 32; ++u) {
        const int idx = lane + 32 * u;
        const int row = warp * 16 + idx / CPR, c = idx % CPR;
        if (R0 + row < nrows) {
            const int64_t at = qo_row(R0 + row) * D + c * 8;
            *reinterpret_cast<uint4 *>(out + at) = *reinterpret_cast<const uint4 *>(sQ + swz<D>(row, c));
        }
    }
}

#define FK_ATTN_PREFILL_ENTRY(TN, T, D)                                                                \
    extern "C" __global__ void __launch_bounds__(FK_ATTN_PREFILL_THREADS)                              \
        fk_attn_prefill_##TN##_d##D(const fk_attn_prefill_params p) {                                  \
        attn_prefill<T, D, false>(p);                                                                  \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(FK_ATTN_PREFILL_THREADS)                              \
        fk_attn_prefill_rope_##TN##_d##D(const fk_attn_prefill_params p) {                             \
        attn_prefill<T, D, true>(p);                                                                   \
    }
FK_ATTN_PREFILL_ENTRY(bf16, __nv_bfloat16, 64)
FK_ATTN_PREFILL_ENTRY(bf16, __nv_bfloat16, 128)
FK_ATTN_PREFILL_ENTRY(bf16, __nv_bfloat16, 256)
FK_ATTN_PREFILL_ENTRY(f16, __half, 64)
FK_ATTN_PREFILL_ENTRY(f16, __half, 128)
FK_ATTN_PREFILL_ENTRY(f16, __half, 256)

// Over a KIVI cache: RoPE (either mode) is a runtime choice here; the rotation runs once per tile,
// outside the mma loop.
#define FK_ATTN_PREFILL_Q_ENTRY(TN, T, D, BITS)                                                        \
    extern "C" __global__ void __launch_bounds__(FK_ATTN_PREFILL_THREADS)                              \
        fk_attn_prefill_q##BITS##_##TN##_d##D(const fk_attn_prefill_params p) {                        \
        attn_prefill<T, D, true, BITS>(p);                                                             \
    }
#define FK_ATTN_PREFILL_Q_DIMS(TN, T, BITS)  \
    FK_ATTN_PREFILL_Q_ENTRY(TN, T, 64, BITS)  \
    FK_ATTN_PREFILL_Q_ENTRY(TN, T, 128, BITS) \
    FK_ATTN_PREFILL_Q_ENTRY(TN, T, 256, BITS)
FK_ATTN_PREFILL_Q_DIMS(bf16, __nv_bfloat16, 8)
FK_ATTN_PREFILL_Q_DIMS(f16, __half, 8)
FK_ATTN_PREFILL_Q_DIMS(bf16, __nv_bfloat16, 4)
FK_ATTN_PREFILL_Q_DIMS(f16, __half, 4)
