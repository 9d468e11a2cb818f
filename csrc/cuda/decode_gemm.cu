// Decode GEMM (small M): y [M, N] = x [M, K] @ deq(W)^T (+ bias), W in the tiled layout
// (core/tile_layout.h), on mma.sync m16n8k16 with the operands swapped: the weight is the A operand
// (16 output rows x 16-deep steps) and the tokens are B (8 per mma), so M <= 8 wastes no rows.
//
// Each warp streams NT 16-row tiles of W along its slice of K: per 64 columns one 16-byte (4-bit),
// 8-byte (2-bit) or 8 + 4-byte (3-bit: two planes) copy per lane and tile, and two 16-byte
// activation copies per 8 tokens, into the lane's own bytes of a per-warp cp.async ring in shared
// memory (no barriers), read back into registers. A code pair becomes an exact 16-bit pair q by a
// shift, one lop3 that masks it into the mantissa of base (128 for bf16, 1024 for fp16; 3 bits: a
// second shift and lop3 add the high bit) and a 16-bit subtraction of base; the mma
// accumulates sum_k x q in fp32, and the scale and zero are applied once per row, token and group:
//   y += s * sum_k x q - z * s * sum_k x     (sum_k x: an mma with an all-ones A).
// The weight is never rounded to 16 bits: the result is the fp32 product with the exact dequantised
// weight, as in the reference (dequant + cuBLAS rounds it first).
// The 8 warps of a block take 8 neighbouring row-tile groups over the same K slice, so the
// activations come from L2 once and from L1 eight times. Split-K over blocks fills one wave of the
// SMs. The K slices of a column tile either form one thread-block cluster (sm_90, at most 8 slices, where
// the grid's clusters are all resident at once): each block leaves its fp32 sums in its own shared
// memory and the cluster's blocks share the sum over slices (through distributed shared memory); or
// else the last block of a column tile to finish sums the fp32 partials from global memory. Both add
// the slices in split order after the bias (deterministic, and the same result either way).
// Warp split (DecodeTuning::warp_split): the 8 warps of a block take the same row tiles and split K
// among themselves instead, and sum their slices in shared memory in warp order after the bias: no
// split-K across blocks, so no partials, counters, fences or cluster barriers, and a grid of more,
// smaller blocks (the time of a small decode GEMM is each warp's instruction stream: more warps a SM
// hide more of its stalls; benchmarks/NOTES.md, decode GEMM version 14).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <utility>

#include "core/tile_layout.h"
#include "cuda/common.cuh"
#include "cuda/kernels.h"
#include "cuda/mma.cuh"
#include "cuda/ptx.cuh"
#include "cuda/wgmma.cuh"

namespace qatext::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kDecodeThreads = 32 * kWarps;
constexpr int kColsPerBlock = kWarps * kTileRows;  // output features per block
constexpr int kMaxClusterSplits = 8;               // K slices summed in a cluster: the portable cluster size

struct DecodeArgs {
  const void* x;          // [M, K]
  const void* x_wgmma;    // x laid out for the staged kernel's wgmma form (wgmma_tokens), where it takes that
  const float* x_sums;    // and its token sums over each part of a group in a K slice: [splits][sums_groups][sums_rows]
  const uint8_t* tiled;   // tiled layout of [N, K] codes
  const float* scale;     // [N, G]
  const float* zero;      // [N, G]
  const void* bias;       // [N] or nullptr
  void* out;              // [M, N]
  float* partial;         // [splits, M, N] when splits > 1
  int* counters;          // [gridDim.z * gridDim.x], zero on entry and left zero, when splits > 1
  int M, N, K, G;
  int sums_groups, sums_rows;  // (wgmma) groups a K slice can touch; tokens, rounded up to whole blocks
  int tiles_per_group;    // 64-column tiles per quantization group
  int tiles_per_split;
  int splits;
  int cluster;            // the splits of a column tile form a cluster: partials stay in shared memory
  int warp_split;         // a block's warps split K over the same row tiles (splits == 1)
  int swiglu;             // (warp split) out [M, N / 2] = silu(gate) * up, W = [gate; up]: a block's first NT / 2
                          // row tiles are gate's, the others the same rows of up's, N / 32 row tiles further on
};

// Grouped (warp split): x's rows sorted by expert, W the experts' [N, K] weights stacked, and token tile z of the
// grid is items[z] = (expert e, first row), e < 0 for none; its rows end at offs[e], the rows of experts 0..e
// (each token tile one expert's rows only). A struct of its own: DecodeArgs grown by these fields changed the
// dense kernel's registers (64 -> 80 at one token tile and row tile, and spills), though none reads them.
struct GroupedArgs {
  DecodeArgs expert;  // one expert's: N its rows, tiled / scale / zero expert 0's, M x's rows
  const int2* items;
  const int* offs;
  int64_t expert_code_bytes;  // one expert's tiled codes
};

// Each lane copies its own codes and activations of a stage into its own bytes of a per-warp ring of
// S stages in shared memory with cp.async, S - 1 stages ahead, and reads them back itself: no
// barrier, no registers held by loads in flight. Codes are read once (.cg: not kept in L1);
// activations are shared by the block's warps (.ca: kept in L1). S = 8 puts a whole 8-tile K slice in
// flight at once (one block per SM); S = 4 leaves room for 2-3 blocks per SM.

// One warp's stage in shared memory: per row tile its lanes' code bytes, then per token tile two
// 16-byte activation vectors per lane (lane-contiguous: conflict-free 8/16-byte accesses). A 3-bit
// lane's 8 + 4 bytes (its two planes) take a 16-byte slot.
template <int BITS, int MT, int NT>
struct StageLayout {
  static constexpr int kCodeBytes = BITS == 3 ? 16 : 4 * BITS;  // per lane per row tile
  static constexpr int kBytes = 32 * (NT * kCodeBytes + MT * 32);
  static __device__ __forceinline__ int codes(int i, int lane) { return (i * 32 + lane) * kCodeBytes; }
  static __device__ __forceinline__ int x(int mt, int h, int lane) { return 32 * NT * kCodeBytes + ((mt * 2 + h) * 32 + lane) * 16; }
};

// Dynamic shared memory of a block: its warps' rings.
template <int BITS, int MT, int NT, int S>
constexpr int decode_smem_bytes() {
  return kWarps * S * StageLayout<BITS, MT, NT>::kBytes;
}

// 32-token blocks (MT = 4) sum in units of the group's scale and read their token fragments a step at a
// time from the ring, with one all-ones mma a token-tile pair: 196 -> 128 registers at 2 row tiles a warp
// (benchmarks/NOTES.md, decode GEMM version 15), where the activations' trips through shared memory bound
// the block.
template <int MT>
constexpr bool kScaleUnits = MT == 4;

template <int BITS, int MT, int NT>
struct Stage {
  uint32_t codes[NT][BITS];  // this lane's 4 * BITS bytes of each of the warp's NT 16 x 64 tiles
  uint4 x[MT][2];            // token g (+ 8 mt): columns 16c .. 16c + 15 of the tile
};

// A lane's code bytes of one row tile, from `src` (the tile plus the lane's offset) into its own slot
// `dst` by cp.async: 4 * BITS bytes, or for 3 bits its 8 bytes of the 2-bit plane and its 4 of the
// 1-bit plane (at 256 + 4 * lane in the tile) in a 16-byte slot.
template <int BITS>
__device__ __forceinline__ void copy_lane_codes(uint8_t* dst, const uint8_t* src, int lane) {
  if constexpr (BITS == 3) {
    cp_async_once<8>(dst, src);
    cp_async_once<4>(dst + 8, src + 256 - 4 * lane);
  } else {
    cp_async_once<4 * BITS>(dst, src);
  }
}

// Those bytes back as the lane's code words (3 bits: two 2-bit plane words, then the 1-bit plane word).
template <int BITS>
__device__ __forceinline__ void read_lane_codes(const uint8_t* src, uint32_t (&w)[BITS]) {
  if constexpr (BITS == 2) {
    const uint2 v = *reinterpret_cast<const uint2*>(src);
    w[0] = v.x, w[1] = v.y;
  } else {
    const uint4 v = *reinterpret_cast<const uint4*>(src);
    w[0] = v.x, w[1] = v.y, w[2] = v.z;
    if constexpr (BITS == 4) w[3] = v.w;
  }
}

// Async copies of tile t into this lane's own bytes of a ring slot `st`: its code bytes of each of the
// warp's row tiles (3 bits: the 2-bit plane, then the 1-bit plane) and its two 16-byte activation
// vectors per token tile.
template <typename T, int BITS, int MT, int NT>
__device__ __forceinline__ void issue_stage(uint8_t* st, const uint8_t* codes, int64_t tile_row_bytes,
                                            int64_t mid_step, int t, const T* const (&xrow)[MT], int lane) {
  using L = StageLayout<BITS, MT, NT>;
  const uint8_t* src = codes + int64_t(t) * tile_bytes(BITS);
#pragma unroll
  for (int i = 0; i < NT; ++i) {
    if (i > 0) src += i == NT / 2 ? mid_step : tile_row_bytes;  // (the step from tile i - 1 to tile i)
    copy_lane_codes<BITS>(st + L::codes(i, lane), src, lane);
  }
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    cp_async16_shared(st + L::x(mt, 0, lane), xrow[mt] + t * kTileCols);
    cp_async16_shared(st + L::x(mt, 1, lane), xrow[mt] + t * kTileCols + 8);
  }
}

// This lane's code words of each row tile and its activations of each token tile, from its own bytes
// of a ring slot `src` into registers.
template <int BITS, int MT, int NT>
__device__ __forceinline__ void read_stage(const uint8_t* src, int lane, Stage<BITS, MT, NT>& st) {
  using L = StageLayout<BITS, MT, NT>;
#pragma unroll
  for (int i = 0; i < NT; ++i) read_lane_codes<BITS>(src + L::codes(i, lane), st.codes[i]);
  if constexpr (!kScaleUnits<MT>) {  // (those read their token fragments a step at a time)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      st.x[mt][0] = *reinterpret_cast<const uint4*>(src + L::x(mt, 0, lane));
      st.x[mt][1] = *reinterpret_cast<const uint4*>(src + L::x(mt, 1, lane));
    }
  }
}

// A lane's code pairs of a row tile at 16-deep step j of its 64 columns, each as the exact 16-bit pair
// base + q (4 registers, the mma A fragment's order): each pair is shifted out of `word` and masked by
// one lop3 into the mantissa of base (3 bits: a second shift and lop3 or the high bit in from `hi`, the
// 1-bit plane word, at bit 2 of each half).
template <typename T, int BITS>
__device__ __forceinline__ void code_pairs(uint32_t word, uint32_t hi, int j, uint32_t (&v)[4]) {
  constexpr int kStepsPerWord = BITS == 3 ? 2 : 4 / BITS;  // (of the 2-bit plane for 3 bits)
  constexpr uint32_t mask = ((1u << (BITS == 3 ? 2 : BITS)) - 1u) * 0x00010001u, base = Native<T>::code_base;
  constexpr uint32_t high_bit = 0x00040004u;
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    if constexpr (BITS == 3) {
      v[r] = and_or(word >> (2 * (r + 4 * (j % kStepsPerWord))), mask, base);
      const int hb = r + 4 * j;  // the high bits' position in the 1-bit plane word, moved to bit 2
      v[r] = and_or(hb >= 2 ? hi >> (hb - 2) : hi << (2 - hb), high_bit, v[r]);
    } else {
      v[r] = and_or(word >> (BITS * (r + 4 * (j % kStepsPerWord))), mask, base);
    }
  }
}

