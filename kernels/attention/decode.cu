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
// Positions are below 2^32 (u32 lengths): divisions by the page and group sizes are 32-bit (a 64-bit
// division is a subroutine call).
//
// A page table that disagrees with the plan (a page index outside the cache, a sequence whose pages do
// not match its length, a length past the grid's splits) is never read out of bounds: the sequence's
// partials are NaN and the status word records it.
#include "attention_params.h"
#include "fk_common.cuh"
#include "fk_kivi.cuh"
#include "fk_rope.cuh"

struct attn_state {
    float m;  // running max of the base-2 scores (-inf: none yet)
    float l;  // sum of 2^(s - m)
};

__device__ __forceinline__ void attn_flag(const fk_attn_decode_params &p, int b) {
    if (threadIdx.x == 0 && p.status) atomicMax(p.status, (unsigned long long)(p.batch - b));
}

// Per-CTA shared state of a decode: the warps' partial states, and the page-table guard.
template <int D, int HG>
struct attn_smem {
    static constexpr int WARPS = FK_ATTN_DECODE_THREADS / 32;
    float m[WARPS][HG], l[WARPS][HG];
    __align__(16) float o[WARPS][HG][D];
    int bad_seq, bad_page_seen;  // the table disagrees with the plan; a page out of range
};

// The CTA's coordinates, its sequence checked against the plan before any cache read, and its
// token range [t0, t1) (empty for a bad sequence).
struct attn_cta {
    int split, kvh, b, h0, nh;
    int32_t pg0;
    int64_t len, t0, t1;
};

template <int D, int HG>
__device__ __forceinline__ attn_cta attn_begin(const fk_attn_decode_params &p, attn_smem<D, HG> &sm) {
    attn_cta c;
    c.split = blockIdx.x;
    c.kvh = blockIdx.y % p.num_kv_heads;
    const int chunk = blockIdx.y / p.num_kv_heads;
    c.b = blockIdx.z;
    const int group = p.num_qo_heads / p.num_kv_heads;
    c.h0 = c.kvh * group + chunk * HG;  // the CTA's first query head
    c.nh = min(HG, group - chunk * HG);
    const int ps = p.page_size;
    c.pg0 = p.page_indptr[c.b];
    const int32_t pg1 = p.page_indptr[c.b + 1];
    c.len = p.seq_lens[c.b];
    if (threadIdx.x == 0) sm.bad_seq = sm.bad_page_seen = 0;
    __syncthreads();
    if (threadIdx.x == 0) {
        const int64_t pages = (int64_t)pg1 - c.pg0;
        bool bad = c.pg0 < 0 || pages < 0 || pg1 > p.n_page_indices || (c.len < 1 && !p.allow_empty) ||
                   !(c.len <= pages * ps && (pages - 1) * ps < c.len) || c.len > (int64_t)p.n_splits * p.split_size;
        if (p.residual_slots) {
            const int32_t slot = p.residual_slots[c.b];
            bad = bad || slot < 0 || slot >= p.n_slots;
        } else if (p.group > 0) {
            // A quantised cache without a residual (the distant part of a shared decode): whole groups only.
            bad = bad || (uint64_t)c.len % (uint32_t)p.group != 0;
        }
        if (bad) sm.bad_seq = 1;
    }
    __syncthreads();
    c.t0 = (int64_t)c.split * p.split_size;
    c.t1 = min(c.t0 + p.split_size, c.len);
    if (p.window > 0 && c.len > p.window) c.t0 = max(c.t0, c.len - p.window);
    if (sm.bad_seq) c.t1 = c.t0;  // read nothing
    return c;
}

// This lane's RoPE constants: the inverse frequency and pair role of each of its VEC channels.
template <int D, int VEC>
struct attn_rope {
    float inv_freq[VEC];
    bool first[VEC];
};

template <int D, int VEC>
__device__ __forceinline__ attn_rope<D, VEC> attn_rope_init(const fk_attn_decode_params &p, int part) {
    attn_rope<D, VEC> r;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
        const int c = part * VEC + e;
        r.inv_freq[e] = fk_rope_inv_freq(c, D, p.rope_style, p.rope_log2_theta);
        r.first[e] = fk_rope_first(c, D, p.rope_style);
    }
    return r;
}

