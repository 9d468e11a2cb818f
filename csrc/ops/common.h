// Argument checks and device dispatch shared by the op wrappers.
#pragma once

#include <ATen/ATen.h>
#include <ATen/DeviceGuard.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <initializer_list>
#include <optional>

#include "core/shape.h"
#include "cpu/kernels.h"
#include "ops/tuning.h"

#ifdef QATEXT_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>

#include "cuda/kernels.h"
#define QATEXT_CUDA_ONLY(call) (call)
#else
#define QATEXT_CUDA_ONLY(call) ::qatext::ops::fail_no_cuda()
#endif

// Calls cuda::fn(args..., stream) or cpu::fn(args...) by the device of `tensor`.
#define QATEXT_DEVICE_CALL(tensor, fn, ...)                                                         \
  do {                                                                                              \
    const at::OptionalDeviceGuard qatext_guard_(at::device_of(tensor));                          \
    if ((tensor).is_cuda()) {                                                                       \
      QATEXT_CUDA_ONLY(::qatext::cuda::fn(__VA_ARGS__, ::qatext::ops::current_stream(tensor)));     \
    } else {                                                                                        \
      ::qatext::cpu::fn(__VA_ARGS__);                                                               \
    }                                                                                               \
  } while (0)

// Runs body with scalar_t bound to float, c10::Half or c10::BFloat16.
#define QATEXT_DISPATCH_FLOAT(dtype, ...)                                                     \
  AT_DISPATCH_SWITCH(dtype, "qatext", AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)              \
                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace qatext::ops {

// An op of the library through the dispatcher, not its C++ function: under torch.compile / AOT
// tracing the tensors are fake and the ops' fake kernels must answer.
template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// Calls body(c10::Half()) for float16, else body(c10::BFloat16()): the 16-bit tensor-core kernels.
template <typename Body>
void dispatch_half(at::ScalarType dtype, const Body& body) {
  if (dtype == at::kHalf) {
    body(c10::Half());
  } else {
    body(c10::BFloat16());
  }
}

[[noreturn]] void fail_no_cuda();

// Whether t's data starts on a 16-byte boundary (the vectorised kernels need it).
inline bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0; }
#ifdef QATEXT_WITH_CUDA
inline cudaStream_t current_stream(const at::Tensor& t) {
  return at::cuda::getCurrentCUDAStream(t.get_device()).stream();
}
#endif

void check_bits(const char* op, int64_t bits);
void check_float(const char* op, const char* name, const at::Tensor& t);
void check_uint8(const char* op, const char* name, const at::Tensor& t);
void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim);
void check_same_device(const char* op, std::initializer_list<std::pair<const char*, const at::Tensor*>> tensors);

// Resolves group_size (-1 means K) and checks it divides K.
int64_t resolve_group_size(const char* op, int64_t group_size, int64_t K);

GroupShape make_shape(const char* op, int64_t N, int64_t K, int64_t bits, int64_t group_size);
// Checks t is a float [N, K / group_size] tensor.
void check_group_param(const char* op, const char* name, const at::Tensor& t, const GroupShape& shape);
void check_scale_values(const char* op, const at::Tensor& scale);

// Checks scale and zero are float [N, K / group_size]; returns the shape. For ops whose kernels keep a
// trained scale positive themselves (trained_scale in core/quant_math.h).
GroupShape check_qparam_shapes(const char* op, const at::Tensor& scale, const at::Tensor& zero, int64_t N,
                               int64_t K, int64_t bits, int64_t group_size);
// check_qparam_shapes, and scale is positive and finite.
GroupShape check_qparams(const char* op, const at::Tensor& scale, const at::Tensor& zero, int64_t N, int64_t K,
                         int64_t bits, int64_t group_size);

// Checks packed is uint8 [N, row_bytes] on the device of scale.
void check_packed(const char* op, const char* name, const at::Tensor& packed, int64_t N, int64_t row_bytes);

// Checks a packed weight [N, K * bits / 8] against scale and zero; returns the group shape for K.
GroupShape check_packed_weight(const char* op, const at::Tensor& packed, const at::Tensor& scale,
                               const at::Tensor& zero, int64_t bits, int64_t group_size, int64_t K);

// x (float, at least 1-D), a weight with its rows first, and an optional bias [rows], all on x's device.
void check_matmul_inputs(const char* op, const at::Tensor& x, const char* weight_name, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias);

// dequant_matmul on arguments already checked (no data-dependent checks: usable inside graph capture).
at::Tensor dequant_matmul_checked(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                                  const at::Tensor& zero, const GroupShape& shape,
                                  const std::optional<at::Tensor>& bias);

// Whether x (16-bit, on CUDA, few rows) takes dequant_matmul's fused kernel; metadata only.
bool fused_dequant_gemm_applies(const at::Tensor& x, const GroupShape& shape);

// x @ w^T (+ bias, in x's dtype): the GEMM on a dequantised weight (cuBLAS on a GPU).
at::Tensor linear_in_dtype(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias);

// dequant_matmul_tiled's path beyond the decode kernel, on arguments already checked: the staged kernel
// up to its token limit (staged_max_tokens), else tiled_matmul_beyond_staged.
at::Tensor tiled_matmul_beyond_decode(const at::Tensor& x, const at::Tensor& tiled, const at::Tensor& scale,
                                      const at::Tensor& zero, const GroupShape& shape,
                                      const std::optional<at::Tensor>& bias);
// Beyond both kernels: the fused kernel on the codes untiled where it applies, else the weight dequantised
// straight from the tiled layout and one GEMM (no untiled copy of the codes).
at::Tensor tiled_matmul_beyond_staged(const at::Tensor& x, const at::Tensor& tiled, const at::Tensor& scale,
                                      const at::Tensor& zero, const GroupShape& shape,
                                      const std::optional<at::Tensor>& bias);

// [..., K] as [rows, K].
inline at::Tensor flatten_rows(const at::Tensor& t) { return t.reshape_symint({c10::SymInt(-1), t.sym_size(-1)}); }

inline at::Tensor as_float(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }
// t in dtype, without a dispatched op when it already is (code that runs above the backend kernels,
// where a tracing mode would see `to` return its input).
inline at::Tensor in_dtype(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

}  // namespace qatext::ops
