// pack / unpack of b-bit codes, dequant, dequant_matmul (and its input gradient), and E2E-QP's
// per-group scale gradient (of a linear layer's output, or of a dequantised weight).
#include "core/quant_math.h"
#include "ops/common.h"
#include "ops/ops.h"

namespace qatext::ops {

namespace {

at::Tensor dequant_checked(const at::Tensor& packed_in, const at::Tensor& scale_in, const at::Tensor& zero_in,
                           const GroupShape& shape, at::ScalarType dtype) {
  const at::Tensor packed = packed_in.contiguous(), scale = as_float(scale_in), zero = as_float(zero_in);
  at::Tensor out = at::empty({shape.N, shape.K}, packed.options().dtype(dtype));
  QATEXT_DISPATCH_FLOAT(dtype, [&] {
    QATEXT_DEVICE_CALL(packed, dequant<scalar_t>, packed.const_data_ptr<uint8_t>(), scale.const_data_ptr<float>(),
                       zero.const_data_ptr<float>(), out.mutable_data_ptr<scalar_t>(), shape);
  });
  return out;
}

// The fused tensor-core GEMM where it applies; nullopt elsewhere, and the caller dequantises and
// calls cuBLAS.
std::optional<at::Tensor> fused_dequant_gemm(const at::Tensor& a_in, const at::Tensor& packed_in,
                                             const at::Tensor& scale_in, const at::Tensor& zero_in,
                                             const GroupShape& shape, const std::optional<at::Tensor>& bias,
                                             bool grad_input) {
#ifdef QATEXT_WITH_CUDA
  if (!fused_dequant_gemm_applies(a_in, shape)) return std::nullopt;
  const auto dtype = a_in.scalar_type();
  const int64_t M = a_in.numel() / std::max<int64_t>(a_in.size(-1), 1);
  const at::Tensor a = flatten_rows(a_in).contiguous(), packed = packed_in.contiguous();
  const at::Tensor scale = as_float(scale_in), zero = as_float(zero_in);
  if (!aligned16(a) || !aligned16(packed)) return std::nullopt;
  const at::Tensor b = bias.has_value() ? bias->to(dtype).contiguous() : at::Tensor();
  const int64_t P = grad_input ? shape.K : shape.N;
  const int64_t splits = cuda::dequant_gemm_splits(M, shape, grad_input);
  at::Tensor out = at::empty({M, P}, a.options());
  at::Tensor partial = splits > 1 ? at::empty({splits, M, P}, a.options().dtype(at::kFloat)) : at::Tensor();
  const at::OptionalDeviceGuard guard(at::device_of(a));
  dispatch_half(dtype, [&](auto type_tag) {
    using scalar_t = decltype(type_tag);
    cuda::dequant_gemm<scalar_t>(a.const_data_ptr<scalar_t>(), packed.const_data_ptr<uint8_t>(),
                                 scale.const_data_ptr<float>(), zero.const_data_ptr<float>(),
                                 b.defined() ? b.const_data_ptr<scalar_t>() : nullptr, out.mutable_data_ptr<scalar_t>(),
                                 splits > 1 ? partial.mutable_data_ptr<float>() : nullptr, M, shape, grad_input,
                                 splits, current_stream(a));
  });
  auto sizes = a_in.sizes().vec();
  sizes.back() = P;
  return out.view(sizes);
#else
  (void)a_in, (void)packed_in, (void)scale_in, (void)zero_in, (void)shape, (void)bias, (void)grad_input;
  return std::nullopt;
#endif
}

}  // namespace

// Whether a (16-bit, on CUDA, small M) takes the fused tensor-core GEMM (see cuda/dequant_gemm.cu);
// metadata only, so it answers for fake tensors too (no, where tracing left the row count symbolic).
bool fused_dequant_gemm_applies(const at::Tensor& a, const GroupShape& shape) {
#ifdef QATEXT_WITH_CUDA
  const auto dtype = a.scalar_type();
  if (!a.is_cuda() || (dtype != at::kBFloat16 && dtype != at::kHalf)) return false;
  int64_t M = 1;
  for (int64_t d = 0; d + 1 < a.dim(); ++d) {
    const std::optional<int64_t> n = a.sym_size(d).maybe_as_int();
    if (!n) return false;
    M *= *n;
  }
  return M <= tuning(Knob::DequantGemmMaxM) && cuda::dequant_gemm_supported(M, shape);
#else
  (void)a, (void)shape;
  return false;
#endif
}

at::Tensor pack(const at::Tensor& codes_in, int64_t bits) {
  const char* op = "qatext.pack";
  check_bits(op, bits);
  check_uint8(op, "codes", codes_in);
  TORCH_CHECK_VALUE(codes_in.dim() >= 1, op, ": codes must have at least one dimension");
  if (value_checks_enabled(!codes_in.is_cpu()) && codes_in.numel() > 0) {
    const int64_t top = codes_in.max().item<int64_t>();
    TORCH_CHECK_VALUE(top < (int64_t(1) << bits), op, ": codes must lie in [0, ", (1 << bits) - 1, "] for bits=",
                      bits, ", found ", top);
  }
  const at::Tensor codes = codes_in.contiguous();
  const int64_t K = codes.size(-1), N = K == 0 ? 0 : codes.numel() / K;
  auto out_sizes = codes.sizes().vec();
  out_sizes.back() = packed_row_bytes(K, bits);
  at::Tensor packed = at::empty(out_sizes, codes.options());
  QATEXT_DEVICE_CALL(codes, pack, codes.const_data_ptr<uint8_t>(), packed.mutable_data_ptr<uint8_t>(), N, K,
                     int(bits));
  return packed;
}

at::Tensor unpack(const at::Tensor& packed_in, int64_t bits, int64_t in_features) {
  const char* op = "qatext.unpack";
  check_bits(op, bits);
  check_uint8(op, "packed", packed_in);
  TORCH_CHECK_VALUE(packed_in.dim() >= 1, op, ": packed must have at least one dimension");
  TORCH_CHECK_VALUE(in_features >= 0, op, ": in_features must be >= 0, got ", in_features);
  const int64_t row_bytes = packed_row_bytes(in_features, bits);
  TORCH_CHECK_VALUE(packed_in.size(-1) == row_bytes, op, ": packed rows must hold ", row_bytes, " bytes for ",
                    in_features, " codes of ", bits, " bits, got ", packed_in.size(-1));
  const at::Tensor packed = packed_in.contiguous();
  const int64_t N = row_bytes == 0 ? 0 : packed.numel() / row_bytes;
  auto out_sizes = packed.sizes().vec();
  out_sizes.back() = in_features;
  at::Tensor codes = at::empty(out_sizes, packed.options());
  QATEXT_DEVICE_CALL(packed, unpack, packed.const_data_ptr<uint8_t>(), codes.mutable_data_ptr<uint8_t>(), N,
                     in_features, int(bits));
  return codes;
}

at::Tensor dequant(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& zero, int64_t bits,
                   int64_t group_size, int64_t in_features, at::ScalarType dtype) {
  const char* op = "qatext.dequant";
  const GroupShape shape = check_packed_weight(op, packed, scale, zero, bits, group_size, in_features);
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
                   ": dtype must be float32, bfloat16 or float16, got ", dtype);
  return dequant_checked(packed, scale, zero, shape, dtype);
}

