// QA-LoRA's linear as one op: the frozen group-wise weight's product plus the adapter on the
// group-pooled input,
//   y = x @ deq(W)^T + bias + (lora_scale / g) * ((pool_g(x) @ A^T) @ B^T),   pool_g: sum over each group,
// the ops, order and dtypes the layer ran one by one in Python. One op with its autograd in C++
// (ops/autograd.cpp): a 7B model calls it 224 times a training step, and the step is host-bound, so
// each Python op and autograd node it replaces is host time saved.
#include "ops/common.h"
#include "ops/ops.h"

namespace qatext::ops {

namespace {

// Whether the streaming kernels take a contiguous tensor whose wide side is [.., K] of `numel` elements
// in groups of g: 8-element chunks that never straddle a group, chunk indices in 32 bits.
bool group_kernel_applies(const at::Tensor& t, int64_t numel, int64_t K, int64_t g) {
  return t.is_cuda() && t.is_contiguous() && K % 8 == 0 && g % 8 == 0 && numel / 8 < (int64_t(1) << 31);
}

}  // namespace

at::Tensor group_sum(const at::Tensor& x, int64_t group_size) {
  const char* op = "qatext.group_sum";
  check_float(op, "x", x);
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dimension, got a scalar");
  const int64_t K = x.size(-1), g = resolve_group_size(op, group_size, K), lanes = g / 8;
  auto sizes = x.sizes().vec();
  sizes.back() = K / g;
  if (group_kernel_applies(x, x.numel(), K, g) && aligned16(x) && lanes <= 32 && (lanes & (lanes - 1)) == 0) {
    at::Tensor out = at::empty(sizes, x.options());
    const at::OptionalDeviceGuard guard(at::device_of(x));
    QATEXT_DISPATCH_FLOAT(x.scalar_type(), [&] {
      QATEXT_CUDA_ONLY(cuda::group_sum<scalar_t>(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                                                 x.numel() / 8, int(lanes), current_stream(x)));
    });
    return out;
  }
  sizes.push_back(g);
  return x.reshape(sizes).sum(-1);
}

at::Tensor group_expand(const at::Tensor& t, int64_t group_size) {
  const char* op = "qatext.group_expand";
  check_float(op, "t", t);
  TORCH_CHECK_VALUE(t.dim() >= 1, op, ": t must have at least one dimension, got a scalar");
  TORCH_CHECK_VALUE(group_size > 0, op, ": group_size must be positive, got ", group_size);
  auto sizes = t.sizes().vec();
  sizes.back() = t.size(-1) * group_size;
  if (group_kernel_applies(t, t.numel() * group_size, sizes.back(), group_size)) {  // t read element-wise
    at::Tensor out = at::empty(sizes, t.options());
    const at::OptionalDeviceGuard guard(at::device_of(t));
    QATEXT_DISPATCH_FLOAT(t.scalar_type(), [&] {
      QATEXT_CUDA_ONLY(cuda::group_expand<scalar_t>(t.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                                                    out.numel() / 8, int(group_size / 8), current_stream(t)));
    });
    return out;
  }
  auto grouped = t.sizes().vec();
  grouped.push_back(group_size);
  return t.unsqueeze(-1).expand(grouped).reshape(sizes);
}

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
  QaloraParts parts;
  parts.group_size = g;
  parts.alpha = lora_scale / double(g);  // the pooling's 1 / g and the adapter's scale, one factor
  static const auto group_sum_op = op_handle<decltype(group_sum)>("qatext::group_sum");
  parts.pooled = group_sum_op.call(x, g);
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
