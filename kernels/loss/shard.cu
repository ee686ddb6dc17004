// kernels/loss/shard.cu: vocabulary-parallel cross-entropy family.
//
// A rank holding logits[:, off : off + Vs] computes per row (max, sum exp, z_y if y in its shard,
// sum w_j z_j) with fk_ce_shard_stats; the [P, N] statistics of all shards (all-gathered by the caller,
// e.g. NCCL) are merged in shard order by fk_ce_shard_combine into the global lse, the loss and the
// gradient coefficients; fk_ce_shard_bwd writes each shard's gradient from them. Merging in a fixed shard
// order makes the result independent of which rank computes it.
// Floors: stats read N Vs sizeof(T); bwd reads and writes it once more; combine is O(N P).
#include "loss_common.cuh"

template <typename T, typename I>
__device__ __forceinline__ void ce_shard_stats(const fk_ce_shard_stats_params &p) {
    __shared__ fk_maxsum red_ms[32];
    __shared__ float red_f[32];
    const bool want_swz = p.cfg.kind == FK_LOSS_CE && p.cfg.smoothing != 0.0f;
    for (int64_t row = blockIdx.x; row < p.n_rows; row += gridDim.x) {
        const T *x = reinterpret_cast<const T *>(p.logits) + row * p.row_stride;
        const int64_t y = fk_target<I>(p.targets, row);
        if (y == p.ignore_index) {
            if (threadIdx.x == 0) p.stats[row] = fk_shard_stat{-INFINITY, 0.0f, 0.0f, 0.0f};
            continue;
        }
        float m, s, swz;
        fk_row_stats<T>(x, p.shard_vocab, p.cfg, want_swz, p.weights, p.vocab_offset, nullptr, red_ms, red_f, m, s,
                        swz);
        if (threadIdx.x == 0) {
            const int64_t local = y - p.vocab_offset;
            const bool mine = local >= 0 && local < p.shard_vocab;
            const float zy = mine ? fk_cap(fk_to_f32(x[local]), p.cfg.softcap).z : 0.0f;
            p.stats[row] = fk_shard_stat{m, s, zy, swz};
        }
        __syncthreads();
    }
}

template <typename I>
__device__ __forceinline__ void ce_shard_combine(const fk_ce_shard_combine_params &p) {
    for (int64_t row = fk_global_thread(); row < p.n_rows; row += fk_grid_threads()) {
        const int64_t y = fk_target<I>(p.targets, row);
        const bool ignored = y == p.ignore_index;
        const bool bad = !ignored && (y < 0 || y >= p.vocab);
        if (ignored || bad) {
            p.loss[row] = bad ? NAN : 0.0f;
            p.lse[row] = bad ? NAN : 0.0f;
            p.coeffs[row] = fk_row_coeffs{0.0f, 0.0f, 0.0f, 0.0f};
            if (bad) fk_flag_bad_row(p.status, p.n_rows, row);
            continue;
        }
        fk_maxsum st{-INFINITY, 0.0f};
        float zy = 0.0f, swz = 0.0f;
        for (int64_t s = 0; s < p.n_shards; ++s) {
            const fk_shard_stat a = p.stats[s * p.n_rows + row];
            st = fk_maxsum_merge(st, fk_maxsum{a.max, a.sumexp});
            zy += a.target_logit;
            swz += a.sum_wz;
        }
        const float ls = logf(st.s);
        const float lse = st.m + ls;
        const fk_row_result r = fk_row_loss(&p.cfg, lse, (zy - st.m) - ls, swz, fk_class_weight(p.weights, y));
        p.loss[row] = r.loss;
        p.lse[row] = lse;
        const float sc = fk_row_grad_scale(p.reduction, p.grad_output, p.denominator, row);
        p.coeffs[row] = fk_row_coeffs{r.a, r.b, r.c, sc};
    }
}

template <typename T, typename I>
__device__ __forceinline__ void ce_shard_bwd(const fk_ce_shard_bwd_params &p) {
    const float cap = p.cfg.softcap;
    for (int64_t row = blockIdx.x; row < p.n_rows; row += gridDim.x) {
        const T *x = reinterpret_cast<const T *>(p.logits) + row * p.row_stride;
        T *g = reinterpret_cast<T *>(p.grad) + row * p.grad_stride;
        const int64_t y = fk_target<I>(p.targets, row);
        const fk_row_coeffs k = p.coeffs[row];
        if (y == p.ignore_index || k.scale == 0.0f) {
            fk_row_fill<T>(g, p.shard_vocab, 0.0f);
            continue;
        }
        const float A = k.a * k.scale, B = k.b * k.scale, C = k.c * k.scale, lse = p.lse[row];
        const int64_t local_y = y - p.vocab_offset;
        const float *w = p.weights ? p.weights + p.vocab_offset : nullptr;
        fk_row_map<T>(x, g, p.shard_vocab, [&](int64_t j, float xv) {
            const fk_capped zc = fk_cap(xv, cap);
            float r = A * expf(zc.z - lse);
            if (C != 0.0f) r += C * fk_class_weight(w, j);
            if (j == local_y) r += B;
            return r * zc.dz;
        });
    }
}

#define FK_SHARD_ENTRIES(TN, T, IN, I)                                                               \
    extern "C" __global__ void __launch_bounds__(FK_CE_MAX_THREADS)                                               \
        fk_ce_shard_stats_##TN##_##IN(const fk_ce_shard_stats_params p) { ce_shard_stats<T, I>(p); } \
    extern "C" __global__ void __launch_bounds__(FK_CE_MAX_THREADS)                                               \
        fk_ce_shard_bwd_##TN##_##IN(const fk_ce_shard_bwd_params p) { ce_shard_bwd<T, I>(p); }
FK_LOSS_TYPES(FK_SHARD_ENTRIES)

extern "C" __global__ void __launch_bounds__(256) fk_ce_shard_combine_i32(const fk_ce_shard_combine_params p) {
    ce_shard_combine<int32_t>(p);
}
extern "C" __global__ void __launch_bounds__(256) fk_ce_shard_combine_i64(const fk_ce_shard_combine_params p) {
    ce_shard_combine<int64_t>(p);
}
