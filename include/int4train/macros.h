// int4train core: portability macros for code shared by the host compiler and nvcc.
#pragma once

#if defined(__CUDACC__)
#define INT4TRAIN_HD __host__ __device__ __forceinline__
#else
#define INT4TRAIN_HD inline
#endif
