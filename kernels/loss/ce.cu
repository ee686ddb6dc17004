// kernels/loss/ce.cu: fused forward + backward of the comp-sum loss family over logits [N, V].
//
// Computes per row i (z = softcap(x_i), p = softmax(z), y = target):
//   lse_i = log sum_j exp(z_j);  loss_i = L(lse_i, z_y, sum_j w_j z_j)            (fk_loss_math.h)
//   grad_ij = s_i * (a_i p_j + b_i [j == y] + c_i w_j) * dz_j/dx_j,  s_i = upstream / mean denominator
// Floor: read the logits once and write the gradient once: 2 N V sizeof(T) bytes. With cache_row the row
// is kept in shared memory between the two passes, so HBM sees exactly that; without (rows too long for
// shared memory: V sizeof(T) > the opt-in limit), pass 2 re-reads the row, mostly from L2.
// Launch: one block per row (grid-stride over rows), blockDim a power of two in [64, 1024] chosen by the
// host from V; dynamic shared memory V sizeof(T) + 16 bytes when cache_row. Deterministic: fixed-order
// block reductions, no atomics on data (the status word only records the first bad target).
#include "loss_common.cuh"

template <typename T, typename I>
__device__ __forceinline__ void ce_fwd_bwd(const fk_ce_params &p) {
    extern __shared__ __align__(16) unsigned char fk_smem[];
    __shared__ fk_maxsum red_ms[32];
    __shared__ float red_f[32];
    __shared__ float row_coef[5];  // a, b, c (scaled), lse, flag
    const fk_loss_config &cfg = p.cfg;
    const bool want_swz = cfg.kind == FK_LOSS_CE && cfg.smoothing != 0.0f;
    const int64_t V = p.vocab;

    for (int64_t row = blockIdx.x; row < p.n_rows; row += gridDim.x) {
        const T *x = reinterpret_cast<const T *>(p.logits) + row * p.row_stride;
        T *g = p.grad ? reinterpret_cast<T *>(p.grad) + row * p.grad_stride : nullptr;
        const int64_t y = fk_target<I>(p.targets, row);
        const bool ignored = y == p.ignore_index;
        const bool bad = !ignored && (y < 0 || y >= V);
        if (ignored || bad) {
            if (threadIdx.x == 0) {
                p.loss[row] = bad ? NAN : 0.0f;
                p.lse[row] = bad ? NAN : 0.0f;
                if (bad) fk_flag_bad_row(p.status, p.n_rows, row);
            }
            if (g) fk_row_fill<T>(g, V, 0.0f);
            __syncthreads();
            continue;
        }
        // The cache mirrors the gradient row's alignment, so pass 2 moves 16-byte vectors.
        T *cache = (p.cache_row && g) ? reinterpret_cast<T *>(fk_smem + ((uint64_t)g & 15u)) : nullptr;
        float m, s, swz;
        fk_row_stats<T>(x, V, cfg, want_swz, p.weights, 0, cache, red_ms, red_f, m, s, swz);
        if (threadIdx.x == 0) {
            const float ls = logf(s);
            const float lse = m + ls;
            const float zy = fk_cap(fk_to_f32(cache ? cache[y] : x[y]), cfg.softcap).z;
            const float wy = fk_class_weight(p.weights, y);
            const fk_row_result r = fk_row_loss(&cfg, lse, (zy - m) - ls, swz, wy);
            p.loss[row] = r.loss;
            p.lse[row] = lse;
            const float sc = fk_row_grad_scale(p.reduction, p.grad_output, p.denominator, row);
            row_coef[0] = r.a * sc;
            row_coef[1] = r.b * sc;
            row_coef[2] = r.c * sc;
            row_coef[3] = lse;
        }
        __syncthreads();
        if (g) {
            const float A = row_coef[0], B = row_coef[1], C = row_coef[2], lse = row_coef[3];
            const float cap = cfg.softcap;
            const float *w = p.weights;
            const bool use_c = C != 0.0f;
            fk_row_map<T>(cache ? cache : x, g, V, [&](int64_t j, float xv) {
                const fk_capped zc = fk_cap(xv, cap);
                float r = A * expf(zc.z - lse);
                if (use_c) r += C * fk_class_weight(w, j);
                if (j == y) r += B;  // the target column: fp32, rounded once
                return r * zc.dz;
            });
        }
        __syncthreads();  // the cache and row_coef are reused by the next row
    }
}

#define FK_CE_ENTRY(TN, T, IN, I)                                                                      \
    extern "C" __global__ void __launch_bounds__(FK_CE_MAX_THREADS) fk_ce_fwd_bwd_##TN##_##IN(const fk_ce_params p) { \
        ce_fwd_bwd<T, I>(p);                                                                           \
    }
FK_CE_ENTRY(f32, float, i32, int32_t)
FK_CE_ENTRY(f32, float, i64, int64_t)
FK_CE_ENTRY(f16, __half, i32, int32_t)
FK_CE_ENTRY(f16, __half, i64, int64_t)
FK_CE_ENTRY(bf16, __nv_bfloat16, i32, int32_t)
FK_CE_ENTRY(bf16, __nv_bfloat16, i64, int64_t)

// The mean's denominator: sum over rows with a valid target of w_y (1 without weights), in f64 and in a
// fixed order. One block of FK_LOSS_REDUCE_THREADS.
template <typename I>
__device__ __forceinline__ void loss_denominator(const fk_loss_denominator_params &p) {
    __shared__ double red[32];
    double acc = 0.0;
    for (int64_t i = threadIdx.x; i < p.n_rows; i += blockDim.x) {
        const int64_t y = fk_target<I>(p.targets, i);
        if (y != p.ignore_index && y >= 0 && y < p.vocab) acc += fk_class_weight(p.weights, y);
    }
    acc = fk_block_reduce(acc, fk_sum_op{}, 0.0, red);
    if (threadIdx.x == 0) *p.denominator = (float)acc;
}
extern "C" __global__ void __launch_bounds__(FK_LOSS_REDUCE_THREADS)
    fk_loss_denominator_i32(const fk_loss_denominator_params p) { loss_denominator<int32_t>(p); }
extern "C" __global__ void __launch_bounds__(FK_LOSS_REDUCE_THREADS)
    fk_loss_denominator_i64(const fk_loss_denominator_params p) { loss_denominator<int64_t>(p); }

// Fixed-order f64 sum of n floats into one scalar (divided by the denominator for a mean). One block.
extern "C" __global__ void __launch_bounds__(FK_LOSS_REDUCE_THREADS) fk_loss_reduce(const fk_loss_reduce_params p) {
    __shared__ double red[32];
    double acc = 0.0;
    for (int64_t i = threadIdx.x; i < p.n; i += blockDim.x) acc += (double)p.values[i];
    acc = fk_block_reduce(acc, fk_sum_op{}, 0.0, red);
    if (threadIdx.x == 0) {
        if (p.denominator) {
            const double d = (double)*p.denominator;
            *p.out = d > 0.0 ? (float)(acc / d) : 0.0f;
        } else {
            *p.out = (float)acc;
        }
    }
}
