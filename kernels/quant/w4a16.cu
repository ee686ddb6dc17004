// W4A16: y = x . W^T with W packed int4 (src/quant/packed.rs, format version 1), x and y bf16/f16,
// fp32 accumulation on tensor cores (mma.sync m16n8k16).
//
// A block owns 64 output columns (one packed n-block), 16 MT rows of x and a contiguous range of
// 128-deep k slabs (split-K along gridDim.z). Per slab, a 4-stage cp.async pipeline brings in 4 KB of
// codes (eight 512-byte tiles, each exactly the B fragments of 16 x 64 weights), the slab's group scales
// and zero points, and the 16 MT x 128 tile of x (16-byte chunks XOR-swizzled by row, so the ldmatrix
// of an A fragment is conflict-free). Warp w takes k tiles w and w + 4 of the slab: one 16-byte
// shared load per lane gives its codes for 8 n-subtiles, which are dequantised in registers
// (fk_dq4.cuh: LOP3 + HSUB2 + HMUL2 per two weights) and fed to 8 MMAs per 16 rows. The four warps'
// accumulators are summed in shared memory in warp order (deterministic), then written as T (one
// split) or as fp32 partials, which the last block of the tile to arrive adds in split order in the
// same launch (fk_splitk.cuh): the result depends on the plan, never on timing.
//
// Rows of x past M and k past K are zero-filled in shared memory (never read from global), and padded
// weights are exactly zero (their code is their group's zero point), so tails need no masks in the
// MMA loop. When rows of x are not 16-byte aligned (K % 8 != 0 or an unaligned pointer), x is loaded
// element by element instead of by cp.async (a_vec = 0).
#include "fk_common.cuh"
#include "fk_dq4.cuh"
#include "fk_mma.cuh"
#include "fk_splitk.cuh"
#include "quant_params.h"

// Dynamic shared memory (declared outside the anonymous namespace: the emulator provides the symbol).
extern __shared__ __align__(16) unsigned char fk_smem[];

namespace {

constexpr int KSLAB = FK_W4_KSLAB;
constexpr int NB = FK_W4_NBLOCK;
constexpr int STAGES = FK_W4A16_STAGES;
constexpr int B_BYTES = (KSLAB / 16) * FK_W4_TILE_BYTES;  // 4096
constexpr int MAX_GROUPS = KSLAB / 32;                       // groups of one slab, at most
constexpr int S_BYTES = MAX_GROUPS * NB * 2;                 // 512: scales
constexpr int Z_BYTES = MAX_GROUPS * NB;                     // 256: zero points (bytes)

template <int MT>
struct W4Smem {
    static constexpr int A_BYTES = 16 * MT * KSLAB * 2;
    static constexpr int STAGE = B_BYTES + S_BYTES + Z_BYTES + A_BYTES;
    static constexpr int TOTAL = STAGES * STAGE;
    // The cross-warp reduction reuses the pipeline's memory.
    static constexpr int RED = FK_W4A16_WARPS * MT * 8 * 4 * 32 * 4;
    static_assert(RED <= TOTAL, "reduction buffer must fit the pipeline's shared memory");
};

// Per-thread copy state: what each thread brings in per slab, addresses advanced slab by slab.
template <typename T, int MT>
struct W4Loader {
    static constexpr int A_CHUNKS = 16 * MT * 16 / FK_W4A16_THREADS;  // 2 MT
    const unsigned char *codes;   // this thread's first code chunk of slab 0
    const unsigned char *params;  // scales (or zero points) chunk of group 0, or NULL: none for this thread
    int64_t params_step;          // bytes per slab
    int params_dst;               // offset in the stage
    const T *x[A_CHUNKS];         // chunk of slab 0, or NULL: a row past m
    int a_dst[A_CHUNKS];
    int64_t a_k[A_CHUNKS];        // k of the chunk in slab 0

    __device__ __forceinline__ void init(const fk_w4a16_params &p, int64_t nb, int64_t m0, int groups_in_slab) {
        const int tid = threadIdx.x;
        codes = reinterpret_cast<const unsigned char *>(p.codes) + nb * (int64_t)(p.k_pad / 16) * FK_W4_TILE_BYTES +
                tid * 16;
        // Scales: groups_in_slab x 128 bytes; zero points: groups_in_slab x 64 bytes, both contiguous per
        // n-block, one 16-byte chunk per thread.
        const int s_chunks = groups_in_slab * 8, z_chunks = p.zeros != nullptr ? groups_in_slab * 4 : 0;
        const int64_t g_step = p.group_len <= KSLAB ? KSLAB / p.group_len : 0;
        params = nullptr;
        params_step = 0;
        params_dst = 0;
        if (tid < s_chunks) {
            params = reinterpret_cast<const unsigned char *>(p.scales) + nb * p.n_groups * (NB * 2) + tid * 16;
            params_step = g_step * (NB * 2);
            params_dst = B_BYTES + tid * 16;
        } else if (tid < s_chunks + z_chunks) {
            const int c = tid - s_chunks;
            params = reinterpret_cast<const unsigned char *>(p.zeros) + nb * p.n_groups * NB + c * 16;
            params_step = g_step * NB;
            params_dst = B_BYTES + S_BYTES + c * 16;
        }
        const T *xp = reinterpret_cast<const T *>(p.x);
#pragma unroll
        for (int i = 0; i < A_CHUNKS; ++i) {
            const int c = tid + i * FK_W4A16_THREADS;
            const int r = c >> 4, ch = c & 15;
            a_dst[i] = B_BYTES + S_BYTES + Z_BYTES + r * (KSLAB * 2) + ((ch ^ (r & 7)) << 4);
            a_k[i] = ch * 8;
            x[i] = m0 + r < p.m ? xp + (m0 + r) * p.lda + ch * 8 : nullptr;
        }
    }

