// fk_emu_runtime.h: the interface between the emulated kernels' built-ins (fk_emu.h) and the runtime
// that runs them (fk_emu_runtime.cpp): the vector types, the running thread's view of its launch, and
// the barriers, collectives and async copies the runtime implements. Included by both; it includes
// neither.
#pragma once

// Everything the emulated family defines stays inside its library except the fk_emu_* entry points.
#pragma GCC visibility push(hidden)

#include <stddef.h>
#include <stdint.h>

// The architecture the emulated kernels see as __CUDA_ARCH__ (fk_emu.h), and the runtime reports.
#ifndef FK_EMU_ARCH
#define FK_EMU_ARCH 900
#endif

// ---------------------------------------------------------------------------------------------------
// Vector types (alignment as in CUDA's vector_types.h).
#define FK_EMU_VEC(T, N1, N2, N3, N4, A2, A3, A4)                                                  \
    struct N1 { T x; };                                                                            \
    struct __attribute__((aligned(A2))) N2 { T x, y; };                                            \
    struct N3 { T x, y, z; };                                                                      \
    struct __attribute__((aligned(A4))) N4 { T x, y, z, w; };                                      \
    inline N1 make_##N1(T x) { return N1{x}; }                                                     \
    inline N2 make_##N2(T x, T y) { return N2{x, y}; }                                             \
    inline N3 make_##N3(T x, T y, T z) { return N3{x, y, z}; }                                     \
    inline N4 make_##N4(T x, T y, T z, T w) { return N4{x, y, z, w}; }
FK_EMU_VEC(signed char, char1, char2, char3, char4, 2, 1, 4)
FK_EMU_VEC(unsigned char, uchar1, uchar2, uchar3, uchar4, 2, 1, 4)
FK_EMU_VEC(short, short1, short2, short3, short4, 4, 2, 8)
FK_EMU_VEC(unsigned short, ushort1, ushort2, ushort3, ushort4, 4, 2, 8)
FK_EMU_VEC(int, int1, int2, int3, int4, 8, 4, 16)
FK_EMU_VEC(unsigned int, uint1, uint2, uint3, uint4, 8, 4, 16)
FK_EMU_VEC(long long, longlong1, longlong2, longlong3, longlong4, 16, 8, 16)
FK_EMU_VEC(unsigned long long, ulonglong1, ulonglong2, ulonglong3, ulonglong4, 16, 8, 16)
FK_EMU_VEC(float, float1, float2, float3, float4, 8, 4, 16)
FK_EMU_VEC(double, double1, double2, double3, double4, 16, 8, 16)
#undef FK_EMU_VEC

struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
};

// ---------------------------------------------------------------------------------------------------
// The runtime's view of the running GPU thread (fk_emu_runtime.cpp).
namespace fk_emu {

struct LaunchGeom {
    dim3 grid;
    dim3 block;
    dim3 cluster;  // 1, 1, 1 without clusters
};

struct Block {
    uint3 idx;
    const LaunchGeom *geom;
    unsigned cluster_rank;
    uint3 cluster_idx;  // position of the block inside its cluster
};

struct Thread {
    uint3 tid;
    unsigned linear;
    unsigned lane;
    unsigned warp;
    Block *block;
};

// The running GPU thread. `const`: within one fiber the answer never changes, so the compiler may keep
// it in a register across a kernel's loops.
__attribute__((const)) Thread *self();

// One lane's part in a warp collective. `exec` runs once, when every lane named in `mask` has arrived
// with the same op, mask and source line; it sees every arrived lane's record (null for other lanes)
// and may report a misuse by writing a message into err.
struct Collective;
typedef void (*CollectiveFn)(Collective *const *lanes, unsigned mask, char *err, size_t err_len);
struct Collective {
    int op;
    unsigned mask;
    const void *in;
    void *out;
    CollectiveFn exec;
};
void warp_collective(Collective *c, const char *file, int line);

enum BarrierKind { BAR_SYNC = 0, BAR_COUNT = 1, BAR_AND = 2, BAR_OR = 3 };
int block_barrier(int kind, int pred, const char *file, int line);
void cluster_arrive(const char *file, int line);
void cluster_wait(const char *file, int line);
void *map_shared_rank(const void *p, unsigned rank, const char *file, int line);
bool shared_address(const void *p);
[[noreturn]] void trap(const char *what, const char *file, int line);
unsigned active_mask();

// cp.async: the copy is recorded (source bytes read now) and lands in shared memory only when a
// wait_group lets its group complete, so a kernel that reads before waiting reads stale data.
void cp_async(void *dst, const void *src, unsigned cp_size, unsigned src_size, const char *file, int line);
void cp_async_commit();
void cp_async_wait(unsigned pending_groups_allowed);

enum Op {
    OP_SHFL_IDX = 1,
    OP_SHFL_UP,
    OP_SHFL_DOWN,
    OP_SHFL_XOR,
    OP_BALLOT,
    OP_ANY,
    OP_ALL,
    OP_UNI,
    OP_MATCH_ANY,
    OP_MATCH_ALL,
    OP_REDUCE_ADD,
    OP_REDUCE_MIN,
    OP_REDUCE_MAX,
    OP_REDUCE_UMIN,
    OP_REDUCE_UMAX,
    OP_REDUCE_AND,
    OP_REDUCE_OR,
    OP_REDUCE_XOR,
    OP_SYNCWARP,
    OP_FIRST_TC = 64,  // tensor-core and ldmatrix ops: fk_emu_mma.h
};
const char *op_name(int op);

struct ShflIn {
    uint64_t v;
    int arg;
    int width;
};
void shfl_exec(Collective *const *lanes, unsigned mask, char *err, size_t err_len);
void vote_exec(Collective *const *lanes, unsigned mask, char *err, size_t err_len);

}  // namespace fk_emu

// The GPU's clock64(): a monotonic nanosecond count here (emulated timing means nothing).
long long clock64();
