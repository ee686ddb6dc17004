// kernels/moe/permute.cu: the data movement around grouped expert GEMMs.
//
// plan (4 small kernels): a stable counting sort of the S = T K slots by expert: per-chunk histograms,
//   a per-expert scan over the chunks, a scan over the experts (offsets, optionally padded to block_size,
//   with the expert of each block), and a warp-synchronous scatter that keeps slot order within an expert
//   (__match_any_sync ranks).
//   Floor: read S ids twice, write S rows + S slot->row: ~16 S bytes, microseconds.
// gather:  out[r, :] = hidden[sorted_slots[r] / K, :] for r < total rows (0 for padding rows).
//   Floor: write rows H b, read T H b once (repeat reads of a token hit L2): (rows + T) H b bytes.
// combine: out[t, :] = sum_k w[t, k] expert_out[slot_row[t K + k], :], fp32 accumulation in k order.
//   Floor: read S H b, write T H b.
// ep_counts: per token the set of ranks its experts live on (membership) and distinct tokens per rank.
#include "fk_common.cuh"
#include "moe_params.h"

extern "C" __global__ void __launch_bounds__(256) fk_moe_plan_count(const fk_moe_plan_params p) {
    __shared__ int hist[FK_MOE_MAX_EXPERTS];
    const int E = p.n_experts;
    for (int e = threadIdx.x; e < E; e += blockDim.x) hist[e] = 0;
    __syncthreads();
    const int64_t s0 = (int64_t)blockIdx.x * p.chunk;
    const int64_t s1 = min(s0 + p.chunk, p.n_slots);
    for (int64_t s = s0 + threadIdx.x; s < s1; s += blockDim.x) {
        const int id = p.ids[s];
        if (id >= 0 && id < E) {
            atomicAdd(&hist[id], 1);
        } else {
            atomicMax(p.status, (int)(p.n_slots - s));
        }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x) p.chunk_counts[(int64_t)blockIdx.x * E + e] = hist[e];
}

// Exclusive scan of up to 1024 values held one per thread; returns the total to every thread.
__device__ __forceinline__ int fk_block_exclusive_scan(int v, int &total) {
    __shared__ int warp_sums[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int x = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(FK_FULL_MASK, x, o);
        if (lane >= o) x += y;
    }
    __syncthreads();
    if (lane == 31) warp_sums[warp] = x;
    __syncthreads();
    if (warp == 0) {
        int w = lane < (int)(blockDim.x >> 5) ? warp_sums[lane] : 0;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int y = __shfl_up_sync(FK_FULL_MASK, w, o);
            if (lane >= o) w += y;
        }
        warp_sums[lane] = w;
    }
    __syncthreads();
    total = warp_sums[(blockDim.x >> 5) - 1];
    return x - v + (warp > 0 ? warp_sums[warp - 1] : 0);
}

// Per expert, the exclusive prefix of its per-chunk counts over the chunks (in chunk order, which keeps
// the sort stable), in place, and the expert's total into offsets[e] (fk_moe_plan_scan turns the totals
// into offsets). Grid: ceil(E / 32) blocks of 1024 threads; lane l of every warp is expert 32 b + l (so a
// warp reads 128 contiguous bytes per chunk), warp w owns a contiguous segment of the chunks. Every load
// of a segment is independent, so a thread keeps several in flight: a T = 65536, K = 8 plan (2048 chunks)
// is 64 chunks per thread, not 2048 dependent round trips.
extern "C" __global__ void __launch_bounds__(1024) fk_moe_plan_scan_chunks(const fk_moe_plan_params p) {
    __shared__ int seg_base[32][33];
    constexpr int U = 8;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int E = p.n_experts, nc = p.n_chunks;
    const int e = blockIdx.x * 32 + lane;
    const int seg = (nc + 31) / 32;
    const int c0 = min(warp * seg, nc), c1 = min(c0 + seg, nc);
    int sum = 0;
    if (e < E) {
#pragma unroll U
        for (int c = c0; c < c1; ++c) sum += p.chunk_counts[(int64_t)c * E + e];
    }
    seg_base[warp][lane] = sum;
    __syncthreads();
    if (warp == 0) {
        int run = 0;
        for (int w = 0; w < 32; ++w) {
            const int t = seg_base[w][lane];
            seg_base[w][lane] = run;
            run += t;
        }
        if (e < E) p.offsets[e] = run;
    }
    __syncthreads();
    if (e < E) {
        int n = seg_base[warp][lane];
        for (int c = c0; c < c1; c += U) {
            int k[U];
#pragma unroll
            for (int u = 0; u < U; ++u) k[u] = c + u < c1 ? p.chunk_counts[(int64_t)(c + u) * E + e] : 0;
#pragma unroll
            for (int u = 0; u < U; ++u) {
                if (c + u < c1) {
                    p.chunk_counts[(int64_t)(c + u) * E + e] = n;
                    n += k[u];
                }
            }
        }
    }
}

