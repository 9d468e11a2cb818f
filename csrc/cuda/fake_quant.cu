// CUDA fake-quant kernels.
//
// Weights, fast path (K and the group a multiple of 8, 16-byte aligned pointers): each thread owns
// 8 consecutive elements, loaded and stored as 16-byte vectors (two for fp32). Backward reduces
// grad_scale / grad_zero over the g / 8 lanes of a group with a fixed xor-shuffle tree
// (deterministic, no atomics) for g <= 256; larger groups (per-channel) take one block per group.
// The forward's 8 divisions a vector by the scale are a rounded reciprocal and FMA corrections (`divide`).
// Other shapes fall back to the simple kernels (one thread per element forward).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <bit>
#include <cstdint>
#include <initializer_list>

#include "core/quant_math.h"
#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace qatext::cuda {
namespace {

template <typename T>
__global__ void fake_quant_forward_kernel(const T* __restrict__ w, const float* __restrict__ scale,
                                          const float* __restrict__ zero, T* __restrict__ out, GroupShape shape) {
  const float qmax = qmax_for_bits(shape.bits);
  const int64_t G = shape.groups();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < shape.numel();
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t ng = (i / shape.K) * G + (i % shape.K) / shape.group_size;
    const float s = trained_scale(scale[ng]);
    out[i] = T(fake_quant_value(float(w[i]) / s, s, trained_zero(zero[ng]), qmax));
  }
}

template <typename T>
__global__ void fake_quant_backward_kernel(const T* __restrict__ grad, const T* __restrict__ w,
                                           const float* __restrict__ scale, const float* __restrict__ zero,
                                           T* __restrict__ grad_w, float* __restrict__ grad_scale,
                                           float* __restrict__ grad_zero, GroupShape shape) {
  const float qmax = qmax_for_bits(shape.bits);
  const int64_t ng = blockIdx.x, G = shape.groups();
  const int64_t base = (ng / G) * shape.K + (ng % G) * shape.group_size;
  const float s = trained_scale(scale[ng]), z = trained_zero(zero[ng]);
  float ds = 0.f, dz = 0.f;
  for (int64_t k = threadIdx.x; k < shape.group_size; k += kThreads) {
    const FakeQuantGrad d = fake_quant_grad(float(w[base + k]) / s, s, z, qmax, float(grad[base + k]));
    grad_w[base + k] = T(d.dw);
    ds += d.ds;
    dz += d.dz;
  }
  ds = block_sum<kThreads>(ds);
  dz = block_sum<kThreads>(dz);
  if (threadIdx.x == 0) {
    grad_scale[ng] = ds;
    grad_zero[ng] = dz;
  }
}

constexpr int kVec = 8;

template <typename T>
struct alignas(16) Vec8 {
  T v[kVec];
};

template <typename T>
__device__ __forceinline__ Vec8<T> load8(const T* p) {
  return *reinterpret_cast<const Vec8<T>*>(p);
}

template <typename T>
__device__ __forceinline__ void store8(T* p, const Vec8<T>& x) {
  *reinterpret_cast<Vec8<T>*>(p) = x;
}

// The 8 weights of a vector over their scale, as floats.
template <typename T>
__device__ __forceinline__ void divide8(const Vec8<T>& w, float s, float (&x)[kVec]) {
  float f[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) f[j] = float(w.v[j]);
  divide(f, divisor(s), x);
}

