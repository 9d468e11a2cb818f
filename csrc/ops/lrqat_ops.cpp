// LR-QAT weight reconstruction W = s * (clamp(round(P + c * A B), 0, 2^b - 1) - z) and its backward
// to A, B and s (straight-through rounding, zero outside the clamp).
#include <optional>
#include <string>

#include "core/quant_math.h"
#include "ops/common.h"
#include "ops/ops.h"

namespace qatext::ops {

namespace {

// LR-QAT's operands with the rows of every expert as one matrix: p, a, scale and zero [E * N, ..] and b
// [E, r, K]. One layer (a [N, r], b [r, K]) is E = 1; a mixture's experts stacked (a [E, N, r], b [E, r, K],
// p, scale and zero [E, N, ..]) reconstruct in one launch of the tile kernels, each with its own B.
struct LrqatOperands {
  at::Tensor p, a, b, scale, zero;
  int64_t experts;
};

LrqatOperands flatten_experts(const char* op, const at::Tensor& p, const at::Tensor& a, const at::Tensor& b,
                              const at::Tensor& scale, const at::Tensor& zero, bool stacked_ok) {
  check_float(op, "a", a);
  check_float(op, "b", b);
  if (a.dim() != 3 || !stacked_ok) {
    check_dim(op, "a", a, 2);
    check_dim(op, "b", b, 2);
    return {p, a, b.unsqueeze(0), scale, zero, 1};
  }
  const int64_t E = a.size(0);
  TORCH_CHECK_VALUE(b.dim() == 3 && b.size(0) == E && p.dim() == 3 && p.size(0) == E && scale.dim() == 3 &&
                        scale.size(0) == E && zero.dim() == 3 && zero.size(0) == E,
                    op, ": stacked experts take a [E, N, r], b [E, r, K] and p, scale, zero [E, N, ..] with one E, ",
                    "got a ", a.sizes(), ", b ", b.sizes(), ", p ", p.sizes(), ", scale ", scale.sizes(), ", zero ",
                    zero.sizes());
  return {p.flatten(0, 1), a.flatten(0, 1), b, scale.flatten(0, 1), zero.flatten(0, 1), E};
}

GroupShape check_lrqat(const char* op, const LrqatOperands& in, int64_t bits, int64_t group_size, int64_t frac_bits) {
  const at::Tensor &p = in.p, &a = in.a, &b = in.b, &scale = in.scale, &zero = in.zero;
  TORCH_CHECK_VALUE(a.size(1) == b.size(1), op, ": a [N, r] and b [r, K] must share r, got a ", a.sizes(), " and b ",
                    b.sizes());
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), op, ": a and b must have one dtype, got ", a.scalar_type(),
                   " and ", b.scalar_type());
  check_same_device(op, {{"p", &p}, {"a", &a}, {"b", &b}, {"scale", &scale}, {"zero", &zero}});
  // No check of the scale's values: the kernels clamp the trained scale to kMinScale themselves.
  const GroupShape shape = check_qparam_shapes(op, scale, zero, a.size(0), b.size(2), bits, group_size);
  TORCH_CHECK_VALUE(frac_bits >= 0 && frac_bits <= 8 - bits, op, ": frac_bits must be in 0..", 8 - bits,
                    " for bits=", bits, " (0: packed codes, >0: uint8 fixed point), got ", frac_bits);
  check_packed(op, "p", p, shape.N, p_row_bytes(shape.K, int(bits), int(frac_bits)));
  return shape;
}

// A B, expert by expert: fp32 [E * N, K] (a [E * N, r], b [E, r, K]).
at::Tensor low_rank_product(const at::Tensor& a, const at::Tensor& b) {
  const int64_t E = b.size(0);
  if (E == 1) return at::matmul(a.to(at::kFloat), b[0].to(at::kFloat)).contiguous();
  return at::bmm(a.to(at::kFloat).view({E, -1, a.size(1)}), b.to(at::kFloat)).view({a.size(0), b.size(2)});
}

