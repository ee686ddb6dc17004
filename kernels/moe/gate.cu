// kernels/moe/gate.cu: fused MoE gate with auxiliary-loss-free load balancing (DeepSeek-V3 "noaux_tc").
//
// Computes per token t (one warp per token; lane l holds experts l, l + 32, ... < E):
//   s_e = sigmoid(x_e) or softmax(x)_e          (unbiased scores, fp32, fk_moe_math.h: host-reproducible)
//   b_e = s_e + bias_e                           (selection only: the bias never reaches the weights)
//   groups (optional): score_g = top-2 sum of b over the group's experts; keep the top topk_group groups;
//                      experts of other groups are ineligible (a mask, not a -inf value, so a negative
//                      bias can never bring them back)
//   ids   = top-K of b over eligible experts, best first, ties to the lower index; NaN sorts as -inf
//   w_k   = s_{ids_k} (/ sum_k s, renormalised) * scaling;   counts[ids_k] += 1
// Floor: read T E logits once, write T K (id, weight): tiny; at decode sizes launch latency dominates.
// Launch: FK_MOE_GATE_WARPS warps per block, grid-stride over tokens; template NPL = experts per lane.
#include "fk_common.cuh"
#include "fk_moe_math.h"
#include "moe_params.h"

struct fk_pick {
    float v;   // key
    int i;     // expert
    float s;   // unbiased score
};

__device__ __forceinline__ fk_pick fk_pick_shfl(fk_pick p, int o) {
    return fk_pick{__shfl_xor_sync(FK_FULL_MASK, p.v, o), __shfl_xor_sync(FK_FULL_MASK, p.i, o),
                   __shfl_xor_sync(FK_FULL_MASK, p.s, o)};
}

__device__ __forceinline__ fk_pick fk_pick_best(fk_pick a, fk_pick b) {
    return fk_moe_better(a.v, a.i, b.v, b.i) ? a : b;
}

// Top-2 of a set of values: merge of two (first >= second) pairs.
__device__ __forceinline__ void fk_top2_merge(float &a1, float &a2, float b1, float b2) {
    if (b1 > a1) {
        a2 = fmaxf(a1, b2);
        a1 = b1;
    } else {
        a2 = fmaxf(a2, b1);
    }
}

template <typename T, int NPL>
__device__ __forceinline__ void moe_gate(const fk_moe_gate_params &p) {
    __shared__ float s_bias[FK_MOE_MAX_EXPERTS];
    __shared__ int s_counts[FK_MOE_MAX_EXPERTS];
    const int E = p.n_experts, K = p.top_k;
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        s_bias[e] = p.bias ? p.bias[e] : 0.0f;
        s_counts[e] = 0;
    }
    __syncthreads();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gsize = E / p.n_group;
    const int64_t stride = (int64_t)gridDim.x * FK_MOE_GATE_WARPS;
    for (int64_t t = (int64_t)blockIdx.x * FK_MOE_GATE_WARPS + warp; t < p.n_tokens; t += stride) {
        const T *row = reinterpret_cast<const T *>(p.logits) + t * E;
        float s[NPL], key[NPL];
#pragma unroll
        for (int j = 0; j < NPL; ++j) {
            const int e = lane + 32 * j;
            s[j] = e < E ? fk_to_f32(row[e]) : -INFINITY;
        }
        if (p.score == FK_MOE_SCORE_SOFTMAX) {
            float m = -INFINITY;
#pragma unroll
            for (int j = 0; j < NPL; ++j) m = fmaxf(m, s[j]);
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(FK_FULL_MASK, m, o));
            float sum = 0.0f;
#pragma unroll
            for (int j = 0; j < NPL; ++j) {
                s[j] = (lane + 32 * j < E) ? fk_exp_portable(FK_SUB(s[j], m)) : 0.0f;
                sum = FK_ADD(sum, s[j]);
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) sum = FK_ADD(sum, __shfl_xor_sync(FK_FULL_MASK, sum, o));
#pragma unroll
            for (int j = 0; j < NPL; ++j) s[j] = FK_DIV(s[j], sum);
        } else {
#pragma unroll
            for (int j = 0; j < NPL; ++j) s[j] = fk_moe_sigmoid(s[j]);
        }
        uint32_t eligible = 0;
