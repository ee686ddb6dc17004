// fk_emu.h: the CUDA built-ins, for kernel sources compiled as host C++ by the SIMT emulator.
//
// build.rs compiles every family's .cu files with `-include fk_emu.h` and kernels/emu/include first on
// the include path (its cuda_bf16.h, cuda_fp16.h and cooperative_groups.h stand in for the toolkit's).
// Kernel code is not changed and has no #ifdef: each GPU thread runs as a fiber (fk_emu_runtime.cpp),
// a block's fibers take turns until each reaches a barrier or a warp collective, and the collectives
// (shuffles, votes, match, reduce, __syncwarp, mma.sync, ldmatrix) are performed once every lane named
// in the mask has arrived. See kernels/emu/README.md for what this proves and what it cannot.
#pragma once

// Everything the emulated family defines stays inside its library except the fk_emu_* entry points.
#pragma GCC visibility push(hidden)

#define FK_EMU 1
// The device compilation pass of nvcc defines both: the kernels take their device branches here too.
#ifndef __CUDACC__
#define __CUDACC__ 1
#endif
#define __CUDA_ARCH__ FK_EMU_ARCH

#include <float.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <type_traits>

#ifdef FK_EMU_SCAN
// build.rs preprocesses each family with FK_EMU_SCAN to find its kernels: these markers survive the
// preprocessor and carry the launch attributes into the generated launch table.
#define __global__ __fk_global__
#define __launch_bounds__(...) __fk_launch_bounds__(__VA_ARGS__)
#define __cluster_dims__(...) __fk_cluster_dims__(__VA_ARGS__)
#define __shared__ __fk_shared__
#else
#define __global__
#define __launch_bounds__(...)
#define __cluster_dims__(...)
// Block scope: a block's fibers share one OS thread, a cluster's blocks run on one OS thread each.
// `used`: the runtime writes the poison through the TLS block's address, so the compiler must not assume
// a variable the kernel never stores to keeps its zero initialiser (it would fold the reads to 0).
#define __shared__ thread_local __attribute__((used))
#endif
#define __device__
#define __host__
#define __constant__
#define __managed__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))
#define __grid_constant__

#include "fk_emu_runtime.h"

// Typed fronts of the runtime's collectives.
namespace fk_emu {

template <class T>
inline T shfl(int op, unsigned mask, T v, int arg, int width, const char *file, int line) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a type over 8 bytes");
    ShflIn in{};
    memcpy(&in.v, &v, sizeof(T));
    in.arg = arg;
    in.width = width;
    uint64_t out = 0;
    Collective c{op, mask, &in, &out, &shfl_exec};
    warp_collective(&c, file, line);
    T r;
    memcpy(&r, &out, sizeof(T));
    return r;
}

inline uint64_t vote(int op, unsigned mask, uint64_t v, const char *file, int line) {
    uint64_t out = 0;
    Collective c{op, mask, &v, &out, &vote_exec};
    warp_collective(&c, file, line);
    return out;
}

template <class T>
inline uint64_t bits_of(T v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "match of a type over 8 bytes");
    uint64_t u = 0;
    memcpy(&u, &v, sizeof(T));
    return u;
}

}  // namespace fk_emu

#define threadIdx (::fk_emu::self()->tid)
#define blockIdx (::fk_emu::self()->block->idx)
#define blockDim (::fk_emu::self()->block->geom->block)
#define gridDim (::fk_emu::self()->block->geom->grid)
#define warpSize 32

#define FK_EMU_LOC const char *fk_file_ = __builtin_FILE(), int fk_line_ = __builtin_LINE()

// ---------------------------------------------------------------------------------------------------
// Barriers and warp collectives.
inline void __syncthreads(FK_EMU_LOC) { fk_emu::block_barrier(fk_emu::BAR_SYNC, 0, fk_file_, fk_line_); }
inline int __syncthreads_count(int pred, FK_EMU_LOC) {
    return fk_emu::block_barrier(fk_emu::BAR_COUNT, pred, fk_file_, fk_line_);
}
inline int __syncthreads_and(int pred, FK_EMU_LOC) {
    return fk_emu::block_barrier(fk_emu::BAR_AND, pred, fk_file_, fk_line_);
}
inline int __syncthreads_or(int pred, FK_EMU_LOC) {
    return fk_emu::block_barrier(fk_emu::BAR_OR, pred, fk_file_, fk_line_);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, FK_EMU_LOC) {
    fk_emu::vote(fk_emu::OP_SYNCWARP, mask, 0, fk_file_, fk_line_);
}

