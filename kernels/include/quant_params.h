/* quant_params.h: launch parameters of the quantised-matmul family (kernels/quant). Read by nvcc and by
 * bindgen. The packed W4 format these kernels read is described in src/quant/packed.rs (format version
 * FK_W4_FORMAT_VERSION); the constants below are part of it. */
#ifndef FK_QUANT_PARAMS_H
#define FK_QUANT_PARAMS_H

#include <stdint.h>

/* Packed W4 format, version 1: K is padded to a multiple of FK_W4_KSLAB, N to a multiple of
 * FK_W4_NBLOCK; one 512-byte tile holds 16 (k) x 64 (n) codes in mma.sync m16n8k16 B-fragment order. */
#define FK_W4_FORMAT_VERSION 1
#define FK_W4_KSLAB 128
#define FK_W4_NBLOCK 64
#define FK_W4_TILE_BYTES 512

/* The W4A16 GEMM: 4 warps per block, each on its own 16-deep k tiles of every 128-deep slab. */
#define FK_W4A16_THREADS 128
#define FK_W4A16_WARPS 4
#define FK_W4A16_STAGES 4

/* y[M][N] = x[M][K] . W^T with W the packed int4 weight, fp32 accumulation. Grid: (n_pad / 64,
 * ceil(M / (16 MT)), splits). With one split the block writes y; else it writes its fp32 partial sums
 * to ws[split][M][N], and the last block of the output tile to arrive adds the splits in order and
 * writes y (fk_splitk.cuh). */
typedef struct fk_w4a16_params {
    const void *x;            /* [M][K] bf16/f16, row stride lda elements */
    const uint32_t *codes;    /* [n_pad/64][k_pad/16][32 lanes][4 words] */
    const void *scales;       /* [n_pad/64][n_groups][8][8] bf16/f16 (same type as x) */
    const uint8_t *zeros;     /* [n_pad/64][n_groups][8][8] bytes, or NULL: symmetric (zero point 8) */
    void *y;                  /* [M][N] bf16/f16 (one split) */
    float *ws;                /* [splits][M][N] fp32 partial sums (several splits), else NULL */
    uint32_t *counters;       /* [ceil(M / (16 MT))][n_pad / 64] arrivals per tile (several splits; 0 between launches) */
    int64_t m;
    int64_t lda;
    int32_t n;
    int32_t k;
    int32_t k_pad;
    int32_t n_groups;         /* k_pad / group_len */
    int32_t group_len;        /* 32, 64, 128 or k_pad (one group per output channel) */
    int32_t slabs_per_split;  /* 128-deep k slabs per block along z */
    int32_t a_vec;            /* 1: rows of x are 16-byte aligned and K % 8 == 0 (cp.async path) */
} fk_w4a16_params;

/* The online Hadamard transform of activations, fused with per-token quantisation: one block of
 * FK_HADQ_THREADS per token (row) of n = m * 2^log2p channels, the row held in shared memory as fp32
 * (4 roundup(n, 32) + 128 bytes). Each row becomes r = x . H_n (src/quant/hadamard.rs: a butterfly over the low
 * log2p index bits, then the m x m Paley mix of the blocks, then 1/sqrt(n)), and then either
 *   bits = 0: y = r rounded to T, or
 *   bits = 4 / 8: codes q = clamp(round(r / s) + z, 0, 2^bits - 1) with one fp32 scale s and zero point z
 *   per row (src/quant/act.rs, quantize_tokens: symmetric z = 2^(bits-1), s = 2 max|r| / (2^bits - 1);
 *   asymmetric over [min(r, 0), max(r, 0)]). A row with a non-finite value gets s = NaN and codes 0.
 * int4 codes are packed two per byte, element 2j in the low nibble of byte j (the order of mma.sync's
 * s4 operands); a row takes ceil(n / 2) bytes. */
#define FK_HADQ_THREADS 128

typedef struct fk_hadq_params {
    const void *x;            /* [rows][n] bf16/f16 */
    void *y;                  /* bits = 0: [rows][n] T; else NULL */
    uint8_t *codes;           /* bits = 4: [rows][ceil(n/2)]; bits = 8: [rows][n]; else NULL */
    float *scales;            /* [rows], or NULL (bits = 0) */
    uint8_t *zeros;           /* [rows], or NULL (bits = 0) */
    int64_t rows;
    float norm;               /* 1 / sqrt(n), rounded once from f64 */
    int32_t n;
    int32_t m;                /* the Paley factor: 1, 12, 20, 28, 36, 44 or 60 */
    int32_t log2p;            /* n = m << log2p */
    int32_t bits;             /* 0, 4 or 8 */
    int32_t symmetric;
    int32_t vec;              /* 1: n % 8 == 0, x and y 16-byte aligned, codes 4-byte aligned (vector paths) */
} fk_hadq_params;

/* BiLLM (src/quant/billm.rs, PackedBillm format FK_BILLM_FORMAT_VERSION): per 128-column block and output
 * row, 128 first-sign bits, 128 second bits (the residual sign in salient columns, the sparse-group flag
 * elsewhere) and eight f16 (alpha, mu) pairs; per block a 128-bit salient-column mask. Column j of a block
 * is bit (j % 32) / 2 + 16 (j % 2) of word j / 32 (even columns in the low half-word). */