// Forward, 8 elements per thread. Groups tile each row in order (K % group_size == 0), so vector v's
// group is v / vecs_per_group: a shift where that is a power of two (group_shift >= 0).
// (Two vectors in flight per thread measured no better: see benchmarks/NOTES.md.)
template <typename T, typename Index>
__global__ void __launch_bounds__(kThreads) fake_quant_forward_vec_kernel(
    const T* __restrict__ w, const float* __restrict__ scale, const float* __restrict__ zero,
    T* __restrict__ out, Index vectors, Index vecs_per_group, int group_shift, float qmax) {
  for (Index v = blockIdx.x * Index(blockDim.x) + threadIdx.x; v < vectors; v += Index(gridDim.x) * blockDim.x) {
    const Index ng = group_shift >= 0 ? v >> group_shift : v / vecs_per_group;
    const float s = trained_scale(__ldg(scale + ng)), z = trained_zero(__ldg(zero + ng));
    float x[kVec];
    divide8(load8(w + Index(kVec) * v), s, x);
    Vec8<T> y;
#pragma unroll
    for (int j = 0; j < kVec; ++j) y.v[j] = T(fake_quant_value(x[j], s, z, qmax));
    store8(out + Index(kVec) * v, y);
  }
}

// Straight-through gradients of one 8-element vector at `offset`; adds its ds, dz to the sums.
template <typename T>
__device__ __forceinline__ void backward_vec8(const T* __restrict__ grad, const T* __restrict__ w,
                                              T* __restrict__ grad_w, int64_t offset, float s, float z, float qmax,
                                              float& ds, float& dz) {
  // A plain division here: with `divide` this kernel took 46 registers against 40 and ran 3-6% slower on
  // the H200 (benchmarks/NOTES.md), where the forward gained 9%.
  const Vec8<T> x = load8(w + offset), g = load8(grad + offset);
  Vec8<T> gw;
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    const FakeQuantGrad d = fake_quant_grad(float(x.v[j]) / s, s, z, qmax, float(g.v[j]));
    gw.v[j] = T(d.dw);
    ds += d.ds;
    dz += d.dz;
  }
  store8(grad_w + offset, gw);
}

// Backward for groups of 8 * Lanes elements (Lanes in 1..32): a group is Lanes consecutive lanes
// of one warp, reduced with xor shuffles in a fixed order.
template <typename T, int Lanes>
__global__ void __launch_bounds__(kThreads) fake_quant_backward_vec_kernel(
    const T* __restrict__ grad, const T* __restrict__ w, const float* __restrict__ scale,
    const float* __restrict__ zero, T* __restrict__ grad_w, float* __restrict__ grad_scale,
    float* __restrict__ grad_zero, int64_t vectors, float qmax) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
  for (int64_t base = (int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32) * 32; base < vectors;
       base += warps * 32) {
    const int64_t v = base + lane;
    const bool valid = v < vectors;  // whole groups: a group never straddles the end
    const int64_t ng = v / Lanes;
    float ds = 0.f, dz = 0.f;
    if (valid) {
      backward_vec8(grad, w, grad_w, kVec * v, trained_scale(__ldg(scale + ng)), trained_zero(__ldg(zero + ng)), qmax,
                    ds, dz);
    }
#pragma unroll
    for (int o = Lanes / 2; o > 0; o >>= 1) {
      ds += __shfl_xor_sync(0xffffffffu, ds, o);
      dz += __shfl_xor_sync(0xffffffffu, dz, o);
    }
    if (valid && lane % Lanes == 0) {
      grad_scale[ng] = ds;
      grad_zero[ng] = dz;
    }
  }
}

