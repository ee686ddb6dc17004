/* loss_params.h: launch parameters of the fused-loss family (kernels/loss). Read by nvcc and by bindgen. */
#ifndef FK_LOSS_PARAMS_H
#define FK_LOSS_PARAMS_H

#include <stdint.h>

/* Row losses of the comp-sum template: each is a function of (lse, z_y, sum_j w_j z_j), so its gradient
 * is a*p_j + b*[j == y] + c*w_j with per-row scalars a, b, c (fk_loss_math.h). */
#define FK_LOSS_CE 0u          /* cross-entropy, with label smoothing, class weights, z-loss */
#define FK_LOSS_FOCAL 1u       /* softmax focal: -alpha_y (1-p_y)^gamma log p_y */
#define FK_LOSS_POLY1 2u       /* Poly-1: CE + eps (1 - p_y) */
#define FK_LOSS_POLY1_FOCAL 3u /* focal + eps (1 - p_y)^(gamma+1) */
#define FK_LOSS_GCE 4u         /* generalised CE: (1 - p_y^q) / q */

#define FK_REDUCTION_NONE 0u
#define FK_REDUCTION_MEAN 1u
#define FK_REDUCTION_SUM 2u

/* The maths of one row loss; shared by every kernel of the family and by the host tests. */
typedef struct fk_loss_config {
    uint32_t kind;       /* FK_LOSS_* */
    uint32_t has_weights; /* class weights given (CE: PyTorch `weight`; focal family: alpha per class) */
    float smoothing;     /* label smoothing eps, PyTorch form (the host rescales for the Megatron form) */
    float z_loss;        /* z-loss scale s: adds s * lse^2 */
    float softcap;       /* logit softcap c (0 = off): z = c tanh(x / c) */
    float gamma;         /* focal gamma */
    float poly_eps;      /* Poly-1 epsilon */
    float gce_q;         /* GCE q in (0, 1] */
    float weight_sum;    /* sum_j w_j over the whole vocabulary (V without weights) */
    float vocab;         /* V (the whole vocabulary, also for shards) */
} fk_loss_config;

/* Fused forward + backward over logits [n_rows, vocab] (row stride in elements), one block per row. */
typedef struct fk_ce_params {
    const void *logits;       /* [n_rows, row_stride] of T */
    void *grad;               /* [n_rows, grad_stride] of T; may equal logits (in place); NULL: forward only */
    const void *targets;      /* [n_rows] int32 or int64 */
    const float *weights;     /* [vocab] or NULL */
    const float *grad_output; /* NULL (1), [1] for mean/sum, [n_rows] for none */
    const float *denominator; /* [1] for mean (from fk_loss_denominator), else NULL */
    float *loss;              /* [n_rows] per-row loss (unreduced, unscaled) */
    float *lse;               /* [n_rows] log-sum-exp of the (softcapped) logits; 0 for ignored rows */
    unsigned long long *status; /* [1], zeroed before launch: max over bad rows of (n_rows - row) */
    int64_t n_rows;
    int64_t vocab;
    int64_t row_stride;
    int64_t grad_stride;
    int64_t ignore_index;
    uint32_t reduction;       /* FK_REDUCTION_* */
    uint32_t cache_row;       /* 1: keep the row in shared memory between the passes (single HBM read) */
    int64_t slice;            /* cluster kernels: elements per CTA (a multiple of 8); 0 otherwise */
    fk_loss_config cfg;
} fk_ce_params;

/* Cluster sizes of the fk_ce_fwd_bwd_cluster kernels (sm_90+): a row split over FK_CE_CLUSTER_* CTAs. */
#define FK_CE_CLUSTER_MAX 8

/* sum over non-ignored rows of w_{y_i} (1 without weights): the mean's denominator. One block. */
typedef struct fk_loss_denominator_params {
    const void *targets;
    const float *weights;
    float *denominator;       /* [1] */
    int64_t n_rows;
    int64_t vocab;
    int64_t ignore_index;
} fk_loss_denominator_params;

