// fk_kivi.cuh: reading a KIVI-quantised KV cache (src/attention/kivi.rs writes it): codes of 8 or 4 bits
// and f16 (scale, zero) pairs, dequantised as fmaf(code, scale, zero) in f32. K groups run along tokens
// (one pair per channel and token group), V groups along channels (one pair per token and channel group).
// Shared by the decode and prefill kernels (kernels/attention).
#pragma once

#include "fk_common.cuh"

// A KIVI code (0..255) as a float, exactly: the code in the mantissa of 2^23, minus 2^23 (no I2F).
__device__ __forceinline__ float attn_code(uint32_t c) { return __uint_as_float(0x4B000000u | c) - 8388608.0f; }

// An f16 (scale, zero) pair from its 32-bit word.
__device__ __forceinline__ float2 attn_param(uint32_t w) {
    return make_float2(__half2float(__ushort_as_half((unsigned short)(w & 0xffffu))),
                       __half2float(__ushort_as_half((unsigned short)(w >> 16))));
}

// Four (scale, zero) pairs into ks[at ..], kz[at ..].
__device__ __forceinline__ void attn_params4(uint4 w, float (&ks)[8], float (&kz)[8], int at) {
    const float2 a = attn_param(w.x), b = attn_param(w.y), c = attn_param(w.z), d = attn_param(w.w);
    ks[at] = a.x, kz[at] = a.y, ks[at + 1] = b.x, kz[at + 1] = b.y;
    ks[at + 2] = c.x, kz[at + 2] = c.y, ks[at + 3] = d.x, kz[at + 3] = d.y;
}

// Eight codes as floats (BITS = 8: a 64-bit word, channel j in byte j; 4: a 32-bit word, channel 2i in the
// low nibble of byte i).
template <int BITS>
__device__ __forceinline__ void attn_unpack8(const uint8_t *at, float (&f)[8]) {
    if constexpr (BITS == 8) {
        const uint2 w = *reinterpret_cast<const uint2 *>(at);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            f[j] = attn_code((w.x >> (8 * j)) & 0xffu);
            f[4 + j] = attn_code((w.y >> (8 * j)) & 0xffu);
        }
    } else {
        const uint32_t w = *reinterpret_cast<const uint32_t *>(at);
#pragma unroll
        for (int j = 0; j < 8; ++j) f[j] = attn_code((w >> (4 * j)) & 0xfu);
    }
}

// This lane's VEC = 8 codes of a token's code row: the part-th run of 8 channels.
template <int BITS>
__device__ __forceinline__ void attn_codes(const uint8_t *row, int part, float (&f)[8]) {
    attn_unpack8<BITS>(row + part * BITS, f);
}
