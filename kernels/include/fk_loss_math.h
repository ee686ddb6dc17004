/* fk_loss_math.h: the per-row maths of the fused-loss family, as __host__ __device__ code.
 *
 * Every loss here depends on a row only through lse, z_y and S = sum_j w_j z_j, so its gradient is
 *     dL/dz_j = a p_j + b [j == y] + c w_j          (p = softmax(z), w_j = 1 without class weights)
 * with per-row scalars (a, b, c). fk_row_loss returns the loss and those scalars; the kernels then write
 * the gradient in one sweep. The host build (cc) exports it so CPU tests check it against an independent
 * f64 reference and finite differences. Derivations: docs in src/loss/mod.rs. */
#ifndef FK_LOSS_MATH_H
#define FK_LOSS_MATH_H

#include <math.h>

#include "fk_hd.h"
#include "loss_params.h"

typedef struct fk_row_result {
    float loss;
    float a;
    float b;
    float c;
} fk_row_result;

/* k x, with 0 * +-inf = 0: a term weighted by exactly 0 (a class weight, 1 - eps, alpha_t) contributes
 * nothing, even where x is infinite (a masked logit: log p = -inf); a NaN x still gives NaN. For finite x
 * this is k * x, bit for bit. */
FK_HD float fk_weighted(float k, float x) { return (k == 0.0f && fabsf(x) == INFINITY) ? 0.0f : k * x; }

/* q = 1 - p_y computed from log p_y without cancellation near p_y = 1. */
FK_HD float fk_one_minus_exp(float logp) { return -expm1f(logp); }

/* lse: log-sum-exp of the row; logp: log p_y = (z_y - max) - log(sum exp(z - max)), computed in that
 * order so a confident row (p_y near 1) keeps its small loss exact instead of losing it to lse - z_y
 * cancellation; swz: sum_j w_j z_j (smoothing only); wy: w_y (1 without weights). */
FK_HD fk_row_result fk_row_loss(const fk_loss_config *cfg, float lse, float logp, float swz, float wy) {
    fk_row_result r;
    const float p = expf(logp);
    const float q = fk_one_minus_exp(logp);
    r.c = 0.0f;
    switch (cfg->kind) {
    case FK_LOSS_FOCAL:
    case FK_LOSS_POLY1_FOCAL: {
        const float g = cfg->gamma;
        const float qg = (g == 0.0f) ? 1.0f : powf(q, g);
        /* gamma q^(gamma-1) p log p: the q^(gamma-1) blow-up at q -> 0 is cancelled by log p ~ -q, and
         * p log p -> 0 at p = 0 (a masked target, log p = -inf: 0 * -inf would make the gradient NaN). */
        const float t2 = (g == 0.0f || q <= 0.0f || p == 0.0f) ? 0.0f : g * powf(q, g - 1.0f) * p * logp;
        const float B = wy * (-qg + t2);
        r.loss = fk_weighted(-wy * qg, logp);
        r.a = -B;
        r.b = B;
        if (cfg->kind == FK_LOSS_POLY1_FOCAL) {
            const float qg1 = qg * q;
            const float d = cfg->poly_eps * wy * (g + 1.0f) * qg * p;
            r.loss += cfg->poly_eps * wy * qg1;
            r.a += d;
            r.b -= d;
        }
        break;
    }
    case FK_LOSS_POLY1: {
        const float k = wy * (1.0f + cfg->poly_eps * p);
        r.loss = fk_weighted(wy, -logp + cfg->poly_eps * q);
        r.a = k;
        r.b = -k;
        break;
    }
    case FK_LOSS_GCE: {
        const float pq = expf(cfg->gce_q * logp);
        r.loss = wy * fk_one_minus_exp(cfg->gce_q * logp) / cfg->gce_q;
        r.a = wy * pq;
        r.b = -wy * pq;
        break;
    }
    default: { /* FK_LOSS_CE */
        const float eps = cfg->smoothing;
        const float ev = eps / cfg->vocab;
        r.loss = fk_weighted((1.0f - eps) * wy, -logp);
        r.a = (1.0f - eps) * wy;
        r.b = -(1.0f - eps) * wy;
        if (eps != 0.0f) {
            r.loss += ev * (cfg->weight_sum * lse - swz);
            r.a += ev * cfg->weight_sum;
            r.c = -ev;
        }
        break;
    }
    }
    if (cfg->z_loss != 0.0f) {
        r.loss += cfg->z_loss * lse * lse;
        r.a += 2.0f * cfg->z_loss * lse;
    }
    return r;
}

/* Softcap: z = c tanh(x / c) and dz/dx = 1 - tanh^2 (c = 0: identity). */
FK_HD float fk_softcap(float x, float c) { return c > 0.0f ? c * tanhf(x / c) : x; }
FK_HD float fk_softcap_grad(float x, float c) {
    if (c <= 0.0f) return 1.0f;
    const float t = tanhf(x / c);
    return 1.0f - t * t;
}

/* Sigmoid focal loss of one element (torchvision): returns the loss, writes dloss/dx to *grad.
 * At x = +-inf the loss and gradient are their limits (torchvision's formula gives NaN there, 0 * inf):
 * 0 and 0 for a correct prediction, +inf and +-alpha_t for a wrong one; alpha_t = 0 gives loss 0. */
FK_HD float fk_sigmoid_focal(float x, float t, float alpha, float gamma, float *grad) {
    const float e = expf(-fabsf(x));
    /* p = sigmoid(x) and q = 1 - p = sigmoid(-x), each without cancellation: forming 1 - p (or p - 1)
     * from p loses all relative accuracy once p is near 1 (x = 8: 1 - p = 3e-4 to 2e-4 relative). */
    const float p = x >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
    const float q = x >= 0.0f ? e / (1.0f + e) : 1.0f / (1.0f + e);
    /* ce = max(x, 0) - x t + log(1 + e^-|x|); at x = +-inf that is x (1 - t) or -x t: 0 where the factor
     * is 0 (a correct prediction), not 0 * inf. */
    const float ce = fabsf(x) == INFINITY ? fk_weighted(x > 0.0f ? 1.0f - t : -t, x)
                                          : fmaxf(x, 0.0f) - x * t + log1pf(e);
    /* m = 1 - p_t = 1 - (p t + q (1 - t)) = p (1 - t) + q t: exact for t in {0, 1}, no cancellation. */
    const float m = p * (1.0f - t) + q * t;
    const float mg = (gamma == 0.0f) ? 1.0f : powf(m, gamma);
    /* d(1 - p_t)/dx = -p q (2t - 1) */
    const float dm = -p * q * (2.0f * t - 1.0f);
    const float dmg = (gamma == 0.0f || m <= 0.0f) ? 0.0f : gamma * powf(m, gamma - 1.0f) * dm;
    float loss = ce * mg;
    /* ce dmg -> 0 at x = +-inf (dm decays like e^-|x|), not inf * 0. */
    const float ce_dmg = fk_weighted(dmg, ce);
    /* dce/dx = p - t = p (1 - t) - q t, again without cancellation. */
    float g = (p * (1.0f - t) - q * t) * mg + ce_dmg;
    if (alpha >= 0.0f) {
        const float at = alpha * t + (1.0f - alpha) * (1.0f - t);
        loss = fk_weighted(at, loss);
        g *= at;
    }
    *grad = g;
    return loss;
}

#endif