template <class T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32, FK_EMU_LOC) {
    return fk_emu::shfl(fk_emu::OP_SHFL_IDX, mask, var, src_lane, width, fk_file_, fk_line_);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32, FK_EMU_LOC) {
    return fk_emu::shfl(fk_emu::OP_SHFL_UP, mask, var, (int)delta, width, fk_file_, fk_line_);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32, FK_EMU_LOC) {
    return fk_emu::shfl(fk_emu::OP_SHFL_DOWN, mask, var, (int)delta, width, fk_file_, fk_line_);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32, FK_EMU_LOC) {
    return fk_emu::shfl(fk_emu::OP_SHFL_XOR, mask, var, lane_mask, width, fk_file_, fk_line_);
}

inline unsigned __ballot_sync(unsigned mask, int pred, FK_EMU_LOC) {
    return (unsigned)fk_emu::vote(fk_emu::OP_BALLOT, mask, pred != 0, fk_file_, fk_line_);
}
inline int __all_sync(unsigned mask, int pred, FK_EMU_LOC) {
    return (int)fk_emu::vote(fk_emu::OP_ALL, mask, pred != 0, fk_file_, fk_line_);
}
inline int __any_sync(unsigned mask, int pred, FK_EMU_LOC) {
    return (int)fk_emu::vote(fk_emu::OP_ANY, mask, pred != 0, fk_file_, fk_line_);
}
inline int __uni_sync(unsigned mask, int pred, FK_EMU_LOC) {
    return (int)fk_emu::vote(fk_emu::OP_UNI, mask, pred != 0, fk_file_, fk_line_);
}
// Lanes of the warp that have not exited: the emulator does not model hardware convergence.
inline unsigned __activemask() { return fk_emu::active_mask(); }

template <class T>
inline unsigned __match_any_sync(unsigned mask, T value, FK_EMU_LOC) {
    return (unsigned)fk_emu::vote(fk_emu::OP_MATCH_ANY, mask, fk_emu::bits_of(value), fk_file_, fk_line_);
}
template <class T>
inline unsigned __match_all_sync(unsigned mask, T value, int *pred, FK_EMU_LOC) {
    const uint64_t r = fk_emu::vote(fk_emu::OP_MATCH_ALL, mask, fk_emu::bits_of(value), fk_file_, fk_line_);
    *pred = r != 0;
    return (unsigned)r;
}

#define FK_EMU_REDUCE(NAME, T, OP)                                                                  \
    inline T NAME(unsigned mask, T value, FK_EMU_LOC) {                                            \
        return (T)fk_emu::vote(fk_emu::OP, mask, (uint64_t)(uint32_t)value, fk_file_, fk_line_);   \
    }
FK_EMU_REDUCE(__reduce_add_sync, unsigned, OP_REDUCE_ADD)
FK_EMU_REDUCE(__reduce_add_sync, int, OP_REDUCE_ADD)
FK_EMU_REDUCE(__reduce_min_sync, unsigned, OP_REDUCE_UMIN)
FK_EMU_REDUCE(__reduce_min_sync, int, OP_REDUCE_MIN)
FK_EMU_REDUCE(__reduce_max_sync, unsigned, OP_REDUCE_UMAX)
FK_EMU_REDUCE(__reduce_max_sync, int, OP_REDUCE_MAX)
FK_EMU_REDUCE(__reduce_and_sync, unsigned, OP_REDUCE_AND)
FK_EMU_REDUCE(__reduce_or_sync, unsigned, OP_REDUCE_OR)
FK_EMU_REDUCE(__reduce_xor_sync, unsigned, OP_REDUCE_XOR)
#undef FK_EMU_REDUCE

inline void __trap(FK_EMU_LOC) { fk_emu::trap("__trap()", fk_file_, fk_line_); }
inline void __brkpt() {}
inline void __nanosleep(unsigned) {}
inline long clock() { return (long)clock64(); }

// Fences: one OS thread runs a block, so these only order the compiler (and cluster threads).
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_system() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// ---------------------------------------------------------------------------------------------------
// Atomics: relaxed, as CUDA's; real atomics, so cluster blocks on other OS threads (and ThreadSanitizer)
// see them as such.
#define FK_EMU_ATOMIC_INT(T)                                                                        \
    inline T atomicAdd(T *p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }            \
    inline T atomicSub(T *p, T v) { return __atomic_fetch_sub(p, v, __ATOMIC_RELAXED); }            \
    inline T atomicExch(T *p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_RELAXED); }          \
    inline T atomicAnd(T *p, T v) { return __atomic_fetch_and(p, v, __ATOMIC_RELAXED); }            \
    inline T atomicOr(T *p, T v) { return __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }              \
    inline T atomicXor(T *p, T v) { return __atomic_fetch_xor(p, v, __ATOMIC_RELAXED); }            \
    inline T atomicCAS(T *p, T cmp, T v) {                                                          \
        __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);        \
        return cmp;                                                                                 \
    }                                                                                               \
    inline T atomicMax(T *p, T v) {                                                                 \
        T old = __atomic_load_n(p, __ATOMIC_RELAXED);                                               \
        while (old < v &&                                                                           \
               !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) \
            ;                                                                                       \
        return old;                                                                                 \
    }                                                                                               \
    inline T atomicMin(T *p, T v) {                                                                 \
        T old = __atomic_load_n(p, __ATOMIC_RELAXED);                                               \
        while (old > v &&                                                                           \
               !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) \
            ;                                                                                       \
        return old;                                                                                 \
    }
