// QA-LoRA's linear as one op: the frozen group-wise weight's product plus the adapter on the
// group-pooled input,
//   y = x @ deq(W)^T + bias + (lora_scale / g) * ((pool_g(x) @ A^T) @ B^T),   pool_g: sum over each group,
// the ops, order and dtypes the layer ran one by one in Python. One op with its autograd in C++
// (ops/autograd.cpp): a 7B model calls it 224 times a training step, and the step is host-bound, so
// each Python op and autograd node it replaces is host time saved.
#include "ops/common.h"
#include "ops/ops.h"

namespace qatext::ops {

QaloraParts qalora_parts(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                         const at::Tensor& zero, const at::Tensor& a, const at::Tensor& b,
                         const std::optional<at::Tensor>& bias, double lora_scale, int64_t bits, int64_t group_size) {
  const char* op = "qatext.qalora_linear";
  check_matmul_inputs(op, x, "packed", packed, bias);
  check_dim(op, "packed", packed, 2);
  const int64_t K = x.size(-1), N = packed.size(0), g = resolve_group_size(op, group_size, K);
  check_dim(op, "a", a, 2);
  check_dim(op, "b", b, 2);
  TORCH_CHECK_VALUE(a.size(1) == K / g && b.size(0) == N && b.size(1) == a.size(0), op,
                    ": a must be [rank, in_features / group_size] = [r, ", K / g, "] and b [out_features, r] = [",
                    N, ", r], got a ", a.sizes(), " and b ", b.sizes());
  check_same_device(op, {{"x", &x}, {"a", &a}, {"b", &b}});
  auto grouped = x.sizes().vec();
  grouped.back() = K / g;
  grouped.push_back(g);
  QaloraParts parts;
  parts.group_size = g;
  parts.alpha = lora_scale / double(g);  // the pooling's 1 / g and the adapter's scale, one factor
  parts.pooled = x.reshape(grouped).sum(-1);
  parts.h = at::linear(parts.pooled, in_dtype(a, x.scalar_type()));
  parts.out = dequant_matmul_plus(x, packed, scale, zero, bits, group_size, bias,
                                  at::linear(parts.h, in_dtype(b, x.scalar_type())), parts.alpha, /*grad_input=*/false);
  return parts;
}

at::Tensor qalora_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                         const at::Tensor& zero, const at::Tensor& a, const at::Tensor& b,
                         const std::optional<at::Tensor>& bias, double lora_scale, int64_t bits, int64_t group_size) {
  return qalora_parts(x, packed, scale, zero, a, b, bias, lora_scale, bits, group_size).out;
}

}  // namespace qatext::ops