// The mma A fragment (4 registers of 16-bit code pairs, exact) of a row tile at step j: base + q where
// the mma takes it so (Native::fold_base), else q (base subtracted in 16 bits, exact).
template <typename T, int BITS>
__device__ __forceinline__ void decode_fragment(uint32_t word, uint32_t hi, int j, uint32_t (&a)[4]) {
  code_pairs<T, BITS>(word, hi, j, a);
#pragma unroll
  for (int r = 0; r < 4; ++r) a[r] = Native<T>::fold_base ? a[r] : Native<T>::sub2(a[r], Native<T>::code_base);
}

// At a group's end, fold its sums into the output, out += s * sum_k x q - z * s * sum_k x, and clear them
// (where the mma took base + q, base joins the zero: out += s * sum_k x (base + q) - (z + base) * s * sum_k x).
template <typename T, int MT, int NT>
__device__ __forceinline__ void fold_group(const float (&s)[NT][2], const float (&z)[NT][2], float (&accq)[MT][NT][4],
                                           float (&accx)[MT][4], float (&out)[MT][NT][4]) {
  constexpr float folded = Native<T>::fold_base ? Native<T>::base : 0.f;
#pragma unroll
  for (int i = 0; i < NT; ++i) {
    const float nzs0 = -(z[i][0] + folded) * s[i][0], nzs1 = -(z[i][1] + folded) * s[i][1];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      out[mt][i][0] += s[i][0] * accq[mt][i][0] + nzs0 * accx[mt][0];
      out[mt][i][1] += s[i][0] * accq[mt][i][1] + nzs0 * accx[mt][1];
      out[mt][i][2] += s[i][1] * accq[mt][i][2] + nzs1 * accx[mt][0];
      out[mt][i][3] += s[i][1] * accq[mt][i][3] + nzs1 * accx[mt][1];
#pragma unroll
      for (int e = 0; e < 4; ++e) accq[mt][i][e] = 0.f;
    }
  }
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int e = 0; e < 4; ++e) accx[mt][e] = 0.f;
}

// Scale-unit sums (kScaleUnits): the codes' mma adds into out, in units of the group's scale; at a group's
// end the zero term leaves it, out -= (z + base) sum_k x, where sum_k x of tile mt's tokens 2c, 2c + 1
// comes from lanes 8c and 8c + 4 (the paired all-ones mma leaves token g of tiles 2p, 2p + 1 in lane
// 4g + c's e = 0 and 2, p < MT / 2); dead rows (scale 0) had their codes left out and take no zero term.
// sums_x is cleared.
template <typename T, int MT, int NT>
__device__ __forceinline__ void fold_zero_units(const float (&z)[NT][2], const bool (&dead)[NT][2],
                                                float (&sums_x)[MT][4], float (&out)[MT][NT][4], int c) {
  constexpr float folded = Native<T>::fold_base ? Native<T>::base : 0.f;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const float sx0 = __shfl_sync(0xffffffffu, sums_x[mt / 2][(mt % 2) * 2], 8 * c);
    const float sx1 = __shfl_sync(0xffffffffu, sums_x[mt / 2][(mt % 2) * 2], 8 * c + 4);
#pragma unroll
    for (int i = 0; i < NT; ++i) {
      const float zf0 = dead[i][0] ? 0.f : z[i][0] + folded, zf1 = dead[i][1] ? 0.f : z[i][1] + folded;
      out[mt][i][0] -= zf0 * sx0;
      out[mt][i][1] -= zf0 * sx1;
      out[mt][i][2] -= zf1 * sx0;
      out[mt][i][3] -= zf1 * sx1;
    }
  }
#pragma unroll
  for (int p = 0; p < MT / 2; ++p)
#pragma unroll
    for (int e = 0; e < 4; ++e) sums_x[p][e] = 0.f;
}

// This warp's accumulators into the output (one K slice: plus the bias) or into its split's partial
// sums. Accumulator of a 16-row x 8-token tile: e = 0, 1 at row g, tokens 2c, 2c + 1; e = 2, 3 at
// row g + 8.
template <typename T, int MT, int NT>
__device__ __forceinline__ void store_outputs(const DecodeArgs& args, const float (&out)[MT][NT][4], int m0, int nt0,
                                              int g, int c, const T* bias, T* y) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int i = 0; i < NT; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int m = m0 + 8 * mt + 2 * c + (e & 1), n = (nt0 + i) * kTileRows + g + 8 * (e >> 1);
        if (m >= args.M) continue;
        if (args.splits > 1) {
          args.partial[(int64_t(blockIdx.y) * args.M + m) * args.N + n] = out[mt][i][e];
        } else {
          y[int64_t(m) * args.N + n] = T(out[mt][i][e] + (bias != nullptr ? float(bias[n]) : 0.f));
        }
      }
    }
  }
}

// Split-K through the cluster of a column tile's K slices (cluster rank = blockIdx.y = the slice): each
// warp leaves its fp32 sums at the start of its own ring (which it no longer reads), and after a
// cluster barrier the block of rank r sums its share of the column tile's outputs over the slices, in
// slice order after the bias, reading the other blocks' shared memory. A second barrier keeps every
// block's shared memory alive until all have read it.
template <typename T, int MT, int NT>
__device__ __forceinline__ void cluster_reduce(const DecodeArgs& args, const float (&out)[MT][NT][4], uint8_t* smem,
                                               int ring_bytes, int m0, const T* bias, T* y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr int kPerWarp = MT * NT * 4 * 32;  // a warp's sums: [mt][i][e][lane]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float* mine = reinterpret_cast<float*>(smem + warp * ring_bytes);
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < NT; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) mine[((mt * NT + i) * 4 + e) * 32 + lane] = out[mt][i][e];
  cluster_arrive_release();
  cluster_wait();
  const int total = kWarps * kPerWarp, share = (total + args.splits - 1) / args.splits;
  const int end = min(total, (int(blockIdx.y) + 1) * share);
  for (int j = int(blockIdx.y) * share + threadIdx.x; j < end; j += kDecodeThreads) {
    const int w = j / kPerWarp, r = j % kPerWarp, l = r % 32, e = (r / 32) % 4, i = (r / 128) % NT, mt = r / (128 * NT);
    const int m = m0 + 8 * mt + 2 * (l % 4) + (e & 1);
    const int n = ((blockIdx.x * kWarps + w) * NT + i) * kTileRows + l / 4 + 8 * (e >> 1);
    if (m >= args.M || n >= args.N) continue;
    const uint32_t local = smem_addr(smem + w * ring_bytes) + 4 * r;
    float part[kMaxClusterSplits];
#pragma unroll
    for (int sp = 0; sp < kMaxClusterSplits; ++sp) part[sp] = sp < args.splits ? ld_cluster_f32(cluster_map(local, sp)) : 0.f;
    float v = bias != nullptr ? float(bias[n]) : 0.f;
#pragma unroll
    for (int sp = 0; sp < kMaxClusterSplits; ++sp) {
      if (sp < args.splits) v += part[sp];
    }
    y[int64_t(m) * args.N + n] = T(v);
  }
  // The values read above are in registers (used): nothing left to order, only to wait for.
  cluster_arrive_relaxed();
  cluster_wait();
#endif
}

// Row tile of a warp's tile i: nt0 + i, and with SwiGLU (jump > 0) its second half's in up's rows.
template <int NT>
__device__ __forceinline__ int row_tile(int nt0, int i, int jump) {
  return nt0 + i + (i >= NT / 2 ? jump : 0);
}

// One output in warp order after the bias: sum over the block's warps of sums[w * per_warp + j].
__device__ __forceinline__ float warp_sum(const float* sums, int per_warp, int j, float bias) {
  float v = bias;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) v += sums[w * per_warp + j];
  return v;
}

// Warp split: the block's warps leave their fp32 sums in shared memory (over their rings, which all
// have been read: hence the first barrier), and the block sums each output over the warps in warp
// (K slice) order after the bias. SwiGLU: each gate output meets the up output of its row (same
// thread, both in fp32) and silu(gate) * up is rounded once.
template <typename T, int MT, int NT>
__device__ __forceinline__ void warp_split_reduce(const DecodeArgs& args, const float (&out)[MT][NT][4], uint8_t* smem,
                                                  int m0, int nt0, const T* bias, T* y) {
  constexpr int kPerWarp = MT * NT * 4 * 32;  // a warp's sums: [mt][i][e][lane]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float* sums = reinterpret_cast<float*>(smem);
  __syncthreads();
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < NT; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) sums[warp * kPerWarp + ((mt * NT + i) * 4 + e) * 32 + lane] = out[mt][i][e];
  __syncthreads();
  if constexpr (NT >= 2) {  // (SwiGLU runs with 2 or more row tiles a block)
    if (args.swiglu) {
      constexpr int kHalf = NT / 2 * 128;  // a token tile's gate sums; up's follow them
      const int width = args.N / 2;
      for (int j = threadIdx.x; j < MT * kHalf; j += kDecodeThreads) {
        const int mt = j / kHalf, r = j % kHalf, l = r % 32, e = (r / 32) % 4, i = r / 128;
        const int m = m0 + 8 * mt + 2 * (l % 4) + (e & 1);
        if (m >= args.M) continue;
        const int n = (nt0 + i) * kTileRows + l / 4 + 8 * (e >> 1);  // gate's row; up's is width further on
        const int at = mt * NT * 128 + r;
        const float gate = warp_sum(sums, kPerWarp, at, bias != nullptr ? float(bias[n]) : 0.f);
        const float up = warp_sum(sums, kPerWarp, at + kHalf, bias != nullptr ? float(bias[n + width]) : 0.f);
        y[int64_t(m) * width + n] = T(gate / (1.f + expf(-gate)) * up);
      }
      return;
    }
  }
  for (int j = threadIdx.x; j < kPerWarp; j += kDecodeThreads) {
    const int l = j % 32, e = (j / 32) % 4, i = (j / 128) % NT, mt = j / (128 * NT);
    const int m = m0 + 8 * mt + 2 * (l % 4) + (e & 1);
    if (m >= args.M) continue;
    const int n = (nt0 + i) * kTileRows + l / 4 + 8 * (e >> 1);
    y[int64_t(m) * args.N + n] = T(warp_sum(sums, kPerWarp, j, bias != nullptr ? float(bias[n]) : 0.f));
  }
}

