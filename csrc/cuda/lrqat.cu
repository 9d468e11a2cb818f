// CUDA LR-QAT weight reconstruction from P and AB (formed by cuBLAS), and its backward: the path
// for fp32 adapters and shapes off the tile grid of cuda/lrqat_fused.cu.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "core/quant_math.h"
#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace qatext::cuda {
namespace {

template <typename T>
__global__ void lrqat_forward_kernel(const uint8_t* __restrict__ p, const float* __restrict__ ab,
                                     const float* __restrict__ scale, const float* __restrict__ zero,
                                     float lora_scale, int frac_bits, T* __restrict__ out, GroupShape shape) {
  const float qmax = qmax_for_bits(shape.bits);
  const int64_t row_bytes = p_row_bytes(shape.K, shape.bits, frac_bits), G = shape.groups();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < shape.numel();
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / shape.K, k = i % shape.K, ng = n * G + k / shape.group_size;
    const LrqatCode c = lrqat_code(read_p(p + n * row_bytes, k, shape.bits, frac_bits), ab[i], lora_scale, qmax);
    out[i] = T((c.q - zero[ng]) * trained_scale(scale[ng]));
  }
}

template <typename T>
__global__ void lrqat_backward_kernel(const T* __restrict__ grad_w, const uint8_t* __restrict__ p,
                                      const float* __restrict__ ab, const float* __restrict__ scale,
                                      const float* __restrict__ zero, float lora_scale, int frac_bits,
                                      float* __restrict__ grad_u, float* __restrict__ grad_scale, GroupShape shape) {
  const float qmax = qmax_for_bits(shape.bits);
  const int64_t ng = blockIdx.x, G = shape.groups();
  const int64_t n = ng / G, k0 = (ng % G) * shape.group_size;
  const uint8_t* row = p + n * p_row_bytes(shape.K, shape.bits, frac_bits);
  const float s = trained_scale(scale[ng]), z = zero[ng];
  float ds = 0.f;
  for (int64_t k = k0 + threadIdx.x; k < k0 + shape.group_size; k += kThreads) {
    const int64_t i = n * shape.K + k;
    const LrqatCode c = lrqat_code(read_p(row, k, shape.bits, frac_bits), ab[i], lora_scale, qmax);
    const float g = float(grad_w[i]);
    grad_u[i] = c.in_range ? g * s : 0.f;
    ds += g * (c.q - z);
  }
  ds = block_sum<kThreads>(ds);
  if (threadIdx.x == 0) grad_scale[ng] = ds;
}

}  // namespace

template <typename T>
void lrqat_weight_forward(const uint8_t* p, const float* ab, const float* scale, const float* zero,
                          float lora_scale, int frac_bits, T* out, GroupShape shape, cudaStream_t stream) {
  if (shape.numel() == 0) return;
  lrqat_forward_kernel<T><<<grid_for(shape.numel()), kThreads, 0, stream>>>(p, ab, scale, zero, lora_scale,
                                                                           frac_bits, out, shape);
  check_launch("lrqat_weight_forward");
}

template <typename T>
void lrqat_weight_backward(const T* grad_w, const uint8_t* p, const float* ab, const float* scale,
                           const float* zero, float lora_scale, int frac_bits, float* grad_u,
                           float* grad_scale, GroupShape shape, cudaStream_t stream) {
  if (shape.numel() == 0) return;
  lrqat_backward_kernel<T><<<unsigned(shape.N * shape.groups()), kThreads, 0, stream>>>(
      grad_w, p, ab, scale, zero, lora_scale, frac_bits, grad_u, grad_scale, shape);
  check_launch("lrqat_weight_backward");
}

#define QATEXT_INSTANTIATE(T)                                                                            \
  template void lrqat_weight_forward<T>(const uint8_t*, const float*, const float*, const float*, float, \
                                        int, T*, GroupShape, cudaStream_t);                            \
  template void lrqat_weight_backward<T>(const T*, const uint8_t*, const float*, const float*,          \
                                         const float*, float, int, float*, float*, GroupShape, cudaStream_t);
QATEXT_INSTANTIATE(float)
QATEXT_INSTANTIATE(c10::Half)
QATEXT_INSTANTIATE(c10::BFloat16)
#undef QATEXT_INSTANTIATE

}  // namespace qatext::cuda
