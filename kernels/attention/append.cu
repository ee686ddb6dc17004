// kernels/attention/append.cu: new tokens' K and V into a paged cache, quantised on the way for the KIVI
// formats.
//
// fk_attn_append_{T}_d{D}: one thread per 16-byte vector (8 elements) of a new token's K or V row of one
// head; the token's sequence is found by binary search over append_indptr. Writes the vector into the
// token's page (bf16/f16 caches), or, for a quantised cache (to_residual = 1), into the sequence's
// residual slot when the token lies past the sequence's last complete group.
//
// fk_attn_append_q{8,4}_{T}_d{D}: one CTA per (group completed by this append, KV head, sequence).
// The group's G tokens come from the old residual (positions before the append) and from k_new/v_new.
// K per channel: each thread owns a pair of channels (one byte of int4 codes), scans the G tokens for
// min and max, writes the f16 (scale, zero) pairs into the K parameter slot of the page of the group's
// first token, then the codes. V per token: a warp per token, lanes own head_dim / 32 consecutive
// channels, min and max over each V group by xor shuffles. The arithmetic is the host's
// (src/attention/kivi.rs) bit for bit: f32 min/max, scale (hi - lo) / max_code and zero lo rounded to
// f16, code = clamp(rint((x - zero) / scale)), a non-finite group or an f16 overflow stores NaN.
// The copy kernel runs after this one (stream order): the residual it overwrites has been read.
//
// fk_attn_copy_values: whole pages' values copied into another buffer (a layer's V pool for inter-layer
// sharing), 16 bytes per thread and step, one CTA per page.
//
// A device table that disagrees with the plan (append_indptr not monotone, more new tokens than the
// sequence holds, pages that do not match the length, a page or slot out of range) is never written
// out of bounds: the sequence's writes are skipped and the status word records it.
#include "attention_params.h"
#include "fk_common.cuh"
#include "fk_rope.cuh"

__device__ __forceinline__ void append_flag(const fk_attn_append_params &p, int b) {
    if (p.status) atomicMax(p.status, (unsigned long long)(p.batch - b));
}

// Sequence b's device table entries, checked against each other: 0 <= n_b <= len, ceil(len / ps) pages,
// the page list inside page_indices, the residual slot in range (quantised caches).
struct append_seq {
    int64_t len, n, a0;
    int32_t pg0;
    bool ok;
};

__device__ __forceinline__ append_seq append_check(const fk_attn_append_params &p, int b) {
    append_seq s;
    const int32_t a0 = p.append_indptr[b], a1 = p.append_indptr[b + 1];
    const int32_t pg0 = p.page_indptr[b], pg1 = p.page_indptr[b + 1];
    s.len = p.seq_lens[b];
    s.n = (int64_t)a1 - a0;
    s.a0 = a0;
    s.pg0 = pg0;
    const int64_t pages = (int64_t)pg1 - pg0;
    s.ok = a0 >= 0 && s.n >= 0 && a1 <= p.n_new && s.n <= s.len && pg0 >= 0 && pages >= 0 &&
           pg1 <= p.n_page_indices && s.len <= pages * p.page_size && (pages - 1) * p.page_size < s.len;
    if (s.ok && p.residual_slots) {
        const int32_t slot = p.residual_slots[b];
        s.ok = slot >= 0 && slot < p.n_slots;
    }
    return s;
}