// The outputs of a warp's sums `out` (rows of row tiles nt0 .., tokens m0 ..) over the K slices of a
// column tile: summed in a cluster (each warp's sums through warp_bytes of shared memory at
// smem + warp * warp_bytes, which it no longer reads), or stored (one slice), or left as the split's
// partials, of which the last block of the column tile to finish sums all in split order.
template <typename T, int MT, int NT>
__device__ __forceinline__ void finish_split_k(const DecodeArgs& args, const float (&out)[MT][NT][4], uint8_t* smem,
                                               int warp_bytes, int m0, int nt0, bool active) {
  T* y = static_cast<T*>(args.out);
  const T* bias = static_cast<const T*>(args.bias);
  if (args.cluster) {
    cluster_reduce<T, MT, NT>(args, out, smem, warp_bytes, m0, bias, y);
    return;
  }
  if (active) store_outputs<T, MT, NT>(args, out, m0, nt0, (threadIdx.x & 31) / 4, threadIdx.x % 4, bias, y);
  if (args.splits == 1) return;

  // The last block of this column tile to finish sums the splits in order.
  __shared__ int last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    int* counter = args.counters + blockIdx.z * gridDim.x + blockIdx.x;
    last = atomicAdd(counter, 1) == args.splits - 1;
    if (last) *counter = 0;  // every split has counted: zero again for the next launch (no memset per call)
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  // Each thread sums kE outputs at once and loads kU splits of each before adding them (in split
  // order): kE * kU independent L2 loads in flight, where one at a time left the block waiting
  // splits * outputs-per-thread L2 round trips.
  constexpr int kE = 4, kU = 4;
  const int n0 = blockIdx.x * kColsPerBlock * NT, cols = min(kColsPerBlock * NT, args.N - n0);
  const int total = min(8 * MT, args.M - m0) * cols;
  const int64_t MN = int64_t(args.M) * args.N;
  for (int i0 = threadIdx.x; i0 < total; i0 += kE * kDecodeThreads) {
    float v[kE];
    const float* p[kE];
#pragma unroll
    for (int e = 0; e < kE; ++e) {
      const int i = min(i0 + e * kDecodeThreads, total - 1);  // a clamped duplicate is summed, not stored
      const int m = m0 + i / cols, n = n0 + i % cols;
      v[e] = bias != nullptr ? float(bias[n]) : 0.f;
      p[e] = args.partial + int64_t(m) * args.N + n;
    }
    int sp = 0;
    for (; sp + kU <= args.splits; sp += kU) {
      float part[kU][kE];
#pragma unroll
      for (int u = 0; u < kU; ++u)
#pragma unroll
        for (int e = 0; e < kE; ++e) part[u][e] = __ldcg(p[e] + (sp + u) * MN);
#pragma unroll
      for (int u = 0; u < kU; ++u)
#pragma unroll
        for (int e = 0; e < kE; ++e) v[e] += part[u][e];
    }
    for (; sp < args.splits; ++sp)
#pragma unroll
      for (int e = 0; e < kE; ++e) v[e] += __ldcg(p[e] + sp * MN);
#pragma unroll
    for (int e = 0; e < kE; ++e) {
      const int i = i0 + e * kDecodeThreads;
      if (i < total) y[int64_t(m0 + i / cols) * args.N + n0 + i % cols] = T(v[e]);
    }
  }
}

// Warp w of block b owns row tiles (8b + w) * NT + i, i < NT, over K slice blockIdx.y (warp split: row
// tiles b * NT + i over K slice w; SwiGLU: b * NT / 2 + i and the same of up's); tokens
// 8 MT blockIdx.z + (0 .. 8 MT) (grouped: first_row + (0 .. 8 MT)).
template <typename T, int BITS, int MT, int NT, int S, bool GROUPED>
__device__ __forceinline__ void decode_gemm_body(const DecodeArgs& args, int first_row) {
  using L = StageLayout<BITS, MT, NT>;
  extern __shared__ __align__(16) uint8_t smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane / 4, c = lane % 4;
  const int KT = args.K / kTileCols;
  const int row_tiles = args.swiglu ? args.N / (2 * kTileRows) : args.N / kTileRows;  // (SwiGLU: gate's)
  const int nt0 = args.swiglu       ? blockIdx.x * (NT / 2)
                  : args.warp_split ? blockIdx.x * NT
                                    : (blockIdx.x * kWarps + warp) * NT;
  const int jump = args.swiglu ? row_tiles - NT / 2 : 0;  // row tiles from a block's gate tiles to its up tiles
  const int m0 = GROUPED ? first_row : blockIdx.z * 8 * MT;
  const int t_begin = (args.warp_split ? warp : blockIdx.y) * args.tiles_per_split;
  const int t_end = min(KT, t_begin + args.tiles_per_split);
  const bool active = nt0 < row_tiles;  // N % (16 NT) == 0: a warp's tiles are all in or all out

  float out[MT][NT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < NT; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) out[mt][i][e] = 0.f;

  if (active) {
    // This lane's bytes of a tile (3 bits: of its 2-bit plane; its 1-bit plane at 256 + 4 * lane).
    const int64_t tile_row_bytes = int64_t(KT) * tile_bytes(BITS);
    const uint8_t* codes = args.tiled + nt0 * tile_row_bytes + lane * (BITS == 3 ? 8 : 4 * BITS);
    const int64_t mid_step = (jump + 1) * tile_row_bytes;  // from tile NT / 2 - 1 to tile NT / 2
    const T* xrow[MT];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      xrow[mt] = static_cast<const T*>(args.x) + int64_t(min(m0 + 8 * mt + g, args.M - 1)) * args.K + 16 * c;
    }
    uint8_t* warp_smem = smem + warp * S * L::kBytes;
    // Issue the copies of tile t into ring slot `slot` (nothing past the slice; the group is still
    // committed so that the wait counts stay aligned).
    const auto issue = [&](int slot, int t) {
      if (t < t_end) {
        issue_stage<T, BITS, MT, NT>(warp_smem + slot * L::kBytes, codes, tile_row_bytes, mid_step, t, xrow, lane);
      }
      cp_async_commit();
    };

    // Scales and zeros of rows g and g + 8 of each tile, four groups at a time: lane c of a row's four
    // lanes loads group first + c (one 16-byte run of a row per four lanes, where one group per load
    // touched a 32-byte sector per row for 4 bytes), and a group's values reach the row's lanes by
    // shuffles at its end. The next four are loaded when these are taken, 4-8 groups ahead of use.
    const float* sp[NT];
    const float* zp[NT];
#pragma unroll
    for (int i = 0; i < NT; ++i) {
      sp[i] = args.scale + int64_t(row_tile<NT>(nt0, i, jump) * kTileRows + g) * args.G;
      zp[i] = args.zero + int64_t(row_tile<NT>(nt0, i, jump) * kTileRows + g) * args.G;
    }
    const int row8 = 8 * args.G;
    float qs[NT][2], qz[NT][2], next_s[NT][2] = {}, next_z[NT][2] = {};  // this batch of four, the next
    const auto load_batch = [&](int first, float (&sv)[NT][2], float (&zv)[NT][2]) {
      const int q = min(first + c, args.G - 1);  // (past the last group: a duplicate, never selected)
#pragma unroll
      for (int i = 0; i < NT; ++i) {
        sv[i][0] = __ldg(sp[i] + q);
        zv[i][0] = __ldg(zp[i] + q);
        sv[i][1] = __ldg(sp[i] + row8 + q);
        zv[i][1] = __ldg(zp[i] + row8 + q);
      }
    };
    int group = t_begin / args.tiles_per_group;
    int group_end = min(t_end, (group + 1) * args.tiles_per_group);
    const int last_group = (t_end - 1) / args.tiles_per_group;
    int batch = group;  // the first group of qs / qz
    load_batch(batch, qs, qz);
    if (batch + 4 <= last_group) load_batch(batch + 4, next_s, next_z);
    float s[NT][2], z[NT][2];
    const auto select = [&]() {  // group's values, from lane 4 g + (group - batch)
      const int src = (lane & ~3) | (group - batch);
#pragma unroll
      for (int i = 0; i < NT; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          s[i][h] = __shfl_sync(0xffffffffu, qs[i][h], src);
          z[i][h] = __shfl_sync(0xffffffffu, qz[i][h], src);
        }
    };

    // Scale-unit sums: the scale out is in (per row g, g + 8 of each tile), the rows whose group has scale 0
    // (their codes are left out), and whether any lane has one (warp-uniform).
    constexpr bool kUnits = kScaleUnits<MT>;
    float unit[NT][2];
    bool dead[NT][2];
    bool any_dead = false;
    // The current group's scale and zero at its start; out into its units (first: out is still zero).
    const auto enter_group = [&](bool first) {
      select();
      bool d_any = false;
#pragma unroll
      for (int i = 0; i < NT; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          dead[i][h] = s[i][h] == 0.f;
          const float ratio = dead[i][h] || first ? 1.f : __fdividef(unit[i][h], s[i][h]);  // (2 ulp)
          unit[i][h] = dead[i][h] ? (first ? 1.f : unit[i][h]) : s[i][h];
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) out[mt][i][2 * h] *= ratio, out[mt][i][2 * h + 1] *= ratio;
          d_any = d_any || dead[i][h];
        }
      any_dead = __any_sync(0xffffffffu, d_any);
    };
    if constexpr (kUnits) enter_group(true);

    float accq[MT][NT][4], accx[MT][4];  // sum_k x q and sum_k x over the current group (scale units: accx[p]
                                         // the sums of token tiles 2p and 2p + 1, accq unused)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        accx[mt][e] = 0.f;
#pragma unroll
        for (int i = 0; i < NT; ++i) accq[mt][i][e] = 0.f;
      }
    const uint32_t ones[4] = {Native<T>::ones, Native<T>::ones, Native<T>::ones, Native<T>::ones};

    const auto compute = [&](const Stage<BITS, MT, NT>& st, const uint8_t* slot_bytes, int t) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        constexpr int kStepsPerWord = BITS == 3 ? 2 : 4 / BITS;  // (of the 2-bit plane for 3 bits)
        uint2 b[MT];  // each token tile's B fragment at step j
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          if constexpr (kUnits) {
            b[mt] = *reinterpret_cast<const uint2*>(slot_bytes + L::x(mt, j / 2, lane) + 8 * (j % 2));
          } else {
            const uint4& v = st.x[mt][j / 2];
            b[mt] = (j % 2) ? make_uint2(v.z, v.w) : make_uint2(v.x, v.y);
          }
        }
