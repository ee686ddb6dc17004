/* attention_params.h: launch parameters of the attention family (kernels/attention). Read by nvcc and
 * by bindgen. */
#ifndef FK_ATTENTION_PARAMS_H
#define FK_ATTENTION_PARAMS_H

#include <stdint.h>

/* Threads per decode CTA (4 warps) and per merge block. */
#define FK_ATTN_DECODE_THREADS 128
#define FK_ATTN_MERGE_THREADS 128
/* Query heads one decode CTA holds in registers (the GQA group, in chunks of this many). */
#define FK_ATTN_MAX_HEADS_PER_CTA 8

/* Split-KV decode over a paged cache: one CTA per (split, KV head x head chunk, sequence). Each writes
 * the fp32 partial state (o, lse) of its query heads over its split's tokens. */
typedef struct fk_attn_decode_params {
    const void *q;                /* [batch, num_qo_heads, head_dim] of T */
    const void *cache;            /* [num_pages][2][num_kv_heads][page_size][head_dim] of T */
    const int32_t *page_indptr;   /* [batch + 1] */
    const int32_t *page_indices;  /* [page_indptr[batch]] */
    const uint32_t *seq_lens;     /* [batch] */
    float *o_part;                /* [batch, num_qo_heads, n_splits, head_dim] */
    float *lse_part;              /* [batch, num_qo_heads, n_splits] (natural log) */
    unsigned long long *status;   /* [1], zeroed before launch: max over bad sequences of (batch - b) */
    int64_t num_pages;
    int64_t n_page_indices;       /* length of page_indices */
    int32_t batch;
    int32_t num_qo_heads;
    int32_t num_kv_heads;
    int32_t page_size;
    int32_t split_size;           /* tokens per split (fixed: results do not depend on the batch) */
    int32_t n_splits;             /* splits per sequence in the grid */
    int32_t window;               /* attend to the last `window` tokens; 0: all */
    float scale;                  /* score scale */
    float softcap;                /* 0: none */
} fk_attn_decode_params;

/* Merge of the split partials of each (sequence, query head) in split order: o (T) and lse (fp32). */
typedef struct fk_attn_merge_params {
    const float *o_part;          /* [rows, n_splits, head_dim] */
    const float *lse_part;        /* [rows, n_splits] */
    void *o;                      /* [rows, head_dim] of T */
    float *lse;                   /* [rows] */
    int64_t rows;                 /* batch * num_qo_heads */
    int32_t n_splits;
    int32_t head_dim;
} fk_attn_merge_params;

/* Causal prefill over a paged cache (kernels/attention/prefill.cu): one CTA of FK_ATTN_PREFILL_THREADS
 * threads per (tile of FK_ATTN_PREFILL_ROWS packed query rows, KV head, sequence). A packed row is
 * (new token, query head of the KV head's GQA group), so a K/V tile serves the whole group. K/V tiles
 * of FK_ATTN_PREFILL_KV_TILE_D<head_dim> tokens, two stages in dynamic shared memory. */
#define FK_ATTN_PREFILL_THREADS 128
#define FK_ATTN_PREFILL_ROWS 64
#define FK_ATTN_PREFILL_KV_TILE_D64 64
#define FK_ATTN_PREFILL_KV_TILE_D128 64
#define FK_ATTN_PREFILL_KV_TILE_D256 32

typedef struct fk_attn_prefill_params {
    const void *q;                /* [total_q, num_qo_heads, head_dim] of T */
    const void *cache;            /* [num_pages][2][num_kv_heads][page_size][head_dim] of T */
    const int32_t *page_indptr;   /* [batch + 1] */
    const int32_t *page_indices;  /* [page_indptr[batch]] */
    const uint32_t *seq_lens;     /* [batch]: tokens in the cache, the new ones included */
    const int32_t *qo_indptr;     /* [batch + 1]: sequence b's new tokens are rows qo_indptr[b] .. [b + 1] */
    void *o;                      /* [total_q, num_qo_heads, head_dim] of T */
    float *lse;                   /* [total_q, num_qo_heads] (natural log) */
    unsigned long long *status;   /* [1], zeroed before launch: max over bad sequences of (batch - b) */
    int64_t num_pages;
    int64_t n_page_indices;       /* length of page_indices */
    int64_t total_q;              /* rows of q and o (qo_indptr[batch] in the plan) */
    int32_t batch;
    int32_t num_qo_heads;
    int32_t num_kv_heads;
    int32_t page_size;
    int32_t window;               /* each query attends to the last `window` tokens up to itself; 0: all */
    float scale;                  /* score scale */
    float softcap;                /* 0: none */
} fk_attn_prefill_params;

#endif
