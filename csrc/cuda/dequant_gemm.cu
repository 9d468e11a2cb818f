// Group-wise dequant GEMM on the tensor cores (small M: decode and short prompts).
//
//   forward    y[M, N]  = x[M, K]  @ deq(W)^T   (reduction over K)
//   grad input gx[M, K] = gy[M, N] @ deq(W)     (reduction over N)
//
// W stays in qatext's packed layout (b-bit little-endian stream along K, fp32 scale/zero per
// group). A block owns 128 output columns and a slice of the reduction (split-K, so that a few
// dozen column tiles still fill every SM at M = 1). Each 128 x 128 tile of W moves as packed bytes
// by cp.async through a multi-stage shared-memory ring. Forward: each thread decodes its own
// mma.sync m16n8k16 B fragments from the packed tile straight into registers (q * s - z * s in
// fp32, one FMA, rounded once to 16 bits); no decoded tile, so 3 blocks fit an SM at M <= 16.
// Grad input: the tile is decoded once into a 16-bit shared tile read with ldmatrix.trans.
// Partial sums of split-K go to an fp32 workspace reduced in a fixed order (deterministic), which
// also adds the bias.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "core/quant_math.h"
#include "cuda/common.cuh"
#include "cuda/mma.cuh"
#include "cuda/ptx.cuh"
#include "cuda/kernels.h"

namespace qatext::cuda {
namespace {

constexpr int kTile = 128;             // output columns per block, and reduction per stage
constexpr int kStages = 4;             // cp.async ring depth
constexpr int kGemmThreads = 256;      // 8 warps, 16 output columns each
constexpr int kPackedStride = 80;      // bytes per packed tile row in smem (<= 64 used; 80 avoids bank conflicts)
constexpr int kHalfStride = kTile + 8;  // 16-bit elements per decoded / activation smem row (conflict-free ldmatrix)

struct GemmArgs {
  const void* a;        // x [M, K] (forward) or grad_y [M, N] (grad input)
  const uint8_t* packed;  // [N, K * bits / 8]
  const float* scale;   // [N, G]
  const float* zero;    // [N, G]
  const void* bias;     // [N] or nullptr (forward only)
  void* out;            // [M, P] when splits == 1
  float* partial;       // [splits, M, P] when splits > 1
  int M, N, K, G;
  int group_shift;      // log2(group_size); 31 for per-channel (k >> 31 == 0)
  int iters_per_split;  // 128-wide reduction stages per block
};

template <int MT, bool TRANS>
struct SmemLayout {
  static constexpr int kPackedBytes = kTile * kPackedStride;
  static constexpr int kActBytes = MT * 16 * kHalfStride * 2;
  static constexpr int kDecodedBytes = TRANS ? kTile * kHalfStride * 2 : 0;  // forward decodes into registers
  static constexpr int kTotal = kStages * (kPackedBytes + kActBytes) + kDecodedBytes;
};

// This warp's accumulators into the output (one split: plus the bias) or into its split's fp32 partial
// sums. Accumulator (m16 x n8): c0, c1 at row lane/4, columns 2*(lane%4) + {0, 1}; c2, c3 eight rows
// down.
template <typename T, int MT>
__device__ __forceinline__ void store_outputs(const GemmArgs& args, const float (&acc)[MT][2][4], int P, int p0, int pw,
                                              int m0, int lane) {
  const int gr = lane / 4, gc = 2 * (lane % 4);
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int p = p0 + pw + 8 * j + gc;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = m0 + mt * 16 + gr + 8 * h;
        if (m >= args.M) continue;
        const float v0 = acc[mt][j][2 * h], v1 = acc[mt][j][2 * h + 1];
        if (args.partial != nullptr) {
          float* dst = args.partial + (int64_t(blockIdx.y) * args.M + m) * P + p;
          *reinterpret_cast<float2*>(dst) = make_float2(v0, v1);
        } else {
          float b0 = 0.f, b1 = 0.f;
          if (args.bias != nullptr) {
            b0 = float(static_cast<const T*>(args.bias)[p]);
            b1 = float(static_cast<const T*>(args.bias)[p + 1]);
          }
          *reinterpret_cast<uint32_t*>(static_cast<T*>(args.out) + int64_t(m) * P + p) =
              Native<T>::pack2(v0 + b0, v1 + b1);
        }
      }
    }
  }
}

// Blocks per SM the forward kernel is register-budgeted for (its shared memory allows 3 at MT = 1).
template <int MT, bool TRANS>
constexpr int kMinBlocks = TRANS ? 1 : (MT == 1 ? 3 : MT == 2 ? 2 : 1);

