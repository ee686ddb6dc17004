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

// Two instantiations of every row kernel. The plain kernels (fk_ce_fwd_bwd_*, fk_ce_fwd_bwd_cluster*_*)
// carry nothing in their loops beyond the online softmax and p_j: every loss kind, z-loss and class
// weights are per-row scalars (a, b) there. The general kernels (fk_ce_fwd_bwd_gen_*) add what needs
// per-element work: a logit softcap (tanh per element, times dz/dx) and label smoothing (sum_j w_j z_j in
// pass 1, c w_j in pass 2). The host picks (FusedPlan).
//
// Hot loops (per element; kernels/loss/PERF.md has the SASS counts): pass 1 is a max, z - m, a scale
// by log2e, one MUFU.EX2 (FTZ) and one FADD into the online sum, with a rescale only when the running
// max grows; the row goes to shared memory with 16-byte stores. Pass 2 is x - lse, the scale, one
// MUFU.EX2 and one FMUL by A. The target column's b term is added once per row by thread 0 after pass 2 (it
// rewrites g[y]); in-row indices are 32-bit (the plan caps vocab below 2^31).

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

// One thread's online softmax statistics: s = sum_j 2^((z_j - m) log2e) for the running max m, kept
// also as mm (0 while m = -inf, so a masked logit adds 2^-inf = 0, not 2^NaN). z - m is exact where it
// matters (Sterbenz), so the max itself adds exactly 1 and a row whose other logits are all masked has
// loss 0 and gradient 0 exactly. (One FMA z log2e - m log2e would save an instruction per element but
// adds the rounding of m log2e to every term, so not even that row would be exact.) A NaN logit, or a
// +inf one (the max then makes every other term 0 and its own 2^(inf - inf)), makes s NaN, so the row's
// loss, lse and gradient are NaN (the f64 reference gives NaN for both). swz: sum_j w_j z_j.
struct ce_stats {
    float m, mm, s, swz;
};

template <int K>
__device__ __forceinline__ void ce_push(ce_stats &st, const float (&z)[K]) {
    float vm = z[0];
#pragma unroll
    for (int k = 1; k < K; ++k) vm = fmaxf(vm, z[k]);  // a NaN is skipped here and reaches s below
    if (vm > st.m) {
        // While the max is -inf, s is 0 (or NaN after a NaN logit): nothing to rescale.
        if (st.m != -INFINITY) st.s *= fk_ex2((st.m - vm) * FK_LOG2E_F);
        st.m = vm;
        st.mm = vm;
    }
#pragma unroll
    for (int k = 0; k < K; ++k) st.s += fk_ex2((z[k] - st.mm) * FK_LOG2E_F);
}

// Per-row constants of pass 2, in shared memory: A, C (scaled by the upstream gradient and the mean's
// denominator), lse, and the target column's gradient before dz/dx: A p_y + B + C w_y.
struct ce_coef {
    float a, c, lse, gy;
};

// Softcapped logits and, for label smoothing, the weighted sum, in the general kernels.
template <bool GEN, int K>
__device__ __forceinline__ void ce_features(float (&z)[K], int j, const fk_loss_config &cfg, bool want_swz,
                                            const float *w, ce_stats &st) {
    if constexpr (GEN) {
        const float cap = cfg.softcap;
#pragma unroll
        for (int k = 0; k < K; ++k) {
            if (cap > 0.0f) z[k] = cap * tanhf(z[k] / cap);
            // A class of weight 0 adds nothing, even where its logit is masked (not 0 * -inf = NaN).
            if (want_swz) st.swz += fk_weighted(fk_class_weight(w, j + k), z[k]);
        }
    }
}