// t, contiguous and 16-byte aligned (the kernels read 16-byte vectors).
at::Tensor aligned16_copy(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  return aligned16(c) ? c : c.clone();
}

#ifdef QATEXT_WITH_CUDA
// The rank the tensor-core kernels take: 16, 32 or 64 (A's columns past the adapter's rank zeros).
int64_t padded_rank(int64_t r) { return r <= 16 ? 16 : r <= 32 ? 32 : 64; }

// Whether dA and dB of a 16-bit dU [E * N, K] on a GPU take the one-read kernel (cuda/lrqat_rank_grads.cu).
bool rank_kernel_applies(const at::Tensor& grad_u, int64_t rank, int64_t experts) {
  const auto dtype = grad_u.scalar_type();
  return tuning(Knob::LrqatRankKernel) && grad_u.is_cuda() && (dtype == at::kBFloat16 || dtype == at::kHalf) &&
         grad_u.numel() > 0 && rank >= 1 && rank <= 64 &&
         cuda::lrqat_rank_grads_supported(grad_u.size(0) / experts, grad_u.size(1), padded_rank(rank));
}

// The kernel's dA [E * N, rank] and dB [E, rank, K] in dU's dtype; a_padded [E * N, R] (R = padded_rank(rank),
// the ranks past `rank` zeros) and b [E, rank, K] in that dtype.
std::pair<at::Tensor, at::Tensor> kernel_rank_grads(const at::Tensor& grad_u, const at::Tensor& a_padded, int64_t rank,
                                                    const at::Tensor& b) {
  const int64_t E = b.size(0), rows = grad_u.size(0), K = grad_u.size(1), R = a_padded.size(1);
  const at::Tensor gu = aligned16_copy(grad_u), a = aligned16_copy(a_padded), b16 = aligned16_copy(b);
  at::Tensor grad_a = at::empty({rows, rank}, gu.options()), grad_b = at::empty({E, rank, K}, gu.options());
  const at::OptionalDeviceGuard guard(at::device_of(gu));
  dispatch_half(gu.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const cuda::RankGradsPlan plan = cuda::lrqat_rank_grads_plan<T>(rows / E, K, R, E);
    const auto f32 = gu.options().dtype(at::kFloat);
    at::Tensor part_a = at::empty({plan.col_blocks, rows, R}, f32), part_b = at::empty({E, plan.row_blocks, R, K}, f32);
    cuda::lrqat_rank_grads<T>(gu.const_data_ptr<T>(), a.const_data_ptr<T>(), b16.const_data_ptr<T>(), E, rows / E, K,
                              int(rank), int(R), plan, part_a.mutable_data_ptr<float>(),
                              part_b.mutable_data_ptr<float>(), grad_a.mutable_data_ptr<T>(),
                              grad_b.mutable_data_ptr<T>(), current_stream(gu));
  });
  return {grad_a, grad_b};
}
#endif

// dA = dU B^T [E * N, r] and dB = A^T dU [E, r, K], expert by expert, in dU's dtype: in one read of dU where
// the kernel applies, else one (batched) GEMM each. r is b's; a [E * N, >= r] may carry zero columns past it
// (the tile kernels' padded A serves as it is).
std::pair<at::Tensor, at::Tensor> rank_grads(const at::Tensor& grad_u, const at::Tensor& a, const at::Tensor& b) {
  const int64_t E = b.size(0), r = b.size(1);
  const at::Tensor a_ = a.to(grad_u.scalar_type()), b_ = b.to(grad_u.scalar_type());
#ifdef QATEXT_WITH_CUDA
  if (rank_kernel_applies(grad_u, r, E)) {
    const int64_t R = padded_rank(r);
    return kernel_rank_grads(grad_u, a_.size(1) == R ? a_ : at::constant_pad_nd(a_.narrow(1, 0, r), {0, R - r}), r, b_);
  }
#endif
  const at::Tensor a_r = a_.narrow(1, 0, r);
  if (E == 1) return {at::mm(grad_u, b_[0].t()), at::mm(a_r.t(), grad_u).unsqueeze(0)};
  const at::Tensor gu = grad_u.view({E, -1, grad_u.size(1)});
  return {at::bmm(gu, b_.transpose(1, 2)).view({a.size(0), r}), at::bmm(a_r.reshape({E, -1, r}).transpose(1, 2), gu)};
}

