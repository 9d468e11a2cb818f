// LR-QAT weight reconstruction with the low-rank product on the tensor cores.
//
//   forward   W[n, k]  = s * (clamp(round(P[n, k] + c * (A B)[n, k]), 0, 2^b - 1) - z)
//   backward  dU[n, k] = c * s * dW[n, k] * in_range[n, k],   ds[n, g] = sum_k dW[n, k] (q[n, k] - z)
//
// A B is never stored: each warp forms a 16 x 128 tile of it with mma.sync m16n8k16 (A fragments in
// registers, B^T from the block's shared copy of its column tile) and applies the quantizer to the
// fp32 accumulators in place, 16-byte loads and stores throughout. Traffic is the floor: read P (b/8
// B/elem) and write W (2 B/elem) forward; read P and dW, write dU backward (and W again, where the
// caller needs it for dX: one pass instead of a second reconstruction).
// A block's 8 warps take 8 row tiles of one column tile at a time (a work item) and run through a
// contiguous run of items: the grid is one wave, each warp loads the next item's P and A (and, backward,
// its dW, by cp.async into the warp's own shared slots) before it computes the current one, so the
// loads stream while the tensor cores and the stores work. B^T is staged from B [rank, K] once per
// column tile (no transposed or padded copy of B on the host); ranks below R read as zeros.
// ds is summed per tile row in a fixed order (thread, then quad shuffle): one partial per (row, group
// in the tile), no atomics.
// Stacked experts (a mixture's experts, one launch for all): the rows of E experts' weights one after
// another, each expert's B its own ([E, rank, K]); items run expert by expert, so a block restages B^T
// where its run crosses into the next expert as it does where it crosses a column tile.
#include <type_traits>

#include "core/quant_math.h"
#include "cuda/common.cuh"
#include "cuda/kernels.h"
#include "cuda/mma.cuh"
#include "cuda/ptx.cuh"