template <typename T, int D>
__device__ __forceinline__ void attn_append_copy(const fk_attn_append_params &p) {
    using V = fk_vec16<T>;
    constexpr int VPR = D / 8;  // vectors per head row
    const int64_t per_tok = 2LL * p.num_kv_heads * VPR;
    const int64_t total = p.n_new * per_tok;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t tok = i / per_tok;
        const int r = (int)(i % per_tok);
        const int kv = r / (p.num_kv_heads * VPR);  // 0: K, 1: V
        const int h = (r / VPR) % p.num_kv_heads;
        const int vec = r % VPR;
        // The sequence whose rows hold tok: the last b with append_indptr[b] <= tok.
        int lo = 0, hi = p.batch - 1;
        while (lo < hi) {
            const int mid = (lo + hi + 1) >> 1;
            if (p.append_indptr[mid] <= tok) lo = mid; else hi = mid - 1;
        }
        const int b = lo;
        const append_seq s = append_check(p, b);
        if (!s.ok || tok < s.a0 || tok >= s.a0 + s.n) {
            append_flag(p, b);
            continue;
        }
        const int64_t pos = s.len - s.n + (tok - s.a0);
        const T *src = reinterpret_cast<const T *>(kv ? p.v_new : p.k_new) + (tok * p.num_kv_heads + h) * D;
        V x = reinterpret_cast<const V *>(src)[vec];
        if (p.rope_k && kv == 0) {  // RoPE at append: the key rotated at its position, then stored
            float f[8], g[8];
            fk_vec_to_f32(x, f);
            if (p.rope_style == 0) {
                fk_vec_to_f32(reinterpret_cast<const V *>(src)[vec ^ (VPR / 2)], g);
            } else {
#pragma unroll
                for (int e = 0; e < 8; ++e) g[e] = f[e ^ 1];
            }
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const int c = vec * 8 + e;
                x.v[e] = fk_from_f32<T>(fk_rope_apply(f[e], g[e], fk_rope_inv_freq(c, D, p.rope_style, p.rope_log2_theta),
                                                      fk_rope_first(c, D, p.rope_style), (float)pos));
            }
        }
        if (p.to_residual) {
            const int64_t nq = (int64_t)((uint32_t)s.len / (uint32_t)p.group) * p.group;
            if (pos < nq) continue;  // quantised by the group kernel
            T *res = reinterpret_cast<T *>(p.residual) +
                     ((((int64_t)p.residual_slots[b] * 2 + kv) * p.num_kv_heads + h) * p.group + (uint32_t)pos % (uint32_t)p.group) * D;
            reinterpret_cast<V *>(res)[vec] = x;
        } else {
            const int32_t page = p.page_indices[s.pg0 + (uint32_t)pos / (uint32_t)p.page_size];
            if (page < 0 || page >= p.num_pages) {
                append_flag(p, b);
                continue;
            }
            const int64_t head_run = (int64_t)p.page_size * D;
            T *dst = reinterpret_cast<T *>(p.cache) + page * (2 * (int64_t)p.num_kv_heads * head_run) +
                     ((int64_t)kv * p.num_kv_heads + h) * head_run + ((uint32_t)pos % (uint32_t)p.page_size) * D;
            reinterpret_cast<V *>(dst)[vec] = x;
        }
    }
}

// The f16 (scale, zero) of a group with min lo, max hi (f32) and whether it is finite, as one word.
__device__ __forceinline__ uint32_t append_params(float lo, float hi, bool finite, int max_code, float &s, float &z) {
    const __half sh = __float2half_rn(__fdiv_rn(hi - lo, (float)max_code));
    const __half zh = __float2half_rn(lo);
    s = __half2float(sh);
    z = __half2float(zh);
    if (!finite || !isfinite(s) || !isfinite(z)) {
        s = z = NAN;
        return 0x7e007e00u;  // f16 NaN, NaN
    }
    return (uint32_t)__half_as_ushort(sh) | ((uint32_t)__half_as_ushort(zh) << 16);
}

__device__ __forceinline__ uint32_t append_code(float x, float s, float z, int max_code) {
    if (!(s > 0.0f)) return 0;  // a constant group (or NaN parameters: the code does not matter)
    return (uint32_t)fminf(fmaxf(rintf(__fdiv_rn(x - z, s)), 0.0f), (float)max_code);
}

// Element e of token t (a position in the sequence) of one head's K or V: from the residual for the
// tokens before the append (old_len), else from the new rows (src: the row of position old_len).
template <typename T, int D>
__device__ __forceinline__ float append_load(const T *res, const T *src, int64_t stride, int64_t old_len, int G,
                                             int64_t t, int e) {
    return t < old_len ? fk_to_f32(res[((uint32_t)t % (uint32_t)G) * D + e]) : fk_to_f32(src[(t - old_len) * stride + e]);
}

// A key element as the cache stores it: with RoPE at append (rope_k), a new token's key rotated at its
// position, as the element type T rounds it (what the bf16/f16 copy stores); the residual's keys are
// rotated already.
template <typename T, int D>
__device__ __forceinline__ float append_load_k(const fk_attn_append_params &p, const T *res, const T *src, int64_t stride,
                                               int64_t old_len, int G, int64_t t, int e) {
    const float x = append_load<T, D>(res, src, stride, old_len, G, t, e);
    if (!p.rope_k || t < old_len) return x;
    const int partner = p.rope_style == 0 ? (e + D / 2) % D : e ^ 1;
    const float xp = fk_to_f32(src[(t - old_len) * stride + partner]);
    const float r = fk_rope_apply(x, xp, fk_rope_inv_freq(e, D, p.rope_style, p.rope_log2_theta),
                                  fk_rope_first(e, D, p.rope_style), (float)t);
    return fk_to_f32(fk_from_f32<T>(r));
}

