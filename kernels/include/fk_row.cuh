// fk_row.cuh: block-cooperative sweeps over one row of T with 16-byte vector accesses, and block reductions.
//
// A row may start at any element offset (row strides need not be multiples of the vector width): the
// elements before the first 16-byte boundary ("head") and after the last whole vector ("tail") are handled
// one by one, the body with 16-byte loads/stores. Every thread of the block must call these together.
#pragma once

#include "fk_common.cuh"
#include "fk_maxsum.h"

// Elements of T before the first 16-byte boundary at or after p.
template <typename T>
__device__ __forceinline__ int64_t fk_head_elems(const void *p) {
    const uint64_t mis = (uint64_t)p & 15u;
    return mis == 0 ? 0 : (int64_t)((16u - mis) / sizeof(T));
}

// Calls f(j, x) for every element j < n of row (x in its storage type). Each thread visits a fixed,
// deterministic subset in a fixed order.
template <typename T, typename F>
__device__ __forceinline__ void fk_row_read(const T *row, int64_t n, F &&f) {
    using V = fk_vec16<T>;
    constexpr int N = V::N;
    int64_t head = fk_head_elems<T>(row);
    if (head > n) head = n;
    const int64_t nvec = (n - head) / N;
    const int64_t tail0 = head + nvec * N;
    for (int64_t j = threadIdx.x; j < head; j += blockDim.x) f(j, row[j]);
    const V *body = reinterpret_cast<const V *>(row + head);
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
        V x = body[v];
#pragma unroll
        for (int k = 0; k < N; ++k) f(head + v * N + k, x.v[k]);
    }
    for (int64_t j = tail0 + threadIdx.x; j < n; j += blockDim.x) f(j, row[j]);
}

// dst[j] = f(j, src[j]) for j < n. Vector loads and stores when src and dst share their alignment within
// 16 bytes (the usual case); element by element otherwise. src may be in shared memory.
template <typename T, typename F>
__device__ __forceinline__ void fk_row_map(const T *src, T *dst, int64_t n, F &&f) {
    using V = fk_vec16<T>;
    constexpr int N = V::N;
    if ((((uint64_t)src ^ (uint64_t)dst) & 15u) != 0) {
        for (int64_t j = threadIdx.x; j < n; j += blockDim.x) dst[j] = fk_from_f32<T>(f(j, fk_to_f32(src[j])));
        return;
    }
    int64_t head = fk_head_elems<T>(dst);
    if (head > n) head = n;
    const int64_t nvec = (n - head) / N;
    const int64_t tail0 = head + nvec * N;
    for (int64_t j = threadIdx.x; j < head; j += blockDim.x) dst[j] = fk_from_f32<T>(f(j, fk_to_f32(src[j])));
    const V *in = reinterpret_cast<const V *>(src + head);
    V *out = reinterpret_cast<V *>(dst + head);
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
        V x = in[v], y;
#pragma unroll
        for (int k = 0; k < N; ++k) y.v[k] = fk_from_f32<T>(f(head + v * N + k, fk_to_f32(x.v[k])));
        out[v] = y;
    }
    for (int64_t j = tail0 + threadIdx.x; j < n; j += blockDim.x) dst[j] = fk_from_f32<T>(f(j, fk_to_f32(src[j])));
}

// The online-softmax state and its push/merge rules live in fk_maxsum.h (host-tested).
__device__ __forceinline__ float fk_shfl_xor(float v, int o) { return __shfl_xor_sync(FK_FULL_MASK, v, o); }
__device__ __forceinline__ double fk_shfl_xor(double v, int o) { return __shfl_xor_sync(FK_FULL_MASK, v, o); }
__device__ __forceinline__ fk_maxsum fk_shfl_xor(fk_maxsum v, int o) {
    return fk_maxsum{__shfl_xor_sync(FK_FULL_MASK, v.m, o), __shfl_xor_sync(FK_FULL_MASK, v.s, o)};
}

// Block-wide reduction in a fixed order (xor-shuffle tree per warp, then warp 0 over the warp results):
// the same inputs give the same bits on every run. blockDim.x is a multiple of 32; `scratch` holds 32
// entries. Every thread gets the result.
template <typename T, typename Op>
__device__ __forceinline__ T fk_block_reduce(T v, Op op, T identity, T *scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = op(v, fk_shfl_xor(v, o));
    __syncthreads();  // scratch may still be read from a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < nwarps ? scratch[lane] : identity;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v = op(v, fk_shfl_xor(v, o));
        if (lane == 0) scratch[0] = v;
    }
    __syncthreads();
    return scratch[0];
}

// dst[j] = v for j < n, with 16-byte stores in the body.
template <typename T>
__device__ __forceinline__ void fk_row_fill(T *dst, int64_t n, float v) {
    using V = fk_vec16<T>;
    constexpr int N = V::N;
    int64_t head = fk_head_elems<T>(dst);
    if (head > n) head = n;
    const int64_t nvec = (n - head) / N;
    const T tv = fk_from_f32<T>(v);
    V vv;
#pragma unroll
    for (int k = 0; k < N; ++k) vv.v[k] = tv;
    for (int64_t j = threadIdx.x; j < head; j += blockDim.x) dst[j] = tv;
    V *out = reinterpret_cast<V *>(dst + head);
    for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) out[i] = vv;
    for (int64_t j = head + nvec * N + threadIdx.x; j < n; j += blockDim.x) dst[j] = tv;
}