namespace qatext::cuda {
namespace {

constexpr int kTileRows = 16, kTileCols = 128, kWarps = 8, kSlices = kTileCols / 32;

template <typename T>
struct LrqatTileArgs {
  const uint8_t* p;       // [N, p_row_bytes]
  const T* a;             // [N, R]: the rank zero-padded to R
  const T* b;             // [experts, rank, K]
  const float* scale;     // [N, G]
  const float* zero;      // [N, G]
  const T* grad_w;        // [N, K], backward only
  T* out;                 // W (forward) or dU (backward, may be grad_w itself), [N, K]
  T* weight;              // backward only, may be null: W as the forward writes it (for dX = dY W)
  float* grad_scale_tiles;  // [N, K / 128 * groups per tile], backward only
  float lora_scale, qmax, p_unit;  // p_unit = 2^-frac_bits
  int64_t p_row_bytes;
  int N, K, G, group_size, rank;
  int row_groups, items, items_per_block;  // work items: (expert, column tile, group of 8 row tiles), the last fastest
  int expert_row_tiles;                    // row tiles an expert (N / 16 / experts)
};

// Per warp, one tile's inputs in shared memory (filled by cp.async while the warp computes the tile
// before): P [16 rows][p_stride] (a row's 128 columns, padded by 16 bytes so the 16 lanes' reads fall
// in distinct banks), A [16 rows][R] and, backward, dW as [2 * m + h][lane] 16-byte slots (each lane
// copies and reads its own, lane-contiguous per slot).
constexpr int kPStride = kTileCols + 16;  // the widest P row (8-bit codes, fixed point) plus padding

template <int RK, bool BACKWARD>
constexpr int warp_smem_bytes() {
  return kTileRows * kPStride + kTileRows * 16 * RK * 2 + (BACKWARD ? 2 * kSlices * 32 * 16 : 0);
}

// Bytes of one P row in a 128-column tile (PB: bits per P value).
template <int PB>
constexpr int p_tile_bytes() {
  return kTileCols * PB / 8;
}

// The 8 P values at tile columns c .. c + 7 (c a multiple of 8) of one shared row, as raw bits. PB = 8
// (8-bit codes and fixed point): 8 bytes, value i in byte i; else 8 codes of PB bits in the low word.
template <int PB>
__device__ __forceinline__ uint2 read_p8(const uint8_t* row, int c) {
  const uint8_t* at = row + (c * PB >> 3);
  if constexpr (PB == 8) return *reinterpret_cast<const uint2*>(at);
  if constexpr (PB == 4) return make_uint2(*reinterpret_cast<const unsigned int*>(at), 0u);
  if constexpr (PB == 2) return make_uint2(*reinterpret_cast<const unsigned short*>(at), 0u);
  return make_uint2(uint32_t(at[0]) | uint32_t(at[1]) << 8 | uint32_t(at[2]) << 16, 0u);  // 3 bits
}

// read_p8's raw bits spread one value a byte where the width allows (two masks for 8 values, so that
// p_value takes each with one byte permute): PB = 8 as read (value i: word i / 4, byte i % 4); PB = 4
// even values in x, odd in y (byte i / 2); PB = 2 x holds values 0, 4, 2, 6 and y 1, 5, 3, 7. PB = 3 is
// left packed (its codes straddle bytes).
template <int PB>
__device__ __forceinline__ uint2 p_bytes(uint2 raw) {
  if constexpr (PB == 4) return make_uint2(raw.x & 0x0F0F0F0Fu, raw.x >> 4 & 0x0F0F0F0Fu);
  if constexpr (PB == 2) {
    const uint32_t y = raw.x | raw.x << 12;  // raw is 16 bits: its upper byte's codes land in bytes 1 and 3
    return make_uint2(y & 0x03030303u, y >> 2 & 0x03030303u);
  }
  return raw;
}

// Value i (0..7, unrolled) of p_bytes's words, exactly, without the conversion unit: the byte goes into
// the mantissa of 2^23 by one permute (code_to_float's trick), then 2^23 comes off.
template <int PB>
__device__ __forceinline__ float p_value(uint2 bytes, int i, float unit) {
  if constexpr (PB == 3) return code_to_float((bytes.x >> (3 * i)) & 7u);
  const int m = i >> 1;
  const uint32_t word = PB == 8 ? (i < 4 ? bytes.x : bytes.y) : (i & 1 ? bytes.y : bytes.x);
  const int byte = PB == 8 ? i & 3 : PB == 4 ? m : (m & 1) << 1 | m >> 1;
  const float v = __int_as_float(__byte_perm(word, 0x4B000000u, 0x7540u | byte)) - 8388608.f;
  return PB == 8 ? v * unit : v;  // PB = 8 with frac_bits: fixed point, unit 2^-f
}

// One tile's P, A (and dW) into the warp's shared buffer, by cp.async, as one commit group.
template <typename T, int RK, int PB, bool BACKWARD>
__device__ __forceinline__ void copy_tile_inputs(const LrqatTileArgs<T>& args, int64_t row_tile, int k0, int lane,
                                                 unsigned char* buf) {
  constexpr int R = 16 * RK, row_bytes = p_tile_bytes<PB>(), chunks_per_row = row_bytes / 16;
  const int64_t row0 = row_tile * kTileRows;
  const uint8_t* p = args.p + row0 * args.p_row_bytes + int64_t(k0) * row_bytes / kTileCols;
#pragma unroll
  for (int c = lane; c < kTileRows * chunks_per_row; c += 32) {
    const int r = c / chunks_per_row, j = c % chunks_per_row;
    cp_async_once<16>(buf + r * kPStride + 16 * j, p + r * args.p_row_bytes + 16 * j);
  }
  unsigned char* a_buf = buf + kTileRows * kPStride;
  const T* a = args.a + row0 * R;
#pragma unroll
  for (int c = lane; c < kTileRows * R / 8; c += 32) cp_async_once<16>(a_buf + 16 * c, a + 8 * c);
  if constexpr (BACKWARD) {
    uint4* slots = reinterpret_cast<uint4*>(a_buf + kTileRows * R * 2);
    const int g4 = lane >> 2, q4 = lane & 3;
#pragma unroll
    for (int m = 0; m < kSlices; ++m) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t row = row0 + g4 + 8 * h;
        cp_async_once<16>(slots + (2 * m + h) * 32 + lane, args.grad_w + row * args.K + k0 + 32 * m + 8 * q4);
      }
    }
  }
  cp_async_commit();
}

