// fake_quant (weights, group-wise) and fake_quant_per_token (activations, dynamic), with backward.
#include "ops/common.h"
#include "ops/ops.h"

namespace qatext::ops {

namespace {

GroupShape check_weight(const char* op, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& zero,
                        int64_t bits, int64_t group_size) {
  check_float(op, "w", w);
  check_dim(op, "w", w, 2);
  check_same_device(op, {{"w", &w}, {"scale", &scale}, {"zero", &zero}});
  return check_qparam_shapes(op, scale, zero, w.size(0), w.size(1), bits, group_size);
}

}  // namespace

at::Tensor fake_quant(const at::Tensor& w_in, const at::Tensor& scale_in, const at::Tensor& zero_in, int64_t bits,
                      int64_t group_size) {
  const GroupShape shape = check_weight("qatext.fake_quant", w_in, scale_in, zero_in, bits, group_size);
  const at::Tensor w = w_in.contiguous(), scale = as_float(scale_in), zero = as_float(zero_in);
  at::Tensor out = at::empty_like(w);
  QATEXT_DISPATCH_FLOAT(w.scalar_type(), [&] {
    QATEXT_DEVICE_CALL(w, fake_quant_forward<scalar_t>, w.const_data_ptr<scalar_t>(), scale.const_data_ptr<float>(),
                       zero.const_data_ptr<float>(), out.mutable_data_ptr<scalar_t>(), shape);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quant_backward(const at::Tensor& grad_in, const at::Tensor& w_in,
                                                                   const at::Tensor& scale_in,
                                                                   const at::Tensor& zero_in, int64_t bits,
                                                                   int64_t group_size) {
  const char* op = "qatext.fake_quant_backward";
  const GroupShape shape = check_weight(op, w_in, scale_in, zero_in, bits, group_size);
  TORCH_CHECK_VALUE(grad_in.sizes() == w_in.sizes(), op, ": grad must have the shape of w ", w_in.sizes(), ", got ",
                    grad_in.sizes());
  check_same_device(op, {{"w", &w_in}, {"grad", &grad_in}});
  const at::Tensor w = w_in.contiguous(), grad = grad_in.to(w.scalar_type()).contiguous();
  const at::Tensor scale = as_float(scale_in), zero = as_float(zero_in);
  at::Tensor grad_w = at::empty_like(w);
  at::Tensor grad_scale = at::empty_like(scale), grad_zero = at::empty_like(zero);
  QATEXT_DISPATCH_FLOAT(w.scalar_type(), [&] {
    QATEXT_DEVICE_CALL(w, fake_quant_backward<scalar_t>, grad.const_data_ptr<scalar_t>(),
                       w.const_data_ptr<scalar_t>(), scale.const_data_ptr<float>(), zero.const_data_ptr<float>(),
                       grad_w.mutable_data_ptr<scalar_t>(), grad_scale.mutable_data_ptr<float>(),
                       grad_zero.mutable_data_ptr<float>(), shape);
  });
  return {grad_w, grad_scale.to(scale_in.scalar_type()), grad_zero.to(zero_in.scalar_type())};
}

at::Tensor fake_quant_per_token(const at::Tensor& x_in, int64_t bits, bool symmetric) {
  const char* op = "qatext.fake_quant_per_token";
  check_bits(op, bits);
  check_float(op, "x", x_in);
  TORCH_CHECK_VALUE(x_in.dim() >= 1, op, ": x must have at least one dimension");
  const at::Tensor x = x_in.contiguous();
  const int64_t K = x.size(-1), M = K == 0 ? 0 : x.numel() / K;
  at::Tensor out = at::empty_like(x);
  QATEXT_DISPATCH_FLOAT(x.scalar_type(), [&] {
    QATEXT_DEVICE_CALL(x, fake_quant_per_token_forward<scalar_t>, x.const_data_ptr<scalar_t>(),
                       out.mutable_data_ptr<scalar_t>(), M, K, int(bits), symmetric);
  });
  return out;
}

at::Tensor fake_quant_per_token_backward(const at::Tensor& grad_in, const at::Tensor& x_in, int64_t bits,
                                         bool symmetric) {
  const char* op = "qatext.fake_quant_per_token_backward";
  check_bits(op, bits);
  check_float(op, "x", x_in);
  TORCH_CHECK_VALUE(x_in.dim() >= 1, op, ": x must have at least one dimension");
  TORCH_CHECK_VALUE(grad_in.sizes() == x_in.sizes(), op, ": grad must have the shape of x ", x_in.sizes(),
                    ", got ", grad_in.sizes());
  check_same_device(op, {{"x", &x_in}, {"grad", &grad_in}});
  const at::Tensor x = x_in.contiguous(), grad = grad_in.to(x.scalar_type()).contiguous();
  const int64_t K = x.size(-1), M = K == 0 ? 0 : x.numel() / K;
  at::Tensor grad_x = at::empty_like(x);
  QATEXT_DISPATCH_FLOAT(x.scalar_type(), [&] {
    QATEXT_DEVICE_CALL(x, fake_quant_per_token_backward<scalar_t>, grad.const_data_ptr<scalar_t>(),
                       x.const_data_ptr<scalar_t>(), grad_x.mutable_data_ptr<scalar_t>(), M, K, int(bits),
                       symmetric);
  });
  return grad_x;
}

}  // namespace qatext::ops