at::Tensor dequant_matmul_checked(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                                  const at::Tensor& zero, const GroupShape& shape,
                                  const std::optional<at::Tensor>& bias) {
  if (auto y = fused_dequant_gemm(x, packed, scale, zero, shape, bias, /*grad_input=*/false)) return *y;
  // Otherwise dequantise to x's dtype once, then one cuBLAS / CPU GEMM.
  return linear_in_dtype(x, dequant_checked(packed, scale, zero, shape, x.scalar_type()), bias);
}

at::Tensor linear_in_dtype(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  return at::linear(x, w, bias.has_value() ? std::optional<at::Tensor>(bias->to(x.scalar_type())) : bias);
}

at::Tensor dequant_matmul(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                          const at::Tensor& zero, int64_t bits, int64_t group_size,
                          const std::optional<at::Tensor>& bias) {
  const char* op = "qatext.dequant_matmul";
  check_matmul_inputs(op, x, "packed", packed, bias);
  const GroupShape shape = check_packed_weight(op, packed, scale, zero, bits, group_size, x.size(-1));
  return dequant_matmul_checked(x, packed, scale, zero, shape, bias);
}

at::Tensor dequant_matmul_plus(const at::Tensor& a, const at::Tensor& packed, const at::Tensor& scale,
                               const at::Tensor& zero, int64_t bits, int64_t group_size,
                               const std::optional<at::Tensor>& bias, const at::Tensor& acc, double beta,
                               bool grad_input) {
  const char* op = grad_input ? "qatext.dequant_matmul_grad_input" : "qatext.dequant_matmul";
  static const auto matmul_op = op_handle<decltype(dequant_matmul)>("qatext::dequant_matmul");
  static const auto grad_input_op = op_handle<decltype(dequant_matmul_grad_input)>("qatext::dequant_matmul_grad_input");
  static const auto dequant_op = op_handle<decltype(dequant)>("qatext::dequant");
  check_dim(op, "packed", packed, 2);
  const int64_t K = grad_input ? acc.size(-1) : a.size(-1);
  const GroupShape shape = make_shape(op, packed.size(0), K, bits, group_size);
  if (fused_dequant_gemm_applies(a, shape)) {  // the fused kernel's output, then one add
    const at::Tensor y = grad_input ? grad_input_op.call(a, packed, scale, zero, bits, group_size, K)
                                    : matmul_op.call(a, packed, scale, zero, bits, group_size, bias);
    return at::add(y, acc, beta);
  }
  if (grad_input) {
    check_float(op, "grad_y", a);
  } else {
    check_matmul_inputs(op, a, "packed", packed, bias);
  }
  // beta * acc + a @ W in the GEMM's epilogue (cuBLAS beta), in acc's memory: the output is written
  // once, where a separate add reads two M x P tensors and writes a third.
  const at::Tensor w = dequant_op.call(packed, scale, zero, bits, group_size, K, a.scalar_type());
  const at::Tensor out = flatten_rows(acc).contiguous();  // a copy only where acc is a broadcast view
  out.addmm_(flatten_rows(a), grad_input ? w : w.t(), beta, 1.0);
  if (bias.has_value()) out.add_(in_dtype(*bias, out.scalar_type()));
  return out.view_symint(acc.sym_sizes());
}