// Rotates this lane's VEC channels of a key at pos. Half style: the partner channel is in lane
// part ^ (L / 2) of the same token (a shuffle, so every lane of the warp calls this); interleaved: in
// the same lane.
template <int D, int VEC, int L>
__device__ __forceinline__ void attn_rope_key(const fk_attn_decode_params &p, const attn_rope<D, VEC> &r,
                                              float (&k)[VEC], float pos) {
    float kp[VEC];
    if (p.rope_style == 0) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) kp[e] = __shfl_xor_sync(FK_FULL_MASK, k[e], L / 2);
    } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) kp[e] = k[e ^ 1];
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) k[e] = fk_rope_apply(k[e], kp[e], r.inv_freq[e], r.first[e], pos);
}

// q chunk (this lane's VEC elements) of each of the CTA's heads, rotated at the query's position len - 1
// when rope_q, then scaled, and by log2 e when no softcap follows, so scores are base 2.
template <typename T, int D, int HG, int VEC>
__device__ __forceinline__ void attn_load_q(const fk_attn_decode_params &p, const attn_cta &c, int part,
                                            const attn_rope<D, VEC> &r, float (&q)[HG][VEC]) {
    using V = fk_vec16<T>;
    constexpr int L = D / VEC;
    const float qs = p.softcap > 0.0f ? p.scale : p.scale * FK_LOG2E_F;
#pragma unroll
    for (int h = 0; h < HG; ++h) {
        if (h < c.nh) {
            const V *row = reinterpret_cast<const V *>(reinterpret_cast<const T *>(p.q) +
                                                       ((int64_t)c.b * p.num_qo_heads + c.h0 + h) * D);
            float f[VEC];
            fk_vec_to_f32(row[part], f);
            if (p.rope_q) {
                float g[VEC];
                if (p.rope_style == 0) {
                    fk_vec_to_f32(row[part ^ (L / 2)], g);
                } else {
#pragma unroll
                    for (int e = 0; e < VEC; ++e) g[e] = f[e ^ 1];
                }
#pragma unroll
                for (int e = 0; e < VEC; ++e) f[e] = fk_rope_apply(f[e], g[e], r.inv_freq[e], r.first[e], (float)(c.len - 1));
            }
#pragma unroll
            for (int e = 0; e < VEC; ++e) q[h][e] = f[e] * qs;
        } else {
#pragma unroll
            for (int e = 0; e < VEC; ++e) q[h][e] = 0.0f;
        }
    }
}

