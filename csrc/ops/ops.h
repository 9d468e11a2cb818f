// The qatext ops as registered in TORCH_LIBRARY(qatext); one implementation serves CPU and CUDA.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace qatext::ops {

at::Tensor fake_quant(const at::Tensor& w, const at::Tensor& scale, const at::Tensor& zero, int64_t bits,
                      int64_t group_size);
std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quant_backward(const at::Tensor& grad, const at::Tensor& w,
                                                                   const at::Tensor& scale, const at::Tensor& zero,
                                                                   int64_t bits, int64_t group_size);
at::Tensor fake_quant_per_token(const at::Tensor& x, int64_t bits, bool symmetric);
at::Tensor fake_quant_per_token_backward(const at::Tensor& grad, const at::Tensor& x, int64_t bits, bool symmetric);

at::Tensor pack(const at::Tensor& codes, int64_t bits);
at::Tensor unpack(const at::Tensor& packed, int64_t bits, int64_t in_features);
at::Tensor dequant(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& zero, int64_t bits,
                   int64_t group_size, int64_t in_features, at::ScalarType dtype);
at::Tensor dequant_matmul(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                          const at::Tensor& zero, int64_t bits, int64_t group_size,
                          const std::optional<at::Tensor>& bias);
at::Tensor dequant_matmul_grad_input(const at::Tensor& grad_y, const at::Tensor& packed, const at::Tensor& scale,
                                     const at::Tensor& zero, int64_t bits, int64_t group_size,
                                     int64_t in_features);
// dequant_matmul(a, ...) (grad_input: dequant_matmul_grad_input) + beta * acc, through the dispatcher
// (it runs inside other ops' autograd, also on fake tensors). acc is a temporary of the result's shape
// and dtype that the call may overwrite: on the cuBLAS path the sum is the GEMM's epilogue.
at::Tensor dequant_matmul_plus(const at::Tensor& a, const at::Tensor& packed, const at::Tensor& scale,
                               const at::Tensor& zero, int64_t bits, int64_t group_size,
                               const std::optional<at::Tensor>& bias, const at::Tensor& acc, double beta,
                               bool grad_input);
at::Tensor tile_packed(const at::Tensor& packed, int64_t bits, int64_t in_features);
at::Tensor untile_packed(const at::Tensor& tiled, int64_t bits, int64_t in_features);
// dequant of tiled codes: the weight [N, K] in dtype, no untiled copy made.
at::Tensor dequant_tiled(const at::Tensor& tiled, const at::Tensor& scale, const at::Tensor& zero, int64_t bits,
                         int64_t group_size, int64_t in_features, at::ScalarType dtype);
at::Tensor dequant_matmul_tiled(const at::Tensor& x, const at::Tensor& tiled, const at::Tensor& scale,
                                const at::Tensor& zero, int64_t bits, int64_t group_size,
                                const std::optional<at::Tensor>& bias);
// silu(y[..., :N / 2]) * y[..., N / 2:] for y = dequant_matmul_tiled(...): a SwiGLU MLP's gate and up rows
// in one tiled weight (N a multiple of 16).
at::Tensor swiglu_matmul_tiled(const at::Tensor& x, const at::Tensor& tiled, const at::Tensor& scale,
                               const at::Tensor& zero, int64_t bits, int64_t group_size,
                               const std::optional<at::Tensor>& bias);
// Grouped experts: out [S, N] = each expert's rows of x [S, K] (sorted by expert; offs int32 [experts], the
// rows of experts 0..e) @ deq(W_e)^T, the experts' tiled [N, K] weights stacked in tiled ([experts * N] rows;
// scale and zero likewise); with swiglu silu(gate) * up of each (W_e = [gate_e; up_e]), [S, N / 2]. Rows past
// offs[-1] are zeros. On CUDA (16-bit x) one decode kernel launch that reads only the chosen experts' weights
// and nothing on the host; elsewhere one call an expert.
at::Tensor grouped_matmul_tiled(const at::Tensor& x, const at::Tensor& offs, const at::Tensor& tiled,
                                const at::Tensor& scale, const at::Tensor& zero, int64_t bits, int64_t group_size,
                                bool swiglu);
at::Tensor e2eqp_scale_grad(const at::Tensor& x, const at::Tensor& grad_y, const at::Tensor& packed,
                            const at::Tensor& zero, int64_t bits, int64_t group_size);
// d loss / d scale of dequant(packed, scale, zero) given grad_w = d loss / d W [N, K]: [N, G] in fp32.
at::Tensor dequant_scale_grad(const at::Tensor& grad_w, const at::Tensor& packed, const at::Tensor& zero, int64_t bits,
                              int64_t group_size);

at::Tensor lrqat_weight(const at::Tensor& p, const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale,
                        const at::Tensor& zero, double lora_scale, int64_t bits, int64_t group_size,
                        int64_t frac_bits);
std::tuple<at::Tensor, at::Tensor, at::Tensor> lrqat_weight_backward(
    const at::Tensor& grad_w, const at::Tensor& p, const at::Tensor& a, const at::Tensor& b,
    const at::Tensor& scale, const at::Tensor& zero, double lora_scale, int64_t bits, int64_t group_size,
    int64_t frac_bits);
// lrqat_linear's backward in one op: dW = dY^T X, then (on the tile kernels) one pass over dW for dU, ds
// and W, then dX = dY W (grad_input; else grad_x is empty) and the adapters' gradients.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lrqat_linear_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& p, const at::Tensor& a, const at::Tensor& b,
    const at::Tensor& scale, const at::Tensor& zero, double lora_scale, int64_t bits, int64_t group_size,
    int64_t frac_bits, bool grad_input);
// LR-QAT's adapter gradients given dU = d loss / d (A B): dA = dU B^T and dB = A^T dU in dU's dtype (fp32
// sums), grad_u [N, K], a [N, r], b [r, K], or each stacked over a leading expert dimension.
std::tuple<at::Tensor, at::Tensor> lrqat_rank_grads(const at::Tensor& grad_u, const at::Tensor& a, const at::Tensor& b);
at::Tensor lrqat_linear(const at::Tensor& x, const at::Tensor& p, const at::Tensor& a, const at::Tensor& b,
                        const at::Tensor& scale, const at::Tensor& zero, const std::optional<at::Tensor>& bias,
                        double lora_scale, int64_t bits, int64_t group_size, int64_t frac_bits);

// QA-LoRA's linear (ops/qalora_ops.cpp), and its forward with what backward keeps: the input pooled
// over each group [.., K / g] and the adapter's hidden pooled @ A^T [.., r] (the ops called through the
// dispatcher, so fake tensors trace it).
at::Tensor qalora_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                         const at::Tensor& zero, const at::Tensor& a, const at::Tensor& b,
                         const std::optional<at::Tensor>& bias, double lora_scale, int64_t bits, int64_t group_size);
struct QaloraParts {
  at::Tensor out, pooled, h;
  int64_t group_size;  // resolved (-1: K)
  double alpha;        // lora_scale / group_size: the adapter's factor
};
QaloraParts qalora_parts(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                         const at::Tensor& zero, const at::Tensor& a, const at::Tensor& b,
                         const std::optional<at::Tensor>& bias, double lora_scale, int64_t bits, int64_t group_size);
// Its pooling, x [.., K] -> [.., K / g] summed over each group (fp32 sum, x's dtype), and the pooling's
// transpose, t [.., G] -> [.., G g] with each group's value over its g columns.
at::Tensor group_sum(const at::Tensor& x, int64_t group_size);
at::Tensor group_expand(const at::Tensor& t, int64_t group_size);

}  // namespace qatext::ops
