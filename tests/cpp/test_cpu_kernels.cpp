// The CPU kernels on small hand-checked inputs.
#include <c10/util/BFloat16.h>
#include <gtest/gtest.h>

#include <vector>

#include "core/quant_math.h"
#include "cpu/kernels.h"

using namespace qatext;

TEST(CpuKernels, PackUnpackRoundTrip) {
  for (int bits : {2, 3, 4, 8}) {
    const int64_t N = 3, K = 21;
    std::vector<uint8_t> codes(N * K), back(N * K);
    for (int64_t i = 0; i < N * K; ++i) codes[i] = uint8_t((i * 5 + 1) % (1 << bits));
    std::vector<uint8_t> packed(N * packed_row_bytes(K, bits));
    cpu::pack(codes.data(), packed.data(), N, K, bits);
    cpu::unpack(packed.data(), back.data(), N, K, bits);
    EXPECT_EQ(codes, back) << "bits=" << bits;
  }
}

TEST(CpuKernels, FakeQuantForwardGroupWise) {
  // Two groups of 2 with different scales.
  const std::vector<float> w = {0.26f, -0.9f, 0.26f, 9.f}, s = {0.5f, 0.25f}, z = {2.f, 2.f};
  std::vector<float> out(4);
  cpu::fake_quant_forward(w.data(), s.data(), z.data(), out.data(), GroupShape{1, 4, 2, 2});
  EXPECT_FLOAT_EQ(out[0], 0.5f);   // round(0.52) = 1 -> 0.5
  EXPECT_FLOAT_EQ(out[1], -1.0f);  // round(-1.8) = -2 -> code 0 -> -1.0
  EXPECT_FLOAT_EQ(out[2], 0.25f);  // round(1.04) = 1 -> 0.25
  EXPECT_FLOAT_EQ(out[3], 0.25f);  // clipped at code 3 -> (3 - 2) * 0.25
}

TEST(CpuKernels, FakeQuantBackwardReducesPerGroup) {
  const std::vector<float> w = {0.26f, 9.f, -9.f, 0.1f}, s = {0.5f}, z = {2.f}, g = {1.f, 1.f, 1.f, 1.f};
  std::vector<float> gw(4), gs(1), gz(1);
  cpu::fake_quant_backward(g.data(), w.data(), s.data(), z.data(), gw.data(), gs.data(), gz.data(),
                           GroupShape{1, 4, 4, 2});
  EXPECT_EQ(gw, (std::vector<float>{1.f, 0.f, 0.f, 1.f}));
  // in range: (round(x) - x); clipped high: qmax - z = 1; clipped low: 0 - z = -2.
  EXPECT_NEAR(gs[0], (1.f - 0.52f) + 1.f - 2.f + (0.f - 0.2f), 1e-6);
  EXPECT_FLOAT_EQ(gz[0], -2.f * 0.5f);
}

TEST(CpuKernels, DequantBFloat16) {
  const std::vector<uint8_t> codes = {0, 1, 2, 3};
  std::vector<uint8_t> packed(1);
  cpu::pack(codes.data(), packed.data(), 1, 4, 2);
  const std::vector<float> s = {0.5f}, z = {1.5f};
  std::vector<c10::BFloat16> out(4);
  cpu::dequant(packed.data(), s.data(), z.data(), out.data(), GroupShape{1, 4, 4, 2});
  EXPECT_FLOAT_EQ(float(out[0]), -0.75f);
  EXPECT_FLOAT_EQ(float(out[3]), 0.75f);
}

TEST(CpuKernels, GroupCodeDot) {
  const std::vector<uint8_t> codes = {0, 1, 2, 3};
  std::vector<uint8_t> packed(1);
  cpu::pack(codes.data(), packed.data(), 1, 4, 2);
  const std::vector<float> dw = {1.f, 2.f, 3.f, 4.f}, z = {1.f, 2.f};
  std::vector<float> gs(2);
  cpu::group_code_dot(dw.data(), packed.data(), z.data(), gs.data(), GroupShape{1, 4, 2, 2});
  EXPECT_FLOAT_EQ(gs[0], 1.f * -1.f + 2.f * 0.f);
  EXPECT_FLOAT_EQ(gs[1], 3.f * 0.f + 4.f * 1.f);
}