template <typename T, int BITS, int MT, bool TRANS>
__global__ void __launch_bounds__(kGemmThreads, (kMinBlocks<MT, TRANS>)) dequant_gemm_kernel(GemmArgs args) {
  using L = SmemLayout<MT, TRANS>;
  extern __shared__ __align__(16) uint8_t smem[];
  uint8_t* packed_s = smem;                                               // [stage][128][kPackedStride]
  uint16_t* act_s = reinterpret_cast<uint16_t*>(smem + kStages * L::kPackedBytes);  // [stage][16MT][kHalfStride]
  uint16_t* dec_s = reinterpret_cast<uint16_t*>(smem + kStages * (L::kPackedBytes + L::kActBytes));  // [128][kHalfStride]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int P = TRANS ? args.K : args.N, R = TRANS ? args.N : args.K;
  const int p0 = blockIdx.x * kTile;
  const int m0 = blockIdx.z * MT * 16;
  const int iter0 = blockIdx.y * args.iters_per_split;
  const int iters = min(args.iters_per_split, R / kTile - iter0);
  const int64_t row_bytes = int64_t(args.K) * BITS / 8;
  constexpr int kChunks = BITS;  // 16-byte chunks per packed tile row (128 codes * BITS / 8 / 16)
  const T* a = static_cast<const T*>(args.a);

  // Issue the cp.async copies of reduction stage `it` into ring slot `slot`.
  auto load_stage = [&](int slot, int it) {
    const int r0 = (iter0 + it) * kTile;
    uint8_t* pdst = packed_s + slot * L::kPackedBytes;
    constexpr int kCopies = (kTile * kChunks + kGemmThreads - 1) / kGemmThreads;  // unrolled: no loop control
#pragma unroll
    for (int copy = 0; copy < kCopies; ++copy) {
      const int i = tid + copy * kGemmThreads;
      if (kTile * kChunks % kGemmThreads != 0 && i >= kTile * kChunks) break;
      const int row = i / kChunks, c = i % kChunks;
      // Tile rows are W rows: output columns (forward) or reduction rows (grad input).
      const int64_t wrow = TRANS ? r0 + row : p0 + row;
      const int64_t col_byte = int64_t(TRANS ? p0 : r0) * BITS / 8 + c * 16;
      cp_async16_zfill(pdst + row * kPackedStride + c * 16, args.packed + wrow * row_bytes + col_byte, 16);
    }
    uint16_t* adst = act_s + slot * (L::kActBytes / 2);
#pragma unroll
    for (int copy = 0; copy < MT; ++copy) {  // MT * 256 16-byte chunks: MT per thread
      const int i = tid + copy * kGemmThreads;
      const int row = i / 16, c = i % 16, m = m0 + row;
      const bool valid = m < args.M;
      const T* src = a + int64_t(valid ? m : 0) * R + r0 + c * 8;
      cp_async16_zfill(adst + row * kHalfStride + c * 8, src, valid ? 16 : 0);
    }
  };

  // This thread decodes one W-tile row (tid % 128), 64 codes (half tid / 128), in 8 chunks of 8 codes;
  // a chunk never straddles a group. Its scales and zeros are loaded before the stage wait, so their
  // latency hides behind it: s[j] and -z[j] * s[j] per chunk. The lanes of a warp are 32 different
  // rows (uncoalesced), so each group is loaded once, not per chunk: the test is the same for the
  // whole warp (dhalf is), and without it L1 wavefronts, not DRAM, bound the kernel.
  const int drow = tid % kTile, dhalf = tid / kTile;
  auto load_qparams = [&](int it, float (&s)[8], float (&nzs)[8]) {
    const int r0 = (iter0 + it) * kTile;
    const int64_t wrow = TRANS ? r0 + drow : p0 + drow;
    const int col0 = (TRANS ? p0 : r0) + dhalf * 64;
    float sg = 0.f, zg = 0.f;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int group = (col0 + 8 * j) >> args.group_shift;
      if (j == 0 || group != ((col0 + 8 * j - 8) >> args.group_shift)) {
        sg = __ldg(args.scale + wrow * args.G + group);
        zg = __ldg(args.zero + wrow * args.G + group);
      }
      s[j] = sg;
      nzs[j] = -zg * sg;
    }
  };

  // Decode ring slot `slot` into dec_s: value = q * s - z * s in fp32 (one FMA), rounded once.
  auto decode_stage = [&](int slot, const float (&s)[8], const float (&nzs)[8]) {
    const uint8_t* src = packed_s + slot * L::kPackedBytes + drow * kPackedStride + dhalf * 8 * BITS;
    uint32_t words[2 * BITS + 1];
#pragma unroll
    for (int i = 0; i < BITS; ++i) {
      const uint2 v = *reinterpret_cast<const uint2*>(src + 8 * i);
      words[2 * i] = v.x;
      words[2 * i + 1] = v.y;
    }
    words[2 * BITS] = 0;
    uint16_t* dst = dec_s + drow * kHalfStride + dhalf * 64;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      uint32_t out[4];
#pragma unroll
      for (int e = 0; e < 8; e += 2) {
        float v[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int bit = (8 * j + e + h) * BITS, w = bit >> 5, off = bit & 31;
          uint32_t q = words[w] >> off;
          if (off + BITS > 32) q |= words[w + 1] << (32 - off);
          v[h] = fmaf(code_to_float(q & ((1u << BITS) - 1u)), s[j], nzs[j]);
        }
        out[e / 2] = Native<T>::pack2(v[0], v[1]);
      }
      *reinterpret_cast<uint4*>(dst + 8 * j) = make_uint4(out[0], out[1], out[2], out[3]);
    }
  };

  float acc[MT][2][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][j][e] = 0.f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < iters) load_stage(s, s);
    cp_async_commit();
  }

  const int pw = warp * 16;  // this warp's output columns within the tile
  // Forward: each thread decodes its own mma B fragments straight from the packed tile: W rows
  // p0 + pw + 8j + lane/4 (j = 0, 1), codes 2t, 2t+1 and 2t+8, 2t+9 (t = lane % 4) of every
  // 16-deep k-step; a k-step never straddles a group (group_size >= 16).
  const int fg = lane / 4, ft = lane % 4;
  // __byte_perm selector: byte 2 <- byte t of the word, the other bytes <- 0.
  const uint32_t byte_t_to_2 = 0x4044u | uint32_t(ft) << 8;
  const float* srow[2] = {args.scale + int64_t(p0 + pw + fg) * args.G, args.scale + int64_t(p0 + pw + 8 + fg) * args.G};
  const float* zrow[2] = {args.zero + int64_t(p0 + pw + fg) * args.G, args.zero + int64_t(p0 + pw + 8 + fg) * args.G};
  // group_size >= 128: one group per stage, whose scale and zero are loaded a stage ahead (their
  // latency hides behind a whole stage); smaller groups load per k-step (L1 hits after the first).
  const bool one_group_per_stage = args.group_shift >= 7;  // the same for the whole block
  auto load_stage_group = [&](int it, float (&s)[2], float (&nz)[2]) {
    const int group = ((iter0 + it) * kTile) >> args.group_shift;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      s[j] = __ldg(srow[j] + group);
      nz[j] = __ldg(zrow[j] + group);
    }
  };
  auto load_fragment_qparams = [&](int it, float (&s)[2][8], float (&nzs)[2][8]) {
    const int r0 = (iter0 + it) * kTile;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int ks = 0; ks < 8; ++ks) {
        const int group = (r0 + 16 * ks) >> args.group_shift;
        s[j][ks] = __ldg(srow[j] + group);
        nzs[j][ks] = -__ldg(zrow[j] + group) * s[j][ks];
      }
    }
  };
  // {b0, b1} of fragment j at k-step ks: four codes from one or two 32-bit words of the packed row.
  auto fragment = [&](const uint8_t* packed_slot, int j, int ks, float s, float nzs, uint32_t& b0, uint32_t& b1) {
    const uint32_t* row = reinterpret_cast<const uint32_t*>(packed_slot + (pw + 8 * j + fg) * kPackedStride);
    const int first_bit = 16 * ks * BITS, word = first_bit >> 5;
    constexpr uint32_t mask = (1u << BITS) - 1u;
    const auto value = [&](uint32_t bits) { return fmaf(code_to_float(bits & mask), s, nzs); };
    if constexpr (BITS == 4) {
      // Byte t of each word holds codes (2t, 2t+1) resp. (2t+8, 2t+9). A byte permute moves it to
      // bits 16-23; masked into the mantissa of 128.0f each nibble gives exactly 128 + q, and one FMA
      // with s and c = -(128 + z) * s gives (q - z) * s (the 128 costs ~2^-17 s of fp32 rounding).
      const uint2 w = *reinterpret_cast<const uint2*>(row + word);
      const float c = fmaf(-128.f, s, nzs);
      const auto value_at_16 = [&](uint32_t bits) { return fmaf(__int_as_float((bits & 0x000F0000u) | 0x43000000u), s, c); };
      const uint32_t lo = __byte_perm(w.x, 0, byte_t_to_2), hi = __byte_perm(w.y, 0, byte_t_to_2);
      b0 = Native<T>::pack2(value_at_16(lo), value_at_16(lo >> 4));
      b1 = Native<T>::pack2(value_at_16(hi), value_at_16(hi >> 4));
      return;
    }
    uint32_t q[4];  // codes 2t, 2t + 1, 2t + 8, 2t + 9 of the k-step, shifted down to bit 0 (masked by value)
    if constexpr (BITS == 3) {  // codes may straddle words: a 64-bit window
      const uint64_t window = row[word] | uint64_t(row[word + 1]) << 32;
      const int base = (first_bit & 31) + 2 * ft * BITS;
      q[0] = uint32_t(window >> base);
      q[1] = uint32_t(window >> (base + BITS));
      q[2] = uint32_t(window >> (base + 8 * BITS));
      q[3] = uint32_t(window >> (base + 9 * BITS));
    } else {  // 2 bits: codes 2t, 2t+1 and 2t+8, 2t+9 sit in one word (32-bit shifts)
      const uint32_t lo = row[word], hi = lo >> 16;
      const int base = 2 * ft * BITS;
      q[0] = lo >> base;
      q[1] = lo >> (base + BITS);
      q[2] = hi >> base;
      q[3] = hi >> (base + BITS);
    }
    b0 = Native<T>::pack2(value(q[0]), value(q[1]));
    b1 = Native<T>::pack2(value(q[2]), value(q[3]));
  };

  float next_s[2] = {0.f, 0.f}, next_z[2] = {0.f, 0.f};  // forward, one group per stage: stage it + 1's
  if (!TRANS && one_group_per_stage && iters > 0) load_stage_group(0, next_s, next_z);
  for (int it = 0; it < iters; ++it) {
    const int slot = it % kStages;
    float s[8], nzs[8];           // grad input: the shared-tile decode's scales
    float fs[2][8], fnzs[2][8];  // forward: the fragments' scales
    if constexpr (TRANS) {
      load_qparams(it, s, nzs);
    } else if (one_group_per_stage) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const float sj = next_s[j], nzj = -next_z[j] * next_s[j];
#pragma unroll
        for (int ks = 0; ks < 8; ++ks) {
          fs[j][ks] = sj;
          fnzs[j][ks] = nzj;
        }
      }
      if (it + 1 < iters) load_stage_group(it + 1, next_s, next_z);
    } else {
      load_fragment_qparams(it, fs, fnzs);
    }
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage `it` landed for all threads; everyone is done with stage it - 1
    if (it + kStages - 1 < iters) load_stage((it + kStages - 1) % kStages, it + kStages - 1);
    cp_async_commit();
    if constexpr (TRANS) {
      decode_stage(slot, s, nzs);
      __syncthreads();
    }
    const uint16_t* act = act_s + slot * (L::kActBytes / 2);
    const uint8_t* packed_slot = packed_s + slot * L::kPackedBytes;
