// Quantizer math shared by the CPU and CUDA kernels: one formula, one rounding, one bit layout.
//
//   codes q in [0, 2^b - 1], dequant w = (q - z) * s,
//   fq(w) = (clamp(round(w / s) + z, 0, 2^b - 1) - z) * s, round half to even (as torch.round).
//
// Packed storage is a little-endian bit stream along K: code k occupies bits [k*b, (k+1)*b) of the
// row, so int4 puts element 2i in the low nibble of byte i ("double-packed") and 2-bit puts four
// codes per byte, lowest first. Every row starts on a byte boundary.
#pragma once

#include <cmath>
#include <cstdint>

#include "core/macros.h"

namespace qatext {

QATEXT_HOST_DEVICE float qmax_for_bits(int bits) { return float((1 << bits) - 1); }

// A code as a float, exactly (q < 2^23). On a GPU the code goes into the mantissa of 2^23, which spares
// the slower integer-to-float conversion.
QATEXT_HOST_DEVICE float code_to_float(uint32_t q) {
#ifdef __CUDA_ARCH__
  return __int_as_float(0x4B000000u | q) - 8388608.f;
#else
  return float(q);
#endif
}

// The weight a code stands for: w = (q - z) * s, in fp32 (rounded once more, by the caller's store).
QATEXT_HOST_DEVICE float dequant_value(uint32_t q, float s, float z) { return (code_to_float(q) - z) * s; }

// Bytes per packed row of K codes of `bits` bits.
QATEXT_HOST_DEVICE int64_t packed_row_bytes(int64_t K, int bits) { return (K * bits + 7) / 8; }

// Round half to even under the default rounding mode, bit-identical on host and device.
QATEXT_HOST_DEVICE float round_half_even(float x) { return rintf(x); }

// round_half_even for a value about to be clamped to a code range: exact for |x| < 2^22; beyond, a value
// of x's sign at least 2^22 in magnitude, which a clamp to [0, 2^b - 1] (and an in-range test) treats
// as it treats x. On a GPU, x + 1.5 * 2^23 rounds to an integer in fp32: two adds instead of the
// conversion unit's FRND, which runs at a quarter of the add rate and bounded the tile kernels.
QATEXT_HOST_DEVICE float round_code(float x) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(__fadd_rn(x, 12582912.f), 12582912.f);
#else
  return rintf(x);
#endif
}

QATEXT_HOST_DEVICE float clampf(float x, float lo, float hi) { return fminf(fmaxf(x, lo), hi); }

// Code k of a packed row.
QATEXT_HOST_DEVICE uint32_t read_code(const uint8_t* row, int64_t k, int bits) {
  const int64_t bit = k * bits;
  const int64_t byte = bit >> 3;
  const int shift = int(bit & 7);
  uint32_t v = row[byte];
  if (shift + bits > 8) v |= uint32_t(row[byte + 1]) << 8;
  return (v >> shift) & ((1u << bits) - 1u);
}

// Byte j of the packed form of a row of K codes (codes must already lie in [0, 2^b - 1]).
QATEXT_HOST_DEVICE uint8_t pack_byte(const uint8_t* codes, int64_t K, int64_t j, int bits) {
  const int64_t first_bit = j * 8;
  int64_t k = first_bit / bits;
  uint32_t out = 0;
  for (; k < K && k * bits < first_bit + 8; ++k) {
    const int64_t offset = k * bits - first_bit;  // may be negative for a code straddling in
    const uint32_t code = codes[k];
    out |= offset >= 0 ? (code << offset) : (code >> (-offset));
  }
  return uint8_t(out & 0xFFu);
}

// The scale and zero a weight fake-quant computes with. Both are trained as floats: the scale is
// kept at least kMinScale (an optimiser step past zero must not divide by zero or flip the sign; NaN
// stays NaN for the loss check to see) and the zero is rounded to an integer (so the merged codes are
// exact). Both pass their gradients straight through to the trained values.
constexpr float kMinScale = 1e-6f;
QATEXT_HOST_DEVICE float trained_scale(float s) { return s < kMinScale ? kMinScale : s; }
QATEXT_HOST_DEVICE float trained_zero(float z) { return round_half_even(z); }

// w / s for the weights of one scale, rounded as the division rounds. On a GPU a division is a
// special-function reciprocal, a range check and a branch per element, which held the fake-quant
// kernels under the copy rate. Here the reciprocal is rounded once (divisor) and each weight takes a
// product and two FMA corrections: by Markstein's theorem the second gives the correctly rounded
// quotient where nothing under- or overflows, which the ranges below keep (|s| in [2^-60, 2^60], every
// |w / s| of the batch in [2^-40, 2^40]). A batch with anything else (zero, inf, NaN, extremes) divides.
// The host divides.
struct Divisor {
  float s, inv;  // inv: 1 / s rounded, or NaN where s is outside the fast path's range
};

