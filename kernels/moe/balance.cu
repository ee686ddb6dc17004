// kernels/moe/balance.cu: auxiliary-loss-free bias update and load statistics, on the device.
//
// Computes, from this step's per-expert counts c (summed by the caller over micro-batches and ranks):
//   mean = sum c / E;  b_i += u sign(mean - c_i)   (or u (mean - c_i) / mean, proportional)
//   MaxVio_batch = (max_i c_i - mean) / mean;  optionally a ring of the last W steps' counts and the MaxVio
//   of their sum (MaxVio over a window); optionally zeroes c for the next step.
// One block of 1024 threads; E <= 1024. A few microseconds; no host round trip, CUDA-graph safe.
#include "fk_common.cuh"
#include "fk_row.cuh"
#include "moe_params.h"

struct fk_max_op {
    template <typename T>
    __device__ __forceinline__ T operator()(T a, T b) const { return a > b ? a : b; }
};
struct fk_add_op {
    template <typename T>
    __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};

extern "C" __global__ void __launch_bounds__(1024) fk_moe_bias_update(const fk_moe_bias_update_params p) {
    __shared__ double red[32];
    const int E = p.n_experts;
    const int i = threadIdx.x;
    const bool mine = i < E;
    const double c = mine ? (double)p.counts[i] : 0.0;
    const double total = fk_block_reduce(c, fk_add_op{}, 0.0, red);
    const double cmax = fk_block_reduce(mine ? c : -1.0, fk_max_op{}, -1.0, red);
    const double mean = total / E;
    if (mine) {
        float delta;
        if (p.proportional) {
            delta = mean > 0.0 ? (float)((mean - c) / mean) : 0.0f;
        } else {
            delta = c < mean ? 1.0f : (c > mean ? -1.0f : 0.0f);
        }
        p.bias[i] += p.rate * delta;
    }
    if (i == 0) *p.maxvio_batch = mean > 0.0 ? (float)((cmax - mean) / mean) : 0.0f;
    if (p.window) {
        const int pos = *p.window_pos;
        double w = 0.0;
        if (mine) {
            int32_t *slot = p.window + (int64_t)pos * E + i;
            p.window_sum[i] += (int64_t)p.counts[i] - *slot;
            *slot = p.counts[i];
            w = (double)p.window_sum[i];
        }
        const double wt = fk_block_reduce(w, fk_add_op{}, 0.0, red);
        const double wmax = fk_block_reduce(mine ? w : -1.0, fk_max_op{}, -1.0, red);
        const double wmean = wt / E;
        if (i == 0) {
            *p.maxvio_window = wmean > 0.0 ? (float)((wmax - wmean) / wmean) : 0.0f;
            *p.window_pos = (pos + 1) % p.window_len;
            *p.window_fill = min(*p.window_fill + 1, p.window_len);
        }
    }
    __syncthreads();  // every thread has read counts before any is zeroed
    if (mine && p.reset_counts) p.counts[i] = 0;
}
