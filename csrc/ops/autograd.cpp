// Autograd of dequant_matmul in C++: the QA-LoRA and E2E-QP layers call it once per linear per
// step, and a Python autograd kernel cost it about as much host time again as the GEMM's own launch
// path (the 7B step is host-bound: benchmarks/NOTES.md).
#include <torch/autograd.h>
#include <torch/library.h>

#include "ops/ops.h"

namespace qatext::ops {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Edge indices of apply's tensor arguments (x, packed, scale, zero, bias).
constexpr size_t kX = 0, kScale = 2, kZero = 3, kBias = 4;

// Through the dispatcher, not the C++ functions: under torch.compile / AOT tracing the tensors are
// fake and the ops' fake kernels must answer.
template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

class DequantMatmulFunction : public torch::autograd::Function<DequantMatmulFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& packed,
                            const at::Tensor& scale, const at::Tensor& zero, int64_t bits, int64_t group_size,
                            const std::optional<at::Tensor>& bias) {
    ctx->save_for_backward({x, packed, scale, zero});
    ctx->saved_data["bits"] = bits;
    ctx->saved_data["group_size"] = group_size;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    static const auto op = op_handle<decltype(dequant_matmul)>("qatext::dequant_matmul");
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return op.call(x, packed, scale, zero, bits, group_size, bias);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &packed = saved[1], &scale = saved[2], &zero = saved[3];
    const at::Tensor& grad_y = grads[0];
    const int64_t bits = ctx->saved_data["bits"].toInt(), group_size = ctx->saved_data["group_size"].toInt();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    TORCH_CHECK(!ctx->needs_input_grad(kZero),
                "qatext.dequant_matmul: zero is frozen (only x, scale and bias are differentiable); "
                "call zero.requires_grad_(False)");
    static const auto grad_input_op =
        op_handle<decltype(dequant_matmul_grad_input)>("qatext::dequant_matmul_grad_input");
    static const auto scale_grad_op = op_handle<decltype(e2eqp_scale_grad)>("qatext::e2eqp_scale_grad");
    at::Tensor grad_x, grad_scale, grad_bias;
    if (ctx->needs_input_grad(kX)) {
      grad_x = grad_input_op.call(grad_y, packed, scale, zero, bits, group_size, x.size(-1));
    }
    if (ctx->needs_input_grad(kScale)) {
      grad_scale = scale_grad_op.call(x, grad_y, packed, zero, bits, group_size).to(scale.scalar_type());
    }
    if (has_bias && ctx->needs_input_grad(kBias)) {
      grad_bias = grad_y.reshape({-1, grad_y.size(-1)}).sum(0);
    }
    // One entry per forward argument: x, packed, scale, zero, bits, group_size, bias.
    return {grad_x, at::Tensor(), grad_scale, at::Tensor(), at::Tensor(), at::Tensor(), grad_bias};
  }
};

at::Tensor dequant_matmul_autograd(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                                   const at::Tensor& zero, int64_t bits, int64_t group_size,
                                   const std::optional<at::Tensor>& bias) {
  return DequantMatmulFunction::apply(x, packed, scale, zero, bits, group_size, bias);
}

}  // namespace

}  // namespace qatext::ops

TORCH_LIBRARY_IMPL(qatext, Autograd, m) { m.impl("dequant_matmul", &qatext::ops::dequant_matmul_autograd); }