FK_EMU_ATOMIC_INT(int)
FK_EMU_ATOMIC_INT(unsigned int)
FK_EMU_ATOMIC_INT(unsigned long long)
FK_EMU_ATOMIC_INT(long long)
#undef FK_EMU_ATOMIC_INT
inline unsigned short atomicCAS(unsigned short *p, unsigned short cmp, unsigned short v) {
    __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
    return cmp;
}
inline unsigned atomicInc(unsigned *p, unsigned limit) {
    unsigned old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (!__atomic_compare_exchange_n(p, &old, old >= limit ? 0u : old + 1u, true, __ATOMIC_RELAXED,
                                        __ATOMIC_RELAXED))
        ;
    return old;
}
inline unsigned atomicDec(unsigned *p, unsigned limit) {
    unsigned old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (!__atomic_compare_exchange_n(p, &old, (old == 0u || old > limit) ? limit : old - 1u, true,
                                        __ATOMIC_RELAXED, __ATOMIC_RELAXED))
        ;
    return old;
}
template <class F, class U>
inline F fk_emu_atomic_float_add(F *p, F v) {
    static_assert(sizeof(F) == sizeof(U), "");
    U *q = reinterpret_cast<U *>(p);
    U old = __atomic_load_n(q, __ATOMIC_RELAXED);
    for (;;) {
        F f;
        memcpy(&f, &old, sizeof f);
        const F n = f + v;
        U nu;
        memcpy(&nu, &n, sizeof nu);
        if (__atomic_compare_exchange_n(q, &old, nu, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) return f;
    }
}
inline float atomicAdd(float *p, float v) { return fk_emu_atomic_float_add<float, uint32_t>(p, v); }
inline double atomicAdd(double *p, double v) { return fk_emu_atomic_float_add<double, uint64_t>(p, v); }
inline float atomicExch(float *p, float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    u = __atomic_exchange_n(reinterpret_cast<uint32_t *>(p), u, __ATOMIC_RELAXED);
    float r;
    memcpy(&r, &u, 4);
    return r;
}
#define atomicAdd_block atomicAdd
#define atomicAdd_system atomicAdd
#define atomicMax_block atomicMax
#define atomicMin_block atomicMin
#define atomicCAS_block atomicCAS
#define atomicExch_block atomicExch

// ---------------------------------------------------------------------------------------------------
// Cache-hinted loads and stores: plain accesses.
template <class T> inline T __ldg(const T *p) { return *p; }
template <class T> inline T __ldcs(const T *p) { return *p; }
template <class T> inline T __ldcg(const T *p) { return *p; }
template <class T> inline T __ldca(const T *p) { return *p; }
template <class T> inline T __ldlu(const T *p) { return *p; }
template <class T> inline T __ldcv(const T *p) { return *p; }
template <class T> inline void __stcs(T *p, T v) { *p = v; }
template <class T> inline void __stcg(T *p, T v) { *p = v; }
template <class T> inline void __stwb(T *p, T v) { *p = v; }
template <class T> inline void __stwt(T *p, T v) { *p = v; }

// ---------------------------------------------------------------------------------------------------
// Arithmetic intrinsics. The *_rn forms are single IEEE operations (the build passes
// -ffp-contract=off, so nothing is fused behind them); the fast forms are built as the device builds
// them (ex2/lg2 of a scaled argument, flushed to zero), on the host's exp2f/log2f, which differ from the
// device's approximations by a few ulp.
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
inline float fk_emu_ftz(float x) { return fabsf(x) < FLT_MIN ? copysignf(0.0f, x) : x; }
inline float __expf(float x) { return fk_emu_ftz(exp2f(fk_emu_ftz(x) * 1.44269504088896341f)); }
inline float __exp10f(float x) { return fk_emu_ftz(exp2f(fk_emu_ftz(x) * 3.32192809488736235f)); }
inline float __logf(float x) { return log2f(fk_emu_ftz(x)) * 0.693147180559945309f; }
inline float __log2f(float x) { return log2f(fk_emu_ftz(x)); }
inline float __log10f(float x) { return log2f(fk_emu_ftz(x)) * 0.301029995663981195f; }
inline float __powf(float x, float y) { return fk_emu_ftz(exp2f(y * log2f(fk_emu_ftz(x)))); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline void __sincosf(float x, float *s, float *c) { *s = sinf(x); *c = cosf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x != x ? 0.0f : (x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x)); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
inline float exp10f(float x) { return powf(10.0f, x); }
inline float __int_as_float(int x) { float f; memcpy(&f, &x, 4); return f; }
inline int __float_as_int(float f) { int x; memcpy(&x, &f, 4); return x; }
inline float __uint_as_float(unsigned x) { float f; memcpy(&f, &x, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned x; memcpy(&x, &f, 4); return x; }
inline double __longlong_as_double(long long x) { double f; memcpy(&f, &x, 8); return f; }
inline long long __double_as_longlong(double f) { long long x; memcpy(&x, &f, 8); return x; }
inline float __int2float_rn(int x) { return (float)x; }
inline float __uint2float_rn(unsigned x) { return (float)x; }
inline float __ll2float_rn(long long x) { return (float)x; }
inline float __double2float_rn(double x) { return (float)x; }
inline int __float2int_rn(float x) { return x != x ? 0 : (int)fmaxf(fminf(rintf(x), 2147483520.0f), -2147483648.0f); }
inline int __float2int_rz(float x) { return x != x ? 0 : (int)fmaxf(fminf(truncf(x), 2147483520.0f), -2147483648.0f); }
inline int __float2int_rd(float x) { return x != x ? 0 : (int)fmaxf(fminf(floorf(x), 2147483520.0f), -2147483648.0f); }
inline int __float2int_ru(float x) { return x != x ? 0 : (int)fmaxf(fminf(ceilf(x), 2147483520.0f), -2147483648.0f); }
inline unsigned __float2uint_rn(float x) { return x != x || x <= 0.0f ? 0u : (unsigned)fminf(rintf(x), 4294967040.0f); }
inline long long __float2ll_rn(float x) { return x != x ? 0 : llrintf(x); }

// Integer intrinsics.
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
    x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
    x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
    x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
    return __builtin_bswap32(x);
}
inline unsigned long long __brevll(unsigned long long x) {
    return ((unsigned long long)__brev((unsigned)x) << 32) | __brev((unsigned)(x >> 32));
}
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
    const uint64_t v = ((uint64_t)y << 32) | x;
    unsigned r = 0;
    for (int i = 0; i < 4; ++i) r |= (unsigned)((v >> (8 * ((s >> (4 * i)) & 7u))) & 0xffu) << (8 * i);
    return r;
}
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned shift) {
    const uint64_t v = ((uint64_t)hi << 32) | lo;
    return (unsigned)((v << (shift & 31u)) >> 32);
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned shift) {
    const uint64_t v = ((uint64_t)hi << 32) | lo;
    return (unsigned)(v >> (shift & 31u));
}
inline unsigned __funnelshift_lc(unsigned lo, unsigned hi, unsigned shift) {
    return __funnelshift_l(lo, hi, shift > 32u ? 32u : shift);
}
inline unsigned __funnelshift_rc(unsigned lo, unsigned hi, unsigned shift) {
    return shift >= 32u ? hi : __funnelshift_r(lo, hi, shift);
}
inline int __mulhi(int a, int b) { return (int)(((long long)a * b) >> 32); }
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
inline long long __mul64hi(long long a, long long b) { return (long long)(((__int128)a * b) >> 64); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
    return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}
