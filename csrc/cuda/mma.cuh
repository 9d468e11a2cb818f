// Warp-level tensor-core helpers shared by the GEMM kernels: mma.sync m16n8k16 with fp32
// accumulation, and the one traits type of the 16-bit element types (Native<T>): two floats packed
// into (or read from) one 32-bit register, a 16-bit pair subtraction, and the pair constants.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace qatext::cuda {

template <typename T>
struct Native;
// code_base: a code q masked into the mantissa of code_base is exactly base + q (base = 128 for bf16,
// 1024 for fp16), and subtracting base in 16 bits is exact too. ones: the pair (1, 1).
// fold_base: the mma takes base + q as it is and the epilogue subtracts base * s * sum_k x with the
// zero term, one 16-bit subtraction a code pair fewer. Only for bf16: the common term costs fp32 bits in
// the tensor cores' sums in proportion to base, and fp16's (1024) drifted its results by ~0.003 at
// K = 4096, more than one fp16 output ulp; bf16's base is 8x smaller and its output ulp 8x coarser.
template <>
struct Native<c10::BFloat16> {
  static constexpr uint32_t code_base = 0x43004300u;
  static constexpr bool fold_base = true;
  static constexpr float base = 128.f;
  static constexpr uint32_t ones = 0x3F803F80u;
  static __device__ __forceinline__ uint32_t sub2(uint32_t a, uint32_t b) {
    const __nv_bfloat162 r =
        __hsub2(*reinterpret_cast<const __nv_bfloat162*>(&a), *reinterpret_cast<const __nv_bfloat162*>(&b));
    return *reinterpret_cast<const uint32_t*>(&r);
  }
  static __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  static __device__ __forceinline__ float2 unpack2(uint32_t v) {
    return make_float2(__uint_as_float(v << 16), __uint_as_float(v & 0xFFFF0000u));
  }
};
template <>
struct Native<c10::Half> {
  static constexpr uint32_t code_base = 0x64006400u;
  static constexpr bool fold_base = false;
  static constexpr float base = 1024.f;
  static constexpr uint32_t ones = 0x3C003C00u;
  static __device__ __forceinline__ uint32_t sub2(uint32_t a, uint32_t b) {
    const __half2 r = __hsub2(*reinterpret_cast<const __half2*>(&a), *reinterpret_cast<const __half2*>(&b));
    return *reinterpret_cast<const uint32_t*>(&r);
  }
  static __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  static __device__ __forceinline__ float2 unpack2(uint32_t v) {
    return __half22float2(*reinterpret_cast<const __half2*>(&v));
  }
};

// d += a b on the tensor cores, TYPE the PTX name of the 16-bit input type ("bf16" or "f16").
#define QATEXT_MMA16816(TYPE)                                                                              \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TYPE "." TYPE                                       \
               ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                               \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                            \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))

template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<c10::BFloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
  QATEXT_MMA16816("bf16");
}
template <>
__device__ __forceinline__ void mma16816<c10::Half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  QATEXT_MMA16816("f16");
}
#undef QATEXT_MMA16816

}  // namespace qatext::cuda
