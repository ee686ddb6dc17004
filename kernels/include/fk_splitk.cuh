// Split-K finished inside its own launch (the quantised GEMMs: quant/w4a16.cu, quant/billm.cu).
//
// Every block of an output tile's k-splits writes its fp32 partial sums to ws[split][M][N], then
// arrives at the tile's counter (one u32 per tile, after the partials in the same workspace). The last
// block to arrive adds all the splits' partials in split order and writes y, and puts the counter back
// to 0 for the next launch. So a product is one launch, and its bits depend on the plan only, never on
// which block came last. The protocol is the threadFenceReduction one: each thread fences its partial
// stores before the block's arrival (one atomicAdd by thread 0), and the last block fences again before
// it reads the other blocks' partials through L2 (ld.global.cg: L1 is not coherent across SMs).
//
// A workspace serves one launch at a time (the partials would collide anyway); its counters start at 0
// (the workspace is allocated zeroed) and every completed launch leaves them at 0.
#pragma once

#include "fk_common.cuh"

// Call with every thread of the block after its partial stores; returns, in every thread, whether this
// block is the tile's last (then its reads of the partials through fk_splitk_sum see every split's).
__device__ __forceinline__ bool fk_splitk_arrive(uint32_t *counter, unsigned splits) {
    __threadfence();  // this thread's partials are visible device-wide before the block arrives
    __syncthreads();
    int last = 0;
    if (threadIdx.x == 0) {
        last = atomicAdd(counter, 1u) == splits - 1u;
        if (last) {
            __threadfence();  // acquire in the arriving thread itself: the other blocks' partials
            // No other block of this launch touches the counter again: reset it for the next launch.
            atomicExch(counter, 0u);
        }
    }
    last = __syncthreads_or(last);
    if (last) __threadfence();
    return last != 0;
}

// The sum over splits s = 0, 1, ... (in that order, from 0.0f) of ws[s * mn + i], read through L2.
__device__ __forceinline__ float fk_splitk_sum(const float *ws, int64_t mn, int64_t i, unsigned splits) {
    float v = 0.0f;
    for (unsigned s = 0; s < splits; ++s) v += __ldcg(ws + (int64_t)s * mn + i);
    return v;
}

// The same for int32 partials (exact, so the order does not matter; kept for symmetry).
__device__ __forceinline__ int32_t fk_splitk_sum_s32(const int32_t *ws, int64_t mn, int64_t i, unsigned splits) {
    int32_t v = 0;
    for (unsigned s = 0; s < splits; ++s) v += __ldcg(ws + (int64_t)s * mn + i);
    return v;
}
