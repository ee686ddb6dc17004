// fk_emu_mma.h: mma.sync and ldmatrix for the SIMT emulator (used by kernels/include/fk_mma.cuh).
//
// Both are warp collectives: every lane hands in its fragment registers (or, for ldmatrix, its row
// address); once all 32 have arrived, the tile is assembled from the fragments following the PTX ISA's
// layout tables, computed, and scattered back lane by lane. Layouts (groupID g = lane >> 2,
// threadID_in_group t = lane % 4; element 0 of a packed register in its low bits):
//   m16n8k16 .f16/.bf16  A reg r: rows g (+8 for r = 1, 3), cols 2t, 2t+1 (+8 for r = 2, 3)
//                        B reg r: rows (k) 2t, 2t+1 (+8 for r = 1), col (n) g
//   m16n8k32 .s8/.e4m3   A reg r: row g (+8 for r = 1, 3), cols 4t..4t+3 (+16 for r = 2, 3)
//                        B reg r: rows 4t..4t+3 (+16 for r = 1), col g
//   m16n8k64 .s4/.u4     A reg r: row g (+8 for r = 1, 3), cols 8t..8t+7 (+32 for r = 2, 3)
//                        B reg r: rows 8t..8t+7 (+32 for r = 1), col g
//   C/D (all)            c0, c1: row g, cols 2t, 2t+1; c2, c3: row g + 8
//   ldmatrix .m8n8.b16   lane 8j + r gives row r of matrix j; lane l gets, in register j,
//                        M_j[l/4][2(l%4)], M_j[l/4][2(l%4)+1] (.trans: M_j[2(l%4)][l/4], M_j[2(l%4)+1][l/4])
// Accumulation: products exact, the sum in f64 then one rounding to f32 (the ISA leaves the order and
// the rounding unspecified; hardware results may differ in the last bits). Integer accumulation wraps.
#pragma once

#include <stdint.h>

#include "fk_emu_runtime.h"

namespace fk_emu {

enum TcOp {
    OP_MMA_M16N8K16_BF16 = OP_FIRST_TC,
    OP_MMA_M16N8K16_F16,
    OP_MMA_M16N8K32_S8,
    OP_MMA_M16N8K32_U8,
    OP_MMA_M16N8K64_S4,
    OP_MMA_M16N8K64_U4,
    OP_MMA_M16N8K32_E4M3,
    OP_LDMATRIX_X1,
    OP_LDMATRIX_X2,
    OP_LDMATRIX_X4,
    OP_LDMATRIX_X1_TRANS,
    OP_LDMATRIX_X2_TRANS,
    OP_LDMATRIX_X4_TRANS,
};

const char *tc_op_name(int op);

struct MmaIn {
    const uint32_t *a;  // 4 registers
    const uint32_t *b;  // 2 registers
    const void *c;      // 4 f32 or s32
};
void mma_exec(Collective *const *lanes, unsigned mask, char *err, size_t err_len);
void ldmatrix_exec(Collective *const *lanes, unsigned mask, char *err, size_t err_len);

inline void mma(int op, void *d, const uint32_t *a, const uint32_t *b, const void *c, const char *file, int line) {
    MmaIn in{a, b, c};
    uint32_t out[4];
    Collective col{op, 0xffffffffu, &in, out, &mma_exec};
    warp_collective(&col, file, line);
    memcpy(d, out, sizeof out);
}

inline void ldmatrix(int op, uint32_t *d, const void *row, const char *file, int line) {
    uint32_t out[4] = {0, 0, 0, 0};
    Collective col{op, 0xffffffffu, row, out, &ldmatrix_exec};
    warp_collective(&col, file, line);
    const int n = (op == OP_LDMATRIX_X1 || op == OP_LDMATRIX_X1_TRANS) ? 1
                  : (op == OP_LDMATRIX_X2 || op == OP_LDMATRIX_X2_TRANS) ? 2
                                                                          : 4;
    memcpy(d, out, 4u * (unsigned)n);
}

}  // namespace fk_emu