// One expert's shape, of `experts` stacked in `shape`.
GroupShape expert_shape(const GroupShape& shape, int64_t experts) {
  GroupShape one = shape;
  one.N = shape.N / experts;
  return one;
}

// A zero-padded to a rank of 16, 32 or 64 (a copy only where the rank is not one of them) and B as it
// is, for the tensor-core kernels (cuda/lrqat_fused.cu); nullopt where they do not apply (CPU, fp32
// adapters, shapes off the tile grid, rank > 64).
struct FusedOperands {
  at::Tensor a, b;
  int rank, rank_padded;
};

std::optional<FusedOperands> fused_operands(const at::Tensor& p, const at::Tensor& a, const at::Tensor& b,
                                            const GroupShape& shape) {
#ifdef QATEXT_WITH_CUDA
  const auto dtype = a.scalar_type();
  const int64_t r = a.size(1);
  if (!tuning(Knob::LrqatFused) || !a.is_cuda() || (dtype != at::kBFloat16 && dtype != at::kHalf) ||
      !cuda::lrqat_fused_supported(expert_shape(shape, b.size(0)), r) || !aligned16(p)) {
    return std::nullopt;
  }
  const int64_t padded = padded_rank(r);
  return FusedOperands{aligned16_copy(padded == r ? a : at::constant_pad_nd(a, {0, padded - r})), aligned16_copy(b),
                       int(r), int(padded)};
#else
  (void)p, (void)a, (void)b, (void)shape;
  return std::nullopt;
#endif
}

#ifdef QATEXT_WITH_CUDA
// The tile kernel's backward over dW [N, K]: dU = c * s * dW * in_range into grad_u (which may be grad_w
// itself), the group sums of dW * (q - z) and, where weight is defined, W as the forward writes it; then
// dA = dU B^T and dB = A^T dU (c is folded into dU). grad_w, a and b share one 16-bit dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_backward(const FusedOperands& fused, const at::Tensor& grad_w,
                                                              const at::Tensor& grad_u, const at::Tensor& weight,
                                                              const at::Tensor& p, const at::Tensor& scale,
                                                              const at::Tensor& zero, double lora_scale,
                                                              int64_t frac_bits, const GroupShape& shape,
                                                              at::ScalarType scale_dtype) {
  const int64_t experts = fused.b.size(0);
  at::Tensor tiles = at::empty({shape.N, cuda::lrqat_fused_tile_groups(shape)}, scale.options());
  const at::OptionalDeviceGuard guard(at::device_of(p));
  dispatch_half(grad_w.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    cuda::lrqat_fused_backward<T>(grad_w.const_data_ptr<T>(), p.const_data_ptr<uint8_t>(), fused.a.const_data_ptr<T>(),
                                  fused.b.const_data_ptr<T>(), int(experts), fused.rank, fused.rank_padded,
                                  scale.const_data_ptr<float>(), zero.const_data_ptr<float>(), float(lora_scale),
                                  int(frac_bits), grad_u.mutable_data_ptr<T>(), tiles.mutable_data_ptr<float>(),
                                  weight.defined() ? weight.mutable_data_ptr<T>() : nullptr, shape,
                                  tuning(Knob::LrqatFusedBlocks), current_stream(p));
  });
  const int64_t G = shape.groups();
  const at::Tensor grad_scale = tiles.size(1) == G ? tiles : tiles.view({shape.N, G, -1}).sum(-1);
  auto [grad_a, grad_b] = rank_grads(grad_u, fused.a, fused.b);
  return {grad_a, grad_b, grad_scale.to(scale_dtype)};
}
#endif

}  // namespace

