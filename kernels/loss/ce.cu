// kernels/loss/ce.cu: fused forward + backward of the comp-sum loss family over logits [N, V].
//
// Computes per row i (z = softcap(x_i), p = softmax(z), y = target):
//   lse_i = log sum_j exp(z_j);  loss_i = L(lse_i, z_y, sum_j w_j z_j)            (fk_loss_math.h)
//   grad_ij = s_i * (a_i p_j + b_i [j == y] + c_i w_j) * dz_j/dx_j,  s_i = upstream / mean denominator
// Floor: read the logits once and write the gradient once: 2 N V sizeof(T) bytes. With cache_row the row
// is kept in shared memory between the two passes, so HBM sees exactly that; without (rows too long for
// shared memory: V sizeof(T) > the opt-in limit), pass 2 re-reads the row, mostly from L2.
// Launch: one block per row (grid-stride over rows), blockDim a power of two in [64, 512] chosen by the
// host from V; dynamic shared memory V sizeof(T) + 16 bytes when cache_row. Deterministic: fixed-order
// block reductions, no atomics on data (the status word only records the first bad target).
//
// Rows too long for one block's shared memory take, on sm_90+, the cluster kernels below: a cluster of
// C = 2, 4 or 8 CTAs per row, each holding a slice of the row in its own shared memory; the slices'
// (max, sum exp, sum w z) are merged in rank order through distributed shared memory, so HBM again sees
// one read and one write. Elsewhere such rows re-read the row in pass 2 (mostly from L2).
#include "loss_common.cuh"

// Ignored or invalid-target row: loss/lse 0 or NaN (written by the CTA with `writer`), gradient 0.
template <typename T>
__device__ __forceinline__ void ce_skip_row(const fk_ce_params &p, int64_t row, bool bad, bool writer, T *g,
                                            int64_t n) {
    if (writer && threadIdx.x == 0) {
        p.loss[row] = bad ? NAN : 0.0f;
        p.lse[row] = bad ? NAN : 0.0f;
        if (bad) fk_flag_bad_row(p.status, p.n_rows, row);
    }
    if (g) fk_row_fill<T>(g, n, 0.0f);
}

// Thread 0 only: the row's loss and lse from its statistics (stored when `writer`), and the gradient
// coefficients (a, b, c) times the upstream scale, plus lse, into coef[0..4).
__device__ __forceinline__ void ce_finish_row(const fk_ce_params &p, int64_t row, float m, float s, float zy,
                                              float swz, float wy, bool writer, float *coef) {
    const float ls = logf(s);
    const float lse = m + ls;
    const fk_row_result r = fk_row_loss(&p.cfg, lse, (zy - m) - ls, swz, wy);
    if (writer) {
        p.loss[row] = r.loss;
        p.lse[row] = lse;
    }
    const float sc = fk_row_grad_scale(p.reduction, p.grad_output, p.denominator, row);
    coef[0] = r.a * sc;
    coef[1] = r.b * sc;
    coef[2] = r.c * sc;
    coef[3] = lse;
}

// Pass 2: g[j] = (A p_j + C w_j + B [j == y]) dz_j from the cached (or re-read) raw row `src`; j and y are
// local to the slice, `w` already offset to it.
template <typename T>
__device__ __forceinline__ void ce_write_grad(const T *src, T *g, int64_t n, const float *coef, float cap,
                                              const float *w, int64_t y) {
    const float A = coef[0], B = coef[1], C = coef[2], lse = coef[3];
    const bool use_c = C != 0.0f;
    fk_row_map<T>(src, g, n, [&](int64_t j, float xv) {
        const fk_capped zc = fk_cap(xv, cap);
        float r = A * expf(zc.z - lse);
        if (use_c) r += C * fk_class_weight(w, j);
        if (j == y) r += B;  // the target column: fp32, rounded once
        return r * zc.dz;
    });
}

template <typename T, typename I>
__device__ __forceinline__ void ce_fwd_bwd(const fk_ce_params &p) {
    extern __shared__ __align__(16) unsigned char fk_smem[];
    __shared__ fk_maxsum red_ms[32];
    __shared__ float red_f[32];
    __shared__ float row_coef[4];  // a, b, c (scaled), lse
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
            ce_skip_row<T>(p, row, bad, true, g, V);
            __syncthreads();
            continue;
        }
        // The cache mirrors the gradient row's alignment, so pass 2 moves 16-byte vectors.
        T *cache = (p.cache_row && g) ? reinterpret_cast<T *>(fk_smem + ((uint64_t)g & 15u)) : nullptr;
        float m, s, swz;
        fk_row_stats<T>(x, V, cfg, want_swz, p.weights, 0, cache, red_ms, red_f, m, s, swz);
        if (threadIdx.x == 0) {
            const float zy = fk_cap(fk_to_f32(cache ? cache[y] : x[y]), cfg.softcap).z;
            ce_finish_row(p, row, m, s, zy, swz, fk_class_weight(p.weights, y), true, row_coef);
        }
        __syncthreads();
        if (g) ce_write_grad<T>(cache ? cache : x, g, V, row_coef, cfg.softcap, p.weights, y);
        __syncthreads();  // the cache and row_coef are reused by the next row
    }
}

