/* fk_emu_abi.h: the C interface between Rust (src/emu/) and an emulated kernel family
 * (OUT_DIR/emu/<variant>/libfk_emu_<family>.so, built by build.rs from the same .cu sources as the
 * fatbin). Read by the emulator runtime and, through bindgen, by Rust: one layout on both sides. */
#ifndef FK_EMU_ABI_H
#define FK_EMU_ABI_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Bumped whenever a struct below changes: Rust refuses a library built against another version. */
#define FK_EMU_ABI_VERSION 1u

/* Thread orders within a block (see kernels/emu/README.md). */
#define FK_EMU_SCHEDULE_ROUND_ROBIN 0u
#define FK_EMU_SCHEDULE_WARP_GREEDY 1u
#define FK_EMU_SCHEDULE_WARP_GREEDY_REVERSED 2u
#define FK_EMU_SCHEDULE_RANDOM 3u

#define FK_EMU_MAX_ARGS 8u

/* The sanitizer a library variant was compiled with. */
#define FK_EMU_SANITIZER_NONE 0u
#define FK_EMU_SANITIZER_ADDRESS 1u /* AddressSanitizer + UndefinedBehaviorSanitizer */
#define FK_EMU_SANITIZER_THREAD 2u

/* One kernel of a family, as the build found it in the preprocessed source. */
typedef struct fk_emu_kernel_info {
    const char *name;
    /* __launch_bounds__ maximum threads per block (0: none declared). */
    uint32_t max_threads;
    /* __cluster_dims__ (all 0: none declared). */
    uint32_t cluster[3];
    uint32_t n_args;
    uint32_t arg_size[FK_EMU_MAX_ARGS];
} fk_emu_kernel_info;

/* What the library is: ABI version, variant, the emulated architecture. */
typedef struct fk_emu_library_info {
    uint32_t abi_version;
    uint32_t sanitizer;
    uint32_t arch; /* __CUDA_ARCH__ the sources were compiled for, e.g. 900 */
    uint32_t n_kernels;
    uint64_t max_dynamic_smem; /* bytes of dynamic shared memory a block can be given */
    uint64_t static_smem;      /* bytes of static __shared__ variables (all kernels of the family) */
} fk_emu_library_info;

/* One launch. */
typedef struct fk_emu_launch_desc {
    uint32_t kernel; /* index into the family's kernel table */
    uint32_t grid[3];
    uint32_t block[3];
    /* Cluster dimensions given at launch (all 0: the kernel's __cluster_dims__, or none). */
    uint32_t cluster[3];
    uint64_t dynamic_smem;
    /* The kernel's dynamic shared-memory limit: 48 KiB unless the launcher raised it (the CUDA
     * attribute MAX_DYNAMIC_SHARED_SIZE_BYTES), and the device's opt-in limit. */
    uint64_t dynamic_smem_limit;
    uint64_t device_smem_optin;
    uint32_t max_threads_per_block;
    uint32_t cluster_capable; /* the emulated device has thread-block clusters */
    const void *const *args;  /* pointers to each argument's bytes, as cuLaunchKernel takes them */
    uint32_t n_args;
    uint32_t arg_size[FK_EMU_MAX_ARGS];
    uint32_t schedule;
    uint32_t fiber_stack_kib; /* 0: the library's default */
    uint64_t seed;            /* FK_EMU_SCHEDULE_RANDOM */
} fk_emu_launch_desc;

/* What a launch did. */
typedef struct fk_emu_launch_stats {
    uint64_t blocks;
    uint64_t threads;
    uint64_t switches;   /* fiber context switches */
    uint64_t barriers;   /* completed block barriers */
    uint64_t warp_ops;   /* completed warp collectives (shuffles, votes, syncwarp, mma, ldmatrix) */
    uint64_t cluster_barriers;
} fk_emu_launch_stats;

/* Library entry points (dlsym'ed by Rust). */
typedef const fk_emu_library_info *(*fk_emu_library_fn)(void);
typedef const fk_emu_kernel_info *(*fk_emu_kernels_fn)(void);
/* Runs a launch to completion on the calling thread (plus one helper thread per extra block of a
 * cluster). Returns 0, or non-zero with a message in err (file:line, block, lanes). */
typedef int (*fk_emu_launch_fn)(const fk_emu_launch_desc *desc, fk_emu_launch_stats *stats, char *err,
                                uint64_t err_len);

#ifdef __cplusplus
}
#endif

#endif
