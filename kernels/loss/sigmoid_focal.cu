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

// Loss of element i (stored for reduction none); its scaled gradient in `gr`.
__device__ __forceinline__ float sf_one(const fk_sigmoid_focal_params &p, int64_t i, float x, float t, float &gr) {
    const float l = fk_sigmoid_focal(x, t, p.alpha, p.gamma, &gr);
    float up = p.grad_scale;
    if (p.grad_output) up *= p.reduction == FK_REDUCTION_NONE ? p.grad_output[i] : p.grad_output[0];
    gr *= up;
    if (p.loss) p.loss[i] = l;
    return l;
}

template <typename T>
__device__ __forceinline__ void sigmoid_focal(const fk_sigmoid_focal_params &p) {
    __shared__ float red[32];
    using V = fk_vec16<T>;
    constexpr int N = V::N;
    const T *x = reinterpret_cast<const T *>(p.logits);
    const T *t = reinterpret_cast<const T *>(p.targets);
    T *g = reinterpret_cast<T *>(p.grad);
    float acc = 0.0f;
    const bool vec = ((((uint64_t)x) | ((uint64_t)t) | ((uint64_t)g)) & 15u) == 0;
    const int64_t nvec = vec ? p.n / N : 0;
    for (int64_t v = fk_global_thread(); v < nvec; v += fk_grid_threads()) {
        const V xv = reinterpret_cast<const V *>(x)[v];
        const V tv = reinterpret_cast<const V *>(t)[v];
        V gv;
#pragma unroll
        for (int k = 0; k < N; ++k) {
            float gr;
            acc += sf_one(p, v * N + k, fk_to_f32(xv.v[k]), fk_to_f32(tv.v[k]), gr);
            gv.v[k] = fk_from_f32<T>(gr);
        }
        if (g) reinterpret_cast<V *>(g)[v] = gv;
    }
    for (int64_t i = nvec * N + fk_global_thread(); i < p.n; i += fk_grid_threads()) {
        float gr;
        acc += sf_one(p, i, fk_to_f32(x[i]), fk_to_f32(t[i]), gr);
        if (g) g[i] = fk_from_f32<T>(gr);
    }
    if (p.block_sums) {
        acc = fk_block_reduce(acc, fk_sum_op{}, 0.0f, red);
        if (threadIdx.x == 0) p.block_sums[blockIdx.x] = acc;
    }
}

extern "C" __global__ void __launch_bounds__(FK_SIGMOID_FOCAL_THREADS)
    fk_sigmoid_focal_f32(const fk_sigmoid_focal_params p) { sigmoid_focal<float>(p); }
extern "C" __global__ void __launch_bounds__(FK_SIGMOID_FOCAL_THREADS)
    fk_sigmoid_focal_f16(const fk_sigmoid_focal_params p) { sigmoid_focal<__half>(p); }
extern "C" __global__ void __launch_bounds__(FK_SIGMOID_FOCAL_THREADS)
    fk_sigmoid_focal_bf16(const fk_sigmoid_focal_params p) { sigmoid_focal<__nv_bfloat16>(p); }
