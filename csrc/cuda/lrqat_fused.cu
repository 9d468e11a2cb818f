// LR-QAT weight reconstruction with the low-rank product on the tensor cores.
//
//   forward   W[n, k]  = s * (clamp(round(P[n, k] + c * (A B)[n, k]), 0, 2^b - 1) - z)
//   backward  dU[n, k] = c * s * dW[n, k] * in_range[n, k],   ds[n, g] = sum_k dW[n, k] (q[n, k] - z)
//
// A B is never stored: each warp owns a 16 x 128 tile of W, forms it with mma.sync m16n8k16
// (A fragments held in registers for the whole tile, B^T fragments read through L1, shared by the
// block's 8 warps; P and dW for the whole tile loaded before any math) and applies the quantizer
// to the fp32 accumulators in place, 16-byte loads and stores throughout. Traffic is the floor: read P (b/8 B/elem) and write W (2 B/elem) forward; read P and dW, write dU backward.
// The rank is zero-padded to R = 16, 32 or 64 by the caller. ds is summed per tile row in a
// fixed order (thread, then quad shuffle): one partial per (row, group in the tile), no atomics.
#include <type_traits>

#include "core/quant_math.h"
#include "cuda/common.cuh"
#include "cuda/kernels.h"
#include "cuda/mma.cuh"