at::Tensor lrqat_weight(const at::Tensor& p_in, const at::Tensor& a_in, const at::Tensor& b_in,
                        const at::Tensor& scale_in, const at::Tensor& zero_in, double lora_scale, int64_t bits,
                        int64_t group_size, int64_t frac_bits) {
  const char* op = "qatext.lrqat_weight";
  const LrqatOperands in = flatten_experts(op, p_in, a_in, b_in, scale_in, zero_in, true);
  const GroupShape shape = check_lrqat(op, in, bits, group_size, frac_bits);
  const at::Tensor p = in.p.contiguous(), scale = as_float(in.scale), zero = as_float(in.zero), &a = in.a, &b = in.b;
  at::Tensor out = at::empty({shape.N, shape.K}, a.options());
  const auto shaped = [&](const at::Tensor& w) { return a_in.dim() == 3 ? w.view({in.experts, -1, shape.K}) : w; };
#ifdef QATEXT_WITH_CUDA
  if (const auto fused = fused_operands(p, a, b, shape)) {
    const at::OptionalDeviceGuard guard(at::device_of(p));
    dispatch_half(a.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      cuda::lrqat_fused_forward<T>(p.const_data_ptr<uint8_t>(), fused->a.const_data_ptr<T>(),
                                   fused->b.const_data_ptr<T>(), int(in.experts), fused->rank, fused->rank_padded,
                                   scale.const_data_ptr<float>(), zero.const_data_ptr<float>(), float(lora_scale),
                                   int(frac_bits), out.mutable_data_ptr<T>(), shape,
                                   tuning(Knob::LrqatFusedBlocks), current_stream(p));
    });
    return shaped(out);
  }