/* Deterministic fixed-order sum of per-row (or per-element) losses into one scalar, divided by
 * *denominator (mean: D = 0 gives 0, or NaN if a value is NaN) or not (sum). One block. */
typedef struct fk_loss_reduce_params {
    const float *values;
    const float *denominator; /* NULL: plain sum */
    float *out;               /* [1] */
    int64_t n;
} fk_loss_reduce_params;

/* Vocabulary shard statistics of one row: combined across shards by fk_ce_shard_combine. */
typedef struct fk_shard_stat {
    float max;          /* max of the shard's (softcapped) logits */
    float sumexp;       /* sum exp(z - max) over the shard */
    float target_logit; /* z_y if the target lies in this shard, else 0 */
    float sum_wz;       /* sum_j w_j z_j over the shard (label smoothing), else 0 */
} fk_shard_stat;

/* Per-row gradient coefficients: grad_j = scale * (a p_j + b [j == y] + c w_j) (* softcap chain). */
typedef struct fk_row_coeffs {
    float a;
    float b;
    float c;
    float scale;
} fk_row_coeffs;

typedef struct fk_ce_shard_stats_params {
    const void *logits;       /* [n_rows, row_stride] shard of T */
    const void *targets;      /* global class ids */
    const float *weights;     /* [vocab] global weights or NULL */
    fk_shard_stat *stats;     /* [n_rows] */
    unsigned long long *status;
    int64_t n_rows;
    int64_t shard_vocab;
    int64_t vocab_offset;
    int64_t row_stride;
    int64_t ignore_index;
    fk_loss_config cfg;
} fk_ce_shard_stats_params;

typedef struct fk_ce_shard_combine_params {
    const fk_shard_stat *stats; /* [n_shards, n_rows] */
    const void *targets;
    const float *weights;
    const float *grad_output;
    const float *denominator;
    float *loss;
    float *lse;
    fk_row_coeffs *coeffs;      /* [n_rows] */
    unsigned long long *status;
    int64_t n_rows;
    int64_t n_shards;
    int64_t vocab;
    int64_t ignore_index;
    uint32_t reduction;
    fk_loss_config cfg;
} fk_ce_shard_combine_params;

typedef struct fk_ce_shard_bwd_params {
    const void *logits;       /* [n_rows, row_stride] shard */
    void *grad;               /* [n_rows, grad_stride] shard; may equal logits */
    const void *targets;
    const float *weights;
    const float *lse;         /* global lse */
    const fk_row_coeffs *coeffs;
    int64_t n_rows;
    int64_t shard_vocab;
    int64_t vocab_offset;
    int64_t row_stride;
    int64_t grad_stride;
    int64_t ignore_index;
    fk_loss_config cfg;
} fk_ce_shard_bwd_params;

/* Sigmoid focal loss (torchvision semantics), elementwise over n elements, forward + backward. */
typedef struct fk_sigmoid_focal_params {
    const void *logits;       /* [n] of T */
    const void *targets;      /* [n] of T, values in [0, 1] */
    void *grad;               /* [n] of T or NULL */
    float *loss;              /* [n] per-element loss (reduction none) or NULL */
    float *block_sums;        /* [gridDim.x] per-block partial sums (mean/sum), or NULL */
    const float *grad_output; /* NULL (1), [1] for mean/sum, [n] for none */
    int64_t n;
    float alpha;              /* < 0: no alpha weighting */
    float gamma;
    float grad_scale;         /* 1/n for mean, 1 otherwise (times grad_output) */
    uint32_t reduction;
} fk_sigmoid_focal_params;

#define FK_LOSS_REDUCE_THREADS 1024
/* Largest block of the row kernels (the host picks a power of two in [64, FK_CE_MAX_THREADS] from V). */
#define FK_CE_MAX_THREADS 512
#define FK_SIGMOID_FOCAL_THREADS 256

#endif