at::Tensor dequant_matmul_grad_input(const at::Tensor& grad_y, const at::Tensor& packed, const at::Tensor& scale,
                                     const at::Tensor& zero, int64_t bits, int64_t group_size, int64_t in_features) {
  const char* op = "qatext.dequant_matmul_grad_input";
  check_float(op, "grad_y", grad_y);
  check_same_device(op, {{"grad_y", &grad_y}, {"packed", &packed}});
  const GroupShape shape = check_packed_weight(op, packed, scale, zero, bits, group_size, in_features);
  TORCH_CHECK_VALUE(grad_y.dim() >= 1 && grad_y.size(-1) == shape.N, op,
                    ": grad_y's last dimension must equal the weight's rows (", shape.N, "), got shape ",
                    grad_y.sizes());
  if (auto gx = fused_dequant_gemm(grad_y, packed, scale, zero, shape, std::nullopt, /*grad_input=*/true)) return *gx;
  return at::matmul(grad_y, dequant_checked(packed, scale, zero, shape, grad_y.scalar_type()));
}

namespace {

// Rows a block of dW in fp32 is formed for at once: dw_chunk_elements() whatever N and K, a multiple of 128
// where it is that large (each block's grad_y columns then 16-byte aligned and on cuBLAS tiles).
int64_t dw_block_rows(int64_t K) {
  int64_t rows = std::max<int64_t>(1, tuning(Knob::DwChunkElements) / std::max<int64_t>(K, 1));
  if (rows >= 128) rows -= rows % 128;
  return rows;
}

// grad_scale[n0 + i, g] = sum_{k in g} (q - z)[n0 + i, k] * dw[i, k] for one block of dW rows (fp32, contiguous).
void group_code_dot_rows(const at::Tensor& dw, const at::Tensor& packed, const at::Tensor& zero, at::Tensor& grad_scale,
                         int64_t n0, const GroupShape& shape) {
  const int64_t G = shape.groups();
  const GroupShape part{dw.size(0), shape.K, shape.group_size, shape.bits};
  QATEXT_DEVICE_CALL(packed, group_code_dot, dw.const_data_ptr<float>(),
                     packed.const_data_ptr<uint8_t>() + n0 * packed_row_bytes(shape.K, shape.bits),
                     zero.const_data_ptr<float>() + n0 * G, grad_scale.mutable_data_ptr<float>() + n0 * G, part);
}

}  // namespace

