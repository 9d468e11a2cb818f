// CPU LR-QAT weight reconstruction W = s * (clamp(round(P + c * AB), 0, qmax) - z) and its backward.
// AB (fp32 [N, K]) is formed by the caller with a GEMM.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "core/quant_math.h"
#include "cpu/kernels.h"
#include "cpu/parallel.h"

namespace qatext::cpu {

template <typename T>
void lrqat_weight_forward(const uint8_t* p, const float* ab, const float* scale, const float* zero,
                          float lora_scale, int frac_bits, T* out, GroupShape shape) {
  const float qmax = qmax_for_bits(shape.bits);
  const int64_t row_bytes = p_row_bytes(shape.K, shape.bits, frac_bits);
  const int64_t G = shape.groups();
  at::parallel_for(0, shape.N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t k = 0; k < shape.K; ++k) {
        const int64_t i = n * shape.K + k, ng = n * G + k / shape.group_size;
        const LrqatCode c =
            lrqat_code(read_p(p + n * row_bytes, k, shape.bits, frac_bits), ab[i], lora_scale, qmax);
        out[i] = T((c.q - zero[ng]) * trained_scale(scale[ng]));
      }
    }
  });
}

template <typename T>
void lrqat_weight_backward(const T* grad_w, const uint8_t* p, const float* ab, const float* scale,
                           const float* zero, float lora_scale, int frac_bits, float* grad_u,
                           float* grad_scale, GroupShape shape) {
  const float qmax = qmax_for_bits(shape.bits);
  const int64_t row_bytes = p_row_bytes(shape.K, shape.bits, frac_bits);
  parallel_groups(shape, [&](int64_t ng, int64_t n, int64_t k0) {
    const float s = trained_scale(scale[ng]), z = zero[ng];
    float ds = 0.f;
    for (int64_t k = k0; k < k0 + shape.group_size; ++k) {
      const int64_t i = n * shape.K + k;
      const LrqatCode c = lrqat_code(read_p(p + n * row_bytes, k, shape.bits, frac_bits), ab[i], lora_scale, qmax);
      const float g = float(grad_w[i]);
      grad_u[i] = c.in_range ? g * s : 0.f;
      ds += g * (c.q - z);
    }
    grad_scale[ng] = ds;
  });
}

#define QATEXT_INSTANTIATE(T)                                                                            \
  template void lrqat_weight_forward<T>(const uint8_t*, const float*, const float*, const float*, float, \
                                        int, T*, GroupShape);                                          \
  template void lrqat_weight_backward<T>(const T*, const uint8_t*, const float*, const float*,          \
                                         const float*, float, int, float*, float*, GroupShape);
QATEXT_INSTANTIATE(float)
QATEXT_INSTANTIATE(c10::Half)
QATEXT_INSTANTIATE(c10::BFloat16)
#undef QATEXT_INSTANTIATE

}  // namespace qatext::cpu