// What a lane takes from the tile's shared inputs: P for its two rows, the A fragments (lane q4 holds
// rank values [4 RK q4, 4 RK (q4 + 1)) of its two rows) and, backward, its dW.
template <int RK, bool BACKWARD>
struct TileInputs {
  uint2 praw[2][kSlices];
  uint32_t af[RK][4];
  uint4 graw[2][BACKWARD ? kSlices : 1];
};

// Each warp owns a 16 x 128 tile; the mma columns are mapped to K so that every thread ends up with
// 8 contiguous columns per 32-column slice m (16-byte loads and stores, a quad covers 64 bytes):
// tile j = 4m + t, mma column c  ->  k = k0 + 32m + 8(c / 2) + 2t + c % 2.
// The rank is permuted the same way in A and B (the sum over r does not care), so that each lane
// reads its fragments as one contiguous run of 4*RK values: r = 4*RK*q4 + 4ks + 2half + e.
template <typename T, int RK, int PB, bool BACKWARD>
__device__ __forceinline__ void read_tile_inputs(const LrqatTileArgs<T>& args, const unsigned char* buf, int lane,
                                                 TileInputs<RK, BACKWARD>& in) {
  constexpr int R = 16 * RK;
  const int g4 = lane >> 2, q4 = lane & 3;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
#pragma unroll
    for (int m = 0; m < kSlices; ++m) {
      in.praw[h][m] = read_p8<PB>(buf + (g4 + 8 * h) * kPStride, 32 * m + 8 * q4);
    }
  }
  const T* a = reinterpret_cast<const T*>(buf + kTileRows * kPStride);
  uint32_t lo[2 * RK], hi[2 * RK];
#pragma unroll
  for (int v = 0; v < RK / 2 + (RK == 1); ++v) {
    const int col = 4 * RK * q4 + 8 * v;
    if constexpr (RK == 1) {
      const uint2 x = *reinterpret_cast<const uint2*>(a + g4 * R + col);
      const uint2 y = *reinterpret_cast<const uint2*>(a + (g4 + 8) * R + col);
      lo[0] = x.x, lo[1] = x.y, hi[0] = y.x, hi[1] = y.y;
    } else {
      const uint4 x = *reinterpret_cast<const uint4*>(a + g4 * R + col);
      const uint4 y = *reinterpret_cast<const uint4*>(a + (g4 + 8) * R + col);
      lo[4 * v] = x.x, lo[4 * v + 1] = x.y, lo[4 * v + 2] = x.z, lo[4 * v + 3] = x.w;
      hi[4 * v] = y.x, hi[4 * v + 1] = y.y, hi[4 * v + 2] = y.z, hi[4 * v + 3] = y.w;
    }
  }
#pragma unroll
  for (int ks = 0; ks < RK; ++ks) {
    in.af[ks][0] = lo[2 * ks], in.af[ks][1] = hi[2 * ks], in.af[ks][2] = lo[2 * ks + 1], in.af[ks][3] = hi[2 * ks + 1];
  }
  if constexpr (BACKWARD) {
    const uint4* slots = reinterpret_cast<const uint4*>(buf + kTileRows * kPStride + kTileRows * R * 2);
#pragma unroll
    for (int m = 0; m < kSlices; ++m) {
#pragma unroll
      for (int h = 0; h < 2; ++h) in.graw[h][m] = slots[(2 * m + h) * 32 + lane];
    }
  }
}

// B^T of the column tile at k0 into shared memory, [kTileCols][R], from B [rank, K]; rows r >= rank
// are zeros. Consecutive threads take consecutive r, so the 2-byte shared stores do not conflict.
template <typename T, int RK>
__device__ __forceinline__ void stage_bt(const LrqatTileArgs<T>& args, int expert, int k0, T* bt) {
  constexpr int R = 16 * RK;
  const T* b = args.b + int64_t(expert) * args.rank * args.K;
  for (int i = threadIdx.x; i < R * (kTileCols / 8); i += kWarps * 32) {
    const int r = i % R, c = i / R * 8;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (r < args.rank) v = __ldg(reinterpret_cast<const uint4*>(b + int64_t(r) * args.K + k0 + c));
    const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
    for (int j = 0; j < 8; ++j) bt[(c + j) * R + r] = e[j];
  }
}

