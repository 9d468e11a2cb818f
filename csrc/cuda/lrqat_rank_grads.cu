// LR-QAT's adapter gradients from dU in one read:  dA = dU B^T [N, r]  and  dB = A^T dU [r, K],  each expert
// with its own A rows and B for stacked experts (dU and A [E * N, ..], B [E, r, K]).
//
// As two GEMMs (cuBLAS) each reads dU, 2 bytes an element for ~2 r FLOPs: both are bound by that read. Here
// a block streams its tile of dU (row chunks x column chunks of 64 x 128) through shared memory once, by
// cp.async three chunks deep, and feeds both products from each chunk on the tensor cores (mma.sync
// m16n8k16): dU as the A operand against the block's columns of B for dA, and dU transposed by
// ldmatrix.trans against the chunk's rows of A for dB^T = dU^T A. A block's fp32 sums are partials, one
// per column block (dA) and row block (dB); a second small kernel adds them in a fixed order and rounds
// once, so every run gives the same bits.
#include "cuda/common.cuh"
#include "cuda/kernels.h"
#include "cuda/mma.cuh"
#include "cuda/ptx.cuh"

namespace qatext::cuda {
namespace {

constexpr int kChunkRows = 64, kChunkCols = 128, kRankThreads = 256, kStages = 3;

// Shared-memory strides in elements. dU chunks are [64][128] with 16-byte unit u of row r at unit u ^ (r & 7)
// (ldmatrix's eight rows of one unit fall in eight distinct bank groups); A chunks [64][R] and the block's B
// [R][CC * 128] rows are padded by 16 bytes for the same reason.
template <int R>
constexpr int a_stride() {
  return R + 8;
}
template <int CC>
constexpr int b_stride() {
  return CC * kChunkCols + 8;
}
template <int R>
constexpr int stage_bytes() {
  return (kChunkRows * kChunkCols + kChunkRows * a_stride<R>()) * 2;
}
template <int R, int CC>
constexpr int smem_bytes() {
  return R * b_stride<CC>() * 2 + kStages * stage_bytes<R>();
}
// Column chunks a block takes: its B rows stay in shared memory, so fewer at rank 64.
constexpr int column_chunks(int rank_padded) { return rank_padded == 64 ? 2 : 4; }

__device__ __forceinline__ int du_offset(int r, int unit) { return r * kChunkCols + ((unit ^ (r & 7)) << 3); }

template <typename T>
struct RankGradArgs {
  const T* grad_u;  // [E * N, K]
  const T* a;       // [E * N, R], ranks past the adapter's zero
  const T* b;       // [E, rank, K]
  float* part_a;    // [col_blocks, E * N, R]
  float* part_b;    // [E, row_blocks, R, K]
  int64_t rows;     // E * N
  int N, K, rank;   // N: an expert's rows
  // A block's row chunks (an expert's last block may have fewer); an expert's row and column blocks.
  int row_chunks, row_blocks, col_blocks;
};

// Block (e, rb, cb), cb fastest: row chunks [rb * row_chunks, ..) of expert e, column chunks [cb * CC, ..).
// Warp w: for dA rows 16 (w % 4) .. of each row chunk and ranks 8 RK (w / 4) ..; for dB columns 16 w .. of
// each column chunk and every rank.
template <typename T, int RK, int CC>
__global__ void __launch_bounds__(kRankThreads, 2) rank_grads_kernel(RankGradArgs<T> args) {
  constexpr int R = 16 * RK, NT = 2 * RK;  // NT: 8-rank tiles
  extern __shared__ __align__(16) unsigned char smem[];
  T* bs = reinterpret_cast<T*>(smem);
  unsigned char* stages = smem + R * b_stride<CC>() * 2;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, q = lane & 3;
  const int cb = int(blockIdx.x % unsigned(args.col_blocks)), rest = int(blockIdx.x / unsigned(args.col_blocks));
  const int rb = rest % args.row_blocks, e = rest / args.row_blocks;
  const int chunk0 = rb * args.row_chunks, nrc = min(args.row_chunks, args.N / kChunkRows - chunk0);
  const int ncc = min(CC, args.K / kChunkCols - cb * CC), col0 = cb * CC * kChunkCols;
  const int64_t row0 = int64_t(e) * args.N + int64_t(chunk0) * kChunkRows;

  {  // B's rows at the block's columns (ranks past the adapter's as zeros): part of the first stage's group
    const T* b = args.b + int64_t(e) * args.rank * args.K;
    const int units = ncc * kChunkCols / 8;
    for (int i = threadIdx.x; i < R * units; i += kRankThreads) {
      const int r = i / units, u = i % units;
      const bool real = r < args.rank;
      cp_async16_zfill(bs + r * b_stride<CC>() + 8 * u, real ? b + int64_t(r) * args.K + col0 + 8 * u : b,
                       real ? 16 : 0);
    }
  }
  const int iterations = nrc * ncc;
  const auto load = [&](int it) {
    unsigned char* st = stages + (it % kStages) * stage_bytes<R>();
    T* du = reinterpret_cast<T*>(st);
    T* as = du + kChunkRows * kChunkCols;
    const int i = it / ncc, j = it % ncc;
    const int64_t r0 = row0 + int64_t(i) * kChunkRows;
    const T* src = args.grad_u + r0 * args.K + col0 + j * kChunkCols;
#pragma unroll
    for (int c = threadIdx.x; c < kChunkRows * 16; c += kRankThreads) {
      cp_async_once<16>(du + du_offset(c >> 4, c & 15), src + int64_t(c >> 4) * args.K + 8 * (c & 15));
    }
    const T* a = args.a + r0 * R;
#pragma unroll
    for (int c = threadIdx.x; c < kChunkRows * R / 8; c += kRankThreads) {
      cp_async_once<16>(as + c / (R / 8) * a_stride<R>() + 8 * (c % (R / 8)), a + 8 * c);
    }
  };
  load(0);
  cp_async_commit();
  if (iterations > 1) load(1);
  cp_async_commit();

  const int mt = warp & 3, nh = warp >> 2;
  float acc_b[CC][NT][4];
#pragma unroll
  for (int j = 0; j < CC; ++j) {
#pragma unroll
    for (int n = 0; n < NT; ++n) acc_b[j][n][0] = acc_b[j][n][1] = acc_b[j][n][2] = acc_b[j][n][3] = 0.f;
  }
  for (int i = 0; i < nrc; ++i) {
    float acc_a[RK][4];
#pragma unroll
    for (int n = 0; n < RK; ++n) acc_a[n][0] = acc_a[n][1] = acc_a[n][2] = acc_a[n][3] = 0.f;
#pragma unroll
    for (int j = 0; j < CC; ++j) {
      if (j >= ncc) break;  // block-uniform
      const int it = i * ncc + j;
      cp_async_wait<1>();
      __syncthreads();  // chunk it landed for every thread; chunk it - 1's stage is free
      if (it + 2 < iterations) load(it + 2);
      cp_async_commit();
      const T* du = reinterpret_cast<const T*>(stages + (it % kStages) * stage_bytes<R>());
      const T* as = du + kChunkRows * kChunkCols;
      // dA += dU [16 rows x 128] B^T [128 x 8 RK]
#pragma unroll
      for (int ks = 0; ks < kChunkCols / 16; ++ks) {
        uint32_t af[4];
        ldmatrix_x4(af, du + du_offset(16 * mt + (lane & 15), 2 * ks + (lane >> 4)));
        const T* brow =
            bs + (8 * RK * nh + (lane & 7)) * b_stride<CC>() + j * kChunkCols + 16 * ks + 8 * ((lane >> 3) & 1);
        if constexpr (RK == 1) {
          uint32_t bf[2];
          ldmatrix_x2(bf, brow);
          mma16816<T>(acc_a[0], af, bf[0], bf[1]);
        } else {
#pragma unroll
          for (int n = 0; n < RK; n += 2) {
            uint32_t bf[4];
            ldmatrix_x4(bf, brow + (8 * n + 8 * (lane >> 4)) * b_stride<CC>());
            mma16816<T>(acc_a[n], af, bf[0], bf[1]);
            mma16816<T>(acc_a[n + 1], af, bf[2], bf[3]);
          }
        }
      }
      // dB^T += dU^T [16 columns x 64 rows] A [64 x R]
#pragma unroll
      for (int ks = 0; ks < kChunkRows / 16; ++ks) {
        uint32_t af[4];
        ldmatrix_x4_trans(af, du + du_offset(16 * ks + 8 * (lane >> 4) + (lane & 7), 2 * warp + ((lane >> 3) & 1)));
#pragma unroll
        for (int n = 0; n < NT; n += 2) {
          uint32_t bf[4];
          const int row = 16 * ks + 8 * ((lane >> 3) & 1) + (lane & 7);
          ldmatrix_x4_trans(bf, as + row * a_stride<R>() + 8 * (n + (lane >> 4)));
          mma16816<T>(acc_b[j][n], af, bf[0], bf[1]);
          mma16816<T>(acc_b[j][n + 1], af, bf[2], bf[3]);
        }
      }
    }
    // This row chunk's dA over the block's columns: accumulator (row g / g + 8, ranks 2q, 2q + 1).
    const int64_t row = row0 + int64_t(i) * kChunkRows + 16 * mt + g;
#pragma unroll
    for (int n = 0; n < RK; ++n) {
      float* pa = args.part_a + (int64_t(cb) * args.rows + row) * R + 8 * RK * nh + 8 * n + 2 * q;
      *reinterpret_cast<float2*>(pa) = make_float2(acc_a[n][0], acc_a[n][1]);
      *reinterpret_cast<float2*>(pa + 8 * R) = make_float2(acc_a[n][2], acc_a[n][3]);
    }
  }
  // The block's dB over its rows: accumulator (column g / g + 8, ranks 2q, 2q + 1).
  float* pb = args.part_b + (int64_t(e) * args.row_blocks + rb) * R * args.K;
#pragma unroll
  for (int j = 0; j < CC; ++j) {
    if (j >= ncc) break;
    const int col = col0 + j * kChunkCols + 16 * warp + g;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      float* p = pb + int64_t(8 * n + 2 * q) * args.K + col;
      p[0] = acc_b[j][n][0];
      p[args.K] = acc_b[j][n][1];
      p[8] = acc_b[j][n][2];
      p[args.K + 8] = acc_b[j][n][3];
    }
  }
}

// grad_a [E * N, rank] = sum over column blocks of part_a, grad_b [E, rank, K] = sum over row blocks of
// part_b, in block order, rounded once.
template <typename T>
__global__ void rank_grads_sum_kernel(const float* part_a, const float* part_b, T* grad_a, T* grad_b, int64_t rows,
                                      int R, int rank, int K, int experts, int row_blocks, int col_blocks) {
  const int64_t total_a = rows * rank, total = total_a + int64_t(experts) * rank * K;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    float s = 0.f;
    if (i < total_a) {
      const float* p = part_a + i / rank * R + i % rank;
      for (int c = 0; c < col_blocks; ++c) s += p[c * rows * R];
      grad_a[i] = T(s);
    } else {
      const int64_t j = i - total_a, per_expert = int64_t(rank) * K, e = j / per_expert;
      const float* p = part_b + (e * row_blocks * R) * K + j % per_expert;
      for (int rb = 0; rb < row_blocks; ++rb) s += p[int64_t(rb) * R * K];
      grad_b[j] = T(s);
    }
  }
}

