// kernels/selftest/conformance.cu: the constructs the SIMT emulator models, exercised on raw inputs so
// that the same expectations (written in Rust from the PTX ISA and the CUDA programming guide, in
// src/selftest/reference.rs) check the emulator and, on a GPU, the hardware. Not performance code.
#include "fk_mma.cuh"
#include "selftest_params.h"

extern "C" __global__ void __launch_bounds__(32) fk_selftest_mma(const fk_selftest_mma_params p) {
    const int l = threadIdx.x;
    uint32_t a[4], b[2], c[4], d[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) a[i] = p.a[l * 4 + i];
#pragma unroll
    for (int i = 0; i < 2; ++i) b[i] = p.b[l * 2 + i];
#pragma unroll
    for (int i = 0; i < 4; ++i) c[i] = p.c[l * 4 + i];
    if (p.op == FK_SELFTEST_MMA_M16N8K16_BF16 || p.op == FK_SELFTEST_MMA_M16N8K16_F16 ||
        p.op == FK_SELFTEST_MMA_M16N8K32_E4M3) {
        float cf[4], df[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) cf[i] = __uint_as_float(c[i]);
        if (p.op == FK_SELFTEST_MMA_M16N8K16_BF16) {
            fk_mma_m16n8k16_bf16(df, a, b, cf);
        } else if (p.op == FK_SELFTEST_MMA_M16N8K16_F16) {
            fk_mma_m16n8k16_f16(df, a, b, cf);
        } else {
            fk_mma_m16n8k32_e4m3(df, a, b, cf);
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) d[i] = __float_as_uint(df[i]);
    } else {
        int32_t ci[4], di[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) ci[i] = (int32_t)c[i];
        if (p.op == FK_SELFTEST_MMA_M16N8K32_S8) {
            fk_mma_m16n8k32_s8(di, a, b, ci);
        } else {
            fk_mma_m16n8k64_s4(di, a, b, ci);
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) d[i] = (uint32_t)di[i];
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) p.d[l * 4 + i] = d[i];
}

extern "C" __global__ void __launch_bounds__(32) fk_selftest_ldmatrix(const fk_selftest_ldmatrix_params p) {
    __shared__ __align__(16) uint16_t tile[32 * 8];
    const int l = threadIdx.x;
    for (int i = l; i < 32 * 8; i += 32) tile[i] = p.tile[i];
    __syncwarp();
    const void *row = &tile[(p.row_of_lane[l] & 31u) * 8];
    uint32_t r[4] = {0, 0, 0, 0};
    switch (p.variant) {
    case FK_SELFTEST_LDMATRIX_X1: {
        uint32_t x[1];
        fk_ldmatrix_x1(x, row);
        r[0] = x[0];
        break;
    }
    case FK_SELFTEST_LDMATRIX_X2: {
        uint32_t x[2];
        fk_ldmatrix_x2(x, row);
        r[0] = x[0];
        r[1] = x[1];
        break;
    }
    case FK_SELFTEST_LDMATRIX_X4: fk_ldmatrix_x4(r, row); break;
    case FK_SELFTEST_LDMATRIX_X1_TRANS: {
        uint32_t x[1];
        fk_ldmatrix_x1_trans(x, row);
        r[0] = x[0];
        break;
    }
    case FK_SELFTEST_LDMATRIX_X2_TRANS: {
        uint32_t x[2];
        fk_ldmatrix_x2_trans(x, row);
        r[0] = x[0];
        r[1] = x[1];
        break;
    }
    default: fk_ldmatrix_x4_trans(r, row); break;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) p.out[l * 4 + i] = r[i];
}

extern "C" __global__ void __launch_bounds__(32) fk_selftest_warp(const fk_selftest_warp_params p) {
    const unsigned l = threadIdx.x;
    const uint32_t v = p.values[l];
    for (uint32_t k = 0; k < p.n_cases; ++k) {
        const fk_selftest_warp_case c = p.cases[k];
        uint32_t r = 0xffffffffu;
        if ((c.mask >> l) & 1u) {
            switch (c.op) {
            case FK_SELFTEST_WARP_SHFL_IDX: r = __shfl_sync(c.mask, v, c.arg, c.width); break;
            case FK_SELFTEST_WARP_SHFL_UP: r = __shfl_up_sync(c.mask, v, (unsigned)c.arg, c.width); break;
            case FK_SELFTEST_WARP_SHFL_DOWN: r = __shfl_down_sync(c.mask, v, (unsigned)c.arg, c.width); break;
            case FK_SELFTEST_WARP_SHFL_XOR: r = __shfl_xor_sync(c.mask, v, c.arg, c.width); break;
            case FK_SELFTEST_WARP_BALLOT: r = __ballot_sync(c.mask, v & 1u); break;
            case FK_SELFTEST_WARP_ANY: r = (uint32_t)__any_sync(c.mask, v & 1u); break;
            case FK_SELFTEST_WARP_ALL: r = (uint32_t)__all_sync(c.mask, v & 1u); break;
            case FK_SELFTEST_WARP_MATCH_ANY: r = __match_any_sync(c.mask, v & 7u); break;
            case FK_SELFTEST_WARP_REDUCE_ADD: r = __reduce_add_sync(c.mask, v); break;
            case FK_SELFTEST_WARP_REDUCE_MIN: r = (uint32_t)__reduce_min_sync(c.mask, (int)v); break;
            default: r = (uint32_t)__reduce_max_sync(c.mask, (int)v); break;
            }
        }
        p.out[k * 32 + l] = r;
        __syncwarp();
    }
}