template <typename T, int D, int BITS>
__device__ __forceinline__ void attn_append_quant(const fk_attn_append_params &p) {
    constexpr int MAXC = (1 << BITS) - 1;
    constexpr int CROW = D * BITS / 8;
    const int b = blockIdx.z, h = blockIdx.y;
    const append_seq s = append_check(p, b);
    const int G = p.group, ps = p.page_size;
    const int64_t old_len = s.len - s.n;
    const int64_t g = (uint32_t)old_len / (uint32_t)G + blockIdx.x;  // the group this CTA quantises
    if (!s.ok) {
        if (threadIdx.x == 0) append_flag(p, b);
        return;
    }
    if ((g + 1) * G > s.len) return;  // not completed by this append
    const int64_t first = g * G;
    // Every page the group touches must be in range before anything is written.
    __shared__ int bad;
    if (threadIdx.x == 0) bad = 0;
    __syncthreads();
    for (int64_t t = first + threadIdx.x; t < first + G; t += blockDim.x) {
        const int32_t page = p.page_indices[s.pg0 + (uint32_t)t / (uint32_t)ps];
        if (page < 0 || page >= p.num_pages) atomicOr(&bad, 1);
    }
    __syncthreads();
    if (bad) {
        if (threadIdx.x == 0) append_flag(p, b);
        return;
    }
    const T *res = reinterpret_cast<const T *>(p.residual) + ((int64_t)p.residual_slots[b] * 2 * p.num_kv_heads + h) * G * D;
    const int64_t res_v = (int64_t)p.num_kv_heads * G * D;
    const T *k_src = reinterpret_cast<const T *>(p.k_new) + (s.a0 * p.num_kv_heads + h) * D;
    const T *v_src = reinterpret_cast<const T *>(p.v_new) + (s.a0 * p.num_kv_heads + h) * D;
    const int64_t src_stride = (int64_t)p.num_kv_heads * D;
    uint8_t *cache = reinterpret_cast<uint8_t *>(p.cache);
    const int32_t *pages = p.page_indices + s.pg0;
    // K: per channel over the group's tokens; each thread a pair of channels.
    for (int c2 = threadIdx.x; c2 < D / 2; c2 += blockDim.x) {
        float sc[2], zc[2];
        uint32_t words[2];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            float lo = INFINITY, hi = -INFINITY;
            bool finite = true;
            for (int64_t t = first; t < first + G; ++t) {
                const float x = append_load_k<T, D>(p, res, k_src, src_stride, old_len, G, t, 2 * c2 + j);
                finite = finite && isfinite(x);
                lo = fminf(lo, x);
                hi = fmaxf(hi, x);
            }
            words[j] = append_params(lo, hi, finite, MAXC, sc[j], zc[j]);
        }
        uint32_t *kp = reinterpret_cast<uint32_t *>((cache + (int64_t)pages[(uint32_t)first / (uint32_t)ps] * p.page_bytes) + p.k_params_start +
                                                    (((int64_t)h * p.k_param_slots + ((uint32_t)first % (uint32_t)ps) / G) * D + 2 * c2) * 4);
        kp[0] = words[0];
        kp[1] = words[1];
        for (int64_t t = first; t < first + G; ++t) {
            const uint32_t c0 = append_code(append_load_k<T, D>(p, res, k_src, src_stride, old_len, G, t, 2 * c2), sc[0], zc[0], MAXC);
            const uint32_t c1 = append_code(append_load_k<T, D>(p, res, k_src, src_stride, old_len, G, t, 2 * c2 + 1), sc[1], zc[1], MAXC);
            uint8_t *row = (cache + (int64_t)pages[(uint32_t)t / (uint32_t)ps] * p.page_bytes) + ((int64_t)h * ps + (uint32_t)t % (uint32_t)ps) * CROW;
            if constexpr (BITS == 4) {
                row[c2] = (uint8_t)(c0 | (c1 << 4));
            } else {
                row[2 * c2] = (uint8_t)c0;
                row[2 * c2 + 1] = (uint8_t)c1;
            }
        }
    }

    // V: per token over groups of v_group channels; a warp per token, CPL channels per lane.
    constexpr int CPL = D / 32;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int lanes_per_group = p.v_group / CPL;  // a power of two, 4 .. 32
    const int vgroups = D / p.v_group;
    for (int64_t t = first + warp; t < first + G; t += blockDim.x / 32) {
        float x[CPL];
        float lo = INFINITY, hi = -INFINITY;
        bool finite = true;
#pragma unroll
        for (int j = 0; j < CPL; ++j) {
            x[j] = append_load<T, D>(res + res_v, v_src, src_stride, old_len, G, t, lane * CPL + j);
            finite = finite && isfinite(x[j]);
            lo = fminf(lo, x[j]);
            hi = fmaxf(hi, x[j]);
        }
        for (int off = 1; off < lanes_per_group; off <<= 1) {
            lo = fminf(lo, __shfl_xor_sync(FK_FULL_MASK, lo, off));
            hi = fmaxf(hi, __shfl_xor_sync(FK_FULL_MASK, hi, off));
            finite = __shfl_xor_sync(FK_FULL_MASK, (int)finite, off) != 0 && finite;
        }
        float sv, zv;
        const uint32_t word = append_params(lo, hi, finite, MAXC, sv, zv);
        uint8_t *pg = (cache + (int64_t)pages[(uint32_t)t / (uint32_t)ps] * p.page_bytes);
        const int slot = (int)((uint32_t)t % (uint32_t)ps);
        const int vg = lane / lanes_per_group;
        if (lane % lanes_per_group == 0)
            *reinterpret_cast<uint32_t *>(pg + p.v_params_start + (((int64_t)h * ps + slot) * vgroups + vg) * 4) = word;
        uint8_t *row = pg + p.v_codes_start + ((int64_t)h * ps + slot) * CROW;
#pragma unroll
        for (int j = 0; j < CPL; j += 2) {
            const uint32_t c0 = append_code(x[j], sv, zv, MAXC);
            const uint32_t c1 = append_code(x[j + 1], sv, zv, MAXC);
            const int e = lane * CPL + j;
            if constexpr (BITS == 4) {
                row[e / 2] = (uint8_t)(c0 | (c1 << 4));
            } else {
                row[e] = (uint8_t)c0;
                row[e + 1] = (uint8_t)c1;
            }
        }
    }
}