// One token's K and V (this lane's VEC channels) into every head's online-softmax state. The L lanes
// of the token reduce q.k by xor shuffles, so every lane of the warp must call this (have = false: the
// token adds nothing).
template <int HG, int VEC, int L>
__device__ __forceinline__ void attn_update(const float (&q)[HG][VEC], const float (&k)[VEC], const float (&v)[VEC],
                                            bool have, float softcap, attn_state (&st)[HG], float (&o)[HG][VEC]) {
#pragma unroll
    for (int h = 0; h < HG; ++h) {
        float s = 0.0f;
#pragma unroll
        for (int e = 0; e < VEC; ++e) s = fmaf(q[h][e], k[e], s);
#pragma unroll
        for (int off = L / 2; off > 0; off >>= 1) s += __shfl_xor_sync(FK_FULL_MASK, s, off);
        if (softcap > 0.0f) s = softcap * tanhf(s / softcap) * FK_LOG2E_F;
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

// Merges the TPW lane groups of each warp (xor over the `sub` bits), then the warps through shared
// memory in a fixed order, and writes the CTA's partial (o, lse) per head: NaN for a flagged sequence,
// (0, -inf) for a split without tokens.
template <int D, int HG, int VEC, int L>
__device__ __forceinline__ void attn_finish(const fk_attn_decode_params &p, const attn_cta &c, attn_smem<D, HG> &sm,
                                            attn_state (&st)[HG], float (&o)[HG][VEC], bool bad_page) {
    constexpr int WARPS = FK_ATTN_DECODE_THREADS / 32;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int sub = lane / L, part = lane % L;
#pragma unroll
    for (int off = L; off < 32; off <<= 1) {
#pragma unroll
        for (int h = 0; h < HG; ++h) {
            const float m2 = __shfl_xor_sync(FK_FULL_MASK, st[h].m, off);
            const float l2 = __shfl_xor_sync(FK_FULL_MASK, st[h].l, off);
            const float m = fmaxf(st[h].m, m2);
            const float mm = m == -INFINITY ? 0.0f : m;
            const float a = st[h].m == -INFINITY ? 0.0f : fk_ex2(st[h].m - mm);
            const float cc = m2 == -INFINITY ? 0.0f : fk_ex2(m2 - mm);
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
                const float o2 = __shfl_xor_sync(FK_FULL_MASK, o[h][e], off);
                o[h][e] = o[h][e] * a + o2 * cc;
            }
            // A NaN state stays NaN: its m may be anything, its l is NaN.
            st[h].l = st[h].l * a + l2 * cc;
            st[h].m = m;
        }
    }
    // A separate flag: every thread has read bad_seq, but not necessarily before this write.
    if (bad_page) atomicOr(&sm.bad_page_seen, 1);
    if (sub == 0) {
#pragma unroll
        for (int h = 0; h < HG; ++h) {
            if (part == 0) {
                sm.m[warp][h] = st[h].m;
                sm.l[warp][h] = st[h].l;
            }
#pragma unroll
            for (int e = 0; e < VEC; ++e) sm.o[warp][h][part * VEC + e] = o[h][e];
        }
    }
    __syncthreads();
    const bool flagged = sm.bad_seq != 0 || sm.bad_page_seen != 0;
    if (flagged) attn_flag(p, c.b);
    for (int i = threadIdx.x; i < c.nh * D; i += FK_ATTN_DECODE_THREADS) {
        const int h = i / D, e = i % D;
        float m = -INFINITY;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) m = fmaxf(m, sm.m[w][h]);
        const float mm = m == -INFINITY ? 0.0f : m;
        float l = 0.0f, acc = 0.0f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) {
            const float a = sm.m[w][h] == -INFINITY ? 0.0f : fk_ex2(sm.m[w][h] - mm);
            l = fmaf(sm.l[w][h], a, l);
            acc = fmaf(sm.o[w][h][e], a, acc);
        }
        const int64_t row = (int64_t)c.b * p.num_qo_heads + c.h0 + h;
        const int64_t at = row * p.splits_per_row + p.split_base + c.split;
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

template <int HG, int VEC>
__device__ __forceinline__ void attn_init(attn_state (&st)[HG], float (&o)[HG][VEC]) {
#pragma unroll
    for (int h = 0; h < HG; ++h) {
        st[h] = attn_state{-INFINITY, 0.0f};
#pragma unroll
        for (int e = 0; e < VEC; ++e) o[h][e] = 0.0f;
    }
}

template <typename T, int D, int HG>
__device__ __forceinline__ void attn_decode(const fk_attn_decode_params &p) {
    constexpr int VEC = 8;            // 2-byte elements per 16-byte vector
    constexpr int L = D / VEC;        // lanes per token: 8, 16, 32
    constexpr int TPW = 32 / L;       // tokens per warp step
    constexpr int WARPS = FK_ATTN_DECODE_THREADS / 32;
    using V = fk_vec16<T>;
    __shared__ attn_smem<D, HG> sm;
    const attn_cta c = attn_begin<D, HG>(p, sm);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int sub = lane / L, part = lane % L;
    const int ps = p.page_size;

    const attn_rope<D, VEC> rope = attn_rope_init<D, VEC>(p, part);
    float q[HG][VEC];
    attn_load_q<T, D, HG, VEC>(p, c, part, rope, q);
    attn_state st[HG];
    float o[HG][VEC];
    attn_init<HG, VEC>(st, o);

    const T *cache = reinterpret_cast<const T *>(p.cache);
    const T *vcache = reinterpret_cast<const T *>(p.v_cache) + p.v_start;
    const int64_t page_elems = 2 * (int64_t)p.num_kv_heads * ps * D;
    const int64_t head_run = (int64_t)ps * D;
    bool bad_page = false;
    // Every lane of the warp runs every trip (the shuffles need the whole warp); a lane whose token is
    // past the split contributes nothing.
    for (int64_t base = c.t0 + warp * TPW; base < c.t1; base += WARPS * TPW) {
        const int64_t t = base + sub;
        float k[VEC], v[VEC];
        bool have = false;
        if (t < c.t1) {
            const int32_t page = p.page_indices[c.pg0 + (uint32_t)t / (uint32_t)ps];
            if (page >= 0 && page < p.num_pages) {
                const int64_t in_page = c.kvh * head_run + ((uint32_t)t % (uint32_t)ps) * D;
                const V kv = reinterpret_cast<const V *>(cache + page * page_elems + in_page)[part];
                const V vv = reinterpret_cast<const V *>(vcache + page * p.v_page_stride + in_page)[part];
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
        if (p.rope_k) attn_rope_key<D, VEC, L>(p, rope, k, (float)t);
        attn_update<HG, VEC, L>(q, k, v, have, p.softcap, st, o);
    }
    attn_finish<D, HG, VEC, L>(p, c, sm, st, o, bad_page);
}

// Decode over a KIVI cache: tokens of complete groups are dequantised in registers (K per channel with
// its group's (scale, zero), V per token), the sequence's newest len % group tokens are read from its
// full-precision residual slot. The same lane layout, update and merge as the bf16/f16 decode.
template <typename T, int D, int HG, int BITS>
__device__ __forceinline__ void attn_decode_quant(const fk_attn_decode_params &p) {
    constexpr int VEC = 8;
    constexpr int L = D / VEC;
    constexpr int TPW = 32 / L;
    constexpr int WARPS = FK_ATTN_DECODE_THREADS / 32;
    constexpr int CROW = D * BITS / 8;  // code bytes of one token and head
    using V = fk_vec16<T>;
    __shared__ attn_smem<D, HG> sm;
    const attn_cta c = attn_begin<D, HG>(p, sm);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int sub = lane / L, part = lane % L;
    const int ps = p.page_size, G = p.group;

    const attn_rope<D, VEC> rope = attn_rope_init<D, VEC>(p, part);
    float q[HG][VEC];
    attn_load_q<T, D, HG, VEC>(p, c, part, rope, q);
    attn_state st[HG];
    float o[HG][VEC];
    attn_init<HG, VEC>(st, o);

    const uint8_t *cache = reinterpret_cast<const uint8_t *>(p.cache);
    const uint8_t *vcache = reinterpret_cast<const uint8_t *>(p.v_cache);
    const int64_t nq = (int64_t)((uint32_t)c.len / (uint32_t)G) * G;  // tokens of complete groups: in the pages
    const int64_t head_codes = (int64_t)c.kvh * ps * CROW;
    const int vgroups = D / p.v_group;
    const int vg = part * VEC / p.v_group;  // this lane's V group (a group spans >= 32 channels)
    bool bad_page = false;
    int cur_g = -1;  // the group whose K parameters ks, kz hold (group indices < 2^27)
    float ks[VEC], kz[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) ks[e] = kz[e] = 0.0f;
    // The residual first (the order of tokens in an online softmax is free): tokens nq .. len of the
    // sequence, in T, at index t % G of its slot.
    const int64_t r0 = max(c.t0, nq);
    if (r0 < c.t1) {
        const T *res = reinterpret_cast<const T *>(p.residual) +
                       (((int64_t)p.residual_slots[c.b] * 2) * p.num_kv_heads + c.kvh) * G * D;
        const int64_t v_off = (int64_t)p.num_kv_heads * G * D;
        for (int64_t base = r0 + warp * TPW; base < c.t1; base += WARPS * TPW) {
            const int64_t t = base + sub;
            float k[VEC], v[VEC];
            const bool have = t < c.t1;
            if (have) {
                const T *kp = res + ((uint32_t)t % (uint32_t)G) * D;
                fk_vec_to_f32(reinterpret_cast<const V *>(kp)[part], k);
                fk_vec_to_f32(reinterpret_cast<const V *>(kp + v_off)[part], v);
            } else {
#pragma unroll
                for (int e = 0; e < VEC; ++e) k[e] = v[e] = 0.0f;
            }
            if (p.rope_k) attn_rope_key<D, VEC, L>(p, rope, k, (float)t);
            attn_update<HG, VEC, L>(q, k, v, have, p.softcap, st, o);
        }
    }
    const int64_t q1 = min(c.t1, nq);
    for (int64_t base = c.t0 + warp * TPW; base < q1; base += WARPS * TPW) {
        const int64_t t = base + sub;
        float k[VEC], v[VEC];
        bool have = false;
        if (t < q1) {
            const int gi = (int)((uint32_t)t / (uint32_t)G);
            if (gi != cur_g) {  // the K parameters of a new group: in the page of its first token
                const int64_t first = (int64_t)gi * G;
                const int32_t gp = p.page_indices[c.pg0 + (uint32_t)first / (uint32_t)ps];
                cur_g = gi;
                if (gp >= 0 && gp < p.num_pages) {
                    const int gslot = (int)((uint32_t)first % (uint32_t)ps) / G;
                    const uint4 *kp = reinterpret_cast<const uint4 *>(
                        cache + gp * p.page_bytes + p.k_params_start +
                        (((int64_t)c.kvh * p.k_param_slots + gslot) * D + part * VEC) * 4);
                    const uint4 w0 = kp[0], w1 = kp[1];
                    attn_params4(w0, ks, kz, 0);
                    attn_params4(w1, ks, kz, 4);
                } else {
                    cur_g = -1;
                }
            }
            const int32_t page = p.page_indices[c.pg0 + (uint32_t)t / (uint32_t)ps];
            if (cur_g == gi && page >= 0 && page < p.num_pages) {
                const uint8_t *pg = cache + page * p.page_bytes;
                const uint8_t *vpg = vcache + page * p.v_page_stride;
                const int slot = (int)((uint32_t)t % (uint32_t)ps);
                float kc[VEC], vc[VEC];
                attn_codes<BITS>(pg + head_codes + (int64_t)slot * CROW, part, kc);
                attn_codes<BITS>(vpg + p.v_start + head_codes + (int64_t)slot * CROW, part, vc);
                const float2 vsz = attn_param(*reinterpret_cast<const uint32_t *>(
                    vpg + p.v_params_start + (((int64_t)c.kvh * ps + slot) * vgroups + vg) * 4));
#pragma unroll
                for (int e = 0; e < VEC; ++e) {
                    k[e] = fmaf(kc[e], ks[e], kz[e]);
                    v[e] = fmaf(vc[e], vsz.x, vsz.y);
                }
                have = true;
            } else {
                bad_page = true;
            }
        }
        if (!have) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) k[e] = v[e] = 0.0f;
        }
        if (p.rope_k) attn_rope_key<D, VEC, L>(p, rope, k, (float)t);
        attn_update<HG, VEC, L>(q, k, v, have, p.softcap, st, o);
    }
    attn_finish<D, HG, VEC, L>(p, c, sm, st, o, bad_page);
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

#define FK_ATTN_DECODE_Q_ENTRY(TN, T, D, HG, BITS)                                                     \
    extern "C" __global__ void __launch_bounds__(FK_ATTN_DECODE_THREADS)                               \
        fk_attn_decode_q##BITS##_##TN##_d##D##_h##HG(const fk_attn_decode_params p) {                  \
        attn_decode_quant<T, D, HG, BITS>(p);                                                          \
    }
#define FK_ATTN_DECODE_Q_HEADS(TN, T, D, BITS)  \
    FK_ATTN_DECODE_Q_ENTRY(TN, T, D, 1, BITS)   \
    FK_ATTN_DECODE_Q_ENTRY(TN, T, D, 2, BITS)   \
    FK_ATTN_DECODE_Q_ENTRY(TN, T, D, 4, BITS)   \
    FK_ATTN_DECODE_Q_ENTRY(TN, T, D, 8, BITS)
#define FK_ATTN_DECODE_Q_DIMS(TN, T, BITS)      \
    FK_ATTN_DECODE_Q_HEADS(TN, T, 64, BITS)     \
    FK_ATTN_DECODE_Q_HEADS(TN, T, 128, BITS)    \
    FK_ATTN_DECODE_Q_HEADS(TN, T, 256, BITS)
FK_ATTN_DECODE_Q_DIMS(bf16, __nv_bfloat16, 8)
FK_ATTN_DECODE_Q_DIMS(f16, __half, 8)
FK_ATTN_DECODE_Q_DIMS(bf16, __nv_bfloat16, 4)
FK_ATTN_DECODE_Q_DIMS(f16, __half, 4)

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
