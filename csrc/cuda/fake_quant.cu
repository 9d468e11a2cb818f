// CUDA fake-quant kernels (straightforward versions: one thread per element forward, one block
// per quantization group backward so the scale/zero reductions are deterministic).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

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
    out[i] = T(fake_quant_value(float(w[i]), scale[ng], zero[ng], qmax));
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
  const float s = scale[ng], z = zero[ng];
  float ds = 0.f, dz = 0.f;
  for (int64_t k = threadIdx.x; k < shape.group_size; k += kThreads) {
    const FakeQuantGrad d = fake_quant_grad(float(w[base + k]), s, z, qmax, float(grad[base + k]));
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

// One block per token: min/max reduction, then the quantizer (or its straight-through mask).
template <typename T, bool Backward>
__global__ void per_token_kernel(const T* __restrict__ x, const T* __restrict__ grad, T* __restrict__ out,
                                 int64_t K, int bits, bool symmetric) {
  const T* row = x + blockIdx.x * K;
  float lo = INFINITY, hi = -INFINITY;
  for (int64_t k = threadIdx.x; k < K; k += kThreads) {
    const float v = float(row[k]);
    lo = fminf(lo, v);
    hi = fmaxf(hi, v);
  }
  lo = block_min<kThreads>(lo);
  hi = block_max<kThreads>(hi);
  const TokenQParams p = token_qparams(lo, hi, bits, symmetric);
  const float qmax = qmax_for_bits(bits);
  T* out_row = out + blockIdx.x * K;
  for (int64_t k = threadIdx.x; k < K; k += kThreads) {
    if constexpr (Backward) {
      out_row[k] = T(fake_quant_grad(float(row[k]), p.s, p.z, qmax, float(grad[blockIdx.x * K + k])).dw);
    } else {
      out_row[k] = T(fake_quant_value(float(row[k]), p.s, p.z, qmax));
    }
  }
}

}  // namespace

template <typename T>
void fake_quant_forward(const T* w, const float* scale, const float* zero, T* out, GroupShape shape,
                        cudaStream_t stream) {
  if (shape.numel() == 0) return;
  fake_quant_forward_kernel<T><<<grid_for(shape.numel()), kThreads, 0, stream>>>(w, scale, zero, out, shape);
  check_launch("fake_quant_forward");
}

template <typename T>
void fake_quant_backward(const T* grad, const T* w, const float* scale, const float* zero, T* grad_w,
                         float* grad_scale, float* grad_zero, GroupShape shape, cudaStream_t stream) {
  if (shape.numel() == 0) return;
  fake_quant_backward_kernel<T><<<unsigned(shape.N * shape.groups()), kThreads, 0, stream>>>(
      grad, w, scale, zero, grad_w, grad_scale, grad_zero, shape);
  check_launch("fake_quant_backward");
}

template <typename T>
void fake_quant_per_token_forward(const T* x, T* out, int64_t M, int64_t K, int bits, bool symmetric,
                                  cudaStream_t stream) {
  if (M * K == 0) return;
  per_token_kernel<T, false><<<unsigned(M), kThreads, 0, stream>>>(x, nullptr, out, K, bits, symmetric);
  check_launch("fake_quant_per_token_forward");
}

template <typename T>
void fake_quant_per_token_backward(const T* grad, const T* x, T* grad_x, int64_t M, int64_t K, int bits,
                                   bool symmetric, cudaStream_t stream) {
  if (M * K == 0) return;
  per_token_kernel<T, true><<<unsigned(M), kThreads, 0, stream>>>(x, grad, grad_x, K, bits, symmetric);
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
