/* fk_hd.h: lets a header of plain scalar maths compile under nvcc (as __host__ __device__ code) and under
 * a host C/C++ compiler (cc in build.rs, for CPU tests of the same formulas). */
#ifndef FK_HD_H
#define FK_HD_H

#if defined(__CUDACC__)
#define FK_HD __host__ __device__ __forceinline__
#else
#define FK_HD static inline
#endif

#include <stdint.h>

#endif