// Offsets and padded offsets over the experts (one block, thread e = expert e), the padding rows of each
// expert, and the expert of every block of block_size rows: each expert's range of blocks written
// directly, the whole block striding over one expert's blocks at a time (coalesced stores, no search,
// and no thread walks a hot expert's blocks alone): E + blocks / blockDim iterations per thread.
extern "C" __global__ void __launch_bounds__(1024) fk_moe_plan_scan(const fk_moe_plan_params p) {
    __shared__ int s_bstart[FK_MOE_MAX_EXPERTS + 1];  // first block of each expert; [E]: blocks in use
    const int E = p.n_experts, e = threadIdx.x, bs = p.block_size;
    const int n = e < E ? p.offsets[e] : 0;  // the expert's total, from fk_moe_plan_scan_chunks
    int total, ptotal;
    const int off = fk_block_exclusive_scan(n, total);
    const int padded = (n + bs - 1) / bs * bs;
    const int poff = fk_block_exclusive_scan(padded, ptotal);
    if (e < E) {
        p.offsets[e] = off;
        p.padded_offsets[e] = poff;
        s_bstart[e] = poff / bs;
        for (int r = poff + n; r < poff + padded; ++r) p.sorted_slots[r] = -1;
    }
    const int used = ptotal / bs;  // ptotal is a multiple of bs
    if (e == 0) {
        p.offsets[E] = total;
        p.padded_offsets[E] = ptotal;
        s_bstart[E] = used;
    }
    __syncthreads();
    const int nb = p.max_blocks;
    int b0 = s_bstart[0];
    for (int x = 0; x < E; ++x) {
        const int b1 = s_bstart[x + 1];
        for (int b = b0 + e; b < min(b1, nb); b += blockDim.x) p.block_expert[b] = x;
        b0 = b1;
    }
    for (int b = used + e; b < nb; b += blockDim.x) p.block_expert[b] = -1;
    for (int64_t r = ptotal + e; r < p.max_rows; r += blockDim.x) p.sorted_slots[r] = -1;
}

// One warp per chunk: slots in order, ranks among equal experts by __match_any_sync.
extern "C" __global__ void __launch_bounds__(32) fk_moe_plan_scatter(const fk_moe_plan_params p) {
    __shared__ int base[FK_MOE_MAX_EXPERTS];
    const int E = p.n_experts, lane = threadIdx.x;
    const int64_t s0 = (int64_t)blockIdx.x * p.chunk;
    const int64_t s1 = min(s0 + p.chunk, p.n_slots);
    for (int e = lane; e < E; e += 32) base[e] = p.padded_offsets[e] + p.chunk_counts[(int64_t)blockIdx.x * E + e];
    __syncwarp();
    for (int64_t s = s0; s < s1; s += 32) {
        const int64_t my = s + lane;
        const bool live = my < s1;
        int id = live ? p.ids[my] : -2;
        if (live && (id < 0 || id >= E)) id = -1;
        const unsigned peers = __match_any_sync(FK_FULL_MASK, id);
        const int rank = __popc(peers & ((1u << lane) - 1u));
        if (id >= 0) {
            const int row = base[id] + rank;
            p.sorted_slots[row] = (int)my;
            p.slot_row[my] = row;
        } else if (live) {
            p.slot_row[my] = -1;
        }
        __syncwarp();
        if (id >= 0 && rank == 0) base[id] += __popc(peers);
        __syncwarp();
    }
}

template <typename T>
__device__ __forceinline__ void moe_gather(const fk_moe_gather_params &p, const int32_t *total_rows) {
    const int64_t rows = min((int64_t)*total_rows, p.rows);
    const int64_t H = p.hidden_size;
    const bool vec = (H * (int64_t)sizeof(T)) % 16 == 0 && ((((uint64_t)p.hidden) | ((uint64_t)p.out)) & 15u) == 0;
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const int slot = p.sorted_slots[r];
        T *dst = reinterpret_cast<T *>(p.out) + r * H;
        if (vec) {
            uint4 *d = reinterpret_cast<uint4 *>(dst);
            const int64_t nv = H * (int64_t)sizeof(T) / 16;
            if (slot < 0) {
                for (int64_t i = threadIdx.x; i < nv; i += blockDim.x) d[i] = make_uint4(0, 0, 0, 0);
            } else {
                const uint4 *src = reinterpret_cast<const uint4 *>(reinterpret_cast<const T *>(p.hidden) + (int64_t)(slot / p.top_k) * H);
                for (int64_t i = threadIdx.x; i < nv; i += blockDim.x) d[i] = src[i];
            }
        } else {
            const T *src = slot < 0 ? nullptr : reinterpret_cast<const T *>(p.hidden) + (int64_t)(slot / p.top_k) * H;
            for (int64_t i = threadIdx.x; i < H; i += blockDim.x) dst[i] = src ? src[i] : fk_from_f32<T>(0.0f);
        }
    }
}