#pragma unroll
        for (int i = 0; i < NT; ++i) {
          const uint32_t word = st.codes[i][j / kStepsPerWord];
          uint32_t a[4];
          decode_fragment<T, BITS>(word, st.codes[i][BITS == 3 ? 2 : 0], j, a);
          if constexpr (kUnits) {
            if (any_dead) {
#pragma unroll
              for (int r = 0; r < 4; ++r) a[r] = dead[i][r & 1] ? 0u : a[r];  // (a[r]: row g + 8 (r & 1))
            }
          }
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            if constexpr (kUnits) {
              mma16816<T>(out[mt][i], a, b[mt].x, b[mt].y);
            } else {
              mma16816<T>(accq[mt][i], a, b[mt].x, b[mt].y);
            }
          }
        }
        if constexpr (kUnits) {  // two token tiles' B fragments are one A fragment: token g of each, rows g, g + 8
#pragma unroll
          for (int p = 0; p < MT / 2; ++p) {
            const uint32_t pair[4] = {b[2 * p].x, b[2 * p + 1].x, b[2 * p].y, b[2 * p + 1].y};
            mma16816<T>(accx[p], pair, Native<T>::ones, Native<T>::ones);
          }
        } else {
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) mma16816<T>(accx[mt], ones, b[mt].x, b[mt].y);
        }
      }
      // At a group's end fold the sums into the output: s * sum x q - z * s * sum x (scale units: the zero
      // term, then the next group's units).
      const bool group_ends = t + 1 == group_end;
      if (group_ends) {
        if constexpr (kUnits) {
          fold_zero_units<T, MT, NT>(z, dead, accx, out, c);
        } else {
          select();
          fold_group<T, MT, NT>(s, z, accq, accx, out);
        }
        ++group;
        group_end = min(t_end, group_end + args.tiles_per_group);
        if (group - batch == 4 && group <= last_group) {
          batch = group;
#pragma unroll
          for (int i = 0; i < NT; ++i)
#pragma unroll
            for (int h = 0; h < 2; ++h) qs[i][h] = next_s[i][h], qz[i][h] = next_z[i][h];
          if (batch + 4 <= last_group) load_batch(batch + 4, next_s, next_z);
        }
        if constexpr (kUnits) {
          if (group <= last_group) enter_group(false);
        }
      }
    };

#pragma unroll
    for (int st = 0; st < S - 1; ++st) issue(st, t_begin + st);
    for (int t = t_begin, slot = 0; t < t_end; ++t) {
      cp_async_wait<S - 2>();  // tile t landed (this lane's own copies)
      Stage<BITS, MT, NT> cur;
      read_stage<BITS, MT, NT>(warp_smem + slot * L::kBytes, lane, cur);
      // Refill the slot read one tile ago (its codes are in registers; scale-unit blocks read their tokens
      // from this tile's slot during compute, so that one is still theirs).
      issue(slot == 0 ? S - 1 : slot - 1, t + S - 1);
      compute(cur, warp_smem + slot * L::kBytes, t);
      slot = slot == S - 1 ? 0 : slot + 1;
    }
    cp_async_wait<0>();
    if constexpr (kUnits) {  // out back to true units
      if (t_begin < t_end) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int i = 0; i < NT; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) out[mt][i][e] *= unit[i][e >> 1];
      }
    }
  }

  T* y = static_cast<T*>(args.out);
  const T* bias = static_cast<const T*>(args.bias);
  if (args.warp_split) {
    warp_split_reduce<T, MT, NT>(args, out, smem, m0, nt0, bias, y);
    return;
  }
  finish_split_k<T, MT, NT>(args, out, smem, S * L::kBytes, m0, nt0, active);
}

template <typename T, int BITS, int MT, int NT, int S>
__global__ void __launch_bounds__(kDecodeThreads) decode_gemm_kernel(DecodeArgs args) {
  decode_gemm_body<T, BITS, MT, NT, S, false>(args, 0);
}

// Grouped: token tile z is items[z], one expert's rows; the block reads that expert's weight (a kernel of its own,
// so that the dense one's registers are what they were).
template <typename T, int BITS, int MT, int NT, int S>
__global__ void __launch_bounds__(kDecodeThreads) grouped_decode_gemm_kernel(GroupedArgs args) {
  const int2 item = args.items[blockIdx.z];
  if (item.x < 0) return;  // (the whole block: before any barrier)
  DecodeArgs expert = args.expert;
  expert.M = min(args.offs[item.x], expert.M);  // (x's rows at most)
  expert.tiled += item.x * args.expert_code_bytes;
  expert.scale += int64_t(item.x) * expert.N * expert.G;
  expert.zero += int64_t(item.x) * expert.N * expert.G;
  decode_gemm_body<T, BITS, MT, NT, S, true>(expert, item.y);
}

// Staged kernel (more tokens than decode: M up to a few hundred). The block's tokens (8 MT of them) are
// staged once per 64-column tile in shared memory for all 8 warps, by a ring of S stages with one block
// barrier a tile, where the decode kernel's warps each copied them. Each weight fragment then meets all
// 8 MT tokens of the block. The warps' codes and, at a group's first tile, their rows' scales and zeros
// ride in the same stage, each lane copying and reading back its own bytes.
// With one row tile a warp and 64 or 128 tokens on sm_90a (the wgmma form), each warpgroup's 4 row tiles
// are one 64-row wgmma (A, the fragments, from registers; B, the tokens, from the ring in wgmma's
// 128-byte swizzle, one bulk copy a tile from x laid out by wgmma_tokens, counted by an mbarrier a slot).
// The scale and zero stay out of the element path, as in the decode
// kernel: a fragment is q - zi, exact in 16 bits (zi the zero rounded to an integer, one 16-bit
// subtraction a code pair), and the fp32 sums run in units of the current group's scale: at a group's
// first tile they are multiplied by s_last / s_new, less zf * sum_k x where the zero has a fraction
// zf = z - zi (sum_k x over the slice's part of the group, from the ring), and at the end by s. So the
// weight is exact, never rounded to 16 bits; a row whose scale is zero takes zeros for the group.
// Elsewhere mma.sync takes the fragments, dequantised to 16 bits in registers, w = (q - z) s rounded
// once (as dequant + cuBLAS rounds them), up to 64 tokens a block.
constexpr bool staged_wgmma_form(int MT, int NT) { return NT == 1 && MT >= 8; }

template <int BITS, int MT, int NT>
struct StagedLayout {
  static constexpr int kCodeBytes = BITS == 3 ? 16 : 4 * BITS;  // per lane per row tile
  static constexpr int kTokenBytes = 8 * MT * kTileCols * 2;    // [tokens][64 columns], 16-byte chunks swizzled
  static constexpr int kWarpBytes = NT * 32 * (kCodeBytes + 4);  // codes, then one scale or zero a lane
  // (wgmma form) the block's token sums of a group, 4 bytes a token, in 1 KB (slots stay 1024-aligned)
  static constexpr int kSums = kTokenBytes + kWarps * kWarpBytes;
  static constexpr int kBytes = kSums + (staged_wgmma_form(MT, NT) ? 1024 : 0);
  // Token row r's 16-byte chunk ch (columns 8 ch .. 8 ch + 7) sits at chunk ch ^ (r % 8): the 8 rows a
  // 16-byte read of a warp's quarter touches then fall in 8 distinct chunk columns (no bank conflict).
  static __device__ __forceinline__ int token(int r, int ch) { return r * kTileCols * 2 + ((ch ^ (r & 7)) << 4); }
  static __device__ __forceinline__ int codes(int warp, int i, int lane) {
    return kTokenBytes + warp * kWarpBytes + (i * 32 + lane) * kCodeBytes;
  }
  static __device__ __forceinline__ int qparams(int warp, int i, int lane) {
    return kTokenBytes + warp * kWarpBytes + NT * 32 * kCodeBytes + (i * 32 + lane) * 4;
  }
};

template <int BITS, int MT, int NT, int S>
constexpr int staged_smem_bytes() {
  // (the ring is reused for the warps' sums when a cluster sums the K slices: MT * NT * 512 bytes a warp;
  // up to 1024 bytes before it align it)
  return 1024 + std::max(S * StagedLayout<BITS, MT, NT>::kBytes, kWarps * MT * NT * 512);
}

// The 16-bit A fragment (w = (q - z) s, rounded once) of a row tile at 16-deep step j, from the lane's
// code words: register r holds rows g (r even) and g + 8 (r odd). As the reference and dequant compute
// it: q exact (base comes off in 16 bits), then q - z and the product each rounded in fp32, then the
// 16-bit rounding.
template <typename T, int BITS>
__device__ __forceinline__ void dequant_fragment(uint32_t word, uint32_t hi, int j, const float (&s)[2],
                                                 const float (&z)[2], uint32_t (&a)[4]) {
  decode_fragment<T, BITS>(word, hi, j, a);
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const float2 q = Native<T>::unpack2(Native<T>::fold_base ? Native<T>::sub2(a[r], Native<T>::code_base) : a[r]);
    a[r] = Native<T>::pack2((q.x - z[r & 1]) * s[r & 1], (q.y - z[r & 1]) * s[r & 1]);
  }
}