// Backward for large groups (per-channel): one block per group, 8 elements per thread per step.
template <typename T>
__global__ void __launch_bounds__(kThreads) fake_quant_backward_group_kernel(
    const T* __restrict__ grad, const T* __restrict__ w, const float* __restrict__ scale,
    const float* __restrict__ zero, T* __restrict__ grad_w, float* __restrict__ grad_scale,
    float* __restrict__ grad_zero, int64_t group_size, float qmax) {
  const int64_t ng = blockIdx.x, base = ng * group_size;  // groups tile each row, rows tile memory
  const float s = trained_scale(scale[ng]), z = trained_zero(zero[ng]);
  float ds = 0.f, dz = 0.f;
  for (int64_t k = int64_t(threadIdx.x) * kVec; k < group_size; k += int64_t(kThreads) * kVec) {
    backward_vec8(grad, w, grad_w, base + k, s, z, qmax, ds, dz);
  }
  ds = block_sum<kThreads>(ds);
  dz = block_sum<kThreads>(dz);
  if (threadIdx.x == 0) {
    grad_scale[ng] = ds;
    grad_zero[ng] = dz;
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

bool vector_path(const GroupShape& shape, std::initializer_list<const void*> ptrs) {
  if (shape.K % kVec != 0 || shape.group_size % kVec != 0) return false;
  for (const void* p : ptrs) {
    if (!aligned16(p)) return false;
  }
  return true;
}

unsigned int vec_grid(int64_t vectors) {
  // Enough blocks to fill the GPU several times over; the loops stride over the rest.
  return grid_for(vectors, kThreads);
}

// One block per token: min/max reduction, then the quantizer (or its straight-through mask).
// V = 8 reads and writes 16-byte vectors (K % 8 == 0, aligned rows); V = 1 is the general case.
template <typename T, int V>
struct alignas(V == 1 ? alignof(T) : 16) VecN {
  T v[V];
};

template <typename T, bool Backward, int V>
__global__ void __launch_bounds__(kThreads) per_token_kernel(const T* __restrict__ x, const T* __restrict__ grad,
                                                             T* __restrict__ out, int64_t K, int bits, bool symmetric) {
  using Vec = VecN<T, V>;
  const int64_t offset = int64_t(blockIdx.x) * K, n = K / V;
  const Vec* row = reinterpret_cast<const Vec*>(x + offset);
  float lo = INFINITY, hi = -INFINITY;
  for (int64_t k = threadIdx.x; k < n; k += kThreads) {
    const Vec a = row[k];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      lo = fminf(lo, float(a.v[j]));
      hi = fmaxf(hi, float(a.v[j]));
    }
  }
  lo = block_min<kThreads>(lo);
  hi = block_max<kThreads>(hi);
  const TokenQParams p = token_qparams(lo, hi, bits, symmetric);
  const Divisor d = divisor(p.s);
  const float qmax = qmax_for_bits(bits);
  Vec* out_row = reinterpret_cast<Vec*>(out + offset);
  for (int64_t k = threadIdx.x; k < n; k += kThreads) {
    const Vec a = row[k];
    float f[V], x[V];
#pragma unroll
    for (int j = 0; j < V; ++j) f[j] = float(a.v[j]);
    divide(f, d, x);
    Vec y;
    if constexpr (Backward) {
      const Vec g = reinterpret_cast<const Vec*>(grad + offset)[k];
#pragma unroll
      for (int j = 0; j < V; ++j) y.v[j] = T(fake_quant_grad(x[j], p.s, p.z, qmax, float(g.v[j])).dw);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) y.v[j] = T(fake_quant_value(x[j], p.s, p.z, qmax));
    }
    out_row[k] = y;
  }
}

template <typename T, bool Backward>
void launch_per_token(const T* x, const T* grad, T* out, int64_t M, int64_t K, int bits, bool symmetric,
                      cudaStream_t stream) {
  const bool vec = K % kVec == 0 && aligned16(x) && aligned16(out) && (grad == nullptr || aligned16(grad));
  if (vec) {
    per_token_kernel<T, Backward, kVec><<<unsigned(M), kThreads, 0, stream>>>(x, grad, out, K, bits, symmetric);
  } else {
    per_token_kernel<T, Backward, 1><<<unsigned(M), kThreads, 0, stream>>>(x, grad, out, K, bits, symmetric);
  }
}

}  // namespace