#endif
  const at::Tensor ab = low_rank_product(a, b);
  QATEXT_DISPATCH_FLOAT(a.scalar_type(), [&] {
    QATEXT_DEVICE_CALL(p, lrqat_weight_forward<scalar_t>, p.const_data_ptr<uint8_t>(), ab.const_data_ptr<float>(),
                       scale.const_data_ptr<float>(), zero.const_data_ptr<float>(), float(lora_scale),
                       int(frac_bits), out.mutable_data_ptr<scalar_t>(), shape);
  });
  return shaped(out);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lrqat_weight_backward(
    const at::Tensor& grad_w_in, const at::Tensor& p_in, const at::Tensor& a_in, const at::Tensor& b_in,
    const at::Tensor& scale_in, const at::Tensor& zero_in, double lora_scale, int64_t bits, int64_t group_size,
    int64_t frac_bits) {
  const char* op = "qatext.lrqat_weight_backward";
  const LrqatOperands in = flatten_experts(op, p_in, a_in, b_in, scale_in, zero_in, true);
  const GroupShape shape = check_lrqat(op, in, bits, group_size, frac_bits);
  const int64_t rows = shape.N / in.experts;
  const bool stacked = a_in.dim() == 3;
  TORCH_CHECK_VALUE(stacked ? grad_w_in.dim() == 3 && grad_w_in.size(0) == in.experts && grad_w_in.size(1) == rows &&
                                  grad_w_in.size(2) == shape.K
                            : grad_w_in.dim() == 2 && grad_w_in.size(0) == shape.N && grad_w_in.size(1) == shape.K,
                    op, ": grad_w must have the weight's shape ", stacked ? "[E, N, K] = [" : "[N, K] = [",
                    stacked ? std::to_string(in.experts) + ", " : std::string(), rows, ", ", shape.K, "], got ",
                    grad_w_in.sizes());
  check_same_device(op, {{"p", &p_in}, {"grad_w", &grad_w_in}});
  const at::Tensor &a = in.a, &b = in.b;
  const at::Tensor grad_w = grad_w_in.to(a.scalar_type()).reshape({shape.N, shape.K}).contiguous();
  const at::Tensor p = in.p.contiguous(), scale = as_float(in.scale), zero = as_float(in.zero);
  // The gradients in the shapes of a, b and the scale as they came.
  const auto shaped = [&](const at::Tensor& ga, const at::Tensor& gb, const at::Tensor& gs) {
    return std::tuple<at::Tensor, at::Tensor, at::Tensor>{ga.view(a_in.sizes()), gb.view(b_in.sizes()),
                                                          gs.reshape(scale_in.sizes())};
  };
#ifdef QATEXT_WITH_CUDA
  if (const auto fused = fused_operands(p, a, b, shape)) {
    const at::Tensor grad_w16 = aligned16_copy(grad_w);
    auto [ga, gb, gs] = fused_backward(*fused, grad_w16, at::empty({shape.N, shape.K}, a.options()), at::Tensor(), p,
                                       scale, zero, lora_scale, frac_bits, shape, scale_in.scalar_type());
    return shaped(ga, gb, gs);
  }
#endif
  const at::Tensor ab = low_rank_product(a, b);
  at::Tensor grad_u = at::empty({shape.N, shape.K}, scale.options());
  at::Tensor grad_scale = at::empty_like(scale);
  QATEXT_DISPATCH_FLOAT(a.scalar_type(), [&] {
    QATEXT_DEVICE_CALL(p, lrqat_weight_backward<scalar_t>, grad_w.const_data_ptr<scalar_t>(),
                       p.const_data_ptr<uint8_t>(), ab.const_data_ptr<float>(), scale.const_data_ptr<float>(),
                       zero.const_data_ptr<float>(), float(lora_scale), int(frac_bits),
                       grad_u.mutable_data_ptr<float>(), grad_scale.mutable_data_ptr<float>(), shape);
  });
  // u = P + c * A B:  dA = c * dU B^T,  dB = c * A^T dU.
  auto [grad_a, grad_b] = rank_grads(grad_u, a, b);
  return shaped(grad_a.mul_(lora_scale).to(a.scalar_type()), grad_b.mul_(lora_scale).to(b.scalar_type()),
                grad_scale.to(scale_in.scalar_type()));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lrqat_linear_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& p_in, const at::Tensor& a, const at::Tensor& b,
    const at::Tensor& scale_in, const at::Tensor& zero_in, double lora_scale, int64_t bits, int64_t group_size,
    int64_t frac_bits, bool grad_input) {
  const char* op = "qatext.lrqat_linear_backward";
  const LrqatOperands in = flatten_experts(op, p_in, a, b, scale_in, zero_in, false);
  const GroupShape shape = check_lrqat(op, in, bits, group_size, frac_bits);
  check_float(op, "grad_y", grad_y);
  check_float(op, "x", x);
  check_same_device(op, {{"p", &p_in}, {"grad_y", &grad_y}, {"x", &x}});
  const int64_t rows = x.numel() / std::max<int64_t>(shape.K, 1);
  TORCH_CHECK_VALUE(grad_y.dim() >= 1 && grad_y.size(-1) == shape.N && x.dim() >= 1 && x.size(-1) == shape.K &&
                        grad_y.numel() == rows * shape.N,
                    op, ": grad_y [.., ", shape.N, "] and x [.., ", shape.K, "] must have the same rows, got ",
                    grad_y.sizes(), " and ", x.sizes());
  const at::Tensor gy = grad_y.reshape({rows, shape.N});
  const at::Tensor grad_w = at::mm(gy.t(), x.reshape({rows, shape.K}).to(gy.scalar_type()));  // N x K, ours
  at::Tensor grad_x = at::empty({0}, x.options());
#ifdef QATEXT_WITH_CUDA
  const at::Tensor p = p_in.contiguous(), scale = as_float(scale_in), zero = as_float(zero_in);
  const auto fused = gy.scalar_type() == a.scalar_type() ? fused_operands(p, a, in.b, shape) : std::nullopt;
  if (fused && aligned16(grad_w) && grad_w.is_contiguous()) {
    // One pass over dW gives dU (written over dW), the scale's gradient and W for dX: no second
    // reconstruction of the weight.
    const at::Tensor w = grad_input ? at::empty({shape.N, shape.K}, a.options()) : at::Tensor();
    auto [grad_a, grad_b, grad_scale] = fused_backward(*fused, grad_w, grad_w, w, p, scale, zero, lora_scale,
                                                       frac_bits, shape, scale_in.scalar_type());
    if (grad_input) grad_x = at::mm(gy, w).view(x.sizes()).to(x.scalar_type());
    return {grad_x, grad_a, grad_b.view(b.sizes()), grad_scale};
  }
#endif
  if (grad_input) {
    const at::Tensor w = lrqat_weight(p_in, a, b, scale_in, zero_in, lora_scale, bits, group_size, frac_bits);
    grad_x = at::mm(gy, w.to(gy.scalar_type())).view(x.sizes()).to(x.scalar_type());
  }
  auto [grad_a, grad_b, grad_scale] =
      lrqat_weight_backward(grad_w, p_in, a, b, scale_in, zero_in, lora_scale, bits, group_size, frac_bits);
  return {grad_x, grad_a, grad_b, grad_scale};
}