#pragma unroll
    for (int k0 = 0; k0 < kTile; k0 += 16) {
      uint32_t b[4];  // {b0, b1} of output columns pw..pw+7, then of pw+8..pw+15
      if constexpr (TRANS) {
        // dec_s rows are the reduction, columns the output: transpose 8x8 blocks on load.
        const int mi = lane / 8;
        ldmatrix_x4_trans(b, dec_s + (k0 + lane % 8 + (mi % 2) * 8) * kHalfStride + pw + (mi / 2) * 8);
      } else {
        fragment(packed_slot, 0, k0 / 16, fs[0][k0 / 16], fnzs[0][k0 / 16], b[0], b[1]);
        fragment(packed_slot, 1, k0 / 16, fs[1][k0 / 16], fnzs[1][k0 / 16], b[2], b[3]);
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        uint32_t af[4];
        ldmatrix_x4(af, act + (mt * 16 + lane % 16) * kHalfStride + k0 + (lane / 16) * 8);
        mma16816<T>(acc[mt][0], af, b[0], b[1]);
        mma16816<T>(acc[mt][1], af, b[2], b[3]);
      }
    }
  }
  cp_async_wait<0>();

  store_outputs<T, MT>(args, acc, P, p0, pw, m0, lane);
}

// out[m, p] = sum over splits, in split order, + bias[p].
template <typename T>
__global__ void split_reduce_kernel(const float* __restrict__ partial, const T* __restrict__ bias, T* __restrict__ out,
                                    int64_t MP, int P, int splits) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < MP; i += int64_t(gridDim.x) * blockDim.x) {
    float v = bias != nullptr ? float(bias[i % P]) : 0.f;
    for (int s = 0; s < splits; ++s) v += partial[s * MP + i];
    out[i] = T(v);
  }
}