namespace qatext::cuda {
namespace {

constexpr int kTileRows = 16, kTileCols = 128, kWarps = 8;  // a block: 8 warps down one column tile

template <typename T>
struct LrqatTileArgs {
  const uint8_t* p;       // [N, p_row_bytes]
  const T* a;             // [N, R]
  const T* bt;            // [K, R]
  const float* scale;     // [N, G]
  const float* zero;      // [N, G]
  const T* grad_w;        // [N, K], backward only
  T* out;                 // W (forward) or dU (backward), [N, K]
  float* grad_scale_tiles;  // [N, K / 128 * groups per tile], backward only
  float lora_scale, qmax, p_unit;  // p_unit = 2^-frac_bits
  int64_t p_row_bytes;
  int N, K, G, group_size, bits, frac_bits;
};

// The 8 P values at columns k .. k + 7 (k a multiple of 8) of one row, as raw bits: 8 bytes for
// fixed point and 8-bit codes, else 8 codes of `bits` bits (one aligned 16/32-bit load for 2/4 bits).
__device__ __forceinline__ uint64_t load_p8(const uint8_t* __restrict__ row, int k, int bits, int frac_bits) {
  if (frac_bits > 0 || bits == 8) {
    const uint2 v = __ldg(reinterpret_cast<const uint2*>(row + k));
    return uint64_t(v.x) | (uint64_t(v.y) << 32);
  }
  const uint8_t* at = row + (k * bits >> 3);
  if (bits == 4) return __ldg(reinterpret_cast<const unsigned int*>(at));
  if (bits == 2) return __ldg(reinterpret_cast<const unsigned short*>(at));
  uint64_t v = 0;
  for (int i = 0; i < bits; ++i) v |= uint64_t(__ldg(at + i)) << (8 * i);
  return v;
}

__device__ __forceinline__ float p_value(uint64_t raw, int i, int bits, int frac_bits, float unit) {
  if (frac_bits > 0 || bits == 8) return float(uint32_t(raw >> (8 * i)) & 0xFFu) * unit;  // exact: unit = 2^-f
  return float(uint32_t(raw >> (bits * i)) & ((1u << bits) - 1u));
}

// Each warp owns a 16 x 128 tile; the mma columns are mapped to K so that every thread ends up with
// 8 contiguous columns per 32-column slice m (16-byte loads and stores, a quad covers 64 bytes):
// tile j = 4m + t, mma column c  ->  k = k0 + 32m + 8(c / 2) + 2t + c % 2.
// The rank is permuted the same way in A and B (the sum over r does not care), so that each lane
// reads its fragments as one contiguous run of 4*RK values: r = 4*RK*q4 + 4ks + 2half + e.
// GPT: quantization groups per 128-column tile (4 for g = 32, 2 for g = 64, 1 for g >= 128).
// The warps of a block share one column tile (rows differ), so B^T comes through L1 once.
template <typename T, int RK, int GPT, bool BACKWARD>
__global__ void __launch_bounds__(kWarps * 32) lrqat_tile_kernel(LrqatTileArgs<T> args) {
  constexpr int R = 16 * RK, kSlices = kTileCols / 32, kSlicesPerGroup = kSlices / GPT;
  const int lane = threadIdx.x & 31, g4 = lane >> 2, q4 = lane & 3;
  const int col_tiles = args.K / kTileCols;
  const int col_tile = int(blockIdx.x % col_tiles), k0 = col_tile * kTileCols;
  const int64_t row_tile = int64_t(blockIdx.x / col_tiles) * kWarps + (threadIdx.x >> 5);
  if (row_tile >= args.N / kTileRows) return;
  const int64_t rows[2] = {row_tile * kTileRows + g4, row_tile * kTileRows + g4 + 8};

  uint64_t praw[2][kSlices];
  uint4 graw[2][BACKWARD ? kSlices : 1];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const uint8_t* __restrict__ prow = args.p + rows[h] * args.p_row_bytes;
#pragma unroll
    for (int m = 0; m < kSlices; ++m) {
      const int k = k0 + 32 * m + 8 * q4;
      praw[h][m] = load_p8(prow, k, args.bits, args.frac_bits);
      if constexpr (BACKWARD) graw[h][m] = __ldg(reinterpret_cast<const uint4*>(args.grad_w + rows[h] * args.K + k));
    }
  }
  // A fragments: lane q4 holds rank values [4 RK q4, 4 RK (q4 + 1)) of its two rows.
  uint32_t af[RK][4];
  {
    uint32_t lo[2 * RK], hi[2 * RK];
#pragma unroll
    for (int v = 0; v < RK / 2 + (RK == 1); ++v) {
      const int64_t col = 4 * RK * q4 + 8 * v;
      if constexpr (RK == 1) {
        const uint2 x = __ldg(reinterpret_cast<const uint2*>(args.a + rows[0] * R + col));
        const uint2 y = __ldg(reinterpret_cast<const uint2*>(args.a + rows[1] * R + col));
        lo[0] = x.x, lo[1] = x.y, hi[0] = y.x, hi[1] = y.y;
      } else {
        const uint4 x = __ldg(reinterpret_cast<const uint4*>(args.a + rows[0] * R + col));
        const uint4 y = __ldg(reinterpret_cast<const uint4*>(args.a + rows[1] * R + col));
        lo[4 * v] = x.x, lo[4 * v + 1] = x.y, lo[4 * v + 2] = x.z, lo[4 * v + 3] = x.w;
        hi[4 * v] = y.x, hi[4 * v + 1] = y.y, hi[4 * v + 2] = y.z, hi[4 * v + 3] = y.w;
      }
    }
#pragma unroll
    for (int ks = 0; ks < RK; ++ks) af[ks][0] = lo[2 * ks], af[ks][1] = hi[2 * ks], af[ks][2] = lo[2 * ks + 1], af[ks][3] = hi[2 * ks + 1];
  }
  float s[2][GPT], z[2][GPT], ds[2][GPT];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
#pragma unroll
    for (int gi = 0; gi < GPT; ++gi) {
      const int64_t idx = rows[h] * args.G + (k0 + gi * (kTileCols / GPT)) / args.group_size;
      s[h][gi] = trained_scale(__ldg(args.scale + idx)), z[h][gi] = __ldg(args.zero + idx), ds[h][gi] = 0.f;
    }
  }

#pragma unroll
  for (int m = 0; m < kSlices; ++m) {
    float acc[4][4];  // [t][mma accumulator]
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;
      const int kb = k0 + 32 * m + 8 * (g4 >> 1) + 2 * t + (g4 & 1);  // this lane's B column
      const T* brow = args.bt + int64_t(kb) * R + 4 * RK * q4;
      uint32_t b[2 * RK];
      if constexpr (RK == 1) {
        const uint2 x = __ldg(reinterpret_cast<const uint2*>(brow));
        b[0] = x.x, b[1] = x.y;
      } else {
#pragma unroll
        for (int v = 0; v < RK / 2; ++v) {
          const uint4 x = __ldg(reinterpret_cast<const uint4*>(brow + 8 * v));
          b[4 * v] = x.x, b[4 * v + 1] = x.y, b[4 * v + 2] = x.z, b[4 * v + 3] = x.w;
        }
      }
#pragma unroll
      for (int ks = 0; ks < RK; ++ks) mma16816<T>(acc[t], af[ks], b[2 * ks], b[2 * ks + 1]);
    }
    const int gi = m / kSlicesPerGroup;
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // accumulators 0, 1: row g4; 2, 3: row g4 + 8
      const float sc = s[h][gi], zc = z[h][gi], cs = args.lora_scale * sc;
      uint32_t packed[4];
      float g[8];
      if constexpr (BACKWARD) {
        const uint32_t gw[4] = {graw[h][m].x, graw[h][m].y, graw[h][m].z, graw[h][m].w};
#pragma unroll
        for (int t = 0; t < 4; ++t) {
          const float2 v = Native<T>::unpack2(gw[t]);
          g[2 * t] = v.x, g[2 * t + 1] = v.y;
        }
      }
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        float out[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float p = p_value(praw[h][m], 2 * t + e, args.bits, args.frac_bits, args.p_unit);
          const LrqatCode c = lrqat_code(p, acc[t][2 * h + e], args.lora_scale, args.qmax);
          if constexpr (!BACKWARD) {
            out[e] = (c.q - zc) * sc;
          } else {
            out[e] = c.in_range ? g[2 * t + e] * cs : 0.f;
            ds[h][gi] += g[2 * t + e] * (c.q - zc);
          }
        }
        packed[t] = Native<T>::pack2(out[0], out[1]);
      }
      *reinterpret_cast<uint4*>(args.out + rows[h] * args.K + k0 + 32 * m + 8 * q4) =
          make_uint4(packed[0], packed[1], packed[2], packed[3]);
    }
  }
  if constexpr (BACKWARD) {
    const int per_row = col_tiles * GPT;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int gi = 0; gi < GPT; ++gi) {
        float v = ds[h][gi];
        v += __shfl_xor_sync(0xffffffffu, v, 1);
        v += __shfl_xor_sync(0xffffffffu, v, 2);
        if (q4 == 0) args.grad_scale_tiles[rows[h] * per_row + col_tile * GPT + gi] = v;
      }
    }
  }
}

