// fk_mma.cuh: tensor-core (mma.sync), ldmatrix and cp.async, as small wrappers. The inline PTX of
// fusekit lives here (and in fk_common.cuh's one-instruction fk_ex2, fk_rcp, fk_lg2); each wrapper has an
// emulated branch (kernels/emu/fk_emu_mma.h) that implements the PTX ISA's fragment layouts,
// so kernels built on these run unchanged on the SIMT emulator.
//
// Fragment layouts (groupID g = lane >> 2, t = lane % 4; element 0 of a packed register in its low bits):
//   m16n8k16 .bf16/.f16  A[16][16]: reg r holds row g (+8 for r = 1, 3), cols 2t, 2t+1 (+8 for r = 2, 3)
//                        B[16][8]:  reg r holds rows (k) 2t, 2t+1 (+8 for r = 1), col (n) g
//   m16n8k32 .s8/.e4m3   A[16][32]: reg r holds row g (+8 for r = 1, 3), cols 4t..4t+3 (+16 for r = 2, 3)
//                        B[32][8]:  reg r holds rows 4t..4t+3 (+16 for r = 1), col g
//   m16n8k64 .s4         A[16][64]: reg r holds row g (+8 for r = 1, 3), cols 8t..8t+7 (+32 for r = 2, 3)
//                        B[64][8]:  reg r holds rows 8t..8t+7 (+32 for r = 1), col g
//   C/D[16][8] (all)     c0, c1: row g, cols 2t, 2t+1; c2, c3: row g + 8
// ldmatrix .m8n8.b16: lane 8j + r gives the (16-byte aligned) address of row r of matrix j; lane l
// receives in register j the elements (l/4, 2(l%4)) and (l/4, 2(l%4)+1) of matrix j (.trans: its
// transpose). Checked by tests/emu_conformance.rs on the emulator and, on a GPU, against the hardware.
#pragma once

#include "fk_common.cuh"

#if defined(FK_EMU)
#define FK_MMA_EMU(op, d, a, b, c) fk_emu::mma(fk_emu::op, d, a, b, c, __FILE__, __LINE__)
#endif

// d = a·b + c, m16n8k16, bf16 inputs, f32 accumulators.
__device__ __forceinline__ void fk_mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                     const float (&c)[4]) {
#if defined(FK_EMU)
    FK_MMA_EMU(OP_MMA_M16N8K16_BF16, d, a, b, c);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
#endif
}

// d = a·b + c, m16n8k16, f16 inputs, f32 accumulators.
__device__ __forceinline__ void fk_mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                    const float (&c)[4]) {
#if defined(FK_EMU)
    FK_MMA_EMU(OP_MMA_M16N8K16_F16, d, a, b, c);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
#endif
}

// d = a·b + c, m16n8k32, s8 inputs, s32 accumulators (wrapping).
__device__ __forceinline__ void fk_mma_m16n8k32_s8(int32_t (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                   const int32_t (&c)[4]) {
#if defined(FK_EMU)
    FK_MMA_EMU(OP_MMA_M16N8K32_S8, d, a, b, c);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(c[0]), "r"(c[1]), "r"(c[2]),
          "r"(c[3]));
#endif
}

// d = a·b + c, m16n8k64, s4 inputs, s32 accumulators (wrapping). sm_80/86/89 have int4 tensor cores;
// sm_90 runs the instruction without them (see kernels/quant when it exists).
__device__ __forceinline__ void fk_mma_m16n8k64_s4(int32_t (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                   const int32_t (&c)[4]) {
#if defined(FK_EMU)
    FK_MMA_EMU(OP_MMA_M16N8K64_S4, d, a, b, c);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(c[0]), "r"(c[1]), "r"(c[2]),
          "r"(c[3]));
#endif
}

// d = a·b + c, m16n8k32, e4m3 inputs, f32 accumulators: sm_89 and newer (elsewhere it traps; the host
// never launches it there).
__device__ __forceinline__ void fk_mma_m16n8k32_e4m3(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                     const float (&c)[4]) {
#if defined(FK_EMU)
    FK_MMA_EMU(OP_MMA_M16N8K32_E4M3, d, a, b, c);
#elif __CUDA_ARCH__ >= 890
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
#else
    (void)a;
    (void)b;
    d[0] = c[0];
    d[1] = c[1];
    d[2] = c[2];
    d[3] = c[3];
    __trap();
#endif
}