// Pass 1 over the n elements of x (w: the class weights of those elements or NULL): the thread's
// statistics, and the raw row copied to `cache` (aligned as x, so the copy is 16-byte stores) if given.
template <typename T, bool GEN>
__device__ __forceinline__ void ce_pass1(const T *x, int n, const fk_loss_config &cfg, bool want_swz,
                                         const float *w, T *cache, ce_stats &st) {
    using V = fk_vec16<T>;
    constexpr int N = V::N;
    const int head = (int)min(fk_head_elems<T>(x), (int64_t)n);
    const int nvec = (n - head) / N;
    const int tail0 = head + nvec * N;
    const int tid = threadIdx.x, nt = blockDim.x;
    const V *body = reinterpret_cast<const V *>(x + head);
    V *cbody = cache ? reinterpret_cast<V *>(cache + head) : nullptr;
    for (int v = tid; v < nvec; v += nt) {
        const V xv = body[v];
        if (cache) cbody[v] = xv;
        float z[N];
        fk_vec_to_f32(xv, z);
        ce_features<GEN>(z, head + v * N, cfg, want_swz, w, st);
        ce_push<N>(st, z);
    }
    // Head and tail elements, one by one.
    for (int j = tid; j < head + (n - tail0); j += nt) {
        const int e = j < head ? j : tail0 + (j - head);
        const T raw = x[e];
        if (cache) cache[e] = raw;
        float z[1] = {fk_to_f32(raw)};
        ce_features<GEN>(z, e, cfg, want_swz, w, st);
        ce_push<1>(st, z);
    }
}

// The gradient of one element before the target's b term: A p_j (+ C w_j) times dz/dx.
template <bool GEN>
__device__ __forceinline__ float ce_grad(float x, int j, const ce_coef &k, float cap, const float *w) {
    if constexpr (GEN) {
        const fk_capped zc = fk_cap(x, cap);
        float r = k.a * fk_ex2((zc.z - k.lse) * FK_LOG2E_F);
        if (k.c != 0.0f) r += k.c * fk_class_weight(w, j);
        return r * zc.dz;
    } else {
        return k.a * fk_ex2((x - k.lse) * FK_LOG2E_F);
    }
}

// Pass 2: g[j] = ce_grad(src[j]) for j < n, with 16-byte loads and stores when src and g share their
// alignment within 16 bytes (src is the cache, aligned as the logits; or the logits themselves), element
// by element otherwise.
template <typename T, bool GEN>
__device__ __forceinline__ void ce_pass2(const T *src, T *g, int n, const ce_coef &k, float cap, const float *w) {
    using V = fk_vec16<T>;
    constexpr int N = V::N;
    const int tid = threadIdx.x, nt = blockDim.x;
    int head = n, nvec = 0;
    if ((((uint64_t)src ^ (uint64_t)g) & 15u) == 0) {
        head = (int)min(fk_head_elems<T>(g), (int64_t)n);
        nvec = (n - head) / N;
    }
    const int tail0 = head + nvec * N;
    const V *in = reinterpret_cast<const V *>(src + head);
    V *out = reinterpret_cast<V *>(g + head);
    for (int v = tid; v < nvec; v += nt) {
        const V xv = in[v];  // one 16-byte load (LDS.128 from the cache), then the unpack in registers
        float xf[N];
        fk_vec_to_f32(xv, xf);
        V gv;
#pragma unroll
        for (int e = 0; e < N; ++e) gv.v[e] = fk_from_f32<T>(ce_grad<GEN>(xf[e], head + v * N + e, k, cap, w));
        out[v] = gv;
    }
    for (int j = tid; j < head + (n - tail0); j += nt) {
        const int e = j < head ? j : tail0 + (j - head);
        g[e] = fk_from_f32<T>(ce_grad<GEN>(fk_to_f32(src[e]), e, k, cap, w));
    }
}

// Thread 0 only: the row's loss and lse from its statistics (stored when `writer`), and the pass-2
// constants times the upstream scale into `k`. xy: the target's raw logit.
__device__ __forceinline__ void ce_finish_row(const fk_ce_params &p, int64_t row, float m, float s, float xy,
                                              float swz, float wy, bool writer, ce_coef *k) {
    const float ls = logf(s);
    const float lse = m + ls;
    const float logp = (fk_cap(xy, p.cfg.softcap).z - m) - ls;
    const fk_row_result r = fk_row_loss(&p.cfg, lse, logp, swz, wy);
    if (writer) {
        p.loss[row] = r.loss;
        p.lse[row] = lse;
    }
    const float sc = fk_row_grad_scale(p.reduction, p.grad_output, p.denominator, row);
    k->a = r.a * sc;
    k->c = r.c * sc;
    k->lse = lse;
    // The target column in fp32, rounded once: A p_y + C w_y + B, with p_y = exp(log p_y) (not from lse).
    float gy = k->a * expf(logp);
    if (k->c != 0.0f) gy += k->c * wy;
    k->gy = gy + r.b * sc;
}