int groups_per_tile(int64_t group_size) { return group_size >= kTileCols ? 1 : int(kTileCols / group_size); }

template <typename T, bool BACKWARD>
void launch(const LrqatTileArgs<T>& args, int rank_padded, cudaStream_t stream) {
  const int64_t row_groups = (args.N / kTileRows + kWarps - 1) / kWarps;
  const unsigned blocks = unsigned(row_groups * (args.K / kTileCols));
  const int gpt = groups_per_tile(args.group_size);
  const auto go = [&](auto rk, auto gpt_c) {
    lrqat_tile_kernel<T, decltype(rk)::value, decltype(gpt_c)::value, BACKWARD>
        <<<blocks, kWarps * 32, 0, stream>>>(args);
  };
  using I1 = std::integral_constant<int, 1>;
  using I2 = std::integral_constant<int, 2>;
  using I4 = std::integral_constant<int, 4>;
  const auto by_gpt = [&](auto rk) {
    if (gpt == 1) go(rk, I1{});
    else if (gpt == 2) go(rk, I2{});
    else go(rk, I4{});
  };
  if (rank_padded == 16) by_gpt(I1{});
  else if (rank_padded == 32) by_gpt(I2{});
  else by_gpt(I4{});
  check_launch(BACKWARD ? "lrqat_fused_backward" : "lrqat_fused_forward");
}

template <typename T>
LrqatTileArgs<T> make_args(const uint8_t* p, const T* a, const T* bt, const float* scale, const float* zero,
                           float lora_scale, int frac_bits, GroupShape shape) {
  LrqatTileArgs<T> args{};
  args.p = p, args.a = a, args.bt = bt, args.scale = scale, args.zero = zero;
  args.lora_scale = lora_scale, args.qmax = qmax_for_bits(shape.bits), args.p_unit = 1.f / float(1 << frac_bits);
  args.p_row_bytes = p_row_bytes(shape.K, shape.bits, frac_bits);
  args.N = int(shape.N), args.K = int(shape.K), args.G = int(shape.groups()), args.group_size = int(shape.group_size);
  args.bits = shape.bits, args.frac_bits = frac_bits;
  return args;
}

}  // namespace

bool lrqat_fused_supported(GroupShape shape, int64_t rank) {
  const int64_t g = shape.group_size;
  return shape.N % kTileRows == 0 && shape.K % kTileCols == 0 && shape.N * shape.K < (int64_t(1) << 31) &&
         rank >= 1 && rank <= 64 && (g == 32 || g == 64 || g % kTileCols == 0);
}

int64_t lrqat_fused_tile_groups(GroupShape shape) { return shape.K / kTileCols * groups_per_tile(shape.group_size); }

template <typename T>
void lrqat_fused_forward(const uint8_t* p, const T* a, const T* bt, int rank_padded, const float* scale,
                         const float* zero, float lora_scale, int frac_bits, T* out, GroupShape shape,
                         cudaStream_t stream) {
  if (shape.numel() == 0) return;
  LrqatTileArgs<T> args = make_args(p, a, bt, scale, zero, lora_scale, frac_bits, shape);
  args.out = out;
  launch<T, false>(args, rank_padded, stream);
}

template <typename T>
void lrqat_fused_backward(const T* grad_w, const uint8_t* p, const T* a, const T* bt, int rank_padded,
                          const float* scale, const float* zero, float lora_scale, int frac_bits, T* grad_u,
                          float* grad_scale_tiles, GroupShape shape, cudaStream_t stream) {
  if (shape.numel() == 0) return;
  LrqatTileArgs<T> args = make_args(p, a, bt, scale, zero, lora_scale, frac_bits, shape);
  args.grad_w = grad_w, args.out = grad_u, args.grad_scale_tiles = grad_scale_tiles;
  launch<T, true>(args, rank_padded, stream);
}

#define QATEXT_INSTANTIATE(T)                                                                                    \
  template void lrqat_fused_forward<T>(const uint8_t*, const T*, const T*, int, const float*, const float*, float, \
                                       int, T*, GroupShape, cudaStream_t);                                       \
  template void lrqat_fused_backward<T>(const T*, const uint8_t*, const T*, const T*, int, const float*,         \
                                        const float*, float, int, T*, float*, GroupShape, cudaStream_t);
QATEXT_INSTANTIATE(c10::Half)
QATEXT_INSTANTIATE(c10::BFloat16)
#undef QATEXT_INSTANTIATE

}  // namespace qatext::cuda
