// kernels/loss/sigmoid_focal.cu: sigmoid (binary, per element) focal loss with torchvision semantics,
// forward + backward fused.
//
// Computes per element (fk_sigmoid_focal in fk_loss_math.h): p = sigmoid(x), ce = BCE-with-logits(x, t),
// p_t = p t + (1 - p)(1 - t), loss = ce (1 - p_t)^gamma, times alpha t + (1 - alpha)(1 - t) when
// alpha >= 0; grad = dloss/dx times the upstream gradient (and 1/n for a mean).
// Floor: read logits and targets, write grad (+ the loss for reduction none): 3 n sizeof(T) (+ 4 n) bytes.
// Launch: FK_SIGMOID_FOCAL_THREADS threads, a grid fixed by n alone (not by the GPU), so the per-block
// partial sums, and with them the reduced loss, are the same bits on every GPU.
#include "loss_common.cuh"

// Three instantiations per type: fk_sigmoid_focal_g0_* (gamma = 0: alpha-balanced BCE) and
// fk_sigmoid_focal_g2_* (gamma = 2, torchvision's default) with the powers written out, and
// fk_sigmoid_focal_* (any other gamma) with m^gamma = 2^(gamma log2 m). The host picks by gamma.
//
// Fast maths per finite element, with e = exp(-|x|) (one MUFU.EX2) and r = 1 / (1 + e) (one MUFU.RCP, the
// only reciprocal): p = r or e r and q = 1 - p = e r or r by the sign of x, each without cancellation;
// BCE = max(x, 0) - x t + log1p(e) with log1p(e) = e P(e), P a degree-6 polynomial fitted to log1p(e)/e
// on [0, 1] (relative error 1.5e-6 in f32 Horner form, and relative, so a confident prediction, whose whole
// BCE is log1p(e) ~ e, keeps its digits); 1 - p_t = p (1 - t) + q t; alpha_t = (1 - alpha) + t (2 alpha - 1)
// (1 without alpha); gamma = 2: loss = BCE m^2 alpha_t, dloss/dx = ((p (1 - t) - q t) m^2 + BCE m dm2)
// alpha_t with m = 1 - p_t, dm2 = 2 dm/dx = p q (2 - 4t).
// A vector with an infinite or NaN logit takes fk_sigmoid_focal for all its elements (its limits at +-inf,
// NaN propagation): one test per element, one branch per vector.
__device__ __forceinline__ float sf_log1p01(float e) {
    float r = 0.013874484226107597f;
    r = fmaf(r, e, -0.06559030711650848f);
    r = fmaf(r, e, 0.148294135928154f);
    r = fmaf(r, e, -0.23454520106315613f);
    r = fmaf(r, e, 0.3309752643108368f);
    r = fmaf(r, e, -0.4998590052127838f);
    r = fmaf(r, e, 0.9999985694885254f);
    return r;  // log1p(e) / e
}

// Loss of one finite element; its dloss/dx (times alpha_t, before the upstream scale) in `gr`.
// G: gamma (0 or 2), or -1 for any gamma > 0. c0, c1: alpha_t = c0 + t c1 (1 - alpha, 2 alpha - 1; or
// 1, 0 without alpha).
template <int G>
__device__ __forceinline__ float sf_fast(float x, float t, float gamma, float c0, float c1, float &gr) {
    const float e = fk_ex2(fabsf(x) * -FK_LOG2E_F);
    const float r = fk_rcp(1.0f + e);
    const float er = e * r;
    const bool pos = x >= 0.0f;
    const float p = pos ? r : er, q = pos ? er : r;
    const float ce = fmaf(e, sf_log1p01(e), fmaf(-x, t, fmaxf(x, 0.0f)));
    const float pa = fmaf(-p, t, p), qb = q * t;  // p (1 - t), q t
    const float at = fmaf(t, c1, c0);
    float loss, g;
    if constexpr (G == 0) {
        loss = ce;
        g = pa - qb;
    } else if constexpr (G == 2) {
        const float m = pa + qb;
        const float mg = m * m;
        const float dm2 = (p * q) * fmaf(-4.0f, t, 2.0f);
        loss = ce * mg;
        g = fmaf(pa - qb, mg, ce * (m * dm2));
    } else {
        // Any gamma > 0 (the host sends 0 and 2 to their own kernels): m^gamma = 2^(gamma log2 m) and
        // m^(gamma - 1) = m^gamma / m, two MUFU and the reciprocal; below FLT_MIN both are 0 (to 1e-38).
        const float m = pa + qb;
        const bool normal = m >= 1.17549435e-38f;  // FLT_MIN
        const float mg = normal ? fk_ex2(gamma * fk_lg2(m)) : 0.0f;
        const float m1 = normal ? mg * fk_rcp(m) : 0.0f;
        const float dm = (p * q) * fmaf(-2.0f, t, 1.0f);  // d(1 - p_t)/dx = -p q (2t - 1)
        loss = ce * mg;
        g = fmaf(pa - qb, mg, ce * ((gamma * m1) * dm));
    }
    gr = g * at;
    return loss * at;
}

// fk_sigmoid_focal (accurate libm maths) as one call (loss, gradient): the rare path of a vector with a
// non-finite logit, kept out of line so the unrolled vector loop holds one copy of it.
__device__ __noinline__ float2 sf_general(float x, float t, float alpha, float gamma) {
    float g;
    const float l = fk_sigmoid_focal(x, t, alpha, gamma, &g);
    return make_float2(l, g);
}

