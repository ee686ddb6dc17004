// kernels/attention/decode.cu: split-KV decode attention over a paged bf16/f16 KV cache, and the merge of
// the splits' partial states.
//
// One CTA per (split, KV head x chunk of its query heads, sequence). The CTA's query heads (at most
// FK_ATTN_MAX_HEADS_PER_CTA of the KV head's GQA group) share every K and V byte it reads: a group of
// up to 8 reads the cache once. A token's head_dim elements are read by L = head_dim / 8 lanes with one
// 16-byte load each (K, then V); a warp streams 32 / L tokens at a time, the CTA's 4 warps interleave.
// Scores: q (pre-scaled) . k reduced over the L lanes by xor shuffles; softcap c tanh(s / c); then an
// online softmax in base 2 (fk_ex2) per lane group, merged across lane groups and warps at the end.
// Each split covers a fixed number of tokens (split_size), so a sequence's result never depends on the
// batch or the grid. The merge kernel combines the splits in split order (deterministic).
//
// Floor: the K and V bytes of the attended tokens, 2 · tokens · num_kv_heads · head_dim · 2 B per
// step, read once (for GQA groups up to 8). Partials: 4 · (head_dim + 1) B per (head, split), small
// against the cache for splits of hundreds of tokens.
//
// A page table that disagrees with the plan (a page index outside the cache, a sequence whose pages do
// not match its length, a length past the grid's splits) is never read out of bounds: the sequence's
// partials are NaN and the status word records it.
#include "attention_params.h"
#include "fk_common.cuh"

struct attn_state {
    float m;  // running max of the base-2 scores (-inf: none yet)
    float l;  // sum of 2^(s - m)
};

__device__ __forceinline__ void attn_flag(const fk_attn_decode_params &p, int b) {
    if (threadIdx.x == 0 && p.status) atomicMax(p.status, (unsigned long long)(p.batch - b));
}

template <typename T, int D, int HG>
__device__ __forceinline__ void attn_decode(const fk_attn_decode_params &p) {
    constexpr int VEC = 8;            // 2-byte elements per 16-byte vector
    constexpr int L = D / VEC;        // lanes per token: 8, 16, 32
    constexpr int TPW = 32 / L;       // tokens per warp step
    constexpr int WARPS = FK_ATTN_DECODE_THREADS / 32;
    using V = fk_vec16<T>;
    __shared__ float sm_m[WARPS][HG], sm_l[WARPS][HG];
    __shared__ __align__(16) float sm_o[WARPS][HG][D];
    __shared__ int bad_seq, bad_page_seen;  // the table disagrees with the plan; a page out of range

    const int split = blockIdx.x;
    const int kvh = blockIdx.y % p.num_kv_heads;
    const int chunk = blockIdx.y / p.num_kv_heads;
    const int b = blockIdx.z;
    const int group = p.num_qo_heads / p.num_kv_heads;
    const int h0 = kvh * group + chunk * HG;  // the CTA's first query head
    const int nh = min(HG, group - chunk * HG);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int sub = lane / L, part = lane % L;
    const int ps = p.page_size;

    // The sequence as the device sees it, checked before any cache read.
    const int32_t pg0 = p.page_indptr[b], pg1 = p.page_indptr[b + 1];
    const int64_t len = p.seq_lens[b];
    if (threadIdx.x == 0) bad_seq = bad_page_seen = 0;
    __syncthreads();
    if (threadIdx.x == 0) {
        const int64_t pages = (int64_t)pg1 - pg0;
        if (pg0 < 0 || pages < 0 || pg1 > p.n_page_indices || len < 1 || pages != (len + ps - 1) / ps ||
            len > (int64_t)p.n_splits * p.split_size)
            bad_seq = 1;
    }
    __syncthreads();

    int64_t t0 = (int64_t)split * p.split_size;
    int64_t t1 = min(t0 + p.split_size, len);
    if (p.window > 0 && len > p.window) t0 = max(t0, len - p.window);
    if (bad_seq) t1 = t0;  // read nothing

    // q chunk of each head, scaled (and by log2 e when no softcap follows, so scores are base 2).
    const float qs = p.softcap > 0.0f ? p.scale : p.scale * FK_LOG2E_F;
    float q[HG][VEC];
#pragma unroll
    for (int h = 0; h < HG; ++h) {
        if (h < nh) {
            const V qv = reinterpret_cast<const V *>(reinterpret_cast<const T *>(p.q) +
                                                     ((int64_t)b * p.num_qo_heads + h0 + h) * D)[part];
            float f[VEC];
            fk_vec_to_f32(qv, f);
#pragma unroll
            for (int e = 0; e < VEC; ++e) q[h][e] = f[e] * qs;
        } else {
#pragma unroll
            for (int e = 0; e < VEC; ++e) q[h][e] = 0.0f;
        }
    }

    attn_state st[HG];
    float o[HG][VEC];
#pragma unroll
    for (int h = 0; h < HG; ++h) {
        st[h] = attn_state{-INFINITY, 0.0f};
#pragma unroll
        for (int e = 0; e < VEC; ++e) o[h][e] = 0.0f;
    }

    const T *cache = reinterpret_cast<const T *>(p.cache);
    const int64_t page_elems = 2 * (int64_t)p.num_kv_heads * ps * D;
    const int64_t head_run = (int64_t)ps * D;
    bool bad_page = false;
    // Every lane of the warp runs every trip (the shuffles need the whole warp); a lane whose token is
    // past the split contributes nothing.
    for (int64_t base = t0 + warp * TPW; base < t1; base += WARPS * TPW) {
        const int64_t t = base + sub;
        const bool valid = t < t1;
        float k[VEC], v[VEC];
        bool have = false;
        if (valid) {
            const int32_t page = p.page_indices[pg0 + t / ps];
            if (page >= 0 && page < p.num_pages) {
                const T *kp = cache + page * page_elems + kvh * head_run + (t % ps) * D;
                const V kv = reinterpret_cast<const V *>(kp)[part];
                const V vv = reinterpret_cast<const V *>(kp + (int64_t)p.num_kv_heads * head_run)[part];
                fk_vec_to_f32(kv, k);
                fk_vec_to_f32(vv, v);
                have = true;
            } else {
                bad_page = true;
            }
        }
        if (!have) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) k[e] = v[e] = 0.0f;
        }