template <typename T, int BITS, int MT, bool TRANS>
void launch(const GemmArgs& args, dim3 grid, cudaStream_t stream) {
  constexpr int smem = SmemLayout<MT, TRANS>::kTotal;
  auto kernel = dequant_gemm_kernel<T, BITS, MT, TRANS>;
  static std::atomic<int> prepared[kMaxDevices];
  opt_in_smem(prepared, kernel, smem, "dequant_gemm");
  kernel<<<grid, kGemmThreads, smem, stream>>>(args);
}

// The kernel instance of (bits, token tiles mt, direction).
template <typename T, bool TRANS>
void launch_instance(int bits, int mt, const GemmArgs& args, dim3 grid, cudaStream_t stream) {
  with_bits(bits, [&]<int BITS>() {
    if (mt == 1) return launch<T, BITS, 1, TRANS>(args, grid, stream);
    if (mt == 2) return launch<T, BITS, 2, TRANS>(args, grid, stream);
    return launch<T, BITS, 4, TRANS>(args, grid, stream);
  });
}

}  // namespace

bool dequant_gemm_supported(int64_t M, GroupShape shape) {
  const bool pow2_group = (shape.group_size & (shape.group_size - 1)) == 0 && shape.group_size >= 16;
  return (shape.bits == 2 || shape.bits == 3 || shape.bits == 4) && M >= 1 && shape.N % kTile == 0 &&
         shape.K % kTile == 0 && shape.N * shape.K < (int64_t(1) << 31) && M * (shape.N + shape.K) < (int64_t(1) << 31) &&
         (pow2_group || shape.group_size == shape.K);
}