template <typename T, typename I, bool GEN>
__device__ __forceinline__ void ce_fwd_bwd(const fk_ce_params &p) {
    extern __shared__ __align__(16) unsigned char fk_smem[];
    __shared__ fk_maxsum red_ms[32];
    __shared__ float red_f[32];
    __shared__ ce_coef row_coef;
    const fk_loss_config &cfg = p.cfg;
    const bool want_swz = GEN && cfg.kind == FK_LOSS_CE && cfg.smoothing != 0.0f;
    const float cap = GEN ? cfg.softcap : 0.0f;
    const int V = (int)p.vocab;

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
        // Read before pass 2 may overwrite it (in place).
        const float xy = threadIdx.x == 0 ? fk_to_f32(x[y]) : 0.0f;
        T *cache = (p.cache_row && g) ? reinterpret_cast<T *>(fk_smem + ((uint64_t)x & 15u)) : nullptr;
        ce_stats st{-INFINITY, 0.0f, 0.0f, 0.0f};
        ce_pass1<T, GEN>(x, V, cfg, want_swz, p.weights, cache, st);
        const fk_maxsum ms = fk_block_reduce(fk_maxsum{st.m, st.s}, fk_merge_op{}, fk_maxsum{-INFINITY, 0.0f}, red_ms);
        const float swz = want_swz ? fk_block_reduce(st.swz, fk_sum_op{}, 0.0f, red_f) : 0.0f;
        if (threadIdx.x == 0)
            ce_finish_row(p, row, ms.m, ms.s, xy, swz, fk_class_weight(p.weights, y), true, &row_coef);
        __syncthreads();
        if (g) {
            const ce_coef k = row_coef;
            ce_pass2<T, GEN>(cache ? cache : x, g, V, k, cap, p.weights);
            __syncthreads();  // pass 2 is done with the cache and row_coef, and g[y] is written
            if (threadIdx.x == 0) g[y] = fk_from_f32<T>(k.gy * fk_cap(xy, cap).dz);
        }
    }
}

#define FK_CE_ENTRY(TN, T, IN, I)                                                                      \
    extern "C" __global__ void __launch_bounds__(FK_CE_MAX_THREADS) fk_ce_fwd_bwd_##TN##_##IN(const fk_ce_params p) { \
        ce_fwd_bwd<T, I, false>(p);                                                                    \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(FK_CE_MAX_THREADS)                                    \
        fk_ce_fwd_bwd_gen_##TN##_##IN(const fk_ce_params p) {                                          \
        ce_fwd_bwd<T, I, true>(p);                                                                     \
    }
FK_LOSS_TYPES(FK_CE_ENTRY)

// Thread-block clusters exist from sm_90: the cluster kernels are in the sm_90a SASS and the compute_90
// PTX only (the host never asks for them on an older GPU).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
#include <cooperative_groups.h>

