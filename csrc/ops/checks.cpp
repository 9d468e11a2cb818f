#include <sstream>

#include "core/quant_math.h"
#include "ops/common.h"

namespace qatext::ops {

void fail_no_cuda() {
  TORCH_CHECK(false, "qatext: this build has no CUDA kernels (rebuild with nvcc and a CUDA build of torch)");
}

void check_bits(const char* op, int64_t bits) {
  TORCH_CHECK_VALUE(bits >= 2 && bits <= 8, op, ": bits must be in 2..8, got ", bits);
}

void check_float(const char* op, const char* name, const at::Tensor& t) {
  const auto d = t.scalar_type();
  TORCH_CHECK_TYPE(d == at::kFloat || d == at::kBFloat16 || d == at::kHalf, op, ": ", name,
                   " must be float32, bfloat16 or float16, got ", d);
}

void check_uint8(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kByte, op, ": ", name, " must be uint8, got ", t.scalar_type());
}

void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
}

void check_same_device(const char* op, std::initializer_list<std::pair<const char*, const at::Tensor*>> tensors) {
  const auto& first = *tensors.begin();
  for (const auto& [name, t] : tensors) {
    TORCH_CHECK(t->device() == first.second->device(), op, ": ", name, " is on ", t->device(), " but ",
                first.first, " is on ", first.second->device(), "; all tensors must be on one device");
  }
}

int64_t resolve_group_size(const char* op, int64_t group_size, int64_t K) {
  if (group_size == -1) return K;
  TORCH_CHECK_VALUE(group_size > 0, op, ": group_size must be positive or -1 (per-channel), got ", group_size);
  TORCH_CHECK_VALUE(K % group_size == 0, op, ": group_size (", group_size, ") must divide K (", K, ")");
  return group_size;
}

GroupShape make_shape(const char* op, int64_t N, int64_t K, int64_t bits, int64_t group_size) {
  check_bits(op, bits);
  return GroupShape{N, K, resolve_group_size(op, group_size, K), int(bits)};
}

void check_group_param(const char* op, const char* name, const at::Tensor& t, const GroupShape& shape) {
  check_float(op, name, t);
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == shape.N && t.size(1) == shape.groups(), op, ": ", name,
                    " must have shape [", shape.N, ", ", shape.groups(), "] (N, K / group_size), got ", t.sizes());
}

void check_scale_values(const char* op, const at::Tensor& scale) {
  if (!value_checks_enabled(!scale.is_cpu()) || scale.numel() == 0) return;
  const bool ok = at::logical_and(scale > 0, at::isfinite(scale)).all().item<bool>();
  TORCH_CHECK_VALUE(ok, op, ": scale must be positive and finite (found a value <= 0, NaN or inf)");
}

GroupShape check_qparam_shapes(const char* op, const at::Tensor& scale, const at::Tensor& zero, int64_t N,
                               int64_t K, int64_t bits, int64_t group_size) {
  const GroupShape shape = make_shape(op, N, K, bits, group_size);
  check_group_param(op, "scale", scale, shape);
  check_group_param(op, "zero", zero, shape);
  return shape;
}

GroupShape check_qparams(const char* op, const at::Tensor& scale, const at::Tensor& zero, int64_t N, int64_t K,
                         int64_t bits, int64_t group_size) {
  const GroupShape shape = check_qparam_shapes(op, scale, zero, N, K, bits, group_size);
  check_scale_values(op, scale);
  return shape;
}

void check_packed(const char* op, const char* name, const at::Tensor& packed, int64_t N, int64_t row_bytes) {
  check_uint8(op, name, packed);
  TORCH_CHECK_VALUE(packed.dim() == 2 && packed.size(0) == N && packed.size(1) == row_bytes, op, ": ", name,
                    " must have shape [", N, ", ", row_bytes, "], got ", packed.sizes());
}

void check_matmul_inputs(const char* op, const at::Tensor& x, const char* weight_name, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias) {
  check_float(op, "x", x);
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dimension");
  check_same_device(op, {{"x", &x}, {weight_name, &weight}});
  if (bias.has_value()) {
    check_same_device(op, {{"x", &x}, {"bias", &*bias}});
    TORCH_CHECK_VALUE(bias->dim() == 1 && weight.dim() >= 1 && bias->size(0) == weight.size(0), op,
                      ": bias must have shape [", weight.dim() >= 1 ? weight.size(0) : 0, "], got ", bias->sizes());
  }
}

GroupShape check_packed_weight(const char* op, const at::Tensor& packed, const at::Tensor& scale,
                               const at::Tensor& zero, int64_t bits, int64_t group_size, int64_t K) {
  check_bits(op, bits);
  check_dim(op, "packed", packed, 2);
  const int64_t N = packed.size(0);
  check_same_device(op, {{"packed", &packed}, {"scale", &scale}, {"zero", &zero}});
  const GroupShape shape = check_qparams(op, scale, zero, N, K, bits, group_size);
  check_packed(op, "packed", packed, N, packed_row_bytes(K, bits));
  return shape;
}

}  // namespace qatext::ops