int64_t dequant_gemm_splits(int64_t M, GroupShape shape, bool grad_input) {
  const int64_t mt = M <= 16 ? 1 : M <= 32 ? 2 : 4;
  const int64_t P = grad_input ? shape.K : shape.N, R = grad_input ? shape.N : shape.K;
  const int64_t blocks = (P / kTile) * ((M + 16 * mt - 1) / (16 * mt));
  const int64_t iters = R / kTile;
  const int64_t want = std::max<int64_t>(1, (2 * sm_count() + blocks - 1) / blocks);
  const int64_t per_split = (iters + std::min(want, iters) - 1) / std::min(want, iters);
  return (iters + per_split - 1) / per_split;
}

template <typename T>
void dequant_gemm(const T* a, const uint8_t* packed, const float* scale, const float* zero, const T* bias, T* out,
                  float* partial, int64_t M, GroupShape shape, bool grad_input, int64_t splits, cudaStream_t stream) {
  const int mt = M <= 16 ? 1 : M <= 32 ? 2 : 4;
  const int64_t P = grad_input ? shape.K : shape.N, R = grad_input ? shape.N : shape.K;
  const int64_t iters = R / kTile;
  GemmArgs args{};
  args.a = a;
  args.packed = packed;
  args.scale = scale;
  args.zero = zero;
  args.bias = splits > 1 ? nullptr : bias;
  args.out = out;
  args.partial = splits > 1 ? partial : nullptr;
  args.M = int(M);
  args.N = int(shape.N);
  args.K = int(shape.K);
  args.G = int(shape.groups());
  args.group_shift = shape.group_size == shape.K && (shape.K & (shape.K - 1)) != 0 ? 31 : __builtin_ctzll(shape.group_size);
  args.iters_per_split = int((iters + splits - 1) / splits);
  const dim3 grid(unsigned(P / kTile), unsigned(splits), unsigned((M + 16 * mt - 1) / (16 * mt)));
  if (grad_input) {
    launch_instance<T, true>(shape.bits, mt, args, grid, stream);
  } else {
    launch_instance<T, false>(shape.bits, mt, args, grid, stream);
  }
  check_launch("dequant_gemm");
  if (splits > 1) {
    split_reduce_kernel<T><<<grid_for(M * P), kThreads, 0, stream>>>(partial, bias, out, M * P, int(P), int(splits));
    check_launch("dequant_gemm split reduce");
  }
}

template void dequant_gemm<c10::BFloat16>(const c10::BFloat16*, const uint8_t*, const float*, const float*,
                                          const c10::BFloat16*, c10::BFloat16*, float*, int64_t, GroupShape, bool,
                                          int64_t, cudaStream_t);
template void dequant_gemm<c10::Half>(const c10::Half*, const uint8_t*, const float*, const float*, const c10::Half*,
                                      c10::Half*, float*, int64_t, GroupShape, bool, int64_t, cudaStream_t);

}  // namespace qatext::cuda
