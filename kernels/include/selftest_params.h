/* selftest_params.h: launch parameters of the selftest family (kernels/selftest): conformance kernels
 * for the constructs the emulator models (mma.sync, ldmatrix, cp.async, warp collectives), run on the
 * emulator and on a GPU against the same Rust expectations, and planted bugs for the emulator's checkers.
 * Shared by nvcc and bindgen. */
#ifndef FK_SELFTEST_PARAMS_H
#define FK_SELFTEST_PARAMS_H

#include <stdint.h>

/* mma.sync shapes and types. */
#define FK_SELFTEST_MMA_M16N8K16_BF16 0u
#define FK_SELFTEST_MMA_M16N8K16_F16 1u
#define FK_SELFTEST_MMA_M16N8K32_S8 2u
#define FK_SELFTEST_MMA_M16N8K64_S4 3u
#define FK_SELFTEST_MMA_M16N8K32_E4M3 4u

/* One warp runs one mma.sync on per-lane registers: a [32][4], b [32][2], c [32][4] -> d [32][4]
 * (lane-major; f32 accumulators as their bits). */
typedef struct fk_selftest_mma_params {
    const uint32_t *a;
    const uint32_t *b;
    const uint32_t *c;
    uint32_t *d;
    uint32_t op;
} fk_selftest_mma_params;

/* ldmatrix variants: x1, x2, x4, then the same transposed. */
#define FK_SELFTEST_LDMATRIX_X1 0u
#define FK_SELFTEST_LDMATRIX_X2 1u
#define FK_SELFTEST_LDMATRIX_X4 2u
#define FK_SELFTEST_LDMATRIX_X1_TRANS 3u
#define FK_SELFTEST_LDMATRIX_X2_TRANS 4u
#define FK_SELFTEST_LDMATRIX_X4_TRANS 5u

/* One warp: `tile` (32 rows of 8 b16) goes to shared memory; lane l supplies the address of row
 * row_of_lane[l]; out [32][4] gets each lane's registers (unused ones 0). */
typedef struct fk_selftest_ldmatrix_params {
    const uint16_t *tile;
    const uint32_t *row_of_lane;
    uint32_t *out;
    uint32_t variant;
} fk_selftest_ldmatrix_params;

/* Warp collectives. */
#define FK_SELFTEST_WARP_SHFL_IDX 0u
#define FK_SELFTEST_WARP_SHFL_UP 1u
#define FK_SELFTEST_WARP_SHFL_DOWN 2u
#define FK_SELFTEST_WARP_SHFL_XOR 3u
#define FK_SELFTEST_WARP_BALLOT 4u
#define FK_SELFTEST_WARP_ANY 5u
#define FK_SELFTEST_WARP_ALL 6u
#define FK_SELFTEST_WARP_MATCH_ANY 7u
#define FK_SELFTEST_WARP_REDUCE_ADD 8u
#define FK_SELFTEST_WARP_REDUCE_MIN 9u
#define FK_SELFTEST_WARP_REDUCE_MAX 10u

typedef struct fk_selftest_warp_case {
    uint32_t op;
    int32_t arg;   /* source lane, delta or lane mask */
    int32_t width; /* shuffles: segment width */
    uint32_t mask; /* participating lanes (the others do not call) */
} fk_selftest_warp_case;

/* One warp runs every case on values[lane]: out [n_cases][32] (0xffffffff for lanes outside the mask).
 * Predicates are value & 1. */
typedef struct fk_selftest_warp_params {
    const uint32_t *values;
    const fk_selftest_warp_case *cases;
    uint32_t *out;
    uint32_t n_cases;
} fk_selftest_warp_params;

/* cp.async pipeline: one block of FK_SELFTEST_CP_THREADS copies `n` u32 from src through a 3-stage
 * shared-memory ring (16 bytes per thread per stage, commit per stage, wait_group<1>) into out, the last
 * vector of each thread zero-filled past n. */
#define FK_SELFTEST_CP_THREADS 32u
typedef struct fk_selftest_cp_async_params {
    const uint32_t *src;
    uint32_t *out;
    int64_t n;
} fk_selftest_cp_async_params;

/* Block-level built-ins: a launch of grid (2, 3, 2) x block (8, 4, 2) writes, per thread, its linear
 * global id, the __syncthreads_count / _and / _or of pred(thread), and takes part in shared and global
 * atomics (int add, unsigned max, CAS, float add). out_ids [n_threads][4]: flat block index, flat
 * thread index, count, and|or<<1; shared_sums [n_blocks]: what the block's shared atomics gave;
 * global_counters [4]: add, max, CAS winners, float sum. */
typedef struct fk_selftest_block_params {
    uint32_t *out_ids;
    uint32_t *shared_sums;
    uint32_t *global_counters;
    float *global_float;
    uint32_t pred_mod; /* pred(thread) = (global id % pred_mod) == 0 */
} fk_selftest_block_params;

/* f32 -> bf16 and f16 with the intrinsics the kernels use (__float2bfloat16_rn, __float2half_rn), and
 * back: out_bf16 [n], out_f16 [n] (bits), back [2n] (f32 of each). */
typedef struct fk_selftest_convert_params {
    const float *in;
    uint16_t *out_bf16;
    uint16_t *out_f16;
    float *back;
    int64_t n;
} fk_selftest_convert_params;

/* Planted bugs (emulator only): each kernel holds one bug a checker must report. */
#define FK_PLANTED_MISSING_BARRIER 0u     /* block reduction without the barrier before reading scratch */
#define FK_PLANTED_OOB_GLOBAL 1u          /* writes out[n] */
#define FK_PLANTED_OOB_STATIC_SHARED 2u   /* indexes a __shared__ float[64] with 128 threads */
#define FK_PLANTED_OOB_DYNAMIC_SHARED 3u  /* writes past the launch's dynamic shared memory */
#define FK_PLANTED_DIVERGENT_BARRIER 4u   /* __syncthreads on two lines */
#define FK_PLANTED_DEADLOCK 5u            /* lane 0 at __syncthreads, its warp at __syncwarp */
#define FK_PLANTED_SHFL_OUTSIDE_MASK 6u   /* lanes 0-15 read lane 20 */
#define FK_PLANTED_EXITED_LANE 7u         /* lanes 16-31 exit, 0-15 shuffle with the full mask */
#define FK_PLANTED_UNINIT_SHARED 8u       /* reads shared memory nobody wrote */
#define FK_PLANTED_CP_ASYNC_NO_WAIT 9u    /* reads a cp.async destination before waiting */

typedef struct fk_planted_params {
    const float *in;
    float *out;
    int64_t n;
    uint32_t bug;
    uint32_t dyn_smem; /* bytes of dynamic shared memory of the launch */
} fk_planted_params;

#endif
