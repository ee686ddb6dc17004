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

// A 16-byte vector widened to fp32. bf16 pairs are unpacked from their 32-bit word with one shift (low
// half) and one mask (high half), not an extract and a shift each.
template <typename T>
__device__ __forceinline__ void fk_vec_to_f32(const fk_vec16<T> v, float (&out)[fk_vec16<T>::N]) {
#pragma unroll
    for (int k = 0; k < fk_vec16<T>::N; ++k) out[k] = fk_to_f32(v.v[k]);
}
template <>
__device__ __forceinline__ void fk_vec_to_f32<__nv_bfloat16>(const fk_vec16<__nv_bfloat16> v, float (&out)[8]) {
    uint32_t w[4];
    memcpy(w, &v, 16);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        out[2 * k] = __uint_as_float(w[k] << 16);
        out[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
    }
}

// Streaming loads bypass L1 allocation: each byte is used once.
__device__ __forceinline__ uint4 fk_ld_stream(const uint4 *p) { return __ldcs(p); }
__device__ __forceinline__ void fk_st_stream(uint4 *p, uint4 v) { __stcs(p, v); }

// 2^x flushed to zero: one MUFU.EX2 on the device (relative error about 2 ulp; results below 2^-126 are
// 0). An e^x is fk_ex2(x * FK_LOG2E_F), with the scaling folded into an FMA by the caller. The emulator
// computes it with the host's exp2f, flushed the same way.
#define FK_LOG2E_F 1.44269504088896341f
__device__ __forceinline__ float fk_ex2(float x) {
#if defined(FK_EMU)
    return fk_emu_ftz(exp2f(fk_emu_ftz(x)));
#else
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#endif
}

// 1/x, flushed to zero: one MUFU.RCP on the device (relative error about 1 ulp).
__device__ __forceinline__ float fk_rcp(float x) {
#if defined(FK_EMU)
    return fk_emu_ftz(1.0f / fk_emu_ftz(x));
#else
    float y;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#endif
}

// log2(x), flushed to zero: one MUFU.LG2 on the device (absolute error about 2^-22 near 1).
__device__ __forceinline__ float fk_lg2(float x) {
#if defined(FK_EMU)
    return log2f(fk_emu_ftz(x));
#else
    float y;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#endif
}