    // Issues the copies of slab `s` (counted from the block's first) into stage buffer `st`.
    __device__ __forceinline__ void load(const fk_w4a16_params &p, unsigned char *st, int64_t s) const {
        const int tid = threadIdx.x;
#pragma unroll
        for (int i = 0; i < B_BYTES / 16 / FK_W4A16_THREADS; ++i)
            fk_cp_async_16(st + tid * 16 + i * FK_W4A16_THREADS * 16,
                           codes + s * B_BYTES + i * FK_W4A16_THREADS * 16);
        if (params != nullptr) fk_cp_async_16(st + params_dst, params + s * params_step);
#pragma unroll
        for (int i = 0; i < A_CHUNKS; ++i) {
            const int64_t left = x[i] != nullptr ? (int64_t)p.k - (a_k[i] + s * KSLAB) : 0;
            if (p.a_vec) {
                // k % 8 == 0: a chunk is wholly in or wholly out. Out: zero-filled, its source unread.
                const bool in = left > 0;
                fk_cp_async_16(st + a_dst[i], in ? x[i] + s * KSLAB : p.x, in ? 16u : 0u);
            } else {
                fk_vec16<T> v;
#pragma unroll
                for (int e = 0; e < 8; ++e) v.v[e] = e < left ? x[i][s * KSLAB + e] : fk_from_f32<T>(0.0f);
                *reinterpret_cast<fk_vec16<T> *>(st + a_dst[i]) = v;
            }
        }
    }
};

template <typename T>
__device__ __forceinline__ void w4_mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
template <>
__device__ __forceinline__ void w4_mma<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    fk_mma_m16n8k16_bf16(d, a, b, d);
}
template <>
__device__ __forceinline__ void w4_mma<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    fk_mma_m16n8k16_f16(d, a, b, d);
}