#pragma unroll
        for (int h = 0; h < HG; ++h) {
            float s = 0.0f;
#pragma unroll
            for (int e = 0; e < VEC; ++e) s = fmaf(q[h][e], k[e], s);
#pragma unroll
            for (int off = L / 2; off > 0; off >>= 1) s += __shfl_xor_sync(FK_FULL_MASK, s, off);
            if (p.softcap > 0.0f) s = p.softcap * tanhf(s / p.softcap) * FK_LOG2E_F;
            if (!have) s = -INFINITY;
            if (s > st[h].m) {
                // Nothing to rescale while the max is -inf (l and o are 0, or NaN after a NaN score).
                const float r = st[h].m == -INFINITY ? 1.0f : fk_ex2(st[h].m - s);
                st[h].l *= r;
#pragma unroll
                for (int e = 0; e < VEC; ++e) o[h][e] *= r;
                st[h].m = s;
            }
            // s = -inf adds 0 (mm = 0 while m = -inf); a NaN s makes l and o NaN.
            const float mm = st[h].m == -INFINITY ? 0.0f : st[h].m;
            const float w = fk_ex2(s - mm);
            st[h].l += w;
#pragma unroll
            for (int e = 0; e < VEC; ++e) o[h][e] = fmaf(w, have ? v[e] : 0.0f, o[h][e]);
        }
    }

    // Merge the TPW lane groups of the warp (xor over the `sub` bits), then the warps through shared
    // memory, in a fixed order.
#pragma unroll
    for (int off = L; off < 32; off <<= 1) {
#pragma unroll
        for (int h = 0; h < HG; ++h) {
            const float m2 = __shfl_xor_sync(FK_FULL_MASK, st[h].m, off);
            const float l2 = __shfl_xor_sync(FK_FULL_MASK, st[h].l, off);
            const float m = fmaxf(st[h].m, m2);
            const float mm = m == -INFINITY ? 0.0f : m;
            const float a = st[h].m == -INFINITY ? 0.0f : fk_ex2(st[h].m - mm);
            const float c = m2 == -INFINITY ? 0.0f : fk_ex2(m2 - mm);
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
                const float o2 = __shfl_xor_sync(FK_FULL_MASK, o[h][e], off);
                o[h][e] = o[h][e] * a + o2 * c;
            }
            // A NaN state stays NaN: its m may be anything, its l is NaN.
            st[h].l = st[h].l * a + l2 * c;
            st[h].m = m;
        }
    }
    // A separate flag: every thread has read bad_seq above, but not necessarily before this write.
    if (bad_page) atomicOr(&bad_page_seen, 1);
    if (sub == 0) {
#pragma unroll
        for (int h = 0; h < HG; ++h) {
            if (part == 0) {
                sm_m[warp][h] = st[h].m;
                sm_l[warp][h] = st[h].l;
            }
#pragma unroll
            for (int e = 0; e < VEC; ++e) sm_o[warp][h][part * VEC + e] = o[h][e];
        }
    }
    __syncthreads();
    const bool flagged = bad_seq != 0 || bad_page_seen != 0;
    if (flagged) attn_flag(p, b);
    for (int i = threadIdx.x; i < nh * D; i += FK_ATTN_DECODE_THREADS) {
        const int h = i / D, e = i % D;
        float m = -INFINITY;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) m = fmaxf(m, sm_m[w][h]);
        const float mm = m == -INFINITY ? 0.0f : m;
        float l = 0.0f, acc = 0.0f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) {
            const float a = sm_m[w][h] == -INFINITY ? 0.0f : fk_ex2(sm_m[w][h] - mm);
            l = fmaf(sm_l[w][h], a, l);
            acc = fmaf(sm_o[w][h][e], a, acc);
        }
        const int64_t row = (int64_t)b * p.num_qo_heads + h0 + h;
        const int64_t at = row * p.n_splits + split;
        float out, lse;
        if (flagged) {
            out = NAN;
            lse = NAN;
        } else if (l == 0.0f) {  // no token in this split: the empty state
            out = 0.0f;
            lse = -INFINITY;
        } else {
            out = acc / l;
            lse = (mm + log2f(l)) * 0.69314718055994531f;
        }
        p.o_part[at * D + e] = out;
        if (e == 0) p.lse_part[at] = lse;
    }
}

