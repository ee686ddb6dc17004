// kernels/probe/copy.cu: device-bandwidth probe.
//
// Computes: dst[i] = src[i] for i < n_bytes.
// Floor: 2 * n_bytes of HBM traffic (read src once, write dst once); the measured time of this kernel on a
// buffer far above L2 *is* the copy ceiling every memory-bound family is compared against.
// Launch: FK_COPY_THREADS threads per block, a grid of a few waves (host side); each thread keeps
// FK_COPY_UNROLL independent 16-byte loads in flight before the first store.
#include "fk_common.cuh"
#include "probe_params.h"

extern "C" __global__ void __launch_bounds__(FK_COPY_THREADS) fk_copy_v16(const fk_copy_params p) {
    const uint4 *__restrict__ src = (const uint4 *)p.src;
    uint4 *__restrict__ dst = (uint4 *)p.dst;
    const uint64_t n_vec = p.n_bytes / 16;
    const uint64_t stride = fk_grid_threads();
    uint64_t i = fk_global_thread();

    // Main body: UNROLL vectors per thread per trip, strided by the grid so each load is coalesced.
    for (; i + (FK_COPY_UNROLL - 1) * stride < n_vec; i += FK_COPY_UNROLL * stride) {
        uint4 r[FK_COPY_UNROLL];
#pragma unroll
        for (int u = 0; u < FK_COPY_UNROLL; ++u) r[u] = fk_ld_stream(src + i + u * stride);
#pragma unroll
        for (int u = 0; u < FK_COPY_UNROLL; ++u) fk_st_stream(dst + i + u * stride, r[u]);
    }
    for (; i < n_vec; i += stride) fk_st_stream(dst + i, fk_ld_stream(src + i));

    // Tail: fewer than 16 bytes, copied byte by byte by the first threads.
    const uint64_t tail = p.n_bytes - n_vec * 16;
    const uint64_t t = fk_global_thread();
    if (t < tail) {
        ((unsigned char *)p.dst)[n_vec * 16 + t] = ((const unsigned char *)p.src)[n_vec * 16 + t];
    }
}