// Warp w of block b owns row tiles (8b + w) * NT + i, i < NT, over K slice blockIdx.y; tokens
// 8 MT blockIdx.z + (0 .. 8 MT), as the decode kernel's (so the two share their split-K epilogue).
// (Registers capped for 2 blocks a SM: a block waits at a barrier every tile, so the SM needs another
// block's warps to issue meanwhile.)
template <typename T, int BITS, int MT, int NT, int S>
__global__ void __launch_bounds__(kDecodeThreads, 2) staged_gemm_kernel(DecodeArgs args) {
  using L = StagedLayout<BITS, MT, NT>;
  constexpr int kTokenChunks = 8 * MT * kTileCols / 8, kChunksPerThread = kTokenChunks / kDecodeThreads;
  static_assert(kTokenChunks % kDecodeThreads == 0, "every thread copies the same number of token chunks");
#ifdef QATEXT_WGMMA
  constexpr bool kWgmma = staged_wgmma_form(MT, NT);  // a warpgroup's 4 row tiles as one 64-row wgmma (sm_90a)
#else
  constexpr bool kWgmma = false;
#endif
  static_assert(!kWgmma || L::kBytes % 1024 == 0, "wgmma reads a slot's tokens in the 128-byte swizzle");
  extern __shared__ __align__(16) uint8_t staged_smem[];
  // The ring from the first 1024-byte boundary (wgmma reads the tokens in the 128-byte swizzle, whose
  // pattern repeats every 1024 bytes; the static shared memory before it need not end on one).
  uint8_t* const smem = staged_smem + ((1024u - (smem_addr(staged_smem) & 1023u)) & 1023u);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane / 4, c = lane % 4;
  const int KT = args.K / kTileCols, row_tiles = args.N / kTileRows;
  const int nt0 = (blockIdx.x * kWarps + warp) * NT;
  const int m0 = blockIdx.z * 8 * MT;
  const int t_begin = blockIdx.y * args.tiles_per_split;
  const int t_end = min(KT, t_begin + args.tiles_per_split);
  const bool active = nt0 < row_tiles;  // N % (16 NT) == 0: a warp's tiles are all in or all out
  const int tpg = args.tiles_per_group, first_group = t_begin / tpg;

  // What this thread copies, as running sources advanced a tile (or, for the scales and zeros, a group)
  // at a time: its token chunks (rows past M read as zeros), its lane's codes of each row tile, and the
  // scale or zero of one row of each: lane 4g + c takes the scale (c = 0, 1) or zero (c = 2, 3) of row
  // g + 8 (c % 2).
  // Token chunks: thread q copies chunk q % 8 of token rows q / 8 + 32 u (M * K < 2^31: int offsets);
  // in the wgmma form thread 0 copies the block's whole tile at once instead, from x laid out by
  // wgmma_tokens (a token block's tile of tokens is one contiguous 8 MT x 128-byte block, in wgmma's k
  // order and the ring's swizzle), and a barrier a slot counts its bytes in.
  const T* x = static_cast<const T*>(args.x) + int64_t(t_begin) * kTileCols;
  const T* xtiles =
      kWgmma ? static_cast<const T*>(args.x_wgmma) + (int64_t(blockIdx.z) * KT + t_begin) * 8 * MT * kTileCols : nullptr;
  __shared__ alignas(8) uint64_t tokens_landed[S];
  const int xdst = L::token(threadIdx.x / 8, threadIdx.x % 8);  // (+ u * 32 token rows)
  int xoff[kChunksPerThread];
  unsigned xvalid = 0;
#pragma unroll
  for (int u = 0; u < kChunksPerThread; ++u) {
    const int m = m0 + int(threadIdx.x) / 8 + 32 * u;
    xoff[u] = min(m, args.M - 1) * args.K + 8 * (threadIdx.x % 8);
    xvalid |= unsigned(m < args.M) << u;
  }
  const int64_t tile_row_bytes = int64_t(KT) * tile_bytes(BITS);
  const uint8_t* csrc = args.tiled + int64_t(active ? nt0 : 0) * tile_row_bytes + int64_t(t_begin) * tile_bytes(BITS) +
                        lane * (BITS == 3 ? 8 : 4 * BITS);
  const float* qsrc = (c < 2 ? args.scale : args.zero) +
                      int64_t((active ? nt0 : 0) * kTileRows + g + 8 * (c & 1)) * args.G + first_group;
  const int row_tile_qparams = kTileRows * args.G;  // from one row tile's scales to the next's
  // (wgmma form) the block's token sums of the slice's first group: 16 bytes a thread of the first 2 MT
  const float* sums = kWgmma ? args.x_sums + int64_t(blockIdx.y) * args.sums_groups * args.sums_rows + m0 +
                                   4 * int(threadIdx.x)
                             : nullptr;
  int issued = t_begin, issue_slot = 0, issue_group_end = (first_group + 1) * tpg;

  // The next tile's copies into its ring slot (nothing past the slice; the group is still committed so
  // that the wait counts stay aligned).
  const auto issue = [&]() {
    if (issued < t_end) {
      uint8_t* st = smem + issue_slot * L::kBytes;
#ifdef QATEXT_WGMMA
      if constexpr (kWgmma) {
        if (threadIdx.x == 0) bulk_copy_to_shared(st, xtiles, L::kTokenBytes, &tokens_landed[issue_slot]);
        xtiles += 8 * MT * kTileCols;
      }
#endif
      if constexpr (!kWgmma) {
#pragma unroll
        for (int u = 0; u < kChunksPerThread; ++u) {
          cp_async16_zfill(st + xdst + u * 32 * kTileCols * 2, x + xoff[u], (xvalid >> u & 1u) ? 16 : 0);
        }
        x += kTileCols;
      }
      const bool starts_group = issued == t_begin || issued == issue_group_end;
      if (issued == issue_group_end) {
        issue_group_end += tpg, ++qsrc;
        if constexpr (kWgmma) sums += args.sums_rows;
      }
      if (active) {
#pragma unroll
        for (int i = 0; i < NT; ++i) copy_lane_codes<BITS>(st + L::codes(warp, i, lane), csrc + i * tile_row_bytes, lane);
        if (starts_group) {
#pragma unroll
          for (int i = 0; i < NT; ++i) cp_async_once<4>(st + L::qparams(warp, i, lane), qsrc + i * row_tile_qparams);
        }
      }
      if constexpr (kWgmma) {
        if (starts_group && threadIdx.x < 2 * MT) cp_async_once<16>(st + L::kSums + 16 * threadIdx.x, sums);
      }
      csrc += tile_bytes(BITS);
    }
    cp_async_commit();
    ++issued;
    issue_slot = issue_slot == S - 1 ? 0 : issue_slot + 1;
  };

  float out[MT][NT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < NT; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) out[mt][i][e] = 0.f;
  float s[NT][2] = {}, z[NT][2] = {};
  // This lane's smem offsets: its token row g of each token tile, columns 16c .. 16c + 7 and + 8 .. + 15.
  const int x0 = L::token(g, 2 * c), x1 = L::token(g, 2 * c + 1);

  // The wgmma form at 64 tokens keeps two fragment buffers, by tile parity: a tile's fragments are made
  // while the last tile's wgmma still runs on the other. At 128 tokens (64 accumulator registers a
  // thread) the second buffer spilled and ran 7-15% slower than one buffer with the wgmma waited for at
  // once (the SM's other warpgroups keep the tensor cores busy meanwhile). Tiles in flight ahead of the
  // one read: S - 1, or with two buffers S - 2 (a warp's wgmma of tile t - 1 may still read its slot
  // while tile t's fragments are made; it is done before the warp reaches the barrier of tile t + 1,
  // after which that slot is refilled).
  constexpr bool kTwoBuffers = kWgmma && MT == 8;
  constexpr int kAhead = kTwoBuffers ? S - 2 : S - 1;
  uint32_t a_even[4][4], a_odd[4][4];  // (wgmma) the fragment buffers of even and odd tiles
  // (wgmma) per row g, g + 8 of this lane: the scale the sums are in units of; at a group's first tile,
  // the factor into the new group's units and the zero's fraction; the pair base + zi; a zero scale.
  float unit[2] = {1.f, 1.f}, ratio[2] = {1.f, 1.f}, frac[2] = {0.f, 0.f};
  uint32_t zero_pair[2] = {Native<T>::code_base, Native<T>::code_base};
  bool dead[2] = {!active, !active}, any_dead = !active, any_frac = false;  // (the last two warp-uniform)
#ifdef QATEXT_WGMMA
  if constexpr (kWgmma) {
    if (threadIdx.x < S) mbar_init(&tokens_landed[threadIdx.x]);
    __syncthreads();
  }
#endif
#pragma unroll
  for (int st = 0; st < kAhead; ++st) issue();
  for (int t = t_begin, slot = 0, group_end = (first_group + 1) * tpg; t < t_end; ++t) {
    // (wgmma reads the tokens after this wait and barrier with no proxy fence, as CUTLASS's cp.async +
    // GMMA mainloops do; fence.proxy.async compiles to a MEMBAR that would also wait for the copies still
    // in flight)
    cp_async_wait<kAhead - 1>();  // tile t landed (this thread's copies) ...
    __syncthreads();              // ... and every thread's; every warp is done with the slot that ...
    issue();                      // ... takes tile t + kAhead
    const uint8_t* st = smem + slot * L::kBytes;
    uint32_t words[NT][BITS];  // this lane's code words of each row tile
    const bool group_start = t == t_begin || t == group_end;  // a group's first tile: its scales and zeros
    if (t == group_end) group_end += tpg;
    if (active) {
      if (group_start) {
#pragma unroll
        for (int i = 0; i < NT; ++i) {
          const float4 v = *reinterpret_cast<const float4*>(st + L::qparams(warp, i, 4 * g));
          s[i][0] = v.x, s[i][1] = v.y, z[i][0] = v.z, z[i][1] = v.w;
        }
        if constexpr (kWgmma) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const float zi = fminf(fmaxf(rintf(z[0][h]), -64.f), 64.f);  // (q - zi exact in 16 bits)
            dead[h] = s[0][h] == 0.f;
            zero_pair[h] = Native<T>::pack2(Native<T>::base + zi, Native<T>::base + zi);
            frac[h] = dead[h] ? 0.f : z[0][h] - zi;
            // (2 ulp: far below the 16-bit output's rounding)
            ratio[h] = dead[h] || t == t_begin ? 1.f : __fdividef(unit[h], s[0][h]);
            unit[h] = dead[h] ? unit[h] : s[0][h];
          }
          any_dead = __any_sync(0xffffffffu, dead[0] || dead[1]);
          any_frac = __any_sync(0xffffffffu, frac[0] != 0.f || frac[1] != 0.f);
        }
      }
    }
    if (active || kWgmma) {  // (an idle warp of the wgmma form reads its slot's bytes, then takes zeros)
#pragma unroll
      for (int i = 0; i < NT; ++i) read_lane_codes<BITS>(st + L::codes(warp, i, lane), words[i]);
    }
    constexpr int kStepsPerWord = BITS == 3 ? 2 : 4 / BITS;
#ifdef QATEXT_WGMMA
    if constexpr (kWgmma) {
      // The warpgroup's 64 rows against all the block's tokens, 4 steps of 16 columns from shared memory
      // (an idle warp of the warpgroup takes part with zeros: its rows count as dead).
      const auto run = [&](uint32_t (&a)[4][4]) {
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int r = 0; r < 4; ++r) a[j][r] = 0u;
        if (active) {
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            code_pairs<T, BITS>(words[0][j / kStepsPerWord], words[0][BITS == 3 ? 2 : 0], j, a[j]);
#pragma unroll
            for (int r = 0; r < 4; ++r) a[j][r] = Native<T>::sub2(a[j][r], zero_pair[r & 1]);  // q - zi
          }
        }
        if (any_dead) {
#pragma unroll
          for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) a[j][r] = dead[r & 1] ? 0u : a[j][r];
        }
        mbar_wait(&tokens_landed[slot], ((t - t_begin) / S) & 1);  // the tile's tokens landed
        if (group_start) {  // the sums into the new group's units, less its zero's fraction times sum_k x
          wgmma_wait<0>();
          if (any_frac) {
            const float* sx = reinterpret_cast<const float*>(st + L::kSums) + 2 * c;  // tokens 2c, 2c + 1 (+ 8 mt)
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
              const float2 v = *reinterpret_cast<const float2*>(sx + 8 * mt);
#pragma unroll
              for (int e = 0; e < 4; ++e) {
                out[mt][0][e] = fmaf(out[mt][0][e], ratio[e >> 1], -frac[e >> 1] * ((e & 1) ? v.y : v.x));
              }
            }
          } else {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
              for (int e = 0; e < 4; ++e) out[mt][0][e] *= ratio[e >> 1];
          }
        }
        wgmma_fence();
        const uint32_t tokens = smem_addr(st);
#pragma unroll
        for (int j = 0; j < 4; ++j) wgmma_rs<T, MT>(out, a[j], sw128_desc(tokens + 32 * j));
        wgmma_commit();
        wgmma_wait<kTwoBuffers ? 1 : 0>();  // the last tile's wgmma is done: its buffer and its ring slot are free
      };
      if (!kTwoBuffers || (t - t_begin) % 2 == 0) {
        run(a_even);
      } else {
        run(a_odd);
      }
    }
#endif
    if (!kWgmma && active) {
      uint32_t a[NT][4][4];  // [row tile][step j]: this lane's dequantised fragments
#pragma unroll
      for (int i = 0; i < NT; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          dequant_fragment<T, BITS>(words[i][j / kStepsPerWord], words[i][BITS == 3 ? 2 : 0], j, s[i], z[i], a[i][j]);
        }
      // MP token tiles at a time (their 32 bytes a lane each): with NT row tiles, MP * NT = 2 independent
      // sums take turns, so an mma rarely waits for the one before.
      constexpr int MP = NT == 1 ? 2 : 1;
#pragma unroll
      for (int mt0 = 0; mt0 < MT; mt0 += MP) {
        uint4 xv[MP][2];
#pragma unroll
        for (int p = 0; p < MP; ++p) {
          xv[p][0] = *reinterpret_cast<const uint4*>(st + (mt0 + p) * 8 * kTileCols * 2 + x0);
          xv[p][1] = *reinterpret_cast<const uint4*>(st + (mt0 + p) * 8 * kTileCols * 2 + x1);
        }
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int p = 0; p < MP; ++p)
#pragma unroll
            for (int i = 0; i < NT; ++i) {
              const uint4& v = xv[p][j / 2];
              mma16816<T>(out[mt0 + p][i], a[i][j], (j % 2) ? v.z : v.x, (j % 2) ? v.w : v.y);
            }
      }
    }
    slot = slot == S - 1 ? 0 : slot + 1;
  }
