// Unit tests of the header-only quantizer math shared by the CPU and CUDA kernels.
#include <gtest/gtest.h>

#include <vector>

#include "core/quant_math.h"

using namespace qatext;

TEST(QuantMath, RoundsHalfToEven) {
  EXPECT_EQ(round_half_even(0.5f), 0.f);
  EXPECT_EQ(round_half_even(1.5f), 2.f);
  EXPECT_EQ(round_half_even(2.5f), 2.f);
  EXPECT_EQ(round_half_even(-0.5f), -0.f);
  EXPECT_EQ(round_half_even(-1.5f), -2.f);
  EXPECT_EQ(round_half_even(2.4f), 2.f);
}

TEST(QuantMath, FakeQuantValueClampsToTheCodeRange) {
  // 4 bits, s = 0.5, z = 8: codes 0..15 represent -4.0 .. 3.5.
  EXPECT_FLOAT_EQ(fake_quant_value(1.2f / 0.5f, 0.5f, 8.f, 15.f), 1.0f);
  EXPECT_FLOAT_EQ(fake_quant_value(100.f / 0.5f, 0.5f, 8.f, 15.f), 3.5f);
  EXPECT_FLOAT_EQ(fake_quant_value(-100.f / 0.5f, 0.5f, 8.f, 15.f), -4.0f);
  EXPECT_FLOAT_EQ(fake_quant_value(0.75f / 0.5f, 0.5f, 8.f, 15.f), 1.0f);  // 1.5 rounds to 2
}

TEST(QuantMath, FakeQuantGradInRangeIsStraightThrough) {
  const FakeQuantGrad d = fake_quant_grad(1.2f / 0.5f, 0.5f, 8.f, 15.f, 2.f);
  EXPECT_FLOAT_EQ(d.dw, 2.f);
  EXPECT_FLOAT_EQ(d.ds, 2.f * (2.f - 2.4f));  // g * (round(w/s) - w/s)
  EXPECT_FLOAT_EQ(d.dz, 0.f);
}

TEST(QuantMath, FakeQuantGradOnTheBoundaryCodeStillFlows) {
  // w/s = -8 -> code 0: representable, so the gradient passes.
  const FakeQuantGrad d = fake_quant_grad(-4.f / 0.5f, 0.5f, 8.f, 15.f, 1.f);
  EXPECT_FLOAT_EQ(d.dw, 1.f);
}

TEST(QuantMath, FakeQuantGradClippedGoesToScaleAndZero) {
  const FakeQuantGrad d = fake_quant_grad(10.f / 0.5f, 0.5f, 8.f, 15.f, 3.f);
  EXPECT_FLOAT_EQ(d.dw, 0.f);
  EXPECT_FLOAT_EQ(d.ds, 3.f * (15.f - 8.f));  // g * (qmax - z)
  EXPECT_FLOAT_EQ(d.dz, -3.f * 0.5f);         // -g * s
}

TEST(QuantMath, PackedRowBytes) {
  EXPECT_EQ(packed_row_bytes(64, 4), 32);
  EXPECT_EQ(packed_row_bytes(64, 3), 24);
  EXPECT_EQ(packed_row_bytes(5, 3), 2);
  EXPECT_EQ(packed_row_bytes(7, 2), 2);
  EXPECT_EQ(packed_row_bytes(9, 8), 9);
}

TEST(QuantMath, PackByteAndReadCodeRoundTripEveryWidth) {
  for (int bits = 2; bits <= 8; ++bits) {
    const int64_t K = 37;
    std::vector<uint8_t> codes(K);
    for (int64_t k = 0; k < K; ++k) codes[k] = uint8_t((k * 7 + 3) % (1 << bits));
    std::vector<uint8_t> packed(packed_row_bytes(K, bits));
    for (size_t j = 0; j < packed.size(); ++j) packed[j] = pack_byte(codes.data(), K, int64_t(j), bits);
    for (int64_t k = 0; k < K; ++k) EXPECT_EQ(read_code(packed.data(), k, bits), codes[k]) << "bits=" << bits;
  }
}

TEST(QuantMath, Int4LowNibbleIsTheEvenElement) {
  const uint8_t codes[2] = {0x3, 0xA};
  EXPECT_EQ(pack_byte(codes, 2, 0, 4), 0xA3);
}

TEST(QuantMath, TokenQParams) {
  const TokenQParams asym = token_qparams(-1.f, 3.f, 8, false);
  EXPECT_FLOAT_EQ(asym.s, 4.f / 255.f);
  EXPECT_FLOAT_EQ(asym.z, round_half_even(1.f / (4.f / 255.f)));
  const TokenQParams sym = token_qparams(-2.f, 1.f, 8, true);
  EXPECT_FLOAT_EQ(sym.s, 2.f / 127.f);
  EXPECT_FLOAT_EQ(sym.z, 128.f);
  EXPECT_GT(token_qparams(0.f, 0.f, 8, false).s, 0.f);  // constant rows never divide by zero
}

TEST(QuantMath, LrqatCodeMaskAndFixedPoint) {
  const uint8_t q44[1] = {0x38};  // 3.5 in Q4.4
  EXPECT_FLOAT_EQ(read_p(q44, 0, 4, 4), 3.5f);
  const LrqatCode in = lrqat_code(3.5f, 0.4f, 1.f, 15.f);  // round(3.9) = 4
  EXPECT_FLOAT_EQ(in.q, 4.f);
  EXPECT_TRUE(in.in_range);
  const LrqatCode out = lrqat_code(14.f, 4.f, 1.f, 15.f);
  EXPECT_FLOAT_EQ(out.q, 15.f);
  EXPECT_FALSE(out.in_range);
}

TEST(QuantMath, DivideByADivisorIsTheDivision) {
  const float w[4] = {1.2f, -3.7f, 0.f, 1e30f};
  float x[4];
  divide(w, divisor(0.3f), x);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(x[i], w[i] / 0.3f);
}