template <typename T, int RK, int CC>
int blocks_per_sm() {
  static std::atomic<int> memo[kMaxDevices];
  return resident_blocks(memo, rank_grads_kernel<T, RK, CC>, kRankThreads, smem_bytes<16 * RK, CC>(),
                         "lrqat_rank_grads");
}

template <typename T, typename F>
auto with_rank(int rank_padded, F&& f) {
  if (rank_padded == 16) return f.template operator()<1, column_chunks(16)>();
  if (rank_padded == 32) return f.template operator()<2, column_chunks(32)>();
  return f.template operator()<4, column_chunks(64)>();
}

}  // namespace

bool lrqat_rank_grads_supported(int64_t expert_rows, int64_t K, int64_t rank_padded) {
  return expert_rows % kChunkRows == 0 && K % kChunkCols == 0 &&
         (rank_padded == 16 || rank_padded == 32 || rank_padded == 64);
}

template <typename T>
RankGradsPlan lrqat_rank_grads_plan(int64_t expert_rows, int64_t K, int64_t rank_padded, int64_t experts) {
  RankGradsPlan plan;
  const int64_t cc = column_chunks(int(rank_padded)), row_chunks = expert_rows / kChunkRows;
  plan.col_blocks = (K / kChunkCols + cc - 1) / cc;
  // One wave: as many row blocks as fill the GPU's resident blocks beside the column blocks. More row blocks
  // cost partial sums of dB (R x K fp32 each), fewer leave SMs idle.
  const int per_sm = with_rank<T>(int(rank_padded), [&]<int RK, int CC>() { return blocks_per_sm<T, RK, CC>(); });
  const int64_t slots = int64_t(per_sm) * sm_count();
  const int64_t want = std::clamp<int64_t>(slots / (experts * plan.col_blocks), 1, std::max<int64_t>(row_chunks, 1));
  plan.row_chunks = (row_chunks + want - 1) / want;
  plan.row_blocks = plan.row_chunks > 0 ? (row_chunks + plan.row_chunks - 1) / plan.row_chunks : 0;
  return plan;
}