at::Tensor e2eqp_scale_grad(const at::Tensor& x, const at::Tensor& grad_y, const at::Tensor& packed_in,
                            const at::Tensor& zero_in, int64_t bits, int64_t group_size) {
  const char* op = "qatext.e2eqp_scale_grad";
  check_float(op, "x", x);
  check_float(op, "grad_y", grad_y);
  TORCH_CHECK_VALUE(x.dim() >= 1 && grad_y.dim() >= 1, op, ": x and grad_y must have at least one dimension");
  TORCH_CHECK_VALUE(x.numel() / std::max<int64_t>(x.size(-1), 1) == grad_y.numel() / std::max<int64_t>(grad_y.size(-1), 1),
                    op, ": x ", x.sizes(), " and grad_y ", grad_y.sizes(), " must have the same number of rows");
  check_same_device(op, {{"x", &x}, {"grad_y", &grad_y}});
  check_dim(op, "packed", packed_in, 2);
  check_same_device(op, {{"x", &x}, {"packed", &packed_in}, {"zero", &zero_in}});
  const GroupShape shape = make_shape(op, packed_in.size(0), x.size(-1), bits, group_size);
  check_group_param(op, "zero", zero_in, shape);
  check_packed(op, "packed", packed_in, shape.N, packed_row_bytes(shape.K, bits));
  TORCH_CHECK_VALUE(grad_y.size(-1) == shape.N, op, ": grad_y's last dimension must be N (", shape.N, "), got ",
                    grad_y.size(-1));
  // dW = grad_y^T x in fp32, one block of output rows at a time (accumulated over blocks of tokens),
  // each reduced at once by a per-group dot with the codes: memory is a few blocks of
  // dw_chunk_elements() whatever M, N and K, never N x K, at the GEMM FLOPs of the dW path.
  const at::Tensor packed = packed_in.contiguous(), zero = as_float(zero_in);
  const at::Tensor xs = flatten_rows(x), gy = flatten_rows(grad_y);
  const int64_t M = xs.size(0);
  const bool half_inputs_on_cuda = xs.is_cuda() && xs.scalar_type() == gy.scalar_type() &&
                                   (xs.scalar_type() == at::kBFloat16 || xs.scalar_type() == at::kHalf);
  at::Tensor grad_scale = at::empty({shape.N, shape.groups()}, zero.options());
  const int64_t rows = dw_block_rows(shape.K);
  for (int64_t n0 = 0; n0 < shape.N; n0 += rows) {
    const int64_t n = std::min(rows, shape.N - n0);
    at::Tensor dw;
    if (half_inputs_on_cuda) {
      // 16-bit inputs, fp32 accumulate and output on the tensor cores: no fp32 copies of x or grad_y.
      dw = at::mm(gy.slice(1, n0, n0 + n).t(), xs, at::kFloat);
    } else {
      dw = at::zeros({n, shape.K}, zero.options());
      for (int64_t m0 = 0; m0 < M; m0 += rows) {  // fp32 copies of x and grad_y, a block of tokens at a time
        const int64_t m = std::min(rows, M - m0);
        dw.addmm_(gy.slice(0, m0, m0 + m).slice(1, n0, n0 + n).to(at::kFloat).t(),
                  xs.slice(0, m0, m0 + m).to(at::kFloat));
      }
    }
    group_code_dot_rows(dw, packed, zero, grad_scale, n0, shape);
  }
  return grad_scale;
}

at::Tensor dequant_scale_grad(const at::Tensor& grad_w, const at::Tensor& packed_in, const at::Tensor& zero_in,
                              int64_t bits, int64_t group_size) {
  const char* op = "qatext.dequant_scale_grad";
  check_float(op, "grad_w", grad_w);
  check_dim(op, "grad_w", grad_w, 2);
  check_dim(op, "packed", packed_in, 2);
  check_same_device(op, {{"grad_w", &grad_w}, {"packed", &packed_in}, {"zero", &zero_in}});
  const GroupShape shape = make_shape(op, packed_in.size(0), grad_w.size(1), bits, group_size);
  TORCH_CHECK_VALUE(grad_w.size(0) == shape.N, op, ": grad_w has ", grad_w.size(0), " rows and packed ", shape.N,
                    "; they must be one weight's");
  check_group_param(op, "zero", zero_in, shape);
  check_packed(op, "packed", packed_in, shape.N, packed_row_bytes(shape.K, bits));
  // A block of dW rows in fp32 at a time (a 16-bit dW is never copied to fp32 whole).
  const at::Tensor packed = packed_in.contiguous(), zero = as_float(zero_in);
  at::Tensor grad_scale = at::empty({shape.N, shape.groups()}, zero.options());
  const int64_t rows = dw_block_rows(shape.K);
  for (int64_t n0 = 0; n0 < shape.N; n0 += rows) {
    const at::Tensor dw = grad_w.slice(0, n0, std::min(n0 + rows, shape.N)).to(at::kFloat).contiguous();
    group_code_dot_rows(dw, packed, zero, grad_scale, n0, shape);
  }
  return grad_scale;
}

}  // namespace qatext::ops
