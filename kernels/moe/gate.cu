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
// Selection: keys as order-preserving u32 (fk_moe_ord), so every arg-max is a 32-bit warp max reduction
// (__reduce_max_sync, sm_80+) and ties go to the lower index by a min reduction: at DeepSeek-V3 a token
// runs 8 shuffles (one per top-k round, the winner's score), not a value + index shuffle ladder per round.
// Launch: FK_MOE_GATE_WARPS warps per block, grid-stride over tokens; template NPL = experts per lane.
#include "fk_common.cuh"
#include "fk_moe_math.h"
#include "moe_params.h"

// Order-preserving image of a selection key (never NaN: fk_moe_key maps NaN to -inf) as a u32: a > b as
// floats <=> ord(a) > ord(b) as unsigned, and -0 maps as +0 so equal floats have equal images. Every key
// maps to >= ord(-inf) = 0x007fffff, so 0 is free to mean "no candidate". fk_moe_unord inverts it
// exactly (bit for bit, -0 aside, which no key is: a score is >= +0 and +0 + -0 = +0).
__device__ __forceinline__ uint32_t fk_moe_ord(float v) {
    uint32_t u = __float_as_uint(v);
    u = u == 0x80000000u ? 0u : u;
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float fk_moe_unord(uint32_t u) {
    return __uint_as_float((u & 0x80000000u) ? (u & 0x7fffffffu) : ~u);
}

// Top-2 (as a multiset) of ordered keys: t1 >= t2, 0 = none.
__device__ __forceinline__ void fk_top2_push(uint32_t &t1, uint32_t &t2, uint32_t u) {
    t2 = umax(t2, umin(t1, u));
    t1 = umax(t1, u);
}

// A group's score from each lane's top-2 of the group's keys: the sum of the group's two largest keys
// (its only key for groups of one), as fk_moe_ord of fk_moe_key, the same value on every lane. Two
// 32-bit warp max reductions, no shuffle: the second drops one instance of the largest (from the lowest
// lane holding it), which leaves the multiset's second largest.
__device__ __forceinline__ uint32_t fk_group_score(uint32_t t1, uint32_t t2, int gsize, int lane) {
    const uint32_t m1 = __reduce_max_sync(FK_FULL_MASK, t1);
    float gs = fk_moe_unord(m1);
    if (gsize >= 2) {
        const int first = __ffs(__ballot_sync(FK_FULL_MASK, t1 == m1)) - 1;
        const uint32_t m2 = __reduce_max_sync(FK_FULL_MASK, lane == first ? t2 : t1);
        gs = FK_ADD(gs, fk_moe_unord(m2));
    }
    return fk_moe_ord(fk_moe_key(gs));
}

template <typename T, int NPL>
__device__ __forceinline__ void moe_gate(const fk_moe_gate_params &p) {
    static_assert(NPL <= 32, "eligibility is a 32-bit mask over a lane's experts");
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
        float s[NPL];
        uint32_t key[NPL];  // fk_moe_ord of the selection key; 0 past E
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
            key[j] = e < E ? fk_moe_ord(fk_moe_key(FK_ADD(s[j], s_bias[e]))) : 0u;
            if (e < E) eligible |= 1u << j;
        }
        if (p.n_group > 1) {
            // Lane g ends up holding group g's score (fk_moe_ord; 0 on lanes past n_group).
            uint32_t my_gscore = 0;
            const bool aligned = (gsize & 31) == 0;
            const int jpg = gsize >> 5;  // aligned: a group is experts j in [g jpg, (g + 1) jpg) of every lane
            if (aligned) {
                uint32_t t1 = 0, t2 = 0;
                int g = 0, jn = 0;
#pragma unroll
                for (int j = 0; j < NPL; ++j) {
                    if (32 * j < E) {
                        fk_top2_push(t1, t2, key[j]);
                        if (++jn == jpg) {
                            const uint32_t gs = fk_group_score(t1, t2, gsize, lane);
                            if (lane == g) my_gscore = gs;
                            ++g;
                            jn = 0;
                            t1 = t2 = 0;
                        }
                    }
                }
            } else {
                for (int g = 0; g < p.n_group; ++g) {
                    uint32_t t1 = 0, t2 = 0;
#pragma unroll
                    for (int j = 0; j < NPL; ++j) {
                        const int e = lane + 32 * j;
                        if (e < E && e / gsize == g) fk_top2_push(t1, t2, key[j]);
                    }
                    const uint32_t gs = fk_group_score(t1, t2, gsize, lane);
                    if (lane == g) my_gscore = gs;
                }
            }
            // Kept groups: topk_group rounds of a warp max; ties to the lower group, which is the lower
            // lane. A taken group (and a lane past n_group) offers 0, below every score.
            uint32_t kept = 0, kept_j = 0;
            for (int r = 0; r < p.topk_group; ++r) {
                const uint32_t m = __reduce_max_sync(FK_FULL_MASK, my_gscore);
                const int g = __ffs(__ballot_sync(FK_FULL_MASK, my_gscore == m)) - 1;
                kept |= 1u << g;
                if (aligned) kept_j |= ((1u << jpg) - 1u) << (g * jpg);
                if (lane == g) my_gscore = 0;
            }
            if (aligned) {
                eligible &= kept_j;
            } else {
#pragma unroll
                for (int j = 0; j < NPL; ++j) {
                    const int e = lane + 32 * j;
                    if (e < E && !((kept >> (e / gsize)) & 1u)) eligible &= ~(1u << j);
                }
            }
        }
        // Top-K: per round, each lane's best eligible expert (larger key, then lower index: ascending j
        // is ascending index), the warp's largest key (one u32 max reduction) and the lowest index among
        // the lanes offering it (one min reduction); the winner's score is the round's one shuffle, and
        // every lane adds it to the renormalisation sum in k order.
        int my_id = -1;
        float my_w = 0.0f, wsum = 0.0f;
        for (int k = 0; k < K; ++k) {
            uint32_t best = 0;
            int best_j = 0;
            float best_s = 0.0f;
#pragma unroll
            for (int j = 0; j < NPL; ++j) {
                const uint32_t u = ((eligible >> j) & 1u) ? key[j] : 0u;
                if (u > best) {
                    best = u;
                    best_j = j;
                    best_s = s[j];
                }
            }
            const uint32_t m = __reduce_max_sync(FK_FULL_MASK, best);
            const uint32_t id = __reduce_min_sync(FK_FULL_MASK, best == m ? (uint32_t)(lane + 32 * best_j) : 0xffffffffu);
            const int src = (int)(id & 31u);
            const float w = __shfl_sync(FK_FULL_MASK, best_s, src);
            if (lane == src) eligible &= ~(1u << best_j);
            if (lane == k) {
                my_id = (int)id;
                my_w = w;
            }
            wsum = FK_ADD(wsum, w);
        }
        if (p.renormalize && wsum != 0.0f) my_w = FK_DIV(my_w, wsum);  // a NaN sum divides: NaN stays visible
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
