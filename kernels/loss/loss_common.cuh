// loss_common.cuh: pieces shared by the fused-loss kernels.
#pragma once

#include "fk_loss_math.h"
#include "fk_row.cuh"
#include "loss_params.h"

// Calls M(TN, T, IN, I) for every (storage type, target index type) the row kernels are built for.
#define FK_LOSS_TYPES(M)                 \
    M(f32, float, i32, int32_t)          \
    M(f32, float, i64, int64_t)          \
    M(f16, __half, i32, int32_t)         \
    M(f16, __half, i64, int64_t)         \
    M(bf16, __nv_bfloat16, i32, int32_t) \
    M(bf16, __nv_bfloat16, i64, int64_t)

template <typename I>
__device__ __forceinline__ int64_t fk_target(const void *targets, int64_t row) {
    return (int64_t)(reinterpret_cast<const I *>(targets)[row]);
}

__device__ __forceinline__ float fk_class_weight(const float *w, int64_t j) { return w ? w[j] : 1.0f; }

// Upstream gradient of row `row` divided by the mean's denominator D = sum of the counted rows' w_y.
// D = 0 (every row ignored, or zero total weight) gives 0, not NaN; any other D divides, a negative or a
// NaN one included (a NaN class weight must reach every gradient, never be dropped as "not > 0").
__device__ __forceinline__ float fk_row_grad_scale(uint32_t reduction, const float *grad_output,
                                                   const float *denominator, int64_t row) {
    float g = 1.0f;
    if (grad_output) g = reduction == FK_REDUCTION_NONE ? grad_output[row] : grad_output[0];
    if (reduction == FK_REDUCTION_MEAN) {
        const float d = *denominator;
        g = d != 0.0f ? g / d : 0.0f;
    }
    return g;
}

// Softcapped logit and the chain factor dz/dx in one tanh.
struct fk_capped {
    float z;
    float dz;
};
__device__ __forceinline__ fk_capped fk_cap(float x, float c) {
    if (c <= 0.0f) return fk_capped{x, 1.0f};
    const float t = tanhf(x / c);
    return fk_capped{c * t, 1.0f - t * t};
}

__device__ __forceinline__ fk_maxsum fk_maxsum_op(fk_maxsum a, fk_maxsum b) { return fk_maxsum_merge(a, b); }

struct fk_sum_op {
    template <typename T>
    __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct fk_merge_op {
    __device__ __forceinline__ fk_maxsum operator()(fk_maxsum a, fk_maxsum b) const { return fk_maxsum_merge(a, b); }
};

// Records a target outside [0, vocab) (that is not ignore_index): the host reads the first such row.
__device__ __forceinline__ void fk_flag_bad_row(unsigned long long *status, int64_t n_rows, int64_t row) {
    if (status) atomicMax(status, (unsigned long long)(n_rows - row));
}

// Pass 1 over a row: online (max, sum exp) of the softcapped logits and, for label smoothing,
// sum_j w_j z_j (weights indexed from w_offset). Optionally copies the raw row into `cache`.
template <typename T>
__device__ __forceinline__ void fk_row_stats(const T *x, int64_t n, const fk_loss_config &cfg, bool want_swz,
                                             const float *weights, int64_t w_offset, T *cache, fk_maxsum *red_ms,
                                             float *red_f, float &lse_part_m, float &lse_part_s, float &swz) {
    fk_maxsum st{-INFINITY, 0.0f};
    float acc = 0.0f;
    const float cap = cfg.softcap;
    fk_row_read<T>(x, n, [&](int64_t j, T raw) {
        if (cache) cache[j] = raw;
        const float z = cap > 0.0f ? cap * tanhf(fk_to_f32(raw) / cap) : fk_to_f32(raw);
        fk_maxsum_push(&st, z);
        // A class of weight 0 adds nothing, even where its logit is masked (not 0 * -inf = NaN).
        if (want_swz) acc += fk_weighted(fk_class_weight(weights ? weights + w_offset : nullptr, j), z);
    });
    st = fk_block_reduce(st, fk_merge_op{}, fk_maxsum{-INFINITY, 0.0f}, red_ms);
    swz = want_swz ? fk_block_reduce(acc, fk_sum_op{}, 0.0f, red_f) : 0.0f;
    lse_part_m = st.m;
    lse_part_s = st.s;
}
