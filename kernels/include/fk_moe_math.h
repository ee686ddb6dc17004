/* fk_moe_math.h: the scalar maths of MoE routing, bit-for-bit identical on the GPU and on the host.
 *
 * Routing compares scores: if the host reference computed a score one ulp differently from the kernel,
 * a near-tie could order two experts differently and an "exact ids" test would flake. So every operation
 * here is an IEEE basic operation with a single rounding, written so neither compiler may contract or
 * reorder it (device: __fmul_rn/__fadd_rn/__fdiv_rn/fmaf; host: plain operators compiled with
 * -ffp-contract=off, and fmaf). The exponential is our own (Cody-Waite reduction + degree-6 polynomial,
 * < 2 ulp), since CUDA's expf and the C library's differ in the last bit. */
#ifndef FK_MOE_MATH_H
#define FK_MOE_MATH_H

#include <math.h>

#include "fk_hd.h"

#if defined(__CUDACC__)
#define FK_MUL(a, b) __fmul_rn((a), (b))
#define FK_ADD(a, b) __fadd_rn((a), (b))
#define FK_SUB(a, b) __fsub_rn((a), (b))
#define FK_DIV(a, b) __fdiv_rn((a), (b))
#else
#define FK_MUL(a, b) ((a) * (b))
#define FK_ADD(a, b) ((a) + (b))
#define FK_SUB(a, b) ((a) - (b))
#define FK_DIV(a, b) ((a) / (b))
#endif

FK_HD float fk_pow2i(int n) {
    /* 2^n for n in [-126, 127] as an exact float. */
    union { float f; uint32_t u; } v;
    v.u = (uint32_t)(n + 127) << 23;
    return v.f;
}

/* exp(x), identical on host and device. NaN -> NaN, +inf -> +inf, -inf -> 0. */
FK_HD float fk_exp_portable(float x) {
    if (x != x) return x;
    if (x > 88.7228317f) return INFINITY;
    if (x < -103.972084f) return 0.0f;
    const float n = rintf(FK_MUL(x, 1.44269504f));
    float r = fmaf(-n, 0.693145752f, x);     /* ln2 high part (exact product) */
    r = fmaf(-n, 1.42860677e-06f, r);        /* ln2 low part */
    float p = 1.38888889e-03f;               /* 1/720 */
    p = fmaf(p, r, 8.33333333e-03f);         /* 1/120 */
    p = fmaf(p, r, 4.16666667e-02f);         /* 1/24 */
    p = fmaf(p, r, 1.66666667e-01f);         /* 1/6 */
    p = fmaf(p, r, 0.5f);
    p = fmaf(p, r, 1.0f);
    p = fmaf(p, r, 1.0f);
    int ni = (int)n;
    /* Scale in two exact steps so 2^n stays a normal float on each. */
    if (ni > 127) {
        p = FK_MUL(p, fk_pow2i(127));
        ni -= 127;
    } else if (ni < -126) {
        p = FK_MUL(p, fk_pow2i(-126));
        ni += 126;
    }
    return FK_MUL(p, fk_pow2i(ni));
}

/* Router sigmoid, identical on host and device. */
FK_HD float fk_moe_sigmoid(float x) { return FK_DIV(1.0f, FK_ADD(1.0f, fk_exp_portable(-x))); }

/* Selection key: NaN can never win against a number (it sorts as -inf). */
FK_HD float fk_moe_key(float v) { return v != v ? -INFINITY : v; }

/* Strict total order of (key, expert): larger key first, then the lower expert index. */
FK_HD int fk_moe_better(float va, int ia, float vb, int ib) { return va > vb || (va == vb && ia < ib); }

#endif
