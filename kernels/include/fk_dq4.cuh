// fk_dq4.cuh: int4 codes to bf16/f16 pairs in registers, for the quantised-matmul family.
//
// A 32-bit word holds 8 nibbles. `(word >> 4s) & 0x000f000f` puts nibbles s and s + 4 in the low bits
// of the two 16-bit halves; OR-ing in the exponent of 2^7 (bf16) or 2^10 (f16) makes each half the
// number 128 + q (resp. 1024 + q) exactly, since the ulp there is 1: one LOP3 for two weights, no
// integer-to-float conversion. Subtracting (magic + zero) is exact (both are integers below 2^8 / 2^11),
// and one multiply by the scale rounds once, so each weight is round_T((q - z) * s): the value the host
// reference (`PackedW4::dequantize_rounded`) computes. Device and emulator share this code: the emulator
// implements __hsub2 / __hmul2 exactly in fp32 with one rounding (kernels/emu/include/fk_emu_half.h).
#pragma once

#include "fk_common.cuh"

template <typename T> struct fk_dq4;

template <> struct fk_dq4<__nv_bfloat16> {
    static constexpr uint32_t MAGIC = 0x43004300u;  // 128.0 in both halves
    typedef __nv_bfloat162 T2;
};
template <> struct fk_dq4<__half> {
    static constexpr uint32_t MAGIC = 0x64006400u;  // 1024.0 in both halves
    typedef __half2 T2;
};

template <typename T>
__device__ __forceinline__ uint32_t fk_h2_sub_mul(uint32_t a, uint32_t b, uint32_t s) {
    typedef typename fk_dq4<T>::T2 T2;
    T2 va, vb, vs;
    memcpy(&va, &a, 4);
    memcpy(&vb, &b, 4);
    memcpy(&vs, &s, 4);
    const T2 r = __hmul2(__hsub2(va, vb), vs);
    uint32_t out;
    memcpy(&out, &r, 4);
    return out;
}

// Nibbles s and s + 4 of `word` as (magic + q) pairs.
template <typename T, int S>
__device__ __forceinline__ uint32_t fk_dq4_pair(uint32_t word) {
    return ((word >> (4 * S)) & 0x000f000fu) | fk_dq4<T>::MAGIC;
}

// (magic + z, magic + z) from byte `i` (0..3) of a word of zero points: one PRMT picking the bytes
// (z, magic's high byte, z, magic's high byte).
template <typename T>
__device__ __forceinline__ uint32_t fk_dq4_zero_pair(uint32_t zw, int i) {
    return __byte_perm(zw, fk_dq4<T>::MAGIC, (uint32_t)i | 0x50u | ((uint32_t)i << 8) | 0x7000u);
}
// (s, s) from half `i` (0, 1) of a word of two scales: one PRMT.
__device__ __forceinline__ uint32_t fk_dq4_scale_pair(uint32_t sw, int i) {
    return __byte_perm(sw, 0u, i ? 0x3232u : 0x1010u);
}