#pragma unroll
        for (int j = 0; j < NPL; ++j) {
            const int e = lane + 32 * j;
            key[j] = e < E ? fk_moe_key(FK_ADD(s[j], s_bias[e])) : -INFINITY;
            if (e < E) eligible |= 1u << j;
        }
        if (p.n_group > 1) {
            // Lane g ends up holding group g's score.
            float my_gscore = -INFINITY;
            for (int g = 0; g < p.n_group; ++g) {
                float a1 = -INFINITY, a2 = -INFINITY;
#pragma unroll
                for (int j = 0; j < NPL; ++j) {
                    const int e = lane + 32 * j;
                    if (e < E && e / gsize == g) fk_top2_merge(a1, a2, key[j], -INFINITY);
                }
#pragma unroll
                for (int o = 16; o > 0; o >>= 1) {
                    const float b1 = __shfl_xor_sync(FK_FULL_MASK, a1, o), b2 = __shfl_xor_sync(FK_FULL_MASK, a2, o);
                    fk_top2_merge(a1, a2, b1, b2);
                }
                const float gs = gsize >= 2 ? FK_ADD(a1, a2) : a1;
                if (lane == g) my_gscore = fk_moe_key(gs);
            }
            uint32_t kept = 0;
            bool taken_g = lane >= p.n_group;
            for (int r = 0; r < p.topk_group; ++r) {
                fk_pick c{taken_g ? -INFINITY : my_gscore, taken_g ? 0x7fffffff : lane, 0.0f};
#pragma unroll
                for (int o = 16; o > 0; o >>= 1) c = fk_pick_best(c, fk_pick_shfl(c, o));
                kept |= 1u << c.i;
                if (lane == c.i) taken_g = true;
            }
#pragma unroll
            for (int j = 0; j < NPL; ++j) {
                const int e = lane + 32 * j;
                if (e < E && !((kept >> (e / gsize)) & 1u)) eligible &= ~(1u << j);
            }
        }
        int my_id = -1;
        float my_w = 0.0f;
        for (int k = 0; k < K; ++k) {
            fk_pick best{-INFINITY, 0x7fffffff, 0.0f};
            int best_j = -1;
#pragma unroll
            for (int j = 0; j < NPL; ++j) {
                if (((eligible >> j) & 1u) && fk_moe_better(key[j], lane + 32 * j, best.v, best.i)) {
                    best = fk_pick{key[j], lane + 32 * j, s[j]};
                    best_j = j;
                }
            }
            fk_pick w = best;
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) w = fk_pick_best(w, fk_pick_shfl(w, o));
            if (w.i == best.i && best_j >= 0) eligible &= ~(1u << best_j);
            if (lane == k) {
                my_id = w.i;
                my_w = w.s;
            }
        }
        if (p.renormalize) {
            float sum = 0.0f;
            for (int k = 0; k < K; ++k) sum = FK_ADD(sum, __shfl_sync(FK_FULL_MASK, my_w, k));
            if (sum != 0.0f) my_w = FK_DIV(my_w, sum);  // a NaN sum divides: NaN stays visible
        }
        my_w = FK_MUL(my_w, p.scaling);
        if (lane < K) {
            p.ids[t * K + lane] = my_id;
            p.weights[t * K + lane] = my_w;
            atomicAdd(&s_counts[my_id], 1);
        }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x)
        if (s_counts[e]) atomicAdd(&p.counts[e], s_counts[e]);
}

#define FK_GATE_ENTRY(TN, T, NPL)                                                                \
    extern "C" __global__ void __launch_bounds__(FK_MOE_GATE_WARPS * 32)                         \
        fk_moe_gate_##TN##_e##NPL(const fk_moe_gate_params p) { moe_gate<T, NPL>(p); }
#define FK_GATE_ENTRIES(TN, T) \
    FK_GATE_ENTRY(TN, T, 1)    \
    FK_GATE_ENTRY(TN, T, 2)    \
    FK_GATE_ENTRY(TN, T, 4)    \
    FK_GATE_ENTRY(TN, T, 8)    \
    FK_GATE_ENTRY(TN, T, 16)   \
    FK_GATE_ENTRY(TN, T, 32)
FK_GATE_ENTRIES(f32, float)
FK_GATE_ENTRIES(bf16, __nv_bfloat16)
