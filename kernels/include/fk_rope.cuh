// fk_rope.cuh: rotary position embedding (RoPE) of single channels, for kernels that hold a few channels
// of a head vector per thread. The pair of frequency index i turns by pos * theta^(-2i / D): style 0
// (half, Hugging Face rotate_half) pairs channel c with c +- D/2 (i = c mod D/2); style 1 (interleaved,
// GPT-J / GGUF) pairs 2i with 2i + 1. The first channel of a pair becomes x1 cos - x2 sin, the second
// x2 cos + x1 sin (src/attention/reference.rs: rope_rotate, in f64).
//
// The angle is formed in f32 (as Hugging Face does: its error grows as |angle| * 2^-24), reduced to
// [-pi, pi] with 2 pi in two parts (Cody-Waite), then the MUFU sine and cosine (absolute error about
// 2^-21 there). No sincosf: its slow path for large arguments uses local memory.
#pragma once

#include "fk_common.cuh"

// theta^(-2i / D) of the frequency index of channel c.
__device__ __forceinline__ float fk_rope_inv_freq(int c, int D, int style, float log2_theta) {
    const int i = style == 0 ? c % (D / 2) : c >> 1;
    return exp2f(-2.0f * (float)i / (float)D * log2_theta);
}

// True for the first channel of its pair.
__device__ __forceinline__ bool fk_rope_first(int c, int D, int style) {
    return style == 0 ? c < D / 2 : (c & 1) == 0;
}

__device__ __forceinline__ void fk_rope_sincos(float x, float *s, float *c) {
    const float k = rintf(x * 0.159154943091895336f);
    float r = fmaf(-k, 6.28318548202514648f, x);
    r = fmaf(-k, -1.74845560007444874e-07f, r);
    __sincosf(r, s, c);
}

// Channel value xc rotated at pos, given its partner's value xp.
__device__ __forceinline__ float fk_rope_apply(float xc, float xp, float inv_freq, bool first, float pos) {
    float s, c;
    fk_rope_sincos(pos * inv_freq, &s, &c);
    return first ? xc * c - xp * s : fmaf(xc, c, xp * s);
}
