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
    /* Quantised (KIVI int8/int4) caches only; zero otherwise. `cache` is then bytes: a page is
     * [K codes][V codes][K params][V params] (PagedKvLayout::code_offset and friends). */
    const void *residual;         /* [n_slots][2][num_kv_heads][group][head_dim] of T: newest tokens */
    const int32_t *residual_slots; /* [batch] */
    int64_t page_bytes;
    int64_t v_codes_start;        /* byte offsets within a page */
    int64_t k_params_start;
    int64_t v_params_start;
    int32_t n_slots;              /* residual slots */
    int32_t group;                /* tokens per K group (per channel) */
    int32_t v_group;              /* channels per V group (per token) */
    int32_t k_param_slots;        /* K parameter slots per page and head: ceil(page_size / group) */
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

/* Append of new tokens' K and V to a paged cache (sequence b's new tokens are rows
 * append_indptr[b] .. append_indptr[b + 1] of k_new / v_new; seq_lens are the lengths after the append,
 * so the new tokens take positions seq_lens[b] - n_b .. seq_lens[b]). bf16/f16 caches: written into the
 * pages. Quantised caches: token groups the append completes are quantised into the pages (one CTA per
 * group, head and sequence), then the new tokens past the last complete group go to the residual. */
#define FK_ATTN_APPEND_THREADS 128
typedef struct fk_attn_append_params {
    const void *k_new;            /* [n_new, num_kv_heads, head_dim] of T */
    const void *v_new;            /* [n_new, num_kv_heads, head_dim] of T */
    const int32_t *append_indptr; /* [batch + 1] */
    void *cache;                  /* T elements (bf16/f16) or the bytes of a quantised cache */
    void *residual;               /* quantised: [n_slots][2][num_kv_heads][group][head_dim] of T */
    const int32_t *residual_slots; /* quantised: [batch] */
    const int32_t *page_indptr;   /* [batch + 1] */
    const int32_t *page_indices;  /* [page_indptr[batch]] */
    const uint32_t *seq_lens;     /* [batch], after the append */
    unsigned long long *status;   /* [1], zeroed before launch: max over bad sequences of (batch - b) */
    int64_t num_pages;
    int64_t n_page_indices;
    int64_t n_new;                /* rows of k_new / v_new */
    int64_t page_bytes;           /* quantised: bytes per page, and the sections' offsets in a page */
    int64_t v_codes_start;
    int64_t k_params_start;
    int64_t v_params_start;
    int32_t batch;
    int32_t num_kv_heads;
    int32_t page_size;
    int32_t n_slots;
    int32_t group;
    int32_t v_group;
    int32_t k_param_slots;
    int32_t to_residual;          /* the copy kernel: 1 = new tokens past the last complete group into the
                                     residual (quantised caches); 0 = every new token into the pages */
} fk_attn_append_params;

#endif