extern "C" __global__ void __launch_bounds__(FK_SELFTEST_CP_THREADS)
    fk_selftest_cp_async(const fk_selftest_cp_async_params p) {
    constexpr int S = 3, T = FK_SELFTEST_CP_THREADS;
    __shared__ __align__(16) uint32_t ring[S][T * 4];
    const int l = threadIdx.x;
    const int64_t per_stage = T * 4;
    const int64_t stages = (p.n + per_stage - 1) / per_stage;
    // Issue stage s into ring slot s % S: 16 bytes per thread, zero-filled past n.
    auto issue = [&](int64_t s) {
        const int64_t e = s * per_stage + l * 4;
        const int64_t left = p.n - e;
        const uint32_t bytes = left >= 4 ? 16u : (left > 0 ? (uint32_t)left * 4u : 0u);
        fk_cp_async_16(&ring[s % S][l * 4], bytes ? (const void *)(p.src + e) : (const void *)p.src, bytes);
        fk_cp_async_commit();
    };
    for (int64_t s = 0; s < S - 1; ++s) {
        if (s < stages) issue(s);
        else fk_cp_async_commit();
    }
    for (int64_t s = 0; s < stages; ++s) {
        fk_cp_async_wait<S - 2>();  // stage s has landed (at most one younger group in flight)
        __syncthreads();
        // Each thread reads another thread's vector: the barrier after the wait is what makes it visible.
        const int src_l = (l + 1) % T;
        for (int k = 0; k < 4; ++k) {
            const int64_t e = s * per_stage + src_l * 4 + k;
            if (e < p.n) p.out[e] = ring[s % S][src_l * 4 + k];
        }
        __syncthreads();  // slot (s % S) is reused by stage s + S
        if (s + S - 1 < stages) issue(s + S - 1);
        else fk_cp_async_commit();
    }
}

extern "C" __global__ void __launch_bounds__(64) fk_selftest_block(const fk_selftest_block_params p) {
    __shared__ uint32_t s_sum;
    __shared__ uint32_t s_max;
    const uint32_t bflat = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const uint32_t tflat = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const uint32_t nthreads = blockDim.x * blockDim.y * blockDim.z;
    const uint32_t gid = bflat * nthreads + tflat;
    if (tflat == 0) {
        s_sum = 0;
        s_max = 0;
    }
    __syncthreads();
    const int pred = (gid % p.pred_mod) == 0;
    const int count = __syncthreads_count(pred);
    const int all = __syncthreads_and(pred);
    const int any = __syncthreads_or(pred);
    atomicAdd(&s_sum, tflat + 1);
    atomicMax(&s_max, gid);
    __syncthreads();
    p.out_ids[gid * 4 + 0] = bflat;
    p.out_ids[gid * 4 + 1] = tflat;
    p.out_ids[gid * 4 + 2] = (uint32_t)count;
    p.out_ids[gid * 4 + 3] = (uint32_t)all | ((uint32_t)any << 1);
    if (tflat == 0) p.shared_sums[bflat] = s_sum + 1000000u * (s_max % 1000u);
    atomicAdd(&p.global_counters[0], 1u);
    atomicMax(&p.global_counters[1], gid);
    // Exactly one thread of the grid wins the CAS from 0.
    if (atomicCAS(&p.global_counters[2], 0u, gid + 1) == 0u) atomicAdd(&p.global_counters[3], 1u);
    atomicAdd(p.global_float, 0.5f);
}

extern "C" __global__ void __launch_bounds__(256) fk_selftest_convert(const fk_selftest_convert_params p) {
    for (int64_t i = fk_global_thread(); i < p.n; i += fk_grid_threads()) {
        const __nv_bfloat16 b = __float2bfloat16_rn(p.in[i]);
        const __half h = __float2half_rn(p.in[i]);
        p.out_bf16[i] = __bfloat16_as_ushort(b);
        p.out_f16[i] = __half_as_ushort(h);
        p.back[2 * i] = __bfloat162float(b);
        p.back[2 * i + 1] = __half2float(h);
    }
}
