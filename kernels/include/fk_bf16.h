/* fk_bf16.h: bf16 / f16 bit-level conversions shared by device code and host tests.
 *
 * Kernels use the cuda_bf16.h intrinsics for speed; these portable forms define the rounding the
 * intrinsics must match (round to nearest, ties to even; NaN stays NaN), and the host build tests them
 * against the `half` crate so both sides agree bit for bit. */
#ifndef FK_BF16_H
#define FK_BF16_H

#include "fk_hd.h"

FK_HD uint32_t fk_f32_bits(float x) {
    union { float f; uint32_t u; } v;
    v.f = x;
    return v.u;
}

FK_HD float fk_bits_f32(uint32_t u) {
    union { float f; uint32_t u; } v;
    v.u = u;
    return v.f;
}

/* float -> bf16 bits, round to nearest even; NaN -> quiet NaN with the sign kept. */
FK_HD uint16_t fk_f32_to_bf16_bits(float x) {
    uint32_t u = fk_f32_bits(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x0040u);
    uint32_t lsb = (u >> 16) & 1u;
    u += 0x7fffu + lsb;
    return (uint16_t)(u >> 16);
}

FK_HD float fk_bf16_bits_to_f32(uint16_t h) { return fk_bits_f32(((uint32_t)h) << 16); }

#endif
