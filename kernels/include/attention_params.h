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
    float *o_part;                /* [batch, num_qo_heads, splits_per_row, head_dim] */
    float *lse_part;              /* [batch, num_qo_heads, splits_per_row] (natural log) */
    unsigned long long *status;   /* [1], zeroed before launch: max over bad sequences of (batch - b) */
    int64_t num_pages;
    int64_t n_page_indices;       /* length of page_indices */
    int32_t batch;
    int32_t num_qo_heads;
    int32_t num_kv_heads;
    int32_t page_size;
    int32_t split_size;           /* tokens per split (fixed: results do not depend on the batch) */
    int32_t n_splits;             /* splits per sequence in the grid */
    int32_t split_base;           /* this launch's splits are partials split_base .. + n_splits of a row */
    int32_t splits_per_row;       /* partials per row in o_part / lse_part (>= split_base + n_splits) */
    int32_t allow_empty;          /* 1: a sequence may hold 0 tokens (its partials are empty states) */
    /* Values: page p's V of KV head h, slot s at v_cache + p * v_page_stride + v_start + (h * page_size +
     * s) * row, row = head_dim elements (bf16/f16) or code bytes (quantised). The cache's own V half:
     * v_cache = cache, v_page_stride = the page, v_start = the K half. A V pool (inter-layer sharing, the
     * values of distant tokens whose keys another layer's cache holds): v_start = 0, v_page_stride =
     * num_kv_heads * page_size * row (+ the V parameters, quantised). Pages index both alike. */
    const void *v_cache;
    int64_t v_page_stride;        /* elements (bf16/f16) or bytes (quantised) */
    int64_t v_start;
    int32_t window;               /* attend to the last `window` tokens; 0: all */
    float scale;                  /* score scale */
    float softcap;                /* 0: none */
    /* Quantised (KIVI int8/int4) caches only; zero otherwise. `cache` is then bytes: a page is
     * [K codes][V codes][K params][V params] (PagedKvLayout::code_offset and friends). */
    const void *residual;         /* [n_slots][2][num_kv_heads][group][head_dim] of T: newest tokens */
    const int32_t *residual_slots; /* [batch]; null: no residual (every sequence whole groups, else bad) */
    int64_t page_bytes;
    int64_t k_params_start;       /* byte offset within a page */
    int64_t v_params_start;       /* byte offset within a V page (v_cache + p * v_page_stride) */
    int32_t n_slots;              /* residual slots */
    int32_t group;                /* tokens per K group (per channel) */
    int32_t v_group;              /* channels per V group (per token) */
    int32_t k_param_slots;        /* K parameter slots per page and head: ceil(page_size / group) */
    /* RoPE (fk_rope.cuh): rope_q rotates q at position len - 1, rope_k each key at its index. */
    float rope_log2_theta;
    int32_t rope_style;           /* 0: half (rotate_half), 1: interleaved pairs */
    int32_t rope_q;
    int32_t rope_k;
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
    /* RoPE at append (fk_rope.cuh): rope_k rotates each new key at its position before it is stored. */
    float rope_log2_theta;
    int32_t rope_style;
    int32_t rope_k;
} fk_attn_append_params;
/* Copy of the values of pages into a V pool (inter-layer sharing): entry i copies the run_bytes at
 * src + src_pages[i] * src_page_stride + src_start to dst + dst_pages[i] * dst_page_stride + dst_start.
 * One CTA per entry (grid-stride), 16-byte copies. An entry whose page is out of range copies nothing
 * and is recorded in the status word. */
#define FK_ATTN_COPY_THREADS 128
typedef struct fk_attn_copy_values_params {
    const void *src;
    void *dst;
    const int32_t *src_pages;     /* [n] */
    const int32_t *dst_pages;     /* [n] */
    unsigned long long *status;   /* [1], zeroed before launch: max over bad entries of (n - i) */
    int64_t n;
    int64_t src_num_pages;
    int64_t dst_num_pages;
    int64_t src_page_stride;      /* bytes */
    int64_t src_start;
    int64_t dst_page_stride;
    int64_t dst_start;
    int64_t run_bytes;            /* a multiple of 16; src, dst, strides and starts 16-byte aligned */
} fk_attn_copy_values_params;

/* Causal prefill over a paged cache (kernels/attention/prefill.cu): one CTA of FK_ATTN_PREFILL_THREADS
 * threads per (tile of FK_ATTN_PREFILL_ROWS packed query rows, KV head, sequence). A packed row is
 * (new token, query head of the KV head's GQA group), so a K/V tile serves the whole group. K/V tiles
 * of FK_ATTN_PREFILL_KV_TILE_D<head_dim> tokens, two stages in dynamic shared memory. */
#define FK_ATTN_PREFILL_THREADS 128
#define FK_ATTN_PREFILL_ROWS 64
#define FK_ATTN_PREFILL_KV_TILE_D64 64
#define FK_ATTN_PREFILL_KV_TILE_D128 64
#define FK_ATTN_PREFILL_KV_TILE_D256 32
/* Over a quantised cache the K/V tiles are one stage of T (dequantised from two stages of codes): head
 * dim 256 takes tiles of 16 tokens to stay within 99 KiB of shared memory. */
#define FK_ATTN_PREFILL_KV_TILE_Q_D256 16

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
    /* RoPE (fk_rope.cuh): rope_q rotates each new token's query at its position, rope_k each key at its
     * index in the cache (keys cached before RoPE); both in shared memory, rounded to T. */
    float rope_log2_theta;
    int32_t rope_style;           /* 0: half (rotate_half), 1: interleaved pairs */
    int32_t rope_q;
    int32_t rope_k;
    /* Quantised (KIVI int8/int4) caches only (fk_attn_prefill_q*); zero otherwise. `cache` is then bytes,
     * as for decode: a page is [K codes][V codes][K params][V params], and each sequence's newest
     * len % group tokens are in its residual slot. */
    const void *residual;         /* [n_slots][2][num_kv_heads][group][head_dim] of T */
    const int32_t *residual_slots; /* [batch] */
    int64_t page_bytes;
    int64_t v_codes_start;        /* byte offsets within a page */
    int64_t k_params_start;
    int64_t v_params_start;
    int32_t n_slots;
    int32_t group;                /* tokens per K group (per channel) */
    int32_t v_group;              /* channels per V group (per token) */
    int32_t k_param_slots;        /* ceil(page_size / group) */
} fk_attn_prefill_params;

#endif
