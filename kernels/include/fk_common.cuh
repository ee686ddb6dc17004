// fk_common.cuh: device helpers shared by every kernel family.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "fk_bf16.h"

#define FK_FULL_MASK 0xffffffffu

// Grid-stride loops index with 64-bit integers: buffers above 2^31 elements are in scope everywhere.
__device__ __forceinline__ uint64_t fk_global_thread() {
    return (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ uint64_t fk_grid_threads() { return (uint64_t)gridDim.x * blockDim.x; }

template <typename T>
__device__ __forceinline__ T fk_warp_sum(T v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FK_FULL_MASK, v, o);
    return v;
}

template <typename T>
__device__ __forceinline__ T fk_warp_max(T v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(FK_FULL_MASK, v, o));
    return v;
}

// Element loads/stores in fp32 whatever the storage type.
__device__ __forceinline__ float fk_to_f32(float x) { return x; }
__device__ __forceinline__ float fk_to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float fk_to_f32(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T fk_from_f32(float x);
template <> __device__ __forceinline__ float fk_from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 fk_from_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ __half fk_from_f32<__half>(float x) { return __float2half_rn(x); }

// 16-byte vector of T: the unit of every coalesced load and store.
template <typename T>
struct alignas(16) fk_vec16 {
    static constexpr int N = 16 / sizeof(T);
    T v[N];
};

// Streaming loads bypass L1 allocation: each byte is used once.
__device__ __forceinline__ uint4 fk_ld_stream(const uint4 *p) { return __ldcs(p); }
__device__ __forceinline__ void fk_st_stream(uint4 *p, uint4 v) { __stcs(p, v); }