// GPT: quantization groups per 128-column tile (4 for g = 32, 2 for g = 64, 1 for g >= 128). PB: bits per
// P value (8: 8-bit codes or fixed point; 2, 3, 4: packed codes).
template <typename T, int RK, int GPT, int PB, bool BACKWARD>
__global__ void __launch_bounds__(kWarps * 32) lrqat_tile_kernel(LrqatTileArgs<T> args) {
  constexpr int R = 16 * RK, kSlicesPerGroup = kSlices / GPT;
  extern __shared__ __align__(16) unsigned char smem[];
  T* bt = reinterpret_cast<T*>(smem);  // [kTileCols][R]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g4 = lane >> 2, q4 = lane & 3;
  unsigned char* buf = smem + kTileCols * R * sizeof(T) + warp * warp_smem_bytes<RK, BACKWARD>();
  const int col_tiles = args.K / kTileCols, expert_tiles = args.expert_row_tiles;
  const int first = int(blockIdx.x) * args.items_per_block;
  const int last = min(first + args.items_per_block, args.items);

  // Item i: expert e = i / (col_tiles * row_groups), then column tile j and group gr of the rest, this warp's
  // row tile the expert's gr * kWarps + warp (none past the expert's last: such a warp only keeps the block's
  // barriers), at e * expert_tiles overall. Walked without divisions.
  int group = first % args.row_groups, k0 = first / args.row_groups % col_tiles * kTileCols;
  int expert = first / args.row_groups / col_tiles;
  int in_expert = group * kWarps + warp;  // the row tile within the expert
  if (in_expert < expert_tiles) {
    copy_tile_inputs<T, RK, PB, BACKWARD>(args, int64_t(expert) * expert_tiles + in_expert, k0, lane, buf);
  }
  int staged_k0 = -1, staged_expert = -1;
  for (int item = first; item < last; ++item) {
    if (k0 != staged_k0 || expert != staged_expert) {  // block-uniform: every warp runs the same items
      __syncthreads();  // the previous column tile's B^T may still be read
      stage_bt<T, RK>(args, expert, k0, bt);
      __syncthreads();
      staged_k0 = k0, staged_expert = expert;
    }
    const bool active = in_expert < expert_tiles;
    const int64_t row_tile = int64_t(expert) * expert_tiles + in_expert;
    TileInputs<RK, BACKWARD> in;
    if (active) {
      cp_async_wait<0>();
      __syncwarp();  // every lane's copies landed
      read_tile_inputs<T, RK, PB, BACKWARD>(args, buf, lane, in);
      __syncwarp();  // every lane read the buffer before the next tile's copies overwrite it
    }
    // The next item's inputs stream in while this one computes.
    const bool wraps = group + 1 == args.row_groups, next_expert_starts = wraps && k0 + kTileCols == args.K;
    const int next_group = wraps ? 0 : group + 1;
    const int next_k0 = next_expert_starts ? 0 : wraps ? k0 + kTileCols : k0;
    const int next_expert = expert + next_expert_starts;
    const int next_in_expert = item + 1 < last ? next_group * kWarps + warp : expert_tiles;
    if (next_in_expert < expert_tiles) {
      copy_tile_inputs<T, RK, PB, BACKWARD>(args, int64_t(next_expert) * expert_tiles + next_in_expert, next_k0, lane,
                                            buf);
    }
    if (active) {
      const int64_t rows[2] = {row_tile * kTileRows + g4, row_tile * kTileRows + g4 + 8};
      const int col_tile = k0 / kTileCols;
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
          const int kb = 32 * m + 8 * (g4 >> 1) + 2 * t + (g4 & 1);  // this lane's B column in the tile
          const T* brow = bt + kb * R + 4 * RK * q4;
          uint32_t b[2 * RK];
          if constexpr (RK == 1) {
            const uint2 x = *reinterpret_cast<const uint2*>(brow);
            b[0] = x.x, b[1] = x.y;
          } else {
#pragma unroll
            for (int v = 0; v < RK / 2; ++v) {
              const uint4 x = *reinterpret_cast<const uint4*>(brow + 8 * v);
              b[4 * v] = x.x, b[4 * v + 1] = x.y, b[4 * v + 2] = x.z, b[4 * v + 3] = x.w;
            }
          }
#pragma unroll
          for (int ks = 0; ks < RK; ++ks) mma16816<T>(acc[t], in.af[ks], b[2 * ks], b[2 * ks + 1]);
        }
        const int gi = m / kSlicesPerGroup;
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // accumulators 0, 1: row g4; 2, 3: row g4 + 8
          const float sc = s[h][gi], zc = z[h][gi], cs = args.lora_scale * sc;
          const uint2 pb = p_bytes<PB>(in.praw[h][m]);  // spread here: held spread costs registers
          uint32_t packed[4], weight[4];
          float g[8];
          if constexpr (BACKWARD) {
            const uint32_t gw[4] = {in.graw[h][m].x, in.graw[h][m].y, in.graw[h][m].z, in.graw[h][m].w};
#pragma unroll
            for (int t = 0; t < 4; ++t) {
              const float2 v = Native<T>::unpack2(gw[t]);
              g[2 * t] = v.x, g[2 * t + 1] = v.y;
            }
          }
#pragma unroll
          for (int t = 0; t < 4; ++t) {
            float out[2], w[2];
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const float p = p_value<PB>(pb, 2 * t + e, args.p_unit);
              const LrqatCode c = lrqat_code(p, acc[t][2 * h + e], args.lora_scale, args.qmax);
              w[e] = (c.q - zc) * sc;
              if constexpr (!BACKWARD) {
                out[e] = w[e];
              } else {
                out[e] = c.in_range ? g[2 * t + e] * cs : 0.f;
                ds[h][gi] += g[2 * t + e] * (c.q - zc);
              }
            }
            packed[t] = Native<T>::pack2(out[0], out[1]);
            if constexpr (BACKWARD) weight[t] = Native<T>::pack2(w[0], w[1]);
          }
          const int64_t at = rows[h] * args.K + k0 + 32 * m + 8 * q4;
          *reinterpret_cast<uint4*>(args.out + at) = make_uint4(packed[0], packed[1], packed[2], packed[3]);
          if (BACKWARD && args.weight != nullptr) {
            *reinterpret_cast<uint4*>(args.weight + at) = make_uint4(weight[0], weight[1], weight[2], weight[3]);
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
    in_expert = next_in_expert, group = next_group, k0 = next_k0, expert = next_expert;
  }
}