std::tuple<at::Tensor, at::Tensor> lrqat_rank_grads(const at::Tensor& grad_u, const at::Tensor& a,
                                                    const at::Tensor& b) {
  const char* op = "qatext.lrqat_rank_grads";
  check_float(op, "grad_u", grad_u);
  check_float(op, "a", a);
  check_float(op, "b", b);
  check_same_device(op, {{"grad_u", &grad_u}, {"a", &a}, {"b", &b}});
  const bool stacked = a.dim() == 3;
  const int64_t d = stacked ? 3 : 2;
  TORCH_CHECK_VALUE(a.dim() == d && b.dim() == d && grad_u.dim() == d && (!stacked || (b.size(0) == a.size(0) &&
                        grad_u.size(0) == a.size(0))) && a.size(-1) == b.size(-2) && grad_u.size(-2) == a.size(-2) &&
                        grad_u.size(-1) == b.size(-1),
                    op, ": expects grad_u [N, K], a [N, r], b [r, K] (or each with a leading expert dimension E), got ",
                    "grad_u ", grad_u.sizes(), ", a ", a.sizes(), ", b ", b.sizes());
  const int64_t E = stacked ? a.size(0) : 1;
  const int64_t rows = E * a.size(-2);
  auto [grad_a, grad_b] = rank_grads(grad_u.reshape({rows, grad_u.size(-1)}), a.reshape({rows, a.size(-1)}),
                                     b.reshape({E, b.size(-2), b.size(-1)}));
  return {grad_a.view(a.sizes()), grad_b.view(b.sizes())};
}

at::Tensor lrqat_linear(const at::Tensor& x, const at::Tensor& p, const at::Tensor& a, const at::Tensor& b,
                        const at::Tensor& scale, const at::Tensor& zero, const std::optional<at::Tensor>& bias,
                        double lora_scale, int64_t bits, int64_t group_size, int64_t frac_bits) {
  // The N x K weight lives only for this GEMM; backward recomputes it (csrc/ops/autograd.cpp).
  const at::Tensor w = lrqat_weight(p, a, b, scale, zero, lora_scale, bits, group_size, frac_bits);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == w.size(1), "qatext.lrqat_linear: x's last dimension must equal ",
                    "the weight's columns (", w.size(1), "), got shape ", x.sizes());
  const auto dtype = x.scalar_type();
  return at::linear(x, w.to(dtype), bias.has_value() ? std::optional<at::Tensor>(bias->to(dtype)) : bias);
}

}  // namespace qatext::ops