inline int __mul24(int a, int b) { return ((a << 8) >> 8) * ((b << 8) >> 8); }
inline unsigned __umul24(unsigned a, unsigned b) { return (a & 0xffffffu) * (b & 0xffffffu); }

// min/max as CUDA overloads them: the usual arithmetic conversions, and fminf/fmaxf for floating point
// (a NaN argument loses against a number).
template <class A, class B,
          class = typename std::enable_if<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>::type>
inline typename std::common_type<A, B>::type max(A a, B b) {
    typedef typename std::common_type<A, B>::type C;
    if (std::is_floating_point<C>::value) return (C)fmax((double)(C)a, (double)(C)b);
    return (C)a > (C)b ? (C)a : (C)b;
}
template <class A, class B,
          class = typename std::enable_if<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>::type>
inline typename std::common_type<A, B>::type min(A a, B b) {
    typedef typename std::common_type<A, B>::type C;
    if (std::is_floating_point<C>::value) return (C)fmin((double)(C)a, (double)(C)b);
    return (C)a < (C)b ? (C)a : (C)b;
}
inline float max(float a, float b) { return fmaxf(a, b); }
inline float min(float a, float b) { return fminf(a, b); }
inline unsigned umin(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned umax(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long llmin(long long a, long long b) { return a < b ? a : b; }
inline long long llmax(long long a, long long b) { return a > b ? a : b; }

#include "fk_emu_mma.h"