int groups_per_tile(int64_t group_size) { return group_size >= kTileCols ? 1 : int(kTileCols / group_size); }

template <typename T, int RK, bool BACKWARD>
constexpr int smem_bytes() {
  return kTileCols * 16 * RK * int(sizeof(T)) + kWarps * warp_smem_bytes<RK, BACKWARD>();
}

// pb: bits per P value (8 for fixed point).
template <typename T, bool BACKWARD>
void launch(LrqatTileArgs<T> args, int experts, int rank_padded, int pb, int64_t max_blocks, cudaStream_t stream) {
  args.expert_row_tiles = args.N / kTileRows / experts;
  args.row_groups = (args.expert_row_tiles + kWarps - 1) / kWarps;
  args.items = experts * args.row_groups * (args.K / kTileCols);
  const int gpt = groups_per_tile(args.group_size);
  const auto go = [&]<int RK, int GPT, int PB>() {
    const auto kernel = lrqat_tile_kernel<T, RK, GPT, PB, BACKWARD>;
    constexpr int smem = smem_bytes<T, RK, BACKWARD>();
    static std::atomic<int> smem_memo[kMaxDevices], occupancy_memo[kMaxDevices];
    opt_in_smem(smem_memo, kernel, smem, "lrqat_tile_kernel");
    const int per_sm = resident_blocks(occupancy_memo, kernel, kWarps * 32, smem, "lrqat_tile_kernel");
    // One wave of blocks, each a contiguous run of items (column-major: a run crosses few column tiles).
    const int64_t full = int64_t(per_sm) * sm_count(), wave = max_blocks > 0 ? std::min(max_blocks, full) : full;
    args.items_per_block = int((args.items + wave - 1) / wave);
    const unsigned blocks = unsigned((args.items + args.items_per_block - 1) / args.items_per_block);
    kernel<<<blocks, kWarps * 32, smem, stream>>>(args);
  };
  const auto by_p = [&]<int RK, int GPT>() {
    if (pb == 8) go.template operator()<RK, GPT, 8>();
    else if (pb == 4) go.template operator()<RK, GPT, 4>();
    else if (pb == 3) go.template operator()<RK, GPT, 3>();
    else go.template operator()<RK, GPT, 2>();
  };
  const auto by_gpt = [&]<int RK>() {
    if (gpt == 1) by_p.template operator()<RK, 1>();
    else if (gpt == 2) by_p.template operator()<RK, 2>();
    else by_p.template operator()<RK, 4>();
  };
  if (rank_padded == 16) by_gpt.template operator()<1>();
  else if (rank_padded == 32) by_gpt.template operator()<2>();
  else by_gpt.template operator()<4>();
  check_launch(BACKWARD ? "lrqat_fused_backward" : "lrqat_fused_forward");
}