template <typename T, int MT>
__device__ void w4a16(const fk_w4a16_params &p) {
    typedef W4Smem<MT> L;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int64_t nb = blockIdx.x, m0 = (int64_t)blockIdx.y * 16 * MT;
    const int64_t slabs = p.k_pad / KSLAB;
    const int64_t s_begin = (int64_t)blockIdx.z * p.slabs_per_split;
    const int64_t s_end = slabs < s_begin + p.slabs_per_split ? slabs : s_begin + p.slabs_per_split;
    const int n_slabs = s_end > s_begin ? (int)(s_end - s_begin) : 0;
    const int groups_in_slab = p.group_len >= KSLAB ? 1 : KSLAB / p.group_len;

    W4Loader<T, MT> ld;
    ld.init(p, nb, m0, groups_in_slab);

    float acc[MT][8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[mt][j][c] = 0.0f;

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < n_slabs) ld.load(p, fk_smem + s * L::STAGE, s_begin + s);
        fk_cp_async_commit();
    }

    // Loop-invariant shared-memory offsets of this lane: its k tiles' codes, their groups' scales and
    // zero points (columns 8j + g, j = 0..7), and its ldmatrix rows of x.
    const int g = lane >> 2;
    int b_off[2], s_off[2], z_off[2], a_off[MT][2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int kk = warp + h * FK_W4A16_WARPS;
        const int gl = p.group_len >= KSLAB ? 0 : (kk * 16) / p.group_len;
        b_off[h] = kk * FK_W4_TILE_BYTES + lane * 16;
        s_off[h] = B_BYTES + gl * (NB * 2) + g * 16;
        z_off[h] = B_BYTES + S_BYTES + gl * NB + g * 8;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            const int mj = lane >> 3;
            const int r = mt * 16 + (lane & 7) + 8 * (mj & 1);
            const int ch = 2 * kk + (mj >> 1);
            a_off[mt][h] = B_BYTES + S_BYTES + Z_BYTES + r * (KSLAB * 2) + ((ch ^ (r & 7)) << 4);
        }
    }
    const bool asym = p.zeros != nullptr;

    for (int it = 0; it < n_slabs; ++it) {
        fk_cp_async_wait<STAGES - 2>();
        __syncthreads();
        {
            const int nxt = it + STAGES - 1;
            if (nxt < n_slabs) ld.load(p, fk_smem + (nxt % STAGES) * L::STAGE, s_begin + nxt);
            fk_cp_async_commit();
        }
        const unsigned char *st = fk_smem + (it % STAGES) * L::STAGE;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            // Scales s_j (bf16/f16 bits, two per word) and zero points z_j (one byte each) of columns 8j + g.
            const uint4 sv = *reinterpret_cast<const uint4 *>(st + s_off[h]);
            const uint2 zv = asym ? *reinterpret_cast<const uint2 *>(st + z_off[h]) : make_uint2(0x08080808u, 0x08080808u);
            const uint32_t sw[4] = {sv.x, sv.y, sv.z, sv.w};
            const uint32_t zw[2] = {zv.x, zv.y};
            const uint4 bv = *reinterpret_cast<const uint4 *>(st + b_off[h]);
            const uint32_t bw[4] = {bv.x, bv.y, bv.z, bv.w};
            uint32_t b[8][2];
#pragma unroll
            for (int w = 0; w < 4; ++w) {
#pragma unroll
                for (int hj = 0; hj < 2; ++hj) {
                    const int j = 2 * w + hj;
                    // (magic + z_j) in both halves and (s_j, s_j): one byte permute each.
                    const uint32_t zz = fk_dq4_zero_pair<T>(zw[j >> 2], j & 3);
                    const uint32_t ss = fk_dq4_scale_pair(sw[j >> 1], j & 1);
                    const uint32_t q0 = hj == 0 ? fk_dq4_pair<T, 0>(bw[w]) : fk_dq4_pair<T, 2>(bw[w]);
                    const uint32_t q1 = hj == 0 ? fk_dq4_pair<T, 1>(bw[w]) : fk_dq4_pair<T, 3>(bw[w]);
                    b[j][0] = fk_h2_sub_mul<T>(q0, zz, ss);
                    b[j][1] = fk_h2_sub_mul<T>(q1, zz, ss);
                }
            }
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                uint32_t a[4];
                fk_ldmatrix_x4(a, st + a_off[mt][h]);
#pragma unroll
                for (int j = 0; j < 8; ++j) w4_mma<T>(acc[mt][j], a, b[j]);
            }
        }
    }
    fk_cp_async_wait<0>();
    __syncthreads();

    // Cross-warp sum in warp order: red[warp][mt][j][c][lane].
    float *red = reinterpret_cast<float *>(fk_smem);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) red[(((warp * MT + mt) * 8 + j) * 4 + c) * 32 + lane] = acc[mt][j][c];
    __syncthreads();
    constexpr int PER_WARP = MT * 8 * 4 * 32;
    for (int e = tid; e < PER_WARP; e += FK_W4A16_THREADS) {
        float v = 0.0f;
#pragma unroll
        for (int w = 0; w < FK_W4A16_WARPS; ++w) v += red[w * PER_WARP + e];
        const int l = e & 31, c = (e >> 5) & 3, j = (e >> 7) & 7, mt = e >> 10;
        const int64_t row = m0 + mt * 16 + (l >> 2) + 8 * (c >> 1);
        const int64_t col = nb * NB + 8 * j + 2 * (l & 3) + (c & 1);
        if (row < p.m && col < p.n) {
            if (p.ws != nullptr)
                p.ws[((int64_t)blockIdx.z * p.m + row) * p.n + col] = v;
            else
                reinterpret_cast<T *>(p.y)[row * p.n + col] = fk_from_f32<T>(v);
        }
    }
    if (p.ws == nullptr) return;

    // Several splits: the tile's last block to arrive adds them in split order (fk_splitk.cuh).
    if (!fk_splitk_arrive(p.counters + blockIdx.y * gridDim.x + blockIdx.x, gridDim.z)) return;
    for (int e = tid; e < PER_WARP; e += FK_W4A16_THREADS) {
        const int l = e & 31, c = (e >> 5) & 3, j = (e >> 7) & 7, mt = e >> 10;
        const int64_t row = m0 + mt * 16 + (l >> 2) + 8 * (c >> 1);
        const int64_t col = nb * NB + 8 * j + 2 * (l & 3) + (c & 1);
        if (row < p.m && col < p.n)
            reinterpret_cast<T *>(p.y)[row * p.n + col] =
                fk_from_f32<T>(fk_splitk_sum(p.ws, p.m * p.n, row * p.n + col, gridDim.z));
    }
}

}  // namespace

#define FK_W4A16_ENTRY(TN, T, MT, ROWS)                                                               \
    extern "C" __global__ void __launch_bounds__(FK_W4A16_THREADS)                                   \
        fk_w4a16_##TN##_m##ROWS(const fk_w4a16_params p) {                                           \
        w4a16<T, MT>(p);                                                                              \
    }
// Rows of x per block: 16, 32 or 64 (the plan picks the smallest that covers M, up to 64).
FK_W4A16_ENTRY(bf16, __nv_bfloat16, 1, 16)
FK_W4A16_ENTRY(bf16, __nv_bfloat16, 2, 32)
FK_W4A16_ENTRY(bf16, __nv_bfloat16, 4, 64)
FK_W4A16_ENTRY(f16, __half, 1, 16)
FK_W4A16_ENTRY(f16, __half, 2, 32)
FK_W4A16_ENTRY(f16, __half, 4, 64)