#ifdef QATEXT_WGMMA
  if constexpr (kWgmma) {
    wgmma_wait<0>();  // (before the barrier below: with two buffers the last wgmma may still read the ring)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int e = 0; e < 4; ++e) out[mt][0][e] *= unit[e >> 1];
  }
#endif
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with the ring before a cluster's sums reuse it
#ifdef QATEXT_WGMMA
  if constexpr (kWgmma) {
    if (threadIdx.x < S) mbar_inval(&tokens_landed[threadIdx.x]);
  }
#endif
  finish_split_k<T, MT, NT>(args, out, smem, MT * NT * 512, m0, nt0, active);
}

// x for the wgmma form, one thread a token row's 64-column tile: token block b's (`block` tokens) tile t
// is one contiguous [block][64] block, token r's row at r of it, its 16-byte chunk ch at ch ^ (r % 8) of
// the row (the ring's swizzle: one bulk copy a tile fills a slot), rows past M zeros. Within a row, the
// columns in wgmma's k order: the tiled layout holds a lane's codes of column pair (c, j, h), columns
// 16c + 4j + 2h + (0, 1), at k 16j + 8h + 2c of its A fragment (so that the decode kernel reads 16
// contiguous columns of x a lane); wgmma reads B in k order, so that pair of x goes to k 16j + 8h + 2c.
template <typename T>
__device__ __forceinline__ void wgmma_token_tile(const T* __restrict__ x, T* __restrict__ out, int M, int K, int block,
                                                 int64_t i) {
  const int KT = K / kTileCols, m = int(i / KT), t = int(i % KT), r = m % block;
  uint32_t in[32] = {}, moved[32];
  if (m < M) {
    const uint4* src = reinterpret_cast<const uint4*>(x + int64_t(m) * K + int64_t(t) * kTileCols);
#pragma unroll
    for (int v = 0; v < 8; ++v) {
      const uint4 q = src[v];
      in[4 * v] = q.x, in[4 * v + 1] = q.y, in[4 * v + 2] = q.z, in[4 * v + 3] = q.w;
    }
  }
#pragma unroll
  for (int c = 0; c < 4; ++c)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h) moved[8 * j + 4 * h + c] = in[8 * c + 2 * j + h];
  uint4* dst = reinterpret_cast<uint4*>(out + ((int64_t(m / block) * KT + t) * block + r) * kTileCols);
#pragma unroll
  for (int v = 0; v < 8; ++v) dst[v ^ (r & 7)] = make_uint4(moved[4 * v], moved[4 * v + 1], moved[4 * v + 2], moved[4 * v + 3]);
}

// The token sums the wgmma form's zero fractions take: entry e = (y * groups + j) * rows + m is the sum of
// token m's x over the columns where K slice y (tiles_per_split tiles) and its j-th group meet (0 where
// they do not, or past M). One warp an entry: its lanes add 8 columns at a time in fp32, then a fixed
// xor-shuffle tree (deterministic).
template <typename T>
__device__ __forceinline__ void wgmma_token_sum(const T* __restrict__ x, float* __restrict__ sums, int M, int K,
                                                int rows, int groups, int tiles_per_group, int tiles_per_split,
                                                int64_t e) {
  const int lane = threadIdx.x & 31;
  const int m = int(e % rows), j = int(e / rows % groups), y = int(e / rows / groups);
  const int t0 = y * tiles_per_split, t1 = min(K / kTileCols, t0 + tiles_per_split);
  const int group = t0 / tiles_per_group + j;
  const int lo = max(t0, group * tiles_per_group) * kTileCols, hi = min(t1, (group + 1) * tiles_per_group) * kTileCols;
  float sum = 0.f;
  if (m < M) {
    for (int k = lo + 8 * lane; k < hi; k += 256) {
      const uint4 v = *reinterpret_cast<const uint4*>(x + int64_t(m) * K + k);
      const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 f = Native<T>::unpack2(w[i]);
        sum += f.x + f.y;
      }
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (lane == 0) sums[e] = sum;
}

// Both in one launch: the first `tile_blocks` blocks lay out the tiles (a thread a row tile), the others
// form the sums (a warp an entry).
struct WgmmaTokensArgs {
  int M, K, block, rows, groups, tiles_per_group, tiles_per_split;
  int64_t row_tiles, entries, tile_blocks;
};
template <typename T>
__global__ void __launch_bounds__(256) wgmma_tokens_kernel(const T* __restrict__ x, T* __restrict__ tiles,
                                                           float* __restrict__ sums, WgmmaTokensArgs a) {
  if (blockIdx.x < a.tile_blocks) {
    const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i < a.row_tiles) wgmma_token_tile(x, tiles, a.M, a.K, a.block, i);
    return;
  }
  const int64_t e = ((int64_t(blockIdx.x) - a.tile_blocks) * blockDim.x + threadIdx.x) / 32;
  if (e < a.entries) wgmma_token_sum(x, sums, a.M, a.K, a.rows, a.groups, a.tiles_per_group, a.tiles_per_split, e);
}

// Kernel configuration: token tiles MT, row tiles per warp NT, ring stages S; the staged kernel or
// the decode kernel.
struct Config {
  int mt, nt, stages;
  bool staged;
};
// The most row tiles per warp allowed that divide N (4 with one or four token tiles; two token tiles'
// 4-row-tile sums would take ~200 registers, where 32-token blocks sum in scale units). Four token tiles
// (32 tokens a block) decode each weight fragment once for all 32, where two would decode it twice, and
// each token fragment read from shared memory feeds every row tile; their ring has 2, 3 or 4 stages (8
// would not fit in shared memory; 4 fill 147 KB of a block's rings at one row tile, so one block a SM,
// where 3 let two share it; at two row tiles 3 take 123 KB and 2 take 82; four row tiles, at 217-241
// registers one block a SM anyway, take 3 or 4, 147 or 197 KB, and read 2 as 3). SwiGLU takes at least
// 2 (a gate tile and its up tile).
// Staged: 32 tokens a block up to 32, else 64, and with one row tile a warp 128 beyond 64 (each weight
// fragment meets all of a block's tokens; mma.sync's 128 would spill its sums, wgmma's (sm_90) take 64);
// 2 row tiles a warp where allowed and asked for (each token read from shared memory feeds both).
Config widest_config(int64_t M, int64_t N, DecodeTuning tuning, bool swiglu) {
  if (tuning.staged) {
    const int nt = tuning.max_row_tiles >= 2 && N % (2 * kTileRows) == 0 ? 2 : 1;
    return {M <= 32 ? 4 : M <= 64 || nt == 2 || !is_sm90() ? 8 : 16, nt, 4, true};
  }
  const int mt = decode_token_tiles(M);
  int nt = tuning.max_row_tiles >= 4 && mt != 2 ? 4 : tuning.max_row_tiles >= 2 || swiglu ? 2 : 1;
  while (nt > 1 && N % (nt * kTileRows) != 0) nt /= 2;
  const int stages = mt < 4 ? (tuning.stages >= 8 ? 8 : 4) : std::clamp(tuning.stages, 2, 4);
  return {mt, nt, stages, false};
}

template <bool STAGED, int BITS, int MT, int NT, int S>
constexpr int smem_bytes() {
  if constexpr (STAGED) return staged_smem_bytes<BITS, MT, NT, S>();
  return decode_smem_bytes<BITS, MT, NT, S>();
}

template <typename T, bool STAGED, int BITS, int MT, int NT, int S, bool GROUPED = false>
const void* prepared_kernel() {
  static std::atomic<int> prepared[kMaxDevices];
  constexpr int smem = smem_bytes<STAGED, BITS, MT, NT, S>();
  if constexpr (GROUPED) {
    static_assert(!STAGED, "the grouped launch takes the decode kernel");
    opt_in_smem(prepared, grouped_decode_gemm_kernel<T, BITS, MT, NT, S>, smem, "grouped_decode_gemm");
    return reinterpret_cast<const void*>(grouped_decode_gemm_kernel<T, BITS, MT, NT, S>);
  } else if constexpr (STAGED) {
    opt_in_smem(prepared, staged_gemm_kernel<T, BITS, MT, NT, S>, smem, "staged_gemm");
    return reinterpret_cast<const void*>(staged_gemm_kernel<T, BITS, MT, NT, S>);
  } else {
    opt_in_smem(prepared, decode_gemm_kernel<T, BITS, MT, NT, S>, smem, "decode_gemm");
    return reinterpret_cast<const void*>(decode_gemm_kernel<T, BITS, MT, NT, S>);
  }
}

// Blocks of one instance resident per SM (the bf16 instances stand for fp16: same registers).
template <bool STAGED, int BITS, int MT, int NT, int S>
int blocks_per_sm() {
  static std::atomic<int> memo[kMaxDevices];
  return per_device(memo, [] {
    int per_sm = 0;
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, prepared_kernel<c10::BFloat16, STAGED, BITS, MT, NT, S>(),
                                                  kDecodeThreads, smem_bytes<STAGED, BITS, MT, NT, S>());
    return std::max(per_sm, 1);
  });
}

// f.template operator()<STAGED, BITS, MT, NT, S>() for the kernel instance of `bits` and cfg.
template <typename F>
auto with_instance(int bits, Config cfg, F&& f) {
  const auto with_stages = [&]<int BITS, int MT, int NT>() {
    return cfg.stages == 8 ? f.template operator()<false, BITS, MT, NT, 8>()
                           : f.template operator()<false, BITS, MT, NT, 4>();
  };
  return with_bits(bits, [&]<int BITS>() {
    if (cfg.staged) {
      if (cfg.mt == 16) return f.template operator()<true, BITS, 16, 1, 4>();
      if (cfg.mt == 8) {
        return cfg.nt == 2 ? f.template operator()<true, BITS, 8, 2, 4>() : f.template operator()<true, BITS, 8, 1, 4>();
      }
      return cfg.nt == 2 ? f.template operator()<true, BITS, 4, 2, 4>() : f.template operator()<true, BITS, 4, 1, 4>();
    }
    if (cfg.mt == 1 && cfg.nt == 4) return with_stages.template operator()<BITS, 1, 4>();
    if (cfg.mt == 1) {
      return cfg.nt == 2 ? with_stages.template operator()<BITS, 1, 2>() : with_stages.template operator()<BITS, 1, 1>();
    }
    if (cfg.mt == 2) {
      return cfg.nt == 2 ? with_stages.template operator()<BITS, 2, 2>() : with_stages.template operator()<BITS, 2, 1>();
    }
    // 32-token blocks: rings of 2, 3 or 4 stages (widest_config), 2 read as 3 at 4 row tiles a warp.
    const auto with_ring = [&]<int S>() {
      if (cfg.nt == 4) return f.template operator()<false, BITS, 4, 4, S == 2 ? 3 : S>();
      return cfg.nt == 2 ? f.template operator()<false, BITS, 4, 2, S>() : f.template operator()<false, BITS, 4, 1, S>();
    };
    if (cfg.stages == 2) return with_ring.template operator()<2>();
    return cfg.stages == 3 ? with_ring.template operator()<3>() : with_ring.template operator()<4>();
  });
}