template <typename T>
LrqatTileArgs<T> make_args(const uint8_t* p, const T* a, const T* b, int rank, const float* scale,
                           const float* zero, float lora_scale, int frac_bits, GroupShape shape) {
  LrqatTileArgs<T> args{};
  args.p = p, args.a = a, args.b = b, args.scale = scale, args.zero = zero;
  args.lora_scale = lora_scale, args.qmax = qmax_for_bits(shape.bits), args.p_unit = 1.f / float(1 << frac_bits);
  args.p_row_bytes = p_row_bytes(shape.K, shape.bits, frac_bits);
  args.N = int(shape.N), args.K = int(shape.K), args.G = int(shape.groups()), args.group_size = int(shape.group_size);
  args.rank = rank;
  return args;
}

}  // namespace

bool lrqat_fused_supported(GroupShape shape, int64_t rank, int64_t experts) {
  const int64_t g = shape.group_size;
  return experts >= 1 && shape.N % (kTileRows * experts) == 0 && shape.K % kTileCols == 0 && shape.N * shape.K < (int64_t(1) << 31) &&
         rank >= 1 && rank <= 64 && (g == 32 || g == 64 || g % kTileCols == 0);
}

int64_t lrqat_fused_tile_groups(GroupShape shape) { return shape.K / kTileCols * groups_per_tile(shape.group_size); }

template <typename T>
void lrqat_fused_forward(const uint8_t* p, const T* a, const T* b, int experts, int rank, int rank_padded,
                         const float* scale, const float* zero, float lora_scale, int frac_bits, T* out,
                         GroupShape shape, int64_t max_blocks, cudaStream_t stream) {
  if (shape.numel() == 0) return;
  LrqatTileArgs<T> args = make_args(p, a, b, rank, scale, zero, lora_scale, frac_bits, shape);
  args.out = out;
  launch<T, false>(args, experts, rank_padded, frac_bits > 0 ? 8 : shape.bits, max_blocks, stream);
}

template <typename T>
void lrqat_fused_backward(const T* grad_w, const uint8_t* p, const T* a, const T* b, int experts, int rank,
                          int rank_padded, const float* scale, const float* zero, float lora_scale, int frac_bits,
                          T* grad_u, float* grad_scale_tiles, T* weight, GroupShape shape, int64_t max_blocks,
                          cudaStream_t stream) {
  if (shape.numel() == 0) return;
  LrqatTileArgs<T> args = make_args(p, a, b, rank, scale, zero, lora_scale, frac_bits, shape);
  args.grad_w = grad_w, args.out = grad_u, args.grad_scale_tiles = grad_scale_tiles, args.weight = weight;
  launch<T, true>(args, experts, rank_padded, frac_bits > 0 ? 8 : shape.bits, max_blocks, stream);
}

#define QATEXT_INSTANTIATE(T)                                                                                      \
  template void lrqat_fused_forward<T>(const uint8_t*, const T*, const T*, int, int, int, const float*,           \
                                       const float*, float, int, T*, GroupShape, int64_t, cudaStream_t);          \
  template void lrqat_fused_backward<T>(const T*, const uint8_t*, const T*, const T*, int, int, int, const float*, \
                                        const float*, float, int, T*, float*, T*, GroupShape, int64_t,            \
                                        cudaStream_t);
QATEXT_INSTANTIATE(c10::Half)
QATEXT_INSTANTIATE(c10::BFloat16)
#undef QATEXT_INSTANTIATE

}  // namespace qatext::cuda