#define FK_CE_ENTRY(TN, T, IN, I)                                                                      \
    extern "C" __global__ void __launch_bounds__(FK_CE_MAX_THREADS) fk_ce_fwd_bwd_##TN##_##IN(const fk_ce_params p) { \
        ce_fwd_bwd<T, I>(p);                                                                           \
    }
FK_LOSS_TYPES(FK_CE_ENTRY)

// Thread-block clusters exist from sm_90: the cluster kernels are in the sm_90a SASS and the compute_90
// PTX only (the host never asks for them on an older GPU).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
#include <cooperative_groups.h>

// One row per cluster of C CTAs (grid-stride over rows by cluster). CTA `rank` owns the elements
// [rank slice, (rank + 1) slice) of the row and keeps them in its shared memory between the passes.
// Every CTA merges the C partial states itself, in rank order, so all compute the same lse bit for bit.
template <typename T, typename I, int C>
__device__ __forceinline__ void ce_fwd_bwd_cluster(const fk_ce_params &p) {
    namespace cg = cooperative_groups;
    extern __shared__ __align__(16) unsigned char fk_smem[];
    __shared__ fk_maxsum red_ms[32];
    __shared__ float red_f[32];
    __shared__ float part[3];  // this CTA's (max, sum exp, sum w z): read by the whole cluster
    __shared__ float row_coef[4];
    cg::cluster_group cluster = cg::this_cluster();
    const int rank = (int)cluster.block_rank();
    const fk_loss_config &cfg = p.cfg;
    const bool want_swz = cfg.kind == FK_LOSS_CE && cfg.smoothing != 0.0f;
    const int64_t V = p.vocab;
    const int64_t j0 = rank * p.slice;
    const int64_t n = j0 >= V ? 0 : min(p.slice, V - j0);
    const float *w = p.weights ? p.weights + j0 : nullptr;

    for (int64_t row = blockIdx.x / C; row < p.n_rows; row += gridDim.x / C) {
        const T *xrow = reinterpret_cast<const T *>(p.logits) + row * p.row_stride;
        T *g = reinterpret_cast<T *>(p.grad) + row * p.grad_stride + j0;
        const int64_t y = fk_target<I>(p.targets, row);
        const bool ignored = y == p.ignore_index;
        const bool bad = !ignored && (y < 0 || y >= V);
        if (ignored || bad) {
            // The same branch in every CTA of the cluster (same row): no cluster barrier is skipped by some.
            ce_skip_row<T>(p, row, bad, rank == 0, g, n);
            continue;
        }
        T *cache = reinterpret_cast<T *>(fk_smem + ((uint64_t)g & 15u));
        float m, s, swz;
        fk_row_stats<T>(xrow + j0, n, cfg, want_swz, p.weights, j0, cache, red_ms, red_f, m, s, swz);
        if (threadIdx.x == 0) {
            part[0] = m;
            part[1] = s;
            part[2] = swz;
        }
        cluster.sync();  // every CTA's part is written (release) and visible to the cluster (acquire)
        if (threadIdx.x == 0) {
            fk_maxsum st{-INFINITY, 0.0f};
            float swz_all = 0.0f;
#pragma unroll
            for (int k = 0; k < C; ++k) {
                const float *q = cluster.map_shared_rank(part, k);
                st = fk_maxsum_merge(st, fk_maxsum{q[0], q[1]});
                swz_all += q[2];
            }
            // z_y from global memory: it may lie in another CTA's slice. Pass 2 (which may overwrite the
            // logits in place) starts only after the next cluster barrier.
            const float zy = fk_cap(fk_to_f32(xrow[y]), cfg.softcap).z;
            ce_finish_row(p, row, st.m, st.s, zy, swz_all, fk_class_weight(p.weights, y), rank == 0, row_coef);
        }
        cluster.sync();  // no CTA reuses `part` while another may still read it; row_coef is visible
        ce_write_grad<T>(cache, g, n, row_coef, cfg.softcap, w, y - j0);
        __syncthreads();  // the cache and row_coef are reused by the next row
    }
}

#define FK_CE_CLUSTER_ENTRY(TN, T, IN, I, C)                                                          \
    extern "C" __global__ void __cluster_dims__(C, 1, 1) __launch_bounds__(FK_CE_MAX_THREADS)          \
        fk_ce_fwd_bwd_cluster##C##_##TN##_##IN(const fk_ce_params p) {                                 \
        ce_fwd_bwd_cluster<T, I, C>(p);                                                                \
    }
#define FK_CE_CLUSTER_ENTRIES(TN, T, IN, I)   \
    FK_CE_CLUSTER_ENTRY(TN, T, IN, I, 2)      \
    FK_CE_CLUSTER_ENTRY(TN, T, IN, I, 4)      \
    FK_CE_CLUSTER_ENTRY(TN, T, IN, I, 8)
FK_LOSS_TYPES(FK_CE_CLUSTER_ENTRIES)
#endif

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
            // D = 0: nothing to average, 0 (PyTorch: 0/0 = NaN), but a NaN row is never averaged away.
            // Any other D divides, a negative or NaN one included.
            const double d = (double)*p.denominator;
            *p.out = d != 0.0 ? (float)(acc / d) : (acc != acc ? NAN : 0.0f);
        } else {
            *p.out = (float)acc;
        }
    }
}
