/* host_math.c: exports the __host__ __device__ maths headers to Rust (src/host_math.rs) for CPU tests.
 * Nothing here is used on a GPU; the kernels include the same headers directly. */
#include "fk_bf16.h"

uint16_t fk_host_f32_to_bf16_bits(float x) { return fk_f32_to_bf16_bits(x); }
float fk_host_bf16_bits_to_f32(uint16_t h) { return fk_bf16_bits_to_f32(h); }
