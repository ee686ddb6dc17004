/* moe_params.h: launch parameters of the MoE routing family (kernels/moe). Read by nvcc and by bindgen. */
#ifndef FK_MOE_PARAMS_H
#define FK_MOE_PARAMS_H

#include <stdint.h>

#define FK_MOE_SCORE_SIGMOID 0u
#define FK_MOE_SCORE_SOFTMAX 1u

#define FK_MOE_MAX_EXPERTS 1024
#define FK_MOE_MAX_TOPK 32
#define FK_MOE_MAX_GROUPS 32
/* Tokens per block of the gate kernel: one warp per token. */
#define FK_MOE_GATE_WARPS 8

/* Fused gate: scores, biased top-k (optionally group-limited), unbiased weights, per-expert counts. */
typedef struct fk_moe_gate_params {
    const void *logits;       /* [T, E] router logits (bf16 or f32), row stride E */
    const float *bias;        /* [E] selection bias (fp32), or NULL */
    int32_t *ids;             /* [T, K] chosen experts, best first */
    float *weights;           /* [T, K] gate weights from the unbiased scores */
    int32_t *counts;          /* [E] tokens routed to each expert, added to (zeroed by the host unless accumulating) */
    int64_t n_tokens;
    int32_t n_experts;
    int32_t top_k;
    int32_t n_group;          /* 1: no group limit */
    int32_t topk_group;       /* groups kept */
    uint32_t score;           /* FK_MOE_SCORE_* */
    uint32_t renormalize;     /* weights /= their sum */
    float scaling;            /* routed scaling factor applied last */
} fk_moe_gate_params;

/* Bias update from device counts, MaxVio, and the running window. One block. */
typedef struct fk_moe_bias_update_params {
    int32_t *counts;          /* [E] this step's counts (summed over micro-batches / ranks by the caller) */
    float *bias;              /* [E] updated in place */
    float *maxvio_batch;      /* [1] (max_i c_i - mean) / mean for this step */
    int32_t *window;          /* [window_len, E] ring of past counts, or NULL */
    int64_t *window_sum;      /* [E] sum of the ring */
    int32_t *window_pos;      /* [1] next ring slot; also counts filled slots via window_fill */
    int32_t *window_fill;     /* [1] */
    float *maxvio_window;     /* [1] MaxVio of window_sum */
    int32_t n_experts;
    int32_t window_len;
    float rate;               /* u */
    uint32_t proportional;    /* 0: u sign(mean - c_i); 1: u (mean - c_i) / mean */
    uint32_t reset_counts;    /* zero counts after reading them */
} fk_moe_bias_update_params;

/* Permutation plan (counting sort of the T*K slots by expert, stable). */
typedef struct fk_moe_plan_params {
    const int32_t *ids;       /* [S] expert of each slot (S = T * K), slot s = t * K + k */
    int32_t *chunk_counts;    /* [n_chunks, E] */
    int32_t *offsets;         /* [E + 1] unpadded start of each expert */
    int32_t *padded_offsets;  /* [E + 1] start of each expert padded to block_size */
    int32_t *block_expert;    /* [max_blocks] expert of each block of block_size rows (-1 past the end) */
    int32_t *sorted_slots;    /* [max_rows] slot at each (padded) row, -1 for padding */
    int32_t *slot_row;        /* [S] row of each slot */
    int32_t *status;          /* [1] 0, or 1 + the first slot whose id is outside [0, E) */
    int64_t n_slots;
    int32_t n_experts;
    int32_t chunk;            /* slots per chunk */
    int32_t n_chunks;
    int32_t block_size;       /* 1: no padding */
    int64_t max_rows;
    int32_t max_blocks;
} fk_moe_plan_params;

/* Gather hidden rows into expert order: out[r] = hidden[sorted_slots[r] / K] (0 for padding). */
typedef struct fk_moe_gather_params {
    const void *hidden;       /* [T, H] */
    const int32_t *sorted_slots;
    void *out;                /* [rows, H] */
    int64_t rows;
    int64_t hidden_size;
    int32_t top_k;
} fk_moe_gather_params;

/* Weighted combine: out[t] = sum_k w[t,k] expert_out[slot_row[t*K+k]] in fp32, k in order. */
typedef struct fk_moe_combine_params {
    const void *expert_out;   /* [rows, H] */
    const float *weights;     /* [T, K] */
    const int32_t *slot_row;  /* [T * K] */
    void *out;                /* [T, H] */
    int64_t n_tokens;
    int64_t hidden_size;
    int32_t top_k;
} fk_moe_combine_params;

/* Expert-parallel dispatch counts: experts split evenly over ranks. */
typedef struct fk_moe_ep_params {
    const int32_t *ids;       /* [T, K] */
    uint8_t *membership;      /* [T, R]: 1 if token t sends to rank r */
    int32_t *tokens_per_rank; /* [R] distinct tokens sent to each rank (added to; zeroed by the host) */
    int64_t n_tokens;
    int32_t top_k;
    int32_t n_ranks;
    int32_t experts_per_rank;
} fk_moe_ep_params;

#define FK_MOE_PLAN_CHUNK 256
#define FK_MOE_ROW_THREADS 256

#endif
