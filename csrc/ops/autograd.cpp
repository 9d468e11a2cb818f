// Autograd of every differentiable qatext op, in C++. Each trained linear calls one of them per step
// (fake_quant: full QAT and Block-AP; qalora_linear: QA-LoRA; dequant_matmul: E2E-QP; lrqat_linear:
// LR-QAT; dequant and lrqat_weight: a mixture's stacked experts), and a Python autograd kernel cost about
// as much host time again as the op's own launch path: the 7B steps are host-bound (benchmarks/NOTES.md).
// Backwards call the ops through the dispatcher.
#include <torch/autograd.h>
#include <torch/library.h>

#include "ops/common.h"
#include "ops/ops.h"

namespace qatext::ops {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// fq(w) with the straight-through gradients to w, scale and zero (the formula: qatext/quant/primitives.py).
class FakeQuantFunction : public torch::autograd::Function<FakeQuantFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& w, const at::Tensor& scale,
                            const at::Tensor& zero, int64_t bits, int64_t group_size) {
    ctx->save_for_backward({w, scale, zero});
    ctx->saved_data["bits"] = bits;
    ctx->saved_data["group_size"] = group_size;
    static const auto op = op_handle<decltype(fake_quant)>("qatext::fake_quant");
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return op.call(w, scale, zero, bits, group_size);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    static const auto op = op_handle<decltype(fake_quant_backward)>("qatext::fake_quant_backward");
    auto [grad_w, grad_scale, grad_zero] = op.call(grads[0], saved[0], saved[1], saved[2],
                                                   ctx->saved_data["bits"].toInt(),
                                                   ctx->saved_data["group_size"].toInt());
    return {grad_w, grad_scale, grad_zero, at::Tensor(), at::Tensor()};
  }
};

class FakeQuantPerTokenFunction : public torch::autograd::Function<FakeQuantPerTokenFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t bits, bool symmetric) {
    ctx->save_for_backward({x});
    ctx->saved_data["bits"] = bits;
    ctx->saved_data["symmetric"] = symmetric;
    static const auto op = op_handle<decltype(fake_quant_per_token)>("qatext::fake_quant_per_token");
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return op.call(x, bits, symmetric);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        op_handle<decltype(fake_quant_per_token_backward)>("qatext::fake_quant_per_token_backward");
    return {op.call(grads[0], ctx->get_saved_variables()[0], ctx->saved_data["bits"].toInt(),
                    ctx->saved_data["symmetric"].toBool()),
            at::Tensor(), at::Tensor()};
  }
};

