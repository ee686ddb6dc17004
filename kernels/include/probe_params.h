/* probe_params.h: launch parameters of the device probes (kernels/probe). Read by nvcc and by bindgen. */
#ifndef FK_PROBE_PARAMS_H
#define FK_PROBE_PARAMS_H

#include <stdint.h>

/* Copy n_bytes from src to dst. Both pointers are 16-byte aligned (checked on the host); the kernel moves
 * n_bytes / 16 vectors of 16 bytes and then the n_bytes % 16 tail bytes. */
typedef struct fk_copy_params {
    const void *src;
    void *dst;
    uint64_t n_bytes;
} fk_copy_params;

/* Threads per block of the copy kernel; the host picks the grid. */
#define FK_COPY_THREADS 256
/* 16-byte vectors each thread moves per loop trip (independent loads in flight). */
#define FK_COPY_UNROLL 4

#endif