int smem_for(Config cfg, int bits) {
  return with_instance(
      bits, cfg, []<bool STAGED, int BITS, int MT, int NT, int S>() { return smem_bytes<STAGED, BITS, MT, NT, S>(); });
}

int64_t resident_blocks(Config cfg, int bits) {
  return int64_t(with_instance(bits, cfg,
                               []<bool STAGED, int BITS, int MT, int NT, int S>() {
                                 return blocks_per_sm<STAGED, BITS, MT, NT, S>();
                               })) *
         sm_count();
}

// Output features of a block: its 8 warps' row tiles, or (warp split) the row tiles its warps share.
int64_t block_cols(Config cfg, bool warp_split) { return (warp_split ? kTileRows : kColsPerBlock) * cfg.nt; }

int64_t column_blocks(int64_t M, int64_t N, Config cfg, bool warp_split = false) {
  const int64_t cols = block_cols(cfg, warp_split), tokens = 8 * cfg.mt;
  return (N + cols - 1) / cols * ((M + tokens - 1) / tokens);
}

// Most K slices of at least min_slice_tiles tiles.
int64_t most_splits(GroupShape shape, DecodeTuning tuning) {
  return std::max<int64_t>(1, shape.K / kTileCols / std::max<int64_t>(1, tuning.min_slice_tiles));
}

// 4 row tiles per warp put twice the bytes in flight per warp, but halve the column blocks: taken
// only where the K slices still fill one wave of resident blocks (measured: W2 on 28672 x 8192 and
// 8192 x 28672 gain 6-10%; 11008 x 4096 and 4096 x 11008, which it would leave part-empty, lose 10%).
// The device's shared memory per block bounds the instance: a shallower ring first, then fewer row
// tiles, then fewer token tiles (more token blocks). Every instance fits on sm_90 and sm_80; GPUs with
// ~100 KB a block (sm_86, sm_89) take smaller ones.
Config fit_shared_memory(Config cfg, int bits) {
  while (smem_for(cfg, bits) > max_block_smem()) {
    if (cfg.stages == 8) {
      cfg.stages = 4;
    } else if (cfg.stages > 2 && cfg.mt == 4 && !cfg.staged) {
      --cfg.stages;
    } else if (cfg.nt > 1) {
      cfg.nt /= 2;
    } else if (cfg.mt > (cfg.staged ? 4 : 1)) {
      cfg.mt /= 2;
    } else {
      break;
    }
  }
  return cfg;
}

Config config_for(int64_t M, GroupShape shape, DecodeTuning tuning, bool swiglu = false) {
  Config cfg = fit_shared_memory(widest_config(M, shape.N, tuning, swiglu), shape.bits);
  if (tuning.warp_split) {  // the grid is its column blocks: fewer row tiles a block until they cover the SMs
    while (cfg.nt > (swiglu ? 2 : 1) && column_blocks(M, shape.N, cfg, true) < sm_count()) cfg.nt /= 2;
  } else if (cfg.nt == 4 &&
             column_blocks(M, shape.N, cfg) * most_splits(shape, tuning) < resident_blocks(cfg, shape.bits)) {
    cfg.nt = 2;
  }
  return cfg;
}

// A launch of the decode kernel over `grid`, the K slices (gridDim.y) of each column tile one
// thread-block cluster when `cluster` (config points at attr: not copyable).
struct DecodeLaunch {
  cudaLaunchAttribute attr{};
  cudaLaunchConfig_t config{};
  DecodeLaunch(dim3 grid, int smem, cudaStream_t stream, bool cluster) {
    attr.id = cudaLaunchAttributeClusterDimension;
    attr.val.clusterDim.x = 1, attr.val.clusterDim.y = grid.y, attr.val.clusterDim.z = 1;
    config.gridDim = grid;
    config.blockDim = dim3(kDecodeThreads);
    config.dynamicSmemBytes = size_t(smem);
    config.stream = stream;
    config.attrs = &attr;
    config.numAttrs = cluster ? 1 : 0;
  }
  DecodeLaunch(const DecodeLaunch&) = delete;
  DecodeLaunch& operator=(const DecodeLaunch&) = delete;
};

// Clusters of `splits` blocks of an instance that can be resident at once (-1: none, or before sm_90).
template <bool STAGED, int BITS, int MT, int NT, int S>
int resident_clusters(int splits) {
  static std::atomic<int> memo[kMaxClusterSplits + 1][kMaxDevices];
  return per_device(memo[splits], [splits] {
    int device = 0, major = 0, clusters = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    if (major < 9) return -1;
    const DecodeLaunch launch(dim3(1, unsigned(splits), 1), smem_bytes<STAGED, BITS, MT, NT, S>(), nullptr, true);
    if (cudaOccupancyMaxActiveClusters(&clusters, prepared_kernel<c10::BFloat16, STAGED, BITS, MT, NT, S>(),
                                       &launch.config) != cudaSuccess) {
      cudaGetLastError();
      return -1;
    }
    return clusters > 0 ? clusters : -1;  // (-1: none; 0 would read as "not yet known")
  });
}

// Whether the K slices of each column tile form a cluster: asked for, 2 to 8 slices, and every
// cluster of the grid resident at once (a cluster waits for a whole group of free SMs, so a second
// wave of them would serialise).
bool use_cluster(int64_t M, GroupShape shape, int64_t splits, Config cfg, DecodeTuning tuning) {
  if (!tuning.cluster_reduce || tuning.warp_split || splits < 2 || splits > kMaxClusterSplits) return false;
  const int resident = with_instance(shape.bits, cfg, [splits]<bool STAGED, int BITS, int MT, int NT, int S>() {
    return resident_clusters<STAGED, BITS, MT, NT, S>(int(splits));
  });
  return column_blocks(M, shape.N, cfg) <= resident;
}

}  // namespace

int64_t wgmma_block_tokens(int64_t M, GroupShape shape, DecodeTuning tuning) {
  if (!tuning.staged || !is_sm90()) return 0;
  const Config cfg = config_for(M, shape, tuning);
  return staged_wgmma_form(cfg.mt, cfg.nt) ? 8 * cfg.mt : 0;  // (as the kernel's kWgmma)
}

namespace {
struct SumsShape {
  int groups, rows, tiles_per_group, tiles_per_split;
};
SumsShape sums_shape(int64_t M, GroupShape shape, int64_t splits) {
  const int64_t tiles = shape.K / kTileCols, per_split = (tiles + splits - 1) / splits;
  const int64_t per_group = shape.group_size / kTileCols, block = 16 * 8;  // (the most tokens a block)
  return {int((per_split + per_group - 1) / per_group + 1), int((M + block - 1) / block * block), int(per_group),
          int(per_split)};
}
}  // namespace

int64_t wgmma_sums_size(int64_t M, GroupShape shape, int64_t splits) {
  const SumsShape s = sums_shape(M, shape, splits);
  return splits * s.groups * s.rows;
}

int64_t wgmma_tiles_size(int64_t M, int64_t K, int64_t block) { return (M + block - 1) / block * block * K; }

template <typename T>
void wgmma_tokens(const T* x, T* tiles, float* sums, int64_t M, GroupShape shape, int64_t splits, int64_t block,
                  cudaStream_t stream) {
  const int64_t row_tiles = wgmma_tiles_size(M, shape.K, block) / kTileCols;
  if (row_tiles == 0) return;
  constexpr int kThreads = 256;
  const SumsShape s = sums_shape(M, shape, splits);
  const int64_t entries = wgmma_sums_size(M, shape, splits), tile_blocks = (row_tiles + kThreads - 1) / kThreads;
  const WgmmaTokensArgs args{int(M), int(shape.K), int(block), s.rows, s.groups, s.tiles_per_group, s.tiles_per_split,
                             row_tiles, entries, tile_blocks};
  const int64_t sum_blocks = (entries + kThreads / 32 - 1) / (kThreads / 32);
  wgmma_tokens_kernel<T><<<unsigned(tile_blocks + sum_blocks), kThreads, 0, stream>>>(x, tiles, sums, args);
  check_launch("wgmma_tokens");
}
template void wgmma_tokens<c10::BFloat16>(const c10::BFloat16*, c10::BFloat16*, float*, int64_t, GroupShape, int64_t,
                                          int64_t, cudaStream_t);
template void wgmma_tokens<c10::Half>(const c10::Half*, c10::Half*, float*, int64_t, GroupShape, int64_t, int64_t,
                                      cudaStream_t);

bool decode_gemm_supported(GroupShape shape) {
  const bool group_ok = shape.group_size % kTileCols == 0 || shape.group_size == shape.K;
  return tile_layout_bits_ok(shape.bits) && shape.N % kTileRows == 0 && shape.K % kTileCols == 0 && shape.K > 0 &&
         group_ok && shape.N * shape.K < (int64_t(1) << 31);
}

bool decode_gemm_swiglu_supported(int64_t M, GroupShape shape, DecodeTuning tuning) {
  tuning.warp_split = true;
  return decode_gemm_supported(shape) && shape.N % (2 * kTileRows) == 0 && config_for(M, shape, tuning, true).nt >= 2;
}

int64_t decode_gemm_counters(int64_t M, GroupShape shape, DecodeTuning tuning) {
  return column_blocks(M, shape.N, config_for(M, shape, tuning));
}

bool decode_gemm_cluster(int64_t M, GroupShape shape, int64_t splits, DecodeTuning tuning) {
  return use_cluster(M, shape, splits, config_for(M, shape, tuning), tuning);
}

int64_t decode_gemm_splits(int64_t M, GroupShape shape, DecodeTuning tuning) {
  // As many K slices as fill one wave of resident blocks (a second, partial wave would double the
  // time), each at least min_slice_tiles long; one with warp split (the block's warps split K).
  if (tuning.warp_split) return 1;
  const Config cfg = config_for(M, shape, tuning);
  const int64_t tiles = shape.K / kTileCols, blocks = column_blocks(M, shape.N, cfg);
  const int64_t want = std::clamp<int64_t>(resident_blocks(cfg, shape.bits) / blocks, 1, most_splits(shape, tuning));
  const int64_t per_split = (tiles + want - 1) / want;
  return (tiles + per_split - 1) / per_split;
}

