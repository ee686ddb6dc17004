// kernels/selftest/planted.cu: one bug per kernel, for the tests that prove each emulator checker fires
// (tests/emu_planted.rs). Built for the emulator only: never part of a fatbin.
#include "fk_mma.cuh"
#include "selftest_params.h"

#if defined(FK_EMU)

// Block sum of in[0..blockDim) into out[0], with the barrier between the scratch writes and warp 0's
// reads left out: a race, which some thread orders expose as a wrong sum.
__device__ __forceinline__ void planted_missing_barrier(const fk_planted_params &p) {
    __shared__ float scratch[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float v = threadIdx.x < p.n ? p.in[threadIdx.x] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) scratch[warp] = v;
    // (the __syncthreads() belongs here)
    if (warp == 0) {
        v = lane < (int)(blockDim.x >> 5) ? scratch[lane] : 0.0f;
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) p.out[0] = v;
    }
}

extern "C" __global__ void __launch_bounds__(1024) fk_planted(const fk_planted_params p) {
    extern __shared__ __align__(16) unsigned char fk_smem[];
    const unsigned t = threadIdx.x;
    switch (p.bug) {
    case FK_PLANTED_MISSING_BARRIER: planted_missing_barrier(p); break;
    case FK_PLANTED_OOB_GLOBAL:
        if (t == 0) p.out[p.n] = 1.0f;  // one past the end
        break;
    case FK_PLANTED_OOB_STATIC_SHARED: {
        __shared__ float s[64];
        s[t] = p.in[t % p.n];  // 128 threads, 64 slots
        __syncthreads();
        if (t == 0) p.out[0] = s[0];
        break;
    }
    case FK_PLANTED_OOB_DYNAMIC_SHARED: {
        float *d = reinterpret_cast<float *>(fk_smem);
        d[p.dyn_smem / 4 + t] = 1.0f;  // past the launch's dynamic shared memory
        break;
    }
    case FK_PLANTED_DIVERGENT_BARRIER:
        if (t < 32) {
            __syncthreads();
        } else {
            __syncthreads();
        }
        break;
    case FK_PLANTED_DEADLOCK:
        if (t == 0) {
            __syncthreads();
        } else if (t < 32) {
            __syncwarp();
        } else {
            __syncthreads();
        }
        break;
    case FK_PLANTED_SHFL_OUTSIDE_MASK:
        if (t < 16) p.out[t] = __shfl_sync(0x0000ffffu, p.in[t], 20);
        break;
    case FK_PLANTED_EXITED_LANE:
        if (t >= 16) return;
        p.out[t] = __shfl_xor_sync(0xffffffffu, p.in[t], 1);
        break;
    case FK_PLANTED_UNINIT_SHARED: {
        __shared__ float never_written[32];
        __syncthreads();
        p.out[t] = never_written[t % 32] + p.in[t % p.n];
        break;
    }
    case FK_PLANTED_CP_ASYNC_NO_WAIT: {
        __shared__ __align__(16) float stage[4 * 32];
        if (t < 32) {
            fk_cp_async_16(&stage[t * 4], p.in + t * 4);
            fk_cp_async_commit();
            // (the wait belongs here)
        }
        __syncthreads();
        if (t < 128) p.out[t] = stage[t];
        break;
    }
    default: break;
    }
}

// A cluster of 2: rank 1 exits at once, rank 0 reads rank 1's shared memory.
#include <cooperative_groups.h>
extern "C" __global__ void __cluster_dims__(2, 1, 1) __launch_bounds__(64) fk_planted_cluster_exited(
    const fk_planted_params p) {
    namespace cg = cooperative_groups;
    __shared__ float part;
    cg::cluster_group cluster = cg::this_cluster();
    if (cluster.block_rank() == 1) return;
    if (threadIdx.x == 0) part = 1.0f;
    __syncthreads();
    // Rank 1 has exited: its shared memory is gone.
    if (threadIdx.x == 0) p.out[0] = *cluster.map_shared_rank(&part, 1);
}

#else
// nvcc: nothing (a planted bug has no place in a fatbin).
#endif
