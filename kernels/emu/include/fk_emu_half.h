// fk_emu_half.h: __half and __nv_bfloat16 for the SIMT emulator, with the device's conversions
// (round to nearest even, subnormals kept, overflow to infinity, NaN to the canonical NaN 0x7fff).
// Arithmetic on them goes through fp32 and rounds once to the storage type.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

namespace fk_emu {
inline uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
inline float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

inline uint16_t f32_to_bf16_bits(float f) {
    const uint32_t u = f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
inline float bf16_bits_to_f32(uint16_t h) { return bits_f32((uint32_t)h << 16); }

inline uint16_t f32_to_f16_bits(float f) {
    const uint32_t u = f32_bits(f);
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    const uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return 0x7fffu;                 // NaN
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // >= 65520 rounds to infinity
    if (a < 0x38800000u) {                                 // below 2^-14: a subnormal (or zero) half
        const float v = bits_f32(a) * 16777216.0f;         // exact: scaled by 2^24
        return (uint16_t)(sign | (uint16_t)rintf(v));      // ties to even; 1024 is the smallest normal
    }
    const uint32_t r = (a - 0x38000000u + 0xfffu + ((a >> 13) & 1u)) >> 13;
    return (uint16_t)(sign | r);
}
inline float f16_bits_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0) return sign ? -(float)m * 5.9604644775390625e-8f : (float)m * 5.9604644775390625e-8f;
    if (e == 31) return bits_f32(sign | 0x7f800000u | (m << 13));
    return bits_f32(sign | ((e + 112u) << 23) | (m << 13));
}
}  // namespace fk_emu

struct __half_raw { unsigned short x; };
struct __nv_bfloat16_raw { unsigned short x; };

struct __half {
    unsigned short __x;
    __half() = default;
    __half(__half_raw r) : __x(r.x) {}
    __half(float f) : __x(fk_emu::f32_to_f16_bits(f)) {}
    __half(double f) : __x(fk_emu::f32_to_f16_bits((float)f)) {}
    operator float() const { return fk_emu::f16_bits_to_f32(__x); }
    operator __half_raw() const { return __half_raw{__x}; }
};
struct __nv_bfloat16 {
    unsigned short __x;
    __nv_bfloat16() = default;
    __nv_bfloat16(__nv_bfloat16_raw r) : __x(r.x) {}
    __nv_bfloat16(float f) : __x(fk_emu::f32_to_bf16_bits(f)) {}
    __nv_bfloat16(double f) : __x(fk_emu::f32_to_bf16_bits((float)f)) {}
    operator float() const { return fk_emu::bf16_bits_to_f32(__x); }
    operator __nv_bfloat16_raw() const { return __nv_bfloat16_raw{__x}; }
};
struct __attribute__((aligned(4))) __half2 { __half x, y; };
struct __attribute__((aligned(4))) __nv_bfloat162 { __nv_bfloat16 x, y; };
typedef __half half;
typedef __half2 half2;
typedef __nv_bfloat16 nv_bfloat16;
typedef __nv_bfloat162 nv_bfloat162;

inline __half __float2half_rn(float f) { return __half(f); }
inline __half __float2half(float f) { return __half(f); }
inline float __half2float(__half h) { return fk_emu::f16_bits_to_f32(h.__x); }
inline __half __ushort_as_half(unsigned short x) { return __half(__half_raw{x}); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__half(a), __half(b)}; }
inline __half2 __float2half2_rn(float a) { return __half2{__half(a), __half(a)}; }
inline float2 __half22float2(__half2 h) { return float2{__half2float(h.x), __half2float(h.y)}; }
inline __half2 __float22half2_rn(float2 f) { return __floats2half2_rn(f.x, f.y); }
inline float __low2float(__half2 h) { return __half2float(h.x); }
inline float __high2float(__half2 h) { return __half2float(h.y); }
inline __half __low2half(__half2 h) { return h.x; }
inline __half __high2half(__half2 h) { return h.y; }
inline __half2 __halves2half2(__half a, __half b) { return __half2{a, b}; }

inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return fk_emu::bf16_bits_to_f32(h.__x); }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short x) { return __nv_bfloat16(__nv_bfloat16_raw{x}); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
    return __nv_bfloat162{__nv_bfloat16(a), __nv_bfloat16(b)};
}
inline __nv_bfloat162 __float2bfloat162_rn(float a) { return __floats2bfloat162_rn(a, a); }
inline __nv_bfloat162 __float22bfloat162_rn(float2 f) { return __floats2bfloat162_rn(f.x, f.y); }
inline float2 __bfloat1622float2(__nv_bfloat162 h) {
    return float2{__bfloat162float(h.x), __bfloat162float(h.y)};
}
inline float __low2float(__nv_bfloat162 h) { return __bfloat162float(h.x); }
inline float __high2float(__nv_bfloat162 h) { return __bfloat162float(h.y); }
inline __nv_bfloat16 __low2bfloat16(__nv_bfloat162 h) { return h.x; }
inline __nv_bfloat16 __high2bfloat16(__nv_bfloat162 h) { return h.y; }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat162{a, b}; }

// Arithmetic: exact in fp32 (or fp64 for the fused forms), one rounding to the storage type.
#define FK_EMU_HALF_OPS(H, H2, TOF)                                                                     \
    inline H __hadd(H a, H b) { return H(TOF(a) + TOF(b)); }                                          \
    inline H __hsub(H a, H b) { return H(TOF(a) - TOF(b)); }                                          \
    inline H __hmul(H a, H b) { return H(TOF(a) * TOF(b)); }                                          \
    inline H __hdiv(H a, H b) { return H(TOF(a) / TOF(b)); }                                          \
    inline H __hneg(H a) { return H(-TOF(a)); }                                                       \
    inline H __hfma(H a, H b, H c) { return H((float)((double)TOF(a) * TOF(b) + TOF(c))); }         \
    inline H __hmax(H a, H b) { return H(fmaxf(TOF(a), TOF(b))); }                                    \
    inline H __hmin(H a, H b) { return H(fminf(TOF(a), TOF(b))); }                                    \
    inline bool __heq(H a, H b) { return TOF(a) == TOF(b); }                                          \
    inline bool __hlt(H a, H b) { return TOF(a) < TOF(b); }                                           \
    inline bool __hgt(H a, H b) { return TOF(a) > TOF(b); }                                           \
    inline bool __hisnan(H a) { return TOF(a) != TOF(a); }                                            \
    inline H2 __hadd2(H2 a, H2 b) { return H2{__hadd(a.x, b.x), __hadd(a.y, b.y)}; }                 \
    inline H2 __hsub2(H2 a, H2 b) { return H2{__hsub(a.x, b.x), __hsub(a.y, b.y)}; }                 \
    inline H2 __hmul2(H2 a, H2 b) { return H2{__hmul(a.x, b.x), __hmul(a.y, b.y)}; }                 \
    inline H2 __hfma2(H2 a, H2 b, H2 c) { return H2{__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y)}; } \
    inline H2 __hmax2(H2 a, H2 b) { return H2{__hmax(a.x, b.x), __hmax(a.y, b.y)}; }                 \
    inline H2 __hmin2(H2 a, H2 b) { return H2{__hmin(a.x, b.x), __hmin(a.y, b.y)}; }
FK_EMU_HALF_OPS(__half, __half2, __half2float)
FK_EMU_HALF_OPS(__nv_bfloat16, __nv_bfloat162, __bfloat162float)
#undef FK_EMU_HALF_OPS