int* decode_gemm_counter_workspace(int64_t count, cudaStream_t stream) {
  // Raw device memory, outside the caching allocator and its graph pools, kept for the process (a
  // stream's buffer is reused by every later call on it; the kernel leaves it zero). Calls on one
  // stream run in order, so they never use it at once. A graph keeps the buffer of the stream it was
  // captured on: replaying it on another stream at the same time as decode calls on that one would
  // share the counters (one generate loop per graph, as torch.compile runs them, never does).
  constexpr int64_t kCapacity = 16384;
  static std::mutex mutex;
  static std::map<std::pair<int, cudaStream_t>, int*> buffers;
  if (count > kCapacity) return nullptr;
  int device = 0;
  cudaGetDevice(&device);
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(device, stream);
  if (const auto it = buffers.find(key); it != buffers.end()) return it->second;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &capture) != cudaSuccess || capture != cudaStreamCaptureStatusNone) return nullptr;
  int* buffer = nullptr;
  if (cudaMalloc(&buffer, kCapacity * sizeof(int)) != cudaSuccess) {
    cudaGetLastError();  // clear it: the caller falls back to a zeroed tensor
    return nullptr;
  }
  if (cudaMemsetAsync(buffer, 0, kCapacity * sizeof(int), stream) != cudaSuccess) {
    cudaGetLastError();
    cudaFree(buffer);
    return nullptr;
  }
  buffers.emplace(key, buffer);
  return buffer;
}

namespace {

// The arguments every decode launch sets: the operands, shape, K slices (warp split: one a warp) and epilogue.
DecodeArgs decode_args(const void* x, const uint8_t* tiled, const float* scale, const float* zero, void* out,
                       int64_t M, GroupShape shape, int64_t splits, bool warp_split, bool swiglu) {
  DecodeArgs args{};
  args.x = x;
  args.tiled = tiled;
  args.scale = scale;
  args.zero = zero;
  args.out = out;
  args.M = int(M);
  args.N = int(shape.N);
  args.K = int(shape.K);
  args.G = int(shape.groups());
  args.tiles_per_group = int(shape.group_size / kTileCols);
  args.warp_split = warp_split ? 1 : 0;
  args.swiglu = swiglu ? 1 : 0;
  const int64_t tiles = shape.K / kTileCols, slices = warp_split ? kWarps : splits;
  args.tiles_per_split = int((tiles + slices - 1) / slices);
  args.splits = int(splits);
  return args;
}

}  // namespace

template <typename T>
void decode_gemm(const T* x, const T* x_wgmma, const float* x_sums, const uint8_t* tiled, const float* scale,
                 const float* zero, const T* bias, T* out, float* partial, int* counters, int64_t M, GroupShape shape,
                 int64_t splits, DecodeTuning tuning, bool swiglu, cudaStream_t stream) {
  if (M == 0 || shape.N == 0) return;
  if ((x_wgmma == nullptr || x_sums == nullptr) && wgmma_block_tokens(M, shape, tuning) > 0) {
    throw std::runtime_error("qatext: decode_gemm: this launch reads the tokens in wgmma's order (wgmma_tokens)");
  }
  if (swiglu && (splits != 1 || tuning.staged || !decode_gemm_swiglu_supported(M, shape, tuning))) {
    throw std::runtime_error("qatext: decode_gemm: SwiGLU needs warp split and two row tiles a block");
  }
  if (tuning.staged && tuning.warp_split) {
    throw std::runtime_error("qatext: decode_gemm: the staged kernel splits K across blocks, not warps");
  }
  tuning.warp_split = tuning.warp_split || swiglu;
  DecodeArgs args = decode_args(x, tiled, scale, zero, out, M, shape, splits, tuning.warp_split, swiglu);
  args.x_wgmma = x_wgmma;
  args.x_sums = x_sums;
  args.bias = bias;
  args.partial = partial;
  args.counters = counters;
  const SumsShape sums = sums_shape(M, shape, splits);
  args.sums_groups = sums.groups;
  args.sums_rows = sums.rows;
  const Config cfg = config_for(M, shape, tuning, swiglu);
  args.cluster = use_cluster(M, shape, splits, cfg, tuning) ? 1 : 0;
  const int64_t cols = block_cols(cfg, tuning.warp_split), tokens = 8 * cfg.mt;
  const dim3 grid(unsigned((shape.N + cols - 1) / cols), unsigned(splits), unsigned((M + tokens - 1) / tokens));
  const void* kernel = with_instance(shape.bits, cfg, []<bool STAGED, int BITS, int MT, int NT, int S>() {
    return prepared_kernel<T, STAGED, BITS, MT, NT, S>();
  });
  void* params[] = {&args};
  const DecodeLaunch launch(grid, smem_for(cfg, shape.bits), stream, args.cluster != 0);
  const cudaError_t err = cudaLaunchKernelExC(&launch.config, kernel, params);
  if (err != cudaSuccess) throw std::runtime_error(std::string("qatext: decode_gemm launch: ") + cudaGetErrorString(err));
  check_launch("decode_gemm");
}

namespace {

// Grouped experts: items[0 .. n_items) = (expert, first row) of each `rows`-token tile of each expert's rows
// (offs[e] the rows of experts 0..e; tiles in expert order), (-1, 0) past the last; and the rows routed past
// the list (from offs[experts - 1] to S) of out [S, width] set to zero. One block (experts <= 1024).
template <typename T>
__global__ void __launch_bounds__(1024) expert_items_kernel(const int* offs, int experts, int rows, int2* items,
                                                            int n_items, T* out, int64_t S, int width) {
  __shared__ int ends[1024];
  const int e = threadIdx.x;
  const int first = e == 0 || e >= experts ? 0 : min(max(offs[e - 1], 0), int(S));
  const int last = e >= experts ? first : min(max(offs[e], first), int(S));
  const int tiles = (last - first + rows - 1) / rows;
  ends[e] = tiles;
  __syncthreads();
  for (int d = 1; d < 1024; d *= 2) {  // inclusive scan of the tiles (Hillis-Steele)
    const int v = e >= d ? ends[e - d] : 0;
    __syncthreads();
    ends[e] += v;
    __syncthreads();
  }
  const int start = ends[e] - tiles, total = ends[1023];
  for (int j = 0; j < tiles && start + j < n_items; ++j) items[start + j] = make_int2(e, first + j * rows);
  for (int i = total + e; i < n_items; i += 1024) items[i] = make_int2(-1, 0);
  const int64_t used = min(max(offs[experts - 1], 0), int(S));
  for (int64_t i = used * width + e; i < S * width; i += 1024) out[i] = T(0.f);
}

// Token tiles of `rows` the experts' S rows can make at most: the sum over experts of ceil(count / rows).
int64_t items_bound(int64_t S, int64_t experts, int64_t rows) { return (S + rows - 1) / rows + std::min(S, experts); }

// The grouped launch's configuration: token tiles for `expert_tokens` (the tokens an expert is expected to
// have), warp split, and fewer row tiles a block while the column blocks of `busy` experts leave SMs empty.
Config grouped_config(int64_t expert_tokens, int64_t busy, GroupShape shape, DecodeTuning tuning, bool swiglu) {
  tuning.warp_split = true;
  tuning.staged = false;
  Config cfg = fit_shared_memory(widest_config(expert_tokens, shape.N, tuning, swiglu), shape.bits);
  while (cfg.nt > (swiglu ? 2 : 1) && column_blocks(expert_tokens, shape.N, cfg, true) * busy < sm_count()) cfg.nt /= 2;
  return cfg;
}

}  // namespace

int64_t grouped_decode_items(int64_t S, int64_t experts) { return items_bound(S, experts, 8); }  // (the shortest tile)

bool grouped_decode_supported(int64_t S, int64_t experts, int64_t expert_tokens, GroupShape shape, DecodeTuning tuning,
                              bool swiglu) {
  if (!decode_gemm_supported(shape) || experts < 1 || experts > 1024 || grouped_decode_items(S, experts) > 65535 ||
      S >= (int64_t(1) << 31) / std::max<int64_t>(shape.K, shape.N)) {
    return false;
  }
  return !swiglu || (shape.N % (2 * kTileRows) == 0 &&
                     grouped_config(expert_tokens, std::min(experts, S), shape, tuning, true).nt >= 2);
}

template <typename T>
void grouped_decode_gemm(const T* x, const uint8_t* tiled, const float* scale, const float* zero, const int* offs,
                         int* items, T* out, int64_t S, int64_t experts, int64_t expert_tokens, GroupShape shape,
                         DecodeTuning tuning, bool swiglu, cudaStream_t stream) {
  if (S == 0 || shape.N == 0) return;
  if (!grouped_decode_supported(S, experts, expert_tokens, shape, tuning, swiglu)) {
    throw std::runtime_error("qatext: grouped_decode_gemm: this shape does not take the grouped decode kernel");
  }
  const Config cfg = grouped_config(expert_tokens, std::min(experts, S), shape, tuning, swiglu);
  const int64_t rows = 8 * cfg.mt, n_items = items_bound(S, experts, rows);
  const int width = int(swiglu ? shape.N / 2 : shape.N);
  expert_items_kernel<T><<<1, 1024, 0, stream>>>(offs, int(experts), int(rows), reinterpret_cast<int2*>(items),
                                                  int(n_items), out, S, width);
  check_launch("expert_items");
  GroupedArgs args{decode_args(x, tiled, scale, zero, out, S, shape, 1, true, swiglu),
                   reinterpret_cast<const int2*>(items), offs,
                   shape.N / kTileRows * (shape.K / kTileCols) * tile_bytes(shape.bits)};
  const int64_t cols = block_cols(cfg, true);
  const dim3 grid(unsigned((shape.N + cols - 1) / cols), 1u, unsigned(n_items));
  const void* kernel = with_instance(shape.bits, cfg, []<bool STAGED, int BITS, int MT, int NT, int S_>() -> const void* {
    if constexpr (STAGED) {
      return nullptr;  // (grouped_config never asks for the staged kernel)
    } else {
      return prepared_kernel<T, false, BITS, MT, NT, S_, true>();
    }
  });
  void* params[] = {&args};
  const DecodeLaunch launch(grid, smem_for(cfg, shape.bits), stream, false);
  const cudaError_t err = cudaLaunchKernelExC(&launch.config, kernel, params);
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("qatext: grouped_decode_gemm launch: ") + cudaGetErrorString(err));
  }
  check_launch("grouped_decode_gemm");
}

template void grouped_decode_gemm<c10::BFloat16>(const c10::BFloat16*, const uint8_t*, const float*, const float*,
                                                 const int*, int*, c10::BFloat16*, int64_t, int64_t, int64_t,
                                                 GroupShape, DecodeTuning, bool, cudaStream_t);
template void grouped_decode_gemm<c10::Half>(const c10::Half*, const uint8_t*, const float*, const float*, const int*,
                                             int*, c10::Half*, int64_t, int64_t, int64_t, GroupShape, DecodeTuning, bool,
                                             cudaStream_t);

template void decode_gemm<c10::BFloat16>(const c10::BFloat16*, const c10::BFloat16*, const float*, const uint8_t*,
                                         const float*, const float*, const c10::BFloat16*, c10::BFloat16*, float*, int*,
                                         int64_t, GroupShape, int64_t, DecodeTuning, bool, cudaStream_t);
template void decode_gemm<c10::Half>(const c10::Half*, const c10::Half*, const float*, const uint8_t*, const float*,
                                     const float*, const c10::Half*, c10::Half*, float*, int*, int64_t, GroupShape,
                                     int64_t, DecodeTuning, bool, cudaStream_t);

}  // namespace qatext::cuda