// One row per cluster of C CTAs (grid-stride over rows by cluster). CTA `rank` owns the elements
// [rank slice, (rank + 1) slice) of the row and keeps them in its shared memory between the passes.
// Every CTA merges the C partial states itself, in rank order, so all compute the same lse bit for bit.
// One cluster barrier per row: each CTA publishes its partial state in one of two buffers, alternating
// by row, so the next row's write never meets a read of this row's (a CTA writes buffer b again only
// after the next barrier, which every CTA reaches after its reads); a last barrier keeps every CTA's
// shared memory alive until the cluster's last remote read.
template <typename T, typename I, bool GEN, int C>
__device__ __forceinline__ void ce_fwd_bwd_cluster(const fk_ce_params &p) {
    namespace cg = cooperative_groups;
    extern __shared__ __align__(16) unsigned char fk_smem[];
    __shared__ fk_maxsum red_ms[32];
    __shared__ float red_f[32];
    __shared__ float part[2][3];  // this CTA's (max, sum exp, sum w z), by row parity: read by the cluster
    __shared__ ce_coef row_coef;
    cg::cluster_group cluster = cg::this_cluster();
    const int rank = (int)cluster.block_rank();
    const fk_loss_config &cfg = p.cfg;
    const bool want_swz = GEN && cfg.kind == FK_LOSS_CE && cfg.smoothing != 0.0f;
    const float cap = GEN ? cfg.softcap : 0.0f;
    const int64_t V = p.vocab;
    const int64_t j0 = rank * p.slice;
    const int n = j0 >= V ? 0 : (int)min(p.slice, V - j0);
    const float *w = p.weights ? p.weights + j0 : nullptr;
    int buf = 0;

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
        // z_y from global memory (it may lie in another CTA's slice), read before this CTA's barrier: no
        // CTA writes the row (in place) before every CTA has arrived.
        const float xy = threadIdx.x == 0 ? fk_to_f32(xrow[y]) : 0.0f;
        T *cache = reinterpret_cast<T *>(fk_smem + ((uint64_t)(xrow + j0) & 15u));
        ce_stats st{-INFINITY, 0.0f, 0.0f, 0.0f};
        ce_pass1<T, GEN>(xrow + j0, n, cfg, want_swz, w, cache, st);
        const fk_maxsum ms = fk_block_reduce(fk_maxsum{st.m, st.s}, fk_merge_op{}, fk_maxsum{-INFINITY, 0.0f}, red_ms);
        const float swz = want_swz ? fk_block_reduce(st.swz, fk_sum_op{}, 0.0f, red_f) : 0.0f;
        if (threadIdx.x == 0) {
            part[buf][0] = ms.m;
            part[buf][1] = ms.s;
            part[buf][2] = swz;
        }
        cluster.sync();  // every CTA's part is written (release) and visible to the cluster (acquire)
        if (threadIdx.x == 0) {
            fk_maxsum all{-INFINITY, 0.0f};
            float swz_all = 0.0f;
#pragma unroll
            for (int r = 0; r < C; ++r) {
                const float *q = cluster.map_shared_rank(&part[buf][0], r);
                all = fk_maxsum_merge(all, fk_maxsum{q[0], q[1]});
                swz_all += q[2];
            }
            ce_finish_row(p, row, all.m, all.s, xy, swz_all, fk_class_weight(p.weights, y), rank == 0, &row_coef);
        }
        buf ^= 1;
        __syncthreads();
        const ce_coef k = row_coef;
        ce_pass2<T, GEN>(cache, g, n, k, cap, w);
        __syncthreads();  // pass 2 is done with the cache and row_coef, and g[y] is written
        if (threadIdx.x == 0 && y >= j0 && y - j0 < n) g[y - j0] = fk_from_f32<T>(k.gy * fk_cap(xy, cap).dz);
    }
    cluster.sync();  // no CTA exits while another may still read its `part`
}

#define FK_CE_CLUSTER_ENTRY(TN, T, IN, I, C)                                                          \
    extern "C" __global__ void __cluster_dims__(C, 1, 1) __launch_bounds__(FK_CE_MAX_THREADS)          \
        fk_ce_fwd_bwd_cluster##C##_##TN##_##IN(const fk_ce_params p) {                                 \
        ce_fwd_bwd_cluster<T, I, false, C>(p);                                                         \
    }                                                                                                  \
    extern "C" __global__ void __cluster_dims__(C, 1, 1) __launch_bounds__(FK_CE_MAX_THREADS)          \
        fk_ce_fwd_bwd_gen_cluster##C##_##TN##_##IN(const fk_ce_params p) {                             \
        ce_fwd_bwd_cluster<T, I, true, C>(p);                                                          \
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
