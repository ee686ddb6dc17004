/* fk_maxsum.h: the online-softmax state (running max m, sum of exp(x - m)) as __host__ __device__ code,
 * so the host build (cc) can test its special-value rules: the kernels and the CPU tests run the same
 * push and merge.
 *
 * Rules:
 *  - the empty state is exactly {-inf, 0}; a masked logit (-inf) leaves a state unchanged;
 *  - a NaN logit makes s NaN, and no later push or merge may lose it: the loss and lse of a row with a NaN
 *    logit are NaN. (A state that saw only NaN is {-inf, NaN}, which is not empty: the merge must not
 *    drop it as if it were.) */
#ifndef FK_MAXSUM_H
#define FK_MAXSUM_H

#include <math.h>

#include "fk_hd.h"

#if defined(__CUDA_ARCH__)
#define FK_MAXSUM_EXP(x) __expf(x)
#else
#define FK_MAXSUM_EXP(x) expf(x)
#endif

typedef struct fk_maxsum {
    float m;
    float s;
} fk_maxsum;

FK_HD int fk_maxsum_is_empty(fk_maxsum a) { return a.m == -INFINITY && a.s == 0.0f; }

FK_HD fk_maxsum fk_maxsum_merge(fk_maxsum a, fk_maxsum b) {
    if (fk_maxsum_is_empty(a)) return b;
    if (fk_maxsum_is_empty(b)) return a;
    /* fmaxf returns the number when one max is NaN; the NaN then reaches s through the exp below. */
    const float m = fmaxf(a.m, b.m);
    fk_maxsum r;
    if (m == -INFINITY || m != m) {
        /* Both maxima -inf: neither state is empty, so each saw a NaN and its s is NaN; no exp(-inf + inf). */
        r.m = m;
        r.s = a.s + b.s;
        return r;
    }
    r.m = m;
    r.s = a.s * FK_MAXSUM_EXP(a.m - m) + b.s * FK_MAXSUM_EXP(b.m - m);
    return r;
}

FK_HD void fk_maxsum_push(fk_maxsum *st, float x) {
    if (x > st->m) {
        st->s = st->s * FK_MAXSUM_EXP(st->m - x) + 1.0f;
        st->m = x;
    } else if (x != -INFINITY) {
        /* A masked logit (-inf) adds nothing; without the test, -inf - (-inf) would be NaN while the
         * running max is still -inf. A NaN x lands here and makes s NaN, as it must. */
        st->s += FK_MAXSUM_EXP(x - st->m);
    }
}

#endif