#define FK_BILLM_FORMAT_VERSION 2
#define FK_BILLM_BLOCK 128
/* The GEMV / small-M GEMM: 4 warps, 16 output rows each (64 per block); 4 TG tokens per block (TG = 1, 2
 * or 4 token groups of 4). */
#define FK_BILLM_THREADS 128
#define FK_BILLM_ROWS 64

/* y[M][N] = x[M][K] . W^T, W the packed 1-bit weight, fp32 accumulation. Grid: (ceil(N / 64), splits,
 * ceil(M / (4 TG))); block y covers the 128-column blocks [y bps, min((y + 1) bps, blocks)). With one
 * split the block writes y, else its fp32 partial sums to ws[split][M][N], and the tile's last block to
 * arrive adds them in order and writes y (fk_splitk.cuh). Dynamic shared memory: 2 * TG * 8 * 136 * 2 bytes. */
typedef struct fk_billm_params {
    const void *x;            /* [M][K] bf16/f16, row stride lda elements */
    const uint32_t *signs;    /* [blocks][n][4] */
    const uint32_t *second;   /* [blocks][n][4] */
    const uint32_t *salient;  /* [blocks][4] */
    const uint16_t *params;   /* [blocks][n][8] f16: alpha1 mu1 alpha2 mu2 (salient), alpha mu (concentrated), alpha mu (sparse) */
    void *y;                  /* [M][N] bf16/f16 (one split) */
    float *ws;                /* [splits][M][N] fp32 partial sums (several splits), else NULL */
    uint32_t *counters;       /* [ceil(M / (4 TG))][ceil(N / 64)] arrivals per tile (several splits; 0 between launches) */
    int64_t m;
    int64_t lda;
    int32_t n;
    int32_t k;
    int32_t blocks;           /* ceil(K / 128) */
    int32_t blocks_per_split;
} fk_billm_params;

/* The dense weight: w[r][c] = the packed weight's value (PackedBillm::dequantize) rounded to bf16/f16, for
 * r < n, c < k (row stride k). One thread per 8 consecutive columns of a row, grid-stride. */
typedef struct fk_billm_unpack_params {
    const uint32_t *signs;
    const uint32_t *second;
    const uint32_t *salient;
    const uint16_t *params;
    void *w;                  /* [n][k] bf16/f16 */
    int32_t n;
    int32_t k;
    int32_t blocks;
    int32_t vec;              /* 1: k % 8 == 0 and w 16-byte aligned (one 16-byte store per 8 columns) */
} fk_billm_unpack_params;

/* W4A4: y[M][N] = x[M][K] . W^T with x int4 per token (the online Hadamard kernel's output: codes q_x in
 * 0..15 two per byte, element 2j in the low nibble, rows of K / 2 bytes; an f32 scale and a zero point per
 * token) and W int4 per output channel, symmetric (src/quant/w4a4.rs, PackedW4A4, format
 * FK_W4A4_FORMAT_VERSION: [n_pad][k_pad / 8] words of q_w - 8 as signed nibbles, each 128-deep chunk's
 * 16 words stored 4 x 4 transposed; an f32 scale and sum_k (q_w - 8) per channel). int32 accumulation:
 * y = s_x s_w (sum_k (q_x - 8)(q_w - 8) - (z_x - 8) colsum). Grid: (n_pad / 64, ceil(M / (16 MT)), splits).
 * With one split the block writes y, else its int32 partial sums to ws[split][M][N], and the tile's last
 * block to arrive adds them and writes y (fk_splitk.cuh). Dynamic shared memory: 4 * 16 MT * 64 * 4 bytes.
 * K % 8 == 0 and K <= 65536. */
#define FK_W4A4_FORMAT_VERSION 1
#define FK_W4A4_KCHUNK 128
#define FK_W4A4_NBLOCK 64
#define FK_W4A4_THREADS 128
#define FK_W4A4_WARPS 4

typedef struct fk_w4a4_params {
    const uint8_t *x;         /* [M][K / 2] int4 codes */
    const float *x_scales;    /* [M] (NaN: the token held NaN/inf; its outputs are NaN) */
    const uint8_t *x_zeros;   /* [M] zero points, 0..15 */
    const uint32_t *codes;    /* [n_pad][k_pad / 8] packed weight words */
    const float *w_scales;    /* [n_pad] */
    const int32_t *colsum;    /* [n_pad] sum over k of q_w - 8 */
    void *y;                  /* [M][N] bf16/f16 */
    int32_t *ws;              /* [splits][M][N] int32 partial sums (several splits), else NULL */
    uint32_t *counters;       /* [ceil(M / (16 MT))][n_pad / 64] arrivals per tile (several splits; 0 between launches) */
    int64_t m;
    int32_t n;
    int32_t k;
    int32_t k_pad;
    int32_t chunks_per_split; /* 128-deep k chunks per block along z */
} fk_w4a4_params;

#endif