#if !defined(FK_EMU)
__device__ __forceinline__ uint32_t fk_smem_addr(const void *p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#endif

// ldmatrix.m8n8 of 1, 2 or 4 matrices (b16), optionally transposed. `row` is this lane's row address in
// shared memory (16-byte aligned); lanes past 8·N supply none that is read.
#if defined(FK_EMU)
#define FK_LDMATRIX(NAME, N, OP)                                                         \
    __device__ __forceinline__ void NAME(uint32_t (&r)[N], const void *row) {            \
        fk_emu::ldmatrix(fk_emu::OP, r, row, __FILE__, __LINE__);                       \
    }
FK_LDMATRIX(fk_ldmatrix_x1, 1, OP_LDMATRIX_X1)
FK_LDMATRIX(fk_ldmatrix_x2, 2, OP_LDMATRIX_X2)
FK_LDMATRIX(fk_ldmatrix_x4, 4, OP_LDMATRIX_X4)
FK_LDMATRIX(fk_ldmatrix_x1_trans, 1, OP_LDMATRIX_X1_TRANS)
FK_LDMATRIX(fk_ldmatrix_x2_trans, 2, OP_LDMATRIX_X2_TRANS)
FK_LDMATRIX(fk_ldmatrix_x4_trans, 4, OP_LDMATRIX_X4_TRANS)
#undef FK_LDMATRIX
#else
__device__ __forceinline__ void fk_ldmatrix_x1(uint32_t (&r)[1], const void *row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(fk_smem_addr(row)));
}
__device__ __forceinline__ void fk_ldmatrix_x2(uint32_t (&r)[2], const void *row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(fk_smem_addr(row)));
}
__device__ __forceinline__ void fk_ldmatrix_x4(uint32_t (&r)[4], const void *row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(fk_smem_addr(row)));
}
__device__ __forceinline__ void fk_ldmatrix_x1_trans(uint32_t (&r)[1], const void *row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
                 : "=r"(r[0])
                 : "r"(fk_smem_addr(row)));
}
__device__ __forceinline__ void fk_ldmatrix_x2_trans(uint32_t (&r)[2], const void *row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(fk_smem_addr(row)));
}
__device__ __forceinline__ void fk_ldmatrix_x4_trans(uint32_t (&r)[4], const void *row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(fk_smem_addr(row)));
}
#endif

// cp.async: global -> shared without passing through registers (sm_80+). A copy is complete, and its
// bytes visible to this thread, only after a wait that covers its commit group; other threads need a
// barrier after that wait. (The emulator lands the bytes at the wait, so a kernel that reads earlier
// reads stale data.)
// 16 bytes, cached in L2 only (.cg); `src_bytes` < 16 fills the rest with zeros (0: all zeros, src unread).
__device__ __forceinline__ void fk_cp_async_16(void *smem, const void *gmem, uint32_t src_bytes = 16) {
#if defined(FK_EMU)
    fk_emu::cp_async(smem, gmem, 16, src_bytes, __FILE__, __LINE__);
#else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(fk_smem_addr(smem)), "l"(gmem),
                 "r"(src_bytes));
#endif
}
// 4 or 8 bytes (.ca).
__device__ __forceinline__ void fk_cp_async_4(void *smem, const void *gmem) {
#if defined(FK_EMU)
    fk_emu::cp_async(smem, gmem, 4, 4, __FILE__, __LINE__);
#else
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(fk_smem_addr(smem)), "l"(gmem));
#endif
}
__device__ __forceinline__ void fk_cp_async_8(void *smem, const void *gmem) {
#if defined(FK_EMU)
    fk_emu::cp_async(smem, gmem, 8, 8, __FILE__, __LINE__);
#else
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(fk_smem_addr(smem)), "l"(gmem));
#endif
}
// Closes the current group of this thread's cp.async copies.
__device__ __forceinline__ void fk_cp_async_commit() {
#if defined(FK_EMU)
    fk_emu::cp_async_commit();
#else
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void fk_cp_async_wait() {
#if defined(FK_EMU)
    fk_emu::cp_async_wait(N);
#else
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}
