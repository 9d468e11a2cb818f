// CPU fake-quant kernels: weights group-wise, activations per token.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <limits>

#include "core/quant_math.h"
#include "cpu/kernels.h"
#include "cpu/parallel.h"

namespace qatext::cpu {

template <typename T>
void fake_quant_forward(const T* w, const float* scale, const float* zero, T* out, GroupShape shape) {
  const float qmax = qmax_for_bits(shape.bits);
  parallel_groups(shape, [&](int64_t ng, int64_t n, int64_t k0) {
    const int64_t base = n * shape.K + k0;
    const float s = trained_scale(scale[ng]), z = trained_zero(zero[ng]);
    for (int64_t k = 0; k < shape.group_size; ++k) {
      out[base + k] = T(fake_quant_value(float(w[base + k]) / s, s, z, qmax));
    }
  });
}

template <typename T>
void fake_quant_backward(const T* grad, const T* w, const float* scale, const float* zero, T* grad_w,
                         float* grad_scale, float* grad_zero, GroupShape shape) {
  const float qmax = qmax_for_bits(shape.bits);
  parallel_groups(shape, [&](int64_t ng, int64_t n, int64_t k0) {
    const int64_t base = n * shape.K + k0;
    const float s = trained_scale(scale[ng]), z = trained_zero(zero[ng]);
    float ds = 0.f, dz = 0.f;
    for (int64_t k = 0; k < shape.group_size; ++k) {
      const FakeQuantGrad d = fake_quant_grad(float(w[base + k]) / s, s, z, qmax, float(grad[base + k]));
      grad_w[base + k] = T(d.dw);
      ds += d.ds;
      dz += d.dz;
    }
    grad_scale[ng] = ds;
    grad_zero[ng] = dz;
  });
}

template <typename T>
static TokenQParams row_qparams(const T* row, int64_t K, int bits, bool symmetric) {
  float lo = std::numeric_limits<float>::infinity(), hi = -lo;
  for (int64_t k = 0; k < K; ++k) {
    lo = std::min(lo, float(row[k]));
    hi = std::max(hi, float(row[k]));
  }
  return token_qparams(lo, hi, bits, symmetric);
}

template <typename T>
void fake_quant_per_token_forward(const T* x, T* out, int64_t M, int64_t K, int bits, bool symmetric) {
  const float qmax = qmax_for_bits(bits);
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const T* row = x + m * K;
      const TokenQParams p = row_qparams(row, K, bits, symmetric);
      for (int64_t k = 0; k < K; ++k) out[m * K + k] = T(fake_quant_value(float(row[k]) / p.s, p.s, p.z, qmax));
    }
  });
}

template <typename T>
void fake_quant_per_token_backward(const T* grad, const T* x, T* grad_x, int64_t M, int64_t K, int bits,
                                   bool symmetric) {
  const float qmax = qmax_for_bits(bits);
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const T* row = x + m * K;
      const TokenQParams p = row_qparams(row, K, bits, symmetric);
      for (int64_t k = 0; k < K; ++k) {
        grad_x[m * K + k] = T(fake_quant_grad(float(row[k]) / p.s, p.s, p.z, qmax, float(grad[m * K + k])).dw);
      }
    }
  });
}

#define QATEXT_INSTANTIATE(T)                                                                          \
  template void fake_quant_forward<T>(const T*, const float*, const float*, T*, GroupShape);          \
  template void fake_quant_backward<T>(const T*, const T*, const float*, const float*, T*, float*,    \
                                       float*, GroupShape);                                           \
  template void fake_quant_per_token_forward<T>(const T*, T*, int64_t, int64_t, int, bool);           \
  template void fake_quant_per_token_backward<T>(const T*, const T*, T*, int64_t, int64_t, int, bool);
QATEXT_INSTANTIATE(float)
QATEXT_INSTANTIATE(c10::Half)
QATEXT_INSTANTIATE(c10::BFloat16)
#undef QATEXT_INSTANTIATE

}  // namespace qatext::cpu