template <typename T>
__device__ __forceinline__ void moe_combine(const fk_moe_combine_params &p) {
    using V = fk_vec16<T>;
    constexpr int N = V::N;
    // The token's K rows and weights, read once per block into shared memory: the loop below then issues
    // only the expert-output loads (independent across k, unrolled so several are in flight), not a
    // dependent slot_row -> row chain per k and per thread. K <= FK_MOE_MAX_TOPK <= blockDim.x.
    __shared__ int s_row[FK_MOE_MAX_TOPK];
    __shared__ float s_w[FK_MOE_MAX_TOPK];
    const int64_t H = p.hidden_size;
    const int K = p.top_k;
    const T *xo = reinterpret_cast<const T *>(p.expert_out);
    const bool vec = H % N == 0 && ((((uint64_t)p.expert_out) | ((uint64_t)p.out)) & 15u) == 0;
    for (int64_t t = blockIdx.x; t < p.n_tokens; t += gridDim.x) {
        __syncthreads();  // the previous token's s_row / s_w are no longer read
        if (threadIdx.x < K) {
            s_row[threadIdx.x] = p.slot_row[t * K + threadIdx.x];
            s_w[threadIdx.x] = p.weights[t * K + threadIdx.x];
        }
        __syncthreads();
        T *dst = reinterpret_cast<T *>(p.out) + t * H;
        if (vec) {
            for (int64_t i = threadIdx.x; i < H / N; i += blockDim.x) {
                float acc[N];
#pragma unroll
                for (int q = 0; q < N; ++q) acc[q] = 0.0f;
#pragma unroll 4
                for (int k = 0; k < K; ++k) {
                    const int row = s_row[k];
                    if (row < 0) continue;
                    const float w = s_w[k];
                    const V x = reinterpret_cast<const V *>(xo + (int64_t)row * H)[i];
#pragma unroll
                    for (int q = 0; q < N; ++q) acc[q] = fmaf(w, fk_to_f32(x.v[q]), acc[q]);
                }
                V y;
#pragma unroll
                for (int q = 0; q < N; ++q) y.v[q] = fk_from_f32<T>(acc[q]);
                reinterpret_cast<V *>(dst)[i] = y;
            }
        } else {
            for (int64_t i = threadIdx.x; i < H; i += blockDim.x) {
                float acc = 0.0f;
#pragma unroll 4
                for (int k = 0; k < K; ++k) {
                    const int row = s_row[k];
                    if (row < 0) continue;
                    acc = fmaf(s_w[k], fk_to_f32(xo[(int64_t)row * H + i]), acc);
                }
                dst[i] = fk_from_f32<T>(acc);
            }
        }
    }
}

#define FK_MOVE_ENTRIES(TN, T)                                                                               \
    extern "C" __global__ void __launch_bounds__(FK_MOE_ROW_THREADS)                                         \
        fk_moe_gather_##TN(const fk_moe_gather_params p, const int32_t *total_rows) { moe_gather<T>(p, total_rows); } \
    extern "C" __global__ void __launch_bounds__(FK_MOE_ROW_THREADS)                                         \
        fk_moe_combine_##TN(const fk_moe_combine_params p) { moe_combine<T>(p); }
FK_MOVE_ENTRIES(f32, float)
FK_MOVE_ENTRIES(f16, __half)
FK_MOVE_ENTRIES(bf16, __nv_bfloat16)

extern "C" __global__ void __launch_bounds__(256) fk_moe_ep_counts(const fk_moe_ep_params p) {
    __shared__ int tpr[FK_MOE_MAX_EXPERTS];
    const int R = p.n_ranks, K = p.top_k;
    for (int r = threadIdx.x; r < R; r += blockDim.x) tpr[r] = 0;
    __syncthreads();
    for (int64_t t = fk_global_thread(); t < p.n_tokens; t += fk_grid_threads()) {
        uint8_t *m = p.membership + t * R;
        for (int r = 0; r < R; ++r) m[r] = 0;
        for (int k = 0; k < K; ++k) {
            const int id = p.ids[t * K + k];
            if (id < 0 || id >= R * p.experts_per_rank) continue;
            const int r = id / p.experts_per_rank;
            if (!m[r]) {
                m[r] = 1;
                atomicAdd(&tpr[r], 1);
            }
        }
    }
    __syncthreads();
    for (int r = threadIdx.x; r < R; r += blockDim.x)
        if (tpr[r]) atomicAdd(&p.tokens_per_rank[r], tpr[r]);
}