#define FK_ATTN_DECODE_ENTRY(TN, T, D, HG)                                                             \
    extern "C" __global__ void __launch_bounds__(FK_ATTN_DECODE_THREADS)                               \
        fk_attn_decode_##TN##_d##D##_h##HG(const fk_attn_decode_params p) {                            \
        attn_decode<T, D, HG>(p);                                                                      \
    }
#define FK_ATTN_DECODE_HEADS(TN, T, D)  \
    FK_ATTN_DECODE_ENTRY(TN, T, D, 1)   \
    FK_ATTN_DECODE_ENTRY(TN, T, D, 2)   \
    FK_ATTN_DECODE_ENTRY(TN, T, D, 4)   \
    FK_ATTN_DECODE_ENTRY(TN, T, D, 8)
#define FK_ATTN_DECODE_DIMS(TN, T)       \
    FK_ATTN_DECODE_HEADS(TN, T, 64)      \
    FK_ATTN_DECODE_HEADS(TN, T, 128)     \
    FK_ATTN_DECODE_HEADS(TN, T, 256)
FK_ATTN_DECODE_DIMS(bf16, __nv_bfloat16)
FK_ATTN_DECODE_DIMS(f16, __half)

// Merge: one block per (sequence, query head) row; the splits in split order. With m = max lse_s,
// o = sum_s e^(lse_s - m) o_s / sum_s e^(lse_s - m) and lse = m + log sum_s e^(lse_s - m); empty splits
// (lse = -inf) add nothing; a NaN partial makes the row NaN.
template <typename T>
__device__ __forceinline__ void attn_merge(const fk_attn_merge_params &p) {
    __shared__ float row_m, row_l;
    const int S = p.n_splits, D = p.head_dim;
    for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
        const float *lp = p.lse_part + row * S;
        if (threadIdx.x == 0) {
            // The max, then the weights' sum, in split order; a NaN partial makes the row NaN.
            float m = -INFINITY, l = 0.0f;
            bool nan = false;
            for (int s = 0; s < S; ++s) {
                m = fmaxf(m, lp[s]);
                nan |= lp[s] != lp[s];
            }
            const float mm = m == -INFINITY ? 0.0f : m;
            for (int s = 0; s < S; ++s) l += lp[s] == -INFINITY ? 0.0f : expf(lp[s] - mm);
            row_m = nan ? NAN : mm;
            row_l = l;
            p.lse[row] = nan ? NAN : (l == 0.0f ? -INFINITY : mm + logf(l));
        }
        __syncthreads();
        const float mm = row_m, l = row_l;
        for (int e = threadIdx.x; e < D; e += blockDim.x) {
            float acc = 0.0f;
            for (int s = 0; s < S; ++s)
                if (lp[s] != -INFINITY) acc = fmaf(expf(lp[s] - mm), p.o_part[(row * S + s) * D + e], acc);
            // mm is NaN for a NaN row: acc and the output are NaN.
            reinterpret_cast<T *>(p.o)[row * D + e] = fk_from_f32<T>(l == 0.0f && mm == mm ? 0.0f : acc / l);
        }
        __syncthreads();  // row_m, row_l are rewritten for the next row
    }
}

extern "C" __global__ void __launch_bounds__(FK_ATTN_MERGE_THREADS) fk_attn_merge_bf16(const fk_attn_merge_params p) {
    attn_merge<__nv_bfloat16>(p);
}
extern "C" __global__ void __launch_bounds__(FK_ATTN_MERGE_THREADS) fk_attn_merge_f16(const fk_attn_merge_params p) {
    attn_merge<__half>(p);
}
