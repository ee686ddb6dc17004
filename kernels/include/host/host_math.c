/* host_math.c: exports the __host__ __device__ maths headers to Rust (src/host_math.rs) for CPU tests.
 * Nothing here is used on a GPU; the kernels include the same headers directly. */
#include "fk_bf16.h"

uint16_t fk_host_f32_to_bf16_bits(float x) { return fk_f32_to_bf16_bits(x); }
float fk_host_bf16_bits_to_f32(uint16_t h) { return fk_bf16_bits_to_f32(h); }

#include "fk_loss_math.h"

fk_row_result fk_host_row_loss(const fk_loss_config *cfg, float lse, float logp, float swz, float wy) {
    return fk_row_loss(cfg, lse, logp, swz, wy);
}
float fk_host_sigmoid_focal(float x, float t, float alpha, float gamma, float *grad) {
    return fk_sigmoid_focal(x, t, alpha, gamma, grad);
}

#include "fk_moe_math.h"

float fk_host_exp_portable(float x) { return fk_exp_portable(x); }
float fk_host_moe_sigmoid(float x) { return fk_moe_sigmoid(x); }
float fk_host_fadd(float a, float b) { return FK_ADD(a, b); }
float fk_host_fmul(float a, float b) { return FK_MUL(a, b); }
float fk_host_fdiv(float a, float b) { return FK_DIV(a, b); }

#include "fk_maxsum.h"

fk_maxsum fk_host_maxsum_merge(fk_maxsum a, fk_maxsum b) { return fk_maxsum_merge(a, b); }
fk_maxsum fk_host_maxsum_push(fk_maxsum st, float x) {
    fk_maxsum_push(&st, x);
    return st;
}
