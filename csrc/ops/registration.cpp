// Schemas of the qatext op library and their CPU / CUDA implementations (one function each).
#include <torch/library.h>

#include "ops/ops.h"

TORCH_LIBRARY(qatext, m) {
  m.def("fake_quant(Tensor w, Tensor scale, Tensor zero, int bits, int group_size) -> Tensor");
  m.def("fake_quant_backward(Tensor grad, Tensor w, Tensor scale, Tensor zero, int bits, int group_size)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("fake_quant_per_token(Tensor x, int bits, bool symmetric) -> Tensor");
  m.def("fake_quant_per_token_backward(Tensor grad, Tensor x, int bits, bool symmetric) -> Tensor");
  m.def("pack(Tensor codes, int bits) -> Tensor");
  m.def("unpack(Tensor packed, int bits, int in_features) -> Tensor");
  m.def("dequant(Tensor packed, Tensor scale, Tensor zero, int bits, int group_size, int in_features,"
        " ScalarType dtype) -> Tensor");
  m.def("dequant_matmul(Tensor x, Tensor packed, Tensor scale, Tensor zero, int bits, int group_size,"
        " Tensor? bias) -> Tensor");
  m.def("dequant_matmul_grad_input(Tensor grad_y, Tensor packed, Tensor scale, Tensor zero, int bits,"
        " int group_size, int in_features) -> Tensor");
  m.def("tile_packed(Tensor packed, int bits, int in_features) -> Tensor");
  m.def("untile_packed(Tensor tiled, int bits, int in_features) -> Tensor");
  m.def("dequant_tiled(Tensor tiled, Tensor scale, Tensor zero, int bits, int group_size, int in_features,"
        " ScalarType dtype) -> Tensor");
  m.def("dequant_matmul_tiled(Tensor x, Tensor tiled, Tensor scale, Tensor zero, int bits, int group_size,"
        " Tensor? bias) -> Tensor");
  m.def("swiglu_matmul_tiled(Tensor x, Tensor tiled, Tensor scale, Tensor zero, int bits, int group_size,"
        " Tensor? bias) -> Tensor");
  m.def("grouped_matmul_tiled(Tensor x, Tensor offs, Tensor tiled, Tensor scale, Tensor zero, int bits, "
        "int group_size, bool swiglu) -> Tensor");
  m.def("e2eqp_scale_grad(Tensor x, Tensor grad_y, Tensor packed, Tensor zero, int bits, int group_size)"
        " -> Tensor");
  m.def("dequant_scale_grad(Tensor grad_w, Tensor packed, Tensor zero, int bits, int group_size) -> Tensor");
  m.def("lrqat_weight(Tensor p, Tensor a, Tensor b, Tensor scale, Tensor zero, float lora_scale, int bits,"
        " int group_size, int frac_bits) -> Tensor");
  m.def("lrqat_weight_backward(Tensor grad_w, Tensor p, Tensor a, Tensor b, Tensor scale, Tensor zero,"
        " float lora_scale, int bits, int group_size, int frac_bits) -> (Tensor, Tensor, Tensor)");
  m.def("lrqat_rank_grads(Tensor grad_u, Tensor a, Tensor b) -> (Tensor, Tensor)");
  m.def("lrqat_linear(Tensor x, Tensor p, Tensor a, Tensor b, Tensor scale, Tensor zero, Tensor? bias,"
        " float lora_scale, int bits, int group_size, int frac_bits) -> Tensor");
  m.def("lrqat_linear_backward(Tensor grad_y, Tensor x, Tensor p, Tensor a, Tensor b, Tensor scale, Tensor zero,"
        " float lora_scale, int bits, int group_size, int frac_bits, bool grad_input)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("qalora_linear(Tensor x, Tensor packed, Tensor scale, Tensor zero, Tensor a, Tensor b, Tensor? bias,"
        " float lora_scale, int bits, int group_size) -> Tensor");
  m.def("group_sum(Tensor x, int group_size) -> Tensor");
  m.def("group_expand(Tensor t, int group_size) -> Tensor");
}

#define QATEXT_IMPLS(m)                                                       \
  m.impl("fake_quant", &qatext::ops::fake_quant);                             \
  m.impl("fake_quant_backward", &qatext::ops::fake_quant_backward);           \
  m.impl("fake_quant_per_token", &qatext::ops::fake_quant_per_token);         \
  m.impl("fake_quant_per_token_backward", &qatext::ops::fake_quant_per_token_backward); \
  m.impl("pack", &qatext::ops::pack);                                         \
  m.impl("unpack", &qatext::ops::unpack);                                     \
  m.impl("dequant", &qatext::ops::dequant);                                   \
  m.impl("dequant_matmul", &qatext::ops::dequant_matmul);                     \
  m.impl("dequant_matmul_grad_input", &qatext::ops::dequant_matmul_grad_input); \
  m.impl("tile_packed", &qatext::ops::tile_packed);                           \
  m.impl("untile_packed", &qatext::ops::untile_packed);                       \
  m.impl("dequant_tiled", &qatext::ops::dequant_tiled);                       \
  m.impl("dequant_matmul_tiled", &qatext::ops::dequant_matmul_tiled);         \
  m.impl("swiglu_matmul_tiled", &qatext::ops::swiglu_matmul_tiled);           \
  m.impl("grouped_matmul_tiled", &qatext::ops::grouped_matmul_tiled);         \
  m.impl("e2eqp_scale_grad", &qatext::ops::e2eqp_scale_grad);                 \
  m.impl("dequant_scale_grad", &qatext::ops::dequant_scale_grad);             \
  m.impl("lrqat_weight", &qatext::ops::lrqat_weight);                         \
  m.impl("lrqat_weight_backward", &qatext::ops::lrqat_weight_backward);       \
  m.impl("lrqat_rank_grads", &qatext::ops::lrqat_rank_grads);                 \
  m.impl("lrqat_linear", &qatext::ops::lrqat_linear);                         \
  m.impl("lrqat_linear_backward", &qatext::ops::lrqat_linear_backward);       \
  m.impl("qalora_linear", &qatext::ops::qalora_linear);                       \
  m.impl("group_sum", &qatext::ops::group_sum);                               \
  m.impl("group_expand", &qatext::ops::group_expand)

TORCH_LIBRARY_IMPL(qatext, CPU, m) { QATEXT_IMPLS(m); }

#ifdef QATEXT_WITH_CUDA
TORCH_LIBRARY_IMPL(qatext, CUDA, m) { QATEXT_IMPLS(m); }
#endif
