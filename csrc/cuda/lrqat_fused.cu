// LR-QAT weight reconstruction with the low-rank product on the tensor cores, version 1.
//
//   forward   W[n, k]  = s * (clamp(round(P[n, k] + c * (A B)[n, k]), 0, 2^b - 1) - z)
//   backward  dU[n, k] = c * s * dW[n, k] * in_range[n, k],   ds[n, g] = sum_k dW[n, k] (q[n, k] - z)
//
// A B is never stored: each warp owns a 16 x 128 tile of W, forms it with mma.sync m16n8k16
// (A fragments held in registers for the whole tile, B^T fragments read through L1, shared by the
// block's 8 warps; P and dW for the whole tile loaded before any math) and applies the quantizer to the fp32 accumulators in place. Traffic is the
// floor: read P (b/8 B/elem) and write W (2 B/elem) forward; read P and dW, write dU backward.
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

__device__ __forceinline__ void st32(void* p, uint32_t v) { *reinterpret_cast<uint32_t*>(p) = v; }

// Raw P bits at columns k and k + 1 (k even) of one row: one byte (int4), two bytes (fixed point),
// or the general bit-stream read. Loaded for the whole tile before any math, so the loads overlap.
__device__ __forceinline__ uint32_t load_p_pair(const uint8_t* __restrict__ row, int k, int bits, int frac_bits) {
  if (frac_bits > 0) return __ldg(reinterpret_cast<const uint16_t*>(row + k));
  if (bits == 4) return __ldg(row + (k >> 1));
  return read_code(row, k, bits) | (read_code(row, k + 1, bits) << 8);
}

__device__ __forceinline__ float2 decode_p_pair(uint32_t v, int bits, int frac_bits, float unit) {
  if (frac_bits > 0) return make_float2(float(v & 0xFFu) * unit, float(v >> 8) * unit);  // exact: unit = 2^-f
  if (bits == 4) return make_float2(float(v & 15u), float(v >> 4));
  return make_float2(float(v & 0xFFu), float(v >> 8));
}

// GPT: quantization groups per 128-column tile (4 for g = 32, 2 for g = 64, 1 for g >= 128).
// The warps of a block share one column tile (rows differ), so B^T fragments come from L1.
template <typename T, int RK, int GPT, bool BACKWARD>
__global__ void __launch_bounds__(kWarps * 32) lrqat_tile_kernel(LrqatTileArgs<T> args) {
  constexpr int R = 16 * RK, kJ = kTileCols / 8, kTilesPerGroup = kJ / GPT;
  const int lane = threadIdx.x & 31, g4 = lane >> 2, q4 = lane & 3;
  const int col_tiles = args.K / kTileCols;
  const int col_tile = int(blockIdx.x % col_tiles), k0 = col_tile * kTileCols;
  const int64_t row_tile = int64_t(blockIdx.x / col_tiles) * kWarps + (threadIdx.x >> 5);
  if (row_tile >= args.N / kTileRows) return;
  const int64_t rows[2] = {row_tile * kTileRows + g4, row_tile * kTileRows + g4 + 8};
  const T* __restrict__ a = args.a;
  const T* __restrict__ bt = args.bt;
  const T* __restrict__ grad_w = args.grad_w;
  T* __restrict__ out = args.out;

  uint32_t praw[2][kJ], graw[2][BACKWARD ? kJ : 1];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const uint8_t* __restrict__ prow = args.p + rows[h] * args.p_row_bytes;
#pragma unroll
    for (int j = 0; j < kJ; ++j) {
      const int k = k0 + 8 * j + 2 * q4;
      praw[h][j] = load_p_pair(prow, k, args.bits, args.frac_bits);
      if constexpr (BACKWARD) graw[h][j] = __ldg(reinterpret_cast<const unsigned int*>(grad_w + rows[h] * args.K + k));
    }
  }
  uint32_t af[RK][4];  // the warp's 16 rows of A, whole rank, as mma A fragments
#pragma unroll
  for (int ks = 0; ks < RK; ++ks) {
    const unsigned int* lo = reinterpret_cast<const unsigned int*>(a + rows[0] * R + ks * 16 + 2 * q4);
    const unsigned int* hi = reinterpret_cast<const unsigned int*>(a + rows[1] * R + ks * 16 + 2 * q4);
    af[ks][0] = __ldg(lo), af[ks][1] = __ldg(hi), af[ks][2] = __ldg(lo + 4), af[ks][3] = __ldg(hi + 4);
  }
  float s[2][GPT], z[2][GPT], ds[2][GPT];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
#pragma unroll
    for (int gi = 0; gi < GPT; ++gi) {
      const int64_t idx = rows[h] * args.G + (k0 + gi * (kTileCols / GPT)) / args.group_size;
      s[h][gi] = __ldg(args.scale + idx), z[h][gi] = __ldg(args.zero + idx), ds[h][gi] = 0.f;
    }
  }

#pragma unroll
  for (int j = 0; j < kJ; ++j) {
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    const unsigned int* bcol = reinterpret_cast<const unsigned int*>(bt + int64_t(k0 + 8 * j + g4) * R + 2 * q4);
#pragma unroll
    for (int ks = 0; ks < RK; ++ks) mma16816<T>(acc, af[ks], __ldg(bcol + ks * 8), __ldg(bcol + ks * 8 + 4));
    const int k = k0 + 8 * j + 2 * q4, gi = j / kTilesPerGroup;
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // accumulators 0, 1: row g4; 2, 3: row g4 + 8; columns k, k + 1
      const float2 p = decode_p_pair(praw[h][j], args.bits, args.frac_bits, args.p_unit);
      const LrqatCode c0 = lrqat_code(p.x, acc[2 * h], args.lora_scale, args.qmax);
      const LrqatCode c1 = lrqat_code(p.y, acc[2 * h + 1], args.lora_scale, args.qmax);
      const float sc = s[h][gi], zc = z[h][gi];
      const int64_t off = rows[h] * args.K + k;
      if constexpr (!BACKWARD) {
        st32(out + off, Native<T>::pack2((c0.q - zc) * sc, (c1.q - zc) * sc));
      } else {
        const float2 g = Native<T>::unpack2(graw[h][j]);
        const float cs = args.lora_scale * sc;
        st32(out + off, Native<T>::pack2(c0.in_range ? g.x * cs : 0.f, c1.in_range ? g.y * cs : 0.f));
        ds[h][gi] += g.x * (c0.q - zc) + g.y * (c1.q - zc);
      }
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
