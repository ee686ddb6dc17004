// fk_emu_mma.cpp: the tensor-core and ldmatrix collectives of the SIMT emulator (fk_emu_mma.h).
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "fk_emu.h"
#include "fk_emu_half.h"
#include "fk_emu_mma.h"

namespace fk_emu {

const char *tc_op_name(int op) {
    switch (op) {
    case OP_MMA_M16N8K16_BF16: return "mma.sync.m16n8k16.bf16";
    case OP_MMA_M16N8K16_F16: return "mma.sync.m16n8k16.f16";
    case OP_MMA_M16N8K32_S8: return "mma.sync.m16n8k32.s8";
    case OP_MMA_M16N8K32_U8: return "mma.sync.m16n8k32.u8";
    case OP_MMA_M16N8K64_S4: return "mma.sync.m16n8k64.s4";
    case OP_MMA_M16N8K64_U4: return "mma.sync.m16n8k64.u4";
    case OP_MMA_M16N8K32_E4M3: return "mma.sync.m16n8k32.e4m3";
    case OP_LDMATRIX_X1: return "ldmatrix.x1";
    case OP_LDMATRIX_X2: return "ldmatrix.x2";
    case OP_LDMATRIX_X4: return "ldmatrix.x4";
    case OP_LDMATRIX_X1_TRANS: return "ldmatrix.x1.trans";
    case OP_LDMATRIX_X2_TRANS: return "ldmatrix.x2.trans";
    case OP_LDMATRIX_X4_TRANS: return "ldmatrix.x4.trans";
    default: return "warp collective";
    }
}

namespace {

// e4m3: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinity; S.1111.111 is NaN.
double e4m3_to_double(unsigned v) {
    const unsigned s = (v >> 7) & 1u, e = (v >> 3) & 15u, m = v & 7u;
    double r;
    if (e == 15 && m == 7) r = NAN;
    else if (e == 0) r = ldexp((double)m, -9);  // subnormal: m * 2^-6 / 8
    else r = ldexp(1.0 + m / 8.0, (int)e - 7);
    return s ? -r : r;
}

// Element `idx` (of `per_reg` per 32-bit register, low bits first) of a lane's register array.
uint32_t field(const uint32_t *regs, int reg, int idx, int bits) {
    return (regs[reg] >> (idx * bits)) & ((1u << bits) - 1u);
}

}  // namespace

void mma_exec(Collective *const *lanes, unsigned mask, char *err, size_t err_len) {
    if (mask != 0xffffffffu) {
        snprintf(err, err_len, "mma.sync needs the whole warp (mask 0x%08x)", mask);
        return;
    }
    const int op = lanes[0]->op;
    // The operands as matrices: A [16][K], B [K][8], C [16][8], in f64 (or exact integers).
    int K = 16, bits = 16;
    switch (op) {
    case OP_MMA_M16N8K32_S8:
    case OP_MMA_M16N8K32_U8:
    case OP_MMA_M16N8K32_E4M3: K = 32; bits = 8; break;
    case OP_MMA_M16N8K64_S4:
    case OP_MMA_M16N8K64_U4: K = 64; bits = 4; break;
    default: break;
    }
    const int per_reg = 32 / bits;       // elements per register
    const int khalf = K / 2;             // the second register pair covers columns/rows + K/2
    double A[16][64], B[64][8], C[16][8];  // on the scheduler's stack: no thread-local state here
    const bool integer = op == OP_MMA_M16N8K32_S8 || op == OP_MMA_M16N8K32_U8 || op == OP_MMA_M16N8K64_S4 ||
                         op == OP_MMA_M16N8K64_U4;
    auto decode = [&](uint32_t v) -> double {
        switch (op) {
        case OP_MMA_M16N8K16_BF16: {
            uint32_t u = v << 16;
            float f;
            memcpy(&f, &u, 4);
            return f;
        }
        case OP_MMA_M16N8K16_F16: return (double)fk_emu::f16_bits_to_f32((uint16_t)v);
        case OP_MMA_M16N8K32_S8: return (double)(int8_t)v;
        case OP_MMA_M16N8K32_U8: return (double)v;
        case OP_MMA_M16N8K64_S4: return (double)((int)(v << 28) >> 28);
        case OP_MMA_M16N8K64_U4: return (double)v;
        default: return e4m3_to_double(v);
        }
    };
    for (int l = 0; l < 32; ++l) {
        const MmaIn *in = static_cast<const MmaIn *>(lanes[l]->in);
        const int g = l >> 2, t = l & 3;
        for (int r = 0; r < 4; ++r)
            for (int i = 0; i < per_reg; ++i) {
                const int row = g + ((r & 1) ? 8 : 0);
                const int col = t * per_reg + i + ((r & 2) ? khalf : 0);
                A[row][col] = decode(field(in->a, r, i, bits));
            }
        for (int r = 0; r < 2; ++r)
            for (int i = 0; i < per_reg; ++i) B[t * per_reg + i + (r ? khalf : 0)][g] = decode(field(in->b, r, i, bits));
        for (int i = 0; i < 4; ++i) {
            const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
            if (integer) C[row][col] = (double)static_cast<const int32_t *>(in->c)[i];
            else C[row][col] = (double)static_cast<const float *>(in->c)[i];
        }
    }
    for (int l = 0; l < 32; ++l) {
        const int g = l >> 2, t = l & 3;
        uint32_t *out = static_cast<uint32_t *>(lanes[l]->out);
        for (int i = 0; i < 4; ++i) {
            const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
            double acc = 0.0;
            for (int k = 0; k < K; ++k) acc += A[row][k] * B[k][col];
            if (integer) {
                // Exact: |sum| < 2^53. The accumulator wraps modulo 2^32 (no .satfinite).
                const int64_t s = (int64_t)acc + (int64_t)C[row][col];
                out[i] = (uint32_t)s;
            } else {
                const float f = (float)(acc + C[row][col]);
                memcpy(&out[i], &f, 4);
            }
        }
    }
}

void ldmatrix_exec(Collective *const *lanes, unsigned mask, char *err, size_t err_len) {
    if (mask != 0xffffffffu) {
        snprintf(err, err_len, "ldmatrix needs the whole warp (mask 0x%08x)", mask);
        return;
    }
    const int op = lanes[0]->op;
    const bool trans = op == OP_LDMATRIX_X1_TRANS || op == OP_LDMATRIX_X2_TRANS || op == OP_LDMATRIX_X4_TRANS;
    const int n = (op == OP_LDMATRIX_X1 || op == OP_LDMATRIX_X1_TRANS) ? 1
                  : (op == OP_LDMATRIX_X2 || op == OP_LDMATRIX_X2_TRANS) ? 2
                                                                          : 4;
    uint16_t M[4][8][8];
    for (int j = 0; j < n; ++j)
        for (int r = 0; r < 8; ++r) {
            const void *row = lanes[8 * j + r]->in;
            if ((uintptr_t)row % 16) {
                snprintf(err, err_len, "lane %d: row address %p is not 16-byte aligned", 8 * j + r, row);
                return;
            }
            if (!shared_address(row) || !shared_address(static_cast<const char *>(row) + 15)) {
                snprintf(err, err_len, "lane %d: row address %p is not in shared memory", 8 * j + r, row);
                return;
            }
            memcpy(M[j][r], row, 16);
        }
    for (int l = 0; l < 32; ++l) {
        uint32_t *out = static_cast<uint32_t *>(lanes[l]->out);
        const int a = l / 4, c = 2 * (l % 4);
        for (int j = 0; j < n; ++j) {
            const uint16_t lo = trans ? M[j][c][a] : M[j][a][c];
            const uint16_t hi = trans ? M[j][c + 1][a] : M[j][a][c + 1];
            out[j] = (uint32_t)lo | ((uint32_t)hi << 16);
        }
    }
}

}  // namespace fk_emu