template <typename T>
void lrqat_rank_grads(const T* grad_u, const T* a, const T* b, int64_t experts, int64_t expert_rows, int64_t K,
                      int rank, int rank_padded, RankGradsPlan plan, float* part_a, float* part_b, T* grad_a,
                      T* grad_b, cudaStream_t stream) {
  const int64_t rows = experts * expert_rows;
  if (rows * K == 0 || rank == 0) return;
  RankGradArgs<T> args{grad_u, a, b, part_a, part_b, rows, int(expert_rows), int(K), rank,
                       int(plan.row_chunks), int(plan.row_blocks), int(plan.col_blocks)};
  with_rank<T>(rank_padded, [&]<int RK, int CC>() {
    const auto kernel = rank_grads_kernel<T, RK, CC>;
    constexpr int smem = smem_bytes<16 * RK, CC>();
    static std::atomic<int> smem_memo[kMaxDevices];
    opt_in_smem(smem_memo, kernel, smem, "lrqat_rank_grads");
    const unsigned blocks = unsigned(experts * plan.row_blocks * plan.col_blocks);
    kernel<<<blocks, kRankThreads, smem, stream>>>(args);
  });
  check_launch("lrqat_rank_grads");
  const int64_t total = rows * rank + experts * rank * K;
  const unsigned sum_blocks = unsigned(std::min<int64_t>((total + 255) / 256, int64_t(sm_count()) * 8));
  rank_grads_sum_kernel<T><<<sum_blocks, 256, 0, stream>>>(part_a, part_b, grad_a, grad_b, rows, rank_padded,
                                                           rank, int(K), int(experts), int(plan.row_blocks),
                                                           int(plan.col_blocks));
  check_launch("lrqat_rank_grads_sum");
}

#define QATEXT_INSTANTIATE(T)                                                                                  \
  template RankGradsPlan lrqat_rank_grads_plan<T>(int64_t, int64_t, int64_t, int64_t);                         \
  template void lrqat_rank_grads<T>(const T*, const T*, const T*, int64_t, int64_t, int64_t, int, int,         \
                                    RankGradsPlan, float*, float*, T*, T*, cudaStream_t);
QATEXT_INSTANTIATE(c10::Half)
QATEXT_INSTANTIATE(c10::BFloat16)
#undef QATEXT_INSTANTIATE

}  // namespace qatext::cuda