QATEXT_HOST_DEVICE Divisor divisor(float s) {
#ifdef __CUDA_ARCH__
  const float a = fabsf(s);
  return {s, a >= 0x1p-60f && a <= 0x1p60f ? __frcp_rn(s) : __int_as_float(0x7fffffff)};
#else
  return {s, 1.f / s};
#endif
}

// x[i] = w[i] / d.s for i < N, one range check for the N.
template <int N>
QATEXT_HOST_DEVICE void divide(const float (&w)[N], Divisor d, float (&x)[N]) {
#ifdef __CUDA_ARCH__
  bool fast = true;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    x[i] = __fmul_rn(w[i], d.inv);
    fast = fast && fabsf(x[i]) >= 0x1p-40f && fabsf(x[i]) <= 0x1p40f;  // false for NaN
  }
  if (fast) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const float q1 = __fmaf_rn(__fmaf_rn(-d.s, x[i], w[i]), d.inv, x[i]);
      x[i] = __fmaf_rn(__fmaf_rn(-d.s, q1, w[i]), d.inv, q1);
    }
    return;
  }
#endif
#pragma unroll
  for (int i = 0; i < N; ++i) x[i] = w[i] / d.s;
}

// Forward of the weight quantizer at x = w / s.
QATEXT_HOST_DEVICE float fake_quant_value(float x, float s, float z, float qmax) {
  const float q = clampf(round_code(x) + z, 0.f, qmax);
  return (q - z) * s;
}

// Gradients of fq at one element, x = w / s, for upstream gradient g, with round() straight-through:
//   in range (0 <= round(w/s)+z <= qmax): dw = g, ds = g * (round(w/s) - w/s), dz = 0
//   clipped:                              dw = 0, ds = g * (clamp(...) - z),    dz = -g * s
struct FakeQuantGrad {
  float dw, ds, dz;
};

QATEXT_HOST_DEVICE FakeQuantGrad fake_quant_grad(float x, float s, float z, float qmax, float g) {
  const float r = round_code(x);
  const float c = r + z;
  if (c >= 0.f && c <= qmax) return {g, g * (r - x), 0.f};
  const float q = clampf(c, 0.f, qmax);
  return {0.f, g * (q - z), -g * s};
}

// Integer code that fq would store (used by RTN initialisation and packing).
QATEXT_HOST_DEVICE float quantize_code(float w, float s, float z, float qmax) {
  return clampf(round_code(w / s) + z, 0.f, qmax);
}

// Dynamic per-token activation quantizer parameters from a row's min and max.
// Asymmetric: range includes 0, s = (max - min) / qmax, z = clamp(round(-min / s), 0, qmax).
// Symmetric:  s = absmax / (2^(b-1) - 1), z = 2^(b-1).
struct TokenQParams {
  float s, z;
};

constexpr float kMinTokenScale = 1e-8f;

QATEXT_HOST_DEVICE TokenQParams token_qparams(float row_min, float row_max, int bits, bool symmetric) {
  if (symmetric) {
    const float absmax = fmaxf(fabsf(row_min), fabsf(row_max));
    const float s = fmaxf(absmax / float((1 << (bits - 1)) - 1), kMinTokenScale);
    return {s, float(1 << (bits - 1))};
  }
  const float lo = fminf(row_min, 0.f);
  const float hi = fmaxf(row_max, 0.f);
  const float qmax = qmax_for_bits(bits);
  const float s = fmaxf((hi - lo) / qmax, kMinTokenScale);
  return {s, clampf(round_code(-lo / s), 0.f, qmax)};
}

// LR-QAT: the frozen P is in code space (already includes z); u = P + c * (A B)[n, k].
// Returns the rounded, clamped code and whether it was in range (straight-through mask).
struct LrqatCode {
  float q;
  bool in_range;
};

QATEXT_HOST_DEVICE LrqatCode lrqat_code(float p, float ab, float lora_scale, float qmax) {
#if defined(__CUDA_ARCH__)
  // No fused multiply-add, so the device rounds exactly as the host and the reference do.
  const float r = round_code(__fadd_rn(p, __fmul_rn(lora_scale, ab)));
#else
  const float r = round_code(p + lora_scale * ab);
#endif
  const float q = clampf(r, 0.f, qmax);
  return {q, q == r};  // in range iff the clamp left r as it was (NaN: never)
}

// Value of P at (n, k): packed b-bit codes when frac_bits == 0, else uint8 fixed point with
// frac_bits fractional bits (Q4.4 for b = 4).
QATEXT_HOST_DEVICE float read_p(const uint8_t* row, int64_t k, int bits, int frac_bits) {
  if (frac_bits == 0) return float(read_code(row, k, bits));
  return float(row[k]) / float(1 << frac_bits);
}

}  // namespace qatext

namespace qatext {

// Bytes per row of LR-QAT's frozen P: packed codes, or one fixed-point byte per element.
QATEXT_HOST_DEVICE int64_t p_row_bytes(int64_t K, int bits, int frac_bits) {
  return frac_bits == 0 ? packed_row_bytes(K, bits) : K;
}

}  // namespace qatext
