#pragma once

#if defined(__CUDACC__)
#define QATEXT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define QATEXT_HOST_DEVICE inline
#endif

// Full unrolling where nvcc compiles (small fixed loops over registers); nothing for host compilers.
#if defined(__CUDACC__)
#define QATEXT_UNROLL _Pragma("unroll")
#else
#define QATEXT_UNROLL
#endif