#define FK_ATTN_APPEND_ENTRIES(TN, T, D)                                                                 \
    extern "C" __global__ void __launch_bounds__(FK_ATTN_APPEND_THREADS)                                 \
        fk_attn_append_##TN##_d##D(const fk_attn_append_params p) {                                      \
        attn_append_copy<T, D>(p);                                                                       \
    }                                                                                                    \
    extern "C" __global__ void __launch_bounds__(FK_ATTN_APPEND_THREADS)                                 \
        fk_attn_append_q8_##TN##_d##D(const fk_attn_append_params p) {                                   \
        attn_append_quant<T, D, 8>(p);                                                                   \
    }                                                                                                    \
    extern "C" __global__ void __launch_bounds__(FK_ATTN_APPEND_THREADS)                                 \
        fk_attn_append_q4_##TN##_d##D(const fk_attn_append_params p) {                                   \
        attn_append_quant<T, D, 4>(p);                                                                   \
    }
FK_ATTN_APPEND_ENTRIES(bf16, __nv_bfloat16, 64)
FK_ATTN_APPEND_ENTRIES(bf16, __nv_bfloat16, 128)
FK_ATTN_APPEND_ENTRIES(bf16, __nv_bfloat16, 256)
FK_ATTN_APPEND_ENTRIES(f16, __half, 64)
FK_ATTN_APPEND_ENTRIES(f16, __half, 128)
FK_ATTN_APPEND_ENTRIES(f16, __half, 256)

extern "C" __global__ void __launch_bounds__(FK_ATTN_COPY_THREADS) fk_attn_copy_values(const fk_attn_copy_values_params p) {
    const int32_t chunks = (int32_t)(p.run_bytes >> 4);
    for (int64_t i = blockIdx.x; i < p.n; i += gridDim.x) {
        const int32_t sp = p.src_pages[i], dp = p.dst_pages[i];
        if (sp < 0 || sp >= p.src_num_pages || dp < 0 || dp >= p.dst_num_pages) {
            if (threadIdx.x == 0 && p.status) atomicMax(p.status, (unsigned long long)(p.n - i));
            continue;
        }
        const uint4 *s = reinterpret_cast<const uint4 *>(reinterpret_cast<const uint8_t *>(p.src) +
                                                         sp * p.src_page_stride + p.src_start);
        uint4 *d = reinterpret_cast<uint4 *>(reinterpret_cast<uint8_t *>(p.dst) + dp * p.dst_page_stride + p.dst_start);
        for (int32_t j = threadIdx.x; j < chunks; j += FK_ATTN_COPY_THREADS) d[j] = s[j];
    }
}