// LR-QAT's reconstructed weight (for merging and inspection; training calls lrqat_linear).
class LrqatWeightFunction : public torch::autograd::Function<LrqatWeightFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& p, const at::Tensor& a, const at::Tensor& b,
                            const at::Tensor& scale, const at::Tensor& zero, double lora_scale, int64_t bits,
                            int64_t group_size, int64_t frac_bits) {
    ctx->save_for_backward({p, a, b, scale, zero});
    ctx->saved_data["lora_scale"] = lora_scale;
    ctx->saved_data["bits"] = bits;
    ctx->saved_data["group_size"] = group_size;
    ctx->saved_data["frac_bits"] = frac_bits;
    static const auto op = op_handle<decltype(lrqat_weight)>("qatext::lrqat_weight");
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return op.call(p, a, b, scale, zero, lora_scale, bits, group_size, frac_bits);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    static const auto op = op_handle<decltype(lrqat_weight_backward)>("qatext::lrqat_weight_backward");
    auto [grad_a, grad_b, grad_scale] =
        op.call(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4],
                ctx->saved_data["lora_scale"].toDouble(), ctx->saved_data["bits"].toInt(),
                ctx->saved_data["group_size"].toInt(), ctx->saved_data["frac_bits"].toInt());
    return {at::Tensor(), grad_a, grad_b, grad_scale, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

// deq = (q - z) s with the gradient to the scale (E2E-QP's trained step sizes, where a caller builds the weight
// itself: a mixture's stacked experts); the codes and the zero are frozen.
class DequantFunction : public torch::autograd::Function<DequantFunction> {
  static constexpr size_t kScale = 1, kZero = 2;  // edge indices of apply's tensor arguments (packed, scale, zero)

 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& packed, const at::Tensor& scale,
                            const at::Tensor& zero, int64_t bits, int64_t group_size, int64_t in_features,
                            at::ScalarType dtype) {
    ctx->save_for_backward({packed, zero});
    ctx->saved_data["bits"] = bits;
    ctx->saved_data["group_size"] = group_size;
    ctx->saved_data["scale_dtype"] = scale.scalar_type();
    static const auto op = op_handle<decltype(dequant)>("qatext::dequant");
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return op.call(packed, scale, zero, bits, group_size, in_features, dtype);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    TORCH_CHECK(!ctx->needs_input_grad(kZero),
                "qatext.dequant: zero is frozen (only scale is differentiable); call zero.requires_grad_(False)");
    static const auto scale_grad_op = op_handle<decltype(dequant_scale_grad)>("qatext::dequant_scale_grad");
    at::Tensor grad_scale;
    if (ctx->needs_input_grad(kScale)) {
      grad_scale = scale_grad_op.call(grads[0], saved[0], saved[1], ctx->saved_data["bits"].toInt(),
                                      ctx->saved_data["group_size"].toInt())
                       .to(ctx->saved_data["scale_dtype"].toScalarType());
    }
    // One entry per forward argument: packed, scale, zero, bits, group_size, in_features, dtype.
    return {at::Tensor(), grad_scale, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class DequantMatmulFunction : public torch::autograd::Function<DequantMatmulFunction> {
  // Edge indices of apply's tensor arguments (x, packed, scale, zero, bias).
  static constexpr size_t kX = 0, kScale = 2, kZero = 3, kBias = 4;

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

// LR-QAT's linear: holds x, P, A, B, s, z for backward, never the N x K weight, which backward
// recomputes (the paper's built-in checkpointing). One op, so that torch.compile cannot merge the
// recomputation with the forward's weight and keep it.
class LrqatLinearFunction : public torch::autograd::Function<LrqatLinearFunction> {
  // Edge indices of apply's tensor arguments (x, p, a, b, scale, zero, bias).
  static constexpr size_t kX = 0, kA = 2, kB = 3, kScale = 4, kBias = 6;

 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& p, const at::Tensor& a,
                            const at::Tensor& b, const at::Tensor& scale, const at::Tensor& zero,
                            const std::optional<at::Tensor>& bias, double lora_scale, int64_t bits,
                            int64_t group_size, int64_t frac_bits) {
    ctx->save_for_backward({x, p, a, b, scale, zero});
    ctx->saved_data["lora_scale"] = lora_scale;
    ctx->saved_data["bits"] = bits;
    ctx->saved_data["group_size"] = group_size;
    ctx->saved_data["frac_bits"] = frac_bits;
    ctx->saved_data["bias_dtype"] = bias.has_value() && bias->defined() ? c10::IValue(bias->scalar_type())
                                                                         : c10::IValue();
    static const auto op = op_handle<decltype(lrqat_linear)>("qatext::lrqat_linear");
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return op.call(x, p, a, b, scale, zero, bias, lora_scale, bits, group_size, frac_bits);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &p = saved[1], &a = saved[2], &b = saved[3], &scale = saved[4], &zero = saved[5];
    const double lora_scale = ctx->saved_data["lora_scale"].toDouble();
    const int64_t bits = ctx->saved_data["bits"].toInt(), group_size = ctx->saved_data["group_size"].toInt();
    const int64_t frac_bits = ctx->saved_data["frac_bits"].toInt();
    const c10::IValue bias_dtype = ctx->saved_data["bias_dtype"];
    static const auto weight_op = op_handle<decltype(lrqat_weight)>("qatext::lrqat_weight");
    static const auto backward_op = op_handle<decltype(lrqat_linear_backward)>("qatext::lrqat_linear_backward");
    const at::Tensor& gy = grads[0];
    const bool grad_input = ctx->needs_input_grad(kX);
    at::Tensor grad_x, grad_a, grad_b, grad_scale, grad_bias;
    if (ctx->needs_input_grad(kA) || ctx->needs_input_grad(kB) || ctx->needs_input_grad(kScale)) {
      // One op: the weight kernel's backward pass also rebuilds W for dX.
      std::tie(grad_x, grad_a, grad_b, grad_scale) =
          backward_op.call(gy, x, p, a, b, scale, zero, lora_scale, bits, group_size, frac_bits, grad_input);
      if (!grad_input) grad_x = at::Tensor();
    } else if (grad_input) {
      const at::Tensor w = weight_op.call(p, a, b, scale, zero, lora_scale, bits, group_size, frac_bits);
      grad_x = at::matmul(gy, w.to(gy.scalar_type())).to(x.scalar_type());
    }
    if (!bias_dtype.isNone() && ctx->needs_input_grad(kBias)) {
      grad_bias = flatten_rows(gy).sum(0).to(bias_dtype.toScalarType());
    }
    // One entry per forward argument: x, p, a, b, scale, zero, bias, lora_scale, bits, group_size, frac_bits.
    return {grad_x, at::Tensor(), grad_a, grad_b, grad_scale, at::Tensor(), grad_bias,
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// QA-LoRA's linear (ops/qalora_ops.cpp): holds the pooled input [.., K / g] and the adapter's hidden
// h = pooled @ A^T [.., r] for backward, not x; the codes, scale and zero are frozen.
class QaloraLinearFunction : public torch::autograd::Function<QaloraLinearFunction> {
  // Edge indices of apply's tensor arguments (x, packed, scale, zero, a, b, bias).
  static constexpr size_t kX = 0, kScale = 2, kZero = 3, kA = 4, kB = 5, kBias = 6;

 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& packed,
                            const at::Tensor& scale, const at::Tensor& zero, const at::Tensor& a, const at::Tensor& b,
                            const std::optional<at::Tensor>& bias, double lora_scale, int64_t bits,
                            int64_t group_size) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    const QaloraParts parts = qalora_parts(x, packed, scale, zero, a, b, bias, lora_scale, bits, group_size);
    ctx->save_for_backward({packed, scale, zero, a, b, parts.pooled, parts.h});
    ctx->saved_data["alpha"] = parts.alpha;
    ctx->saved_data["bits"] = bits;
    ctx->saved_data["group_size"] = parts.group_size;
    ctx->saved_data["bias_dtype"] = bias.has_value() && bias->defined() ? c10::IValue(bias->scalar_type())
                                                                         : c10::IValue();
    return parts.out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &packed = saved[0], &scale = saved[1], &zero = saved[2], &a = saved[3], &b = saved[4];
    const at::Tensor &pooled = saved[5], &h = saved[6];
    const int64_t bits = ctx->saved_data["bits"].toInt(), g = ctx->saved_data["group_size"].toInt();
    const c10::IValue bias_dtype = ctx->saved_data["bias_dtype"];
    TORCH_CHECK(!ctx->needs_input_grad(kScale) && !ctx->needs_input_grad(kZero),
                "qatext.qalora_linear: scale and zero are frozen (x, a, b and bias are differentiable); "
                "call requires_grad_(False) on them");
    const at::Tensor& gy = grads[0];
    const auto dtype = gy.scalar_type();
    // What autograd ran for the ops one by one: the add's alpha on the adapter's gradient, then each
    // linear's, then the pooling's (each group's gradient spread over its g inputs).
    const at::Tensor g_delta = at::mul(gy, ctx->saved_data["alpha"].toDouble());
    const at::Tensor g_h = at::matmul(g_delta, in_dtype(b, dtype));
    at::Tensor grad_x, grad_a, grad_b, grad_bias;
    if (ctx->needs_input_grad(kX)) {
      static const auto group_expand_op = op_handle<decltype(group_expand)>("qatext::group_expand");
      const at::Tensor g_pooled = at::matmul(g_h, in_dtype(a, dtype));
      grad_x = dequant_matmul_plus(gy, packed, scale, zero, bits, g, std::nullopt, group_expand_op.call(g_pooled, g),
                                   1.0, /*grad_input=*/true);
    }
    if (ctx->needs_input_grad(kA)) {
      grad_a = in_dtype(at::mm(flatten_rows(g_h).t(), flatten_rows(pooled)), a.scalar_type());
    }
    if (ctx->needs_input_grad(kB)) {
      grad_b = in_dtype(at::mm(flatten_rows(g_delta).t(), flatten_rows(h)), b.scalar_type());
    }
    if (!bias_dtype.isNone() && ctx->needs_input_grad(kBias)) {
      grad_bias = in_dtype(flatten_rows(gy).sum(0), bias_dtype.toScalarType());
    }
    // One entry per forward argument: x, packed, scale, zero, a, b, bias, lora_scale, bits, group_size.
    return {grad_x, at::Tensor(), at::Tensor(), at::Tensor(), grad_a, grad_b, grad_bias,
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

}  // namespace qatext::ops

TORCH_LIBRARY_IMPL(qatext, Autograd, m) {
  using namespace qatext::ops;
  m.impl("fake_quant", [](const at::Tensor& w, const at::Tensor& scale, const at::Tensor& zero, int64_t bits,
                          int64_t group_size) { return FakeQuantFunction::apply(w, scale, zero, bits, group_size); });
  m.impl("fake_quant_per_token", [](const at::Tensor& x, int64_t bits, bool symmetric) {
    return FakeQuantPerTokenFunction::apply(x, bits, symmetric);
  });
  m.impl("lrqat_weight", [](const at::Tensor& p, const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale,
                            const at::Tensor& zero, double lora_scale, int64_t bits, int64_t group_size,
                            int64_t frac_bits) {
    return LrqatWeightFunction::apply(p, a, b, scale, zero, lora_scale, bits, group_size, frac_bits);
  });
  m.impl("dequant", [](const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& zero, int64_t bits,
                       int64_t group_size, int64_t in_features, at::ScalarType dtype) {
    return DequantFunction::apply(packed, scale, zero, bits, group_size, in_features, dtype);
  });
  m.impl("dequant_matmul", [](const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                              const at::Tensor& zero, int64_t bits, int64_t group_size,
                              const std::optional<at::Tensor>& bias) {
    return DequantMatmulFunction::apply(x, packed, scale, zero, bits, group_size, bias);
  });
  m.impl("lrqat_linear", [](const at::Tensor& x, const at::Tensor& p, const at::Tensor& a, const at::Tensor& b,
                            const at::Tensor& scale, const at::Tensor& zero, const std::optional<at::Tensor>& bias,
                            double lora_scale, int64_t bits, int64_t group_size, int64_t frac_bits) {
    return LrqatLinearFunction::apply(x, p, a, b, scale, zero, bias, lora_scale, bits, group_size, frac_bits);
  });
  m.impl("qalora_linear", [](const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                             const at::Tensor& zero, const at::Tensor& a, const at::Tensor& b,
                             const std::optional<at::Tensor>& bias, double lora_scale, int64_t bits,
                             int64_t group_size) {
    return QaloraLinearFunction::apply(x, packed, scale, zero, a, b, bias, lora_scale, bits, group_size);
  });
}