// Loss and scaled gradient of the N elements of one vector (or one element, N = 1).
template <int G, int N>
__device__ __forceinline__ void sf_elements(const float (&x)[N], const float (&t)[N], const fk_sigmoid_focal_params &p,
                                            float c0, float c1, float (&l)[N], float (&g)[N]) {
    bool special = false;
#pragma unroll
    for (int k = 0; k < N; ++k) special |= !(fabsf(x[k]) < INFINITY);
    if (!special) {
#pragma unroll
        for (int k = 0; k < N; ++k) l[k] = sf_fast<G>(x[k], t[k], p.gamma, c0, c1, g[k]);
    } else {
#pragma unroll
        for (int k = 0; k < N; ++k) {
            const float2 r = sf_general(x[k], t[k], p.alpha, p.gamma);
            l[k] = r.x;
            g[k] = r.y;
        }
    }
}

template <typename T, int G>
__device__ __forceinline__ void sigmoid_focal(const fk_sigmoid_focal_params &p) {
    __shared__ float red[32];
    using V = fk_vec16<T>;
    constexpr int N = V::N;
    const T *x = reinterpret_cast<const T *>(p.logits);
    const T *t = reinterpret_cast<const T *>(p.targets);
    T *g = reinterpret_cast<T *>(p.grad);
    const bool per_elem_up = p.grad_output && p.reduction == FK_REDUCTION_NONE;
    // The upstream scale of every element when it is one scalar (mean or sum), read once.
    const float up0 = p.grad_scale * ((p.grad_output && !per_elem_up) ? p.grad_output[0] : 1.0f);
    const float c0 = p.alpha >= 0.0f ? 1.0f - p.alpha : 1.0f;
    const float c1 = p.alpha >= 0.0f ? 2.0f * p.alpha - 1.0f : 0.0f;
    float acc = 0.0f;
    // Vectors when every array the loop touches shares 16-byte alignment (the loss and the upstream
    // gradient of reduction none are f32: N of them are N / 4 vectors).
    const bool vec = ((((uint64_t)x) | ((uint64_t)t) | ((uint64_t)g) | ((uint64_t)p.loss) |
                       (per_elem_up ? (uint64_t)p.grad_output : 0u)) & 15u) == 0;
    const int64_t nvec = vec ? p.n / N : 0;
    for (int64_t v = fk_global_thread(); v < nvec; v += fk_grid_threads()) {
        const V xv = reinterpret_cast<const V *>(x)[v];
        const V tv = reinterpret_cast<const V *>(t)[v];
        float xf[N], tf[N], l[N], gr[N];
        fk_vec_to_f32(xv, xf);
        fk_vec_to_f32(tv, tf);
        sf_elements<G>(xf, tf, p, c0, c1, l, gr);
#pragma unroll
        for (int k = 0; k < N; ++k) gr[k] *= up0;
        if (per_elem_up) {  // reduction none with an upstream gradient: one more factor per element
#pragma unroll
            for (int k = 0; k < N; k += 4) {
                const float4 u = reinterpret_cast<const float4 *>(p.grad_output + v * N)[k / 4];
                gr[k] *= u.x, gr[k + 1] *= u.y, gr[k + 2] *= u.z, gr[k + 3] *= u.w;
            }
        }
        V gv;
#pragma unroll
        for (int k = 0; k < N; ++k) {
            acc += l[k];
            gv.v[k] = fk_from_f32<T>(gr[k]);
        }
        if (p.loss) {
#pragma unroll
            for (int k = 0; k < N; k += 4)
                reinterpret_cast<float4 *>(p.loss + v * N)[k / 4] = make_float4(l[k], l[k + 1], l[k + 2], l[k + 3]);
        }
        if (g) reinterpret_cast<V *>(g)[v] = gv;
    }
    for (int64_t i = nvec * N + fk_global_thread(); i < p.n; i += fk_grid_threads()) {
        const float xf[1] = {fk_to_f32(x[i])}, tf[1] = {fk_to_f32(t[i])};
        float l[1], gr[1];
        sf_elements<G>(xf, tf, p, c0, c1, l, gr);
        if (p.loss) p.loss[i] = l[0];
        acc += l[0];
        if (g) g[i] = fk_from_f32<T>(per_elem_up ? gr[0] * up0 * p.grad_output[i] : gr[0] * up0);
    }
    if (p.block_sums) {
        acc = fk_block_reduce(acc, fk_sum_op{}, 0.0f, red);
        if (threadIdx.x == 0) p.block_sums[blockIdx.x] = acc;
    }
}

#define FK_SF_ENTRIES(TN, T)                                                                            \
    extern "C" __global__ void __launch_bounds__(FK_SIGMOID_FOCAL_THREADS)                              \
        fk_sigmoid_focal_##TN(const fk_sigmoid_focal_params p) { sigmoid_focal<T, -1>(p); }             \
    extern "C" __global__ void __launch_bounds__(FK_SIGMOID_FOCAL_THREADS)                              \
        fk_sigmoid_focal_g0_##TN(const fk_sigmoid_focal_params p) { sigmoid_focal<T, 0>(p); }           \
    extern "C" __global__ void __launch_bounds__(FK_SIGMOID_FOCAL_THREADS)                              \
        fk_sigmoid_focal_g2_##TN(const fk_sigmoid_focal_params p) { sigmoid_focal<T, 2>(p); }
FK_SF_ENTRIES(f32, float)
FK_SF_ENTRIES(f16, __half)
FK_SF_ENTRIES(bf16, __nv_bfloat16)
