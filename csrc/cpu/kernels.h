// CPU kernels over raw pointers. T is float, c10::Half or c10::BFloat16; scales, zeros and every
// accumulation are fp32. Shapes and argument checks are the caller's (csrc/ops/) job.
#pragma once

#include <cstdint>

#include "core/shape.h"

namespace qatext::cpu {

template <typename T>
void fake_quant_forward(const T* w, const float* scale, const float* zero, T* out, GroupShape shape);

template <typename T>
void fake_quant_backward(const T* grad, const T* w, const float* scale, const float* zero, T* grad_w,
                         float* grad_scale, float* grad_zero, GroupShape shape);

template <typename T>
void fake_quant_per_token_forward(const T* x, T* out, int64_t M, int64_t K, int bits, bool symmetric);

template <typename T>
void fake_quant_per_token_backward(const T* grad, const T* x, T* grad_x, int64_t M, int64_t K, int bits,
                                   bool symmetric);

void pack(const uint8_t* codes, uint8_t* packed, int64_t N, int64_t K, int bits);
void unpack(const uint8_t* packed, uint8_t* codes, int64_t N, int64_t K, int bits);
// Packed [N, K * bits / 8] to the decode GEMM's tiled layout (core/tile_layout.h) and back.
void tile_packed(const uint8_t* packed, uint8_t* tiled, int64_t N, int64_t K, int bits);
void untile_packed(const uint8_t* tiled, uint8_t* packed, int64_t N, int64_t K, int bits);

template <typename T>
void dequant(const uint8_t* packed, const float* scale, const float* zero, T* out, GroupShape shape);
// dequant from the tiled layout (bits 2..4): the same values as dequant of the codes untiled.
template <typename T>
void dequant_tiled(const uint8_t* tiled, const float* scale, const float* zero, T* out, GroupShape shape);

template <typename T>
void lrqat_weight_forward(const uint8_t* p, const float* ab, const float* scale, const float* zero,
                          float lora_scale, int frac_bits, T* out, GroupShape shape);

template <typename T>
void lrqat_weight_backward(const T* grad_w, const uint8_t* p, const float* ab, const float* scale,
                           const float* zero, float lora_scale, int frac_bits, float* grad_u,
                           float* grad_scale, GroupShape shape);

// grad_scale[n, g] = sum over k in group g of dw[n, k] * (q[n, k] - zero[n, g]).
void group_code_dot(const float* dw, const uint8_t* packed, const float* zero, float* grad_scale,
                    GroupShape shape);

}  // namespace qatext::cpu