template <typename T>
void fake_quant_forward(const T* w, const float* scale, const float* zero, T* out, GroupShape shape,
                        cudaStream_t stream) {
  if (shape.numel() == 0) return;
  const float qmax = qmax_for_bits(shape.bits);
  if (vector_path(shape, {w, out})) {
    const int64_t vectors = shape.numel() / kVec, per_group = shape.group_size / kVec;
    const int shift = (per_group & (per_group - 1)) == 0 ? std::countr_zero(uint64_t(per_group)) : -1;
    if (shape.numel() < (int64_t(1) << 31)) {
      fake_quant_forward_vec_kernel<T, uint32_t><<<vec_grid(vectors), kThreads, 0, stream>>>(
          w, scale, zero, out, uint32_t(vectors), uint32_t(per_group), shift, qmax);
    } else {
      fake_quant_forward_vec_kernel<T, int64_t><<<vec_grid(vectors), kThreads, 0, stream>>>(
          w, scale, zero, out, vectors, per_group, shift, qmax);
    }
  } else {
    fake_quant_forward_kernel<T><<<grid_for(shape.numel()), kThreads, 0, stream>>>(w, scale, zero, out, shape);
  }
  check_launch("fake_quant_forward");
}

template <typename T>
void fake_quant_backward(const T* grad, const T* w, const float* scale, const float* zero, T* grad_w,
                         float* grad_scale, float* grad_zero, GroupShape shape, cudaStream_t stream) {
  if (shape.numel() == 0) return;
  const float qmax = qmax_for_bits(shape.bits);
  const int64_t lanes = shape.group_size / kVec, vectors = shape.numel() / kVec;
  if (vector_path(shape, {grad, w, grad_w}) && lanes <= 32 && (lanes & (lanes - 1)) == 0) {
    const unsigned grid = vec_grid(vectors);
    switch (lanes) {
#define QATEXT_LANES(L)                                                                                        \
  case L:                                                                                                      \
    fake_quant_backward_vec_kernel<T, L><<<grid, kThreads, 0, stream>>>(grad, w, scale, zero, grad_w,         \
                                                                         grad_scale, grad_zero, vectors, qmax); \
    break;
      QATEXT_LANES(1) QATEXT_LANES(2) QATEXT_LANES(4) QATEXT_LANES(8) QATEXT_LANES(16) QATEXT_LANES(32)
#undef QATEXT_LANES
    }
  } else if (vector_path(shape, {grad, w, grad_w})) {
    fake_quant_backward_group_kernel<T><<<unsigned(shape.N * shape.groups()), kThreads, 0, stream>>>(
        grad, w, scale, zero, grad_w, grad_scale, grad_zero, shape.group_size, qmax);
  } else {
    fake_quant_backward_kernel<T><<<unsigned(shape.N * shape.groups()), kThreads, 0, stream>>>(
        grad, w, scale, zero, grad_w, grad_scale, grad_zero, shape);
  }
  check_launch("fake_quant_backward");
}

template <typename T>
void fake_quant_per_token_forward(const T* x, T* out, int64_t M, int64_t K, int bits, bool symmetric,
                                  cudaStream_t stream) {
  if (M * K == 0) return;
  launch_per_token<T, false>(x, nullptr, out, M, K, bits, symmetric, stream);
  check_launch("fake_quant_per_token_forward");
}

template <typename T>
void fake_quant_per_token_backward(const T* grad, const T* x, T* grad_x, int64_t M, int64_t K, int bits,
                                   bool symmetric, cudaStream_t stream) {
  if (M * K == 0) return;
  launch_per_token<T, true>(x, grad, grad_x, M, K, bits, symmetric, stream);
  check_launch("fake_quant_per_token_backward");
}

#define QATEXT_INSTANTIATE(T)                                                                          \
  template void fake_quant_forward<T>(const T*, const float*, const float*, T*, GroupShape, cudaStream_t); \
  template void fake_quant_backward<T>(const T*, const T*, const float*, const float*, T*, float*,    \
                                       float*, GroupShape, cudaStream_t);                             \
  template void fake_quant_per_token_forward<T>(const T*, T*, int64_t, int64_t, int, bool, cudaStream_t); \
  template void fake_quant_per_token_backward<T>(const T*, const T*, T*, int64_t, int64_t, int, bool, \
                                                 cudaStream_t);
QATEXT_INSTANTIATE(float)
QATEXT_INSTANTIATE(c10::Half)
QATEXT_INSTANTIATE(c10::BFloat16)
#undef QATEXT_INSTANTIATE

}  // namespace qatext::cuda
