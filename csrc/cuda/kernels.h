// CUDA kernels over raw device pointers, launched on `stream`. Same contracts as cpu/kernels.h;
// T is float, c10::Half or c10::BFloat16.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "core/shape.h"

namespace qatext::cuda {

template <typename T>
void fake_quant_forward(const T* w, const float* scale, const float* zero, T* out, GroupShape shape,
                        cudaStream_t stream);

template <typename T>
void fake_quant_backward(const T* grad, const T* w, const float* scale, const float* zero, T* grad_w,
                         float* grad_scale, float* grad_zero, GroupShape shape, cudaStream_t stream);

template <typename T>
void fake_quant_per_token_forward(const T* x, T* out, int64_t M, int64_t K, int bits, bool symmetric,
                                  cudaStream_t stream);

template <typename T>
void fake_quant_per_token_backward(const T* grad, const T* x, T* grad_x, int64_t M, int64_t K, int bits,
                                   bool symmetric, cudaStream_t stream);

void pack(const uint8_t* codes, uint8_t* packed, int64_t N, int64_t K, int bits, cudaStream_t stream);
void unpack(const uint8_t* packed, uint8_t* codes, int64_t N, int64_t K, int bits, cudaStream_t stream);
void tile_packed(const uint8_t* packed, uint8_t* tiled, int64_t N, int64_t K, int bits, cudaStream_t stream);
void untile_packed(const uint8_t* tiled, uint8_t* packed, int64_t N, int64_t K, int bits, cudaStream_t stream);

template <typename T>
void dequant(const uint8_t* packed, const float* scale, const float* zero, T* out, GroupShape shape,
             cudaStream_t stream);
template <typename T>
void dequant_tiled(const uint8_t* tiled, const float* scale, const float* zero, T* out, GroupShape shape,
                   cudaStream_t stream);

template <typename T>
void lrqat_weight_forward(const uint8_t* p, const float* ab, const float* scale, const float* zero,
                          float lora_scale, int frac_bits, T* out, GroupShape shape, cudaStream_t stream);

template <typename T>
void lrqat_weight_backward(const T* grad_w, const uint8_t* p, const float* ab, const float* scale,
                           const float* zero, float lora_scale, int frac_bits, float* grad_u,
                           float* grad_scale, GroupShape shape, cudaStream_t stream);

// LR-QAT on the tensor cores (16-bit A and B): a [N, R] with the rank zero-padded to R = 16, 32 or 64,
// b [experts, rank, K] as it is (contiguous, 16-byte aligned); with experts > 1 the N rows are the experts'
// weights one after another, N / experts rows each, each expert's A B with its own B. Backward writes
// dU = c * s * dW * in_range (16-bit; grad_u may be grad_w itself), the per-tile group sums of dW * (q - z)
// into grad_scale_tiles
// [N, lrqat_fused_tile_groups(shape)] and, where weight is not null, W as the forward does (so that
// dX = dY W needs no second pass). max_blocks: at most this many blocks (0: one wave of the device).
bool lrqat_fused_supported(GroupShape shape, int64_t rank, int64_t experts = 1);
int64_t lrqat_fused_tile_groups(GroupShape shape);
template <typename T>
void lrqat_fused_forward(const uint8_t* p, const T* a, const T* b, int experts, int rank, int rank_padded,
                         const float* scale, const float* zero, float lora_scale, int frac_bits, T* out,
                         GroupShape shape, int64_t max_blocks, cudaStream_t stream);
template <typename T>
void lrqat_fused_backward(const T* grad_w, const uint8_t* p, const T* a, const T* b, int experts, int rank,
                          int rank_padded, const float* scale, const float* zero, float lora_scale, int frac_bits,
                          T* grad_u, float* grad_scale_tiles, T* weight, GroupShape shape, int64_t max_blocks,
                          cudaStream_t stream);

// LR-QAT's adapter gradients from dU in one read (cuda/lrqat_rank_grads.cu): grad_a [E * N, rank] = dU B^T and
// grad_b [E, rank, K] = A^T dU, expert by expert, for grad_u [E * N, K], a [E * N, rank_padded] (ranks past
// `rank` zero) and b [E, rank, K], all contiguous and 16-byte aligned; N (an expert's rows) a multiple of 64,
// K of 128. part_a [col_blocks, E * N, rank_padded] and part_b [E, row_blocks, rank_padded, K] (fp32) hold
// the blocks' partial sums, sized by the plan.
struct RankGradsPlan {
  int64_t row_chunks = 0, row_blocks = 0, col_blocks = 0;
};
bool lrqat_rank_grads_supported(int64_t expert_rows, int64_t K, int64_t rank_padded);
template <typename T>
RankGradsPlan lrqat_rank_grads_plan(int64_t expert_rows, int64_t K, int64_t rank_padded, int64_t experts);
template <typename T>
void lrqat_rank_grads(const T* grad_u, const T* a, const T* b, int64_t experts, int64_t expert_rows, int64_t K,
                      int rank, int rank_padded, RankGradsPlan plan, float* part_a, float* part_b, T* grad_a,
                      T* grad_b, cudaStream_t stream);

// Fused dequant GEMM (tensor cores, small M): out = a @ deq(W)^T (forward, a = x [M, K]) or
// a @ deq(W) (grad_input, a = grad_y [M, N]). partial: fp32 [splits, M, out columns] when splits > 1.
bool dequant_gemm_supported(int64_t M, GroupShape shape);
int64_t dequant_gemm_splits(int64_t M, GroupShape shape, bool grad_input);
template <typename T>
void dequant_gemm(const T* a, const uint8_t* packed, const float* scale, const float* zero, const T* bias, T* out,
                  float* partial, int64_t M, GroupShape shape, bool grad_input, int64_t splits, cudaStream_t stream);

// Decode GEMM on the tiled layout (cuda/decode_gemm.cu): out [M, N] = x [M, K] @ deq(W)^T + bias, for
// 16-bit x, bits 2 / 3 / 4, N % 16 == 0, K % 64 == 0 and groups of a multiple of 64 (or per-channel).
// Split-K partials (fp32 [splits, M, N]) are summed in a fixed order by the last block of each column
// tile to finish; counters ([column tiles * token tiles] int32) must be zero on entry, and are left
// zero, so one buffer per stream serves every call (decode_gemm_counter_workspace).
// Tuning: K slices of at least min_slice_tiles 64-column tiles; up to max_row_tiles 16-row tiles per
// warp (1, 2 or 4; 4 only for M <= 8 and where the K slices still fill a wave); a copy ring of `stages`
// (4 or 8) per warp; the K slices of a column tile summed through a thread-block cluster where
// cluster_reduce allows it and decode_gemm_cluster says so (no partials or counters needed then).
// warp_split: a block's 8 warps split K over the same row tiles and sum in shared memory instead (one
// split, min_slice_tiles and cluster_reduce unused).
// swiglu: W holds gate's rows then up's (N / 2 each) and out [M, N / 2] = silu(x gate^T) * (x up^T) (biases
// added first), from the fp32 sums, rounded once; warp split is taken (splits must be 1), and it needs
// decode_gemm_swiglu_supported.
// staged: the staged kernel instead, for more tokens (M up to a few hundred): the block's tokens are
// staged once a 64-column tile in shared memory for its 8 warps; split-K across blocks as above (1 or 2
// row tiles a warp; stages and warp_split unused). On sm_90 with one row tile a warp and more than 32
// tokens it takes wgmma (where built for sm_90a) and keeps the weight exact, as the decode kernel does;
// it then reads x in its own layout and x's sums over the K slices' parts of each group:
// wgmma_block_tokens says when, and then wgmma_tokens must fill x_wgmma and x_sums. Elsewhere it
// dequantises the weight to 16 bits, w = (q - z) s rounded once, as dequant + cuBLAS rounds it.
// The ops layer fills it from its knobs (ops/tuning.cpp holds the defaults).
// stages: the decode kernel's ring, 4 or 8 stages for blocks of up to 16 tokens (2 and 3 take 4), 2, 3 or 4
// for blocks of 32 (8 takes 4; at 4 row tiles a warp 2 takes 3).
struct DecodeTuning {
  int64_t min_slice_tiles;
  int max_row_tiles;
  int stages;
  bool cluster_reduce;
  bool warp_split;
  bool staged = false;
};
// 8-token tiles a decode block takes at M tokens (more tokens: more blocks).
inline int decode_token_tiles(int64_t M) { return M <= 8 ? 1 : M <= 16 ? 2 : 4; }
bool decode_gemm_supported(GroupShape shape);
int64_t decode_gemm_splits(int64_t M, GroupShape shape, DecodeTuning tuning);
int64_t decode_gemm_counters(int64_t M, GroupShape shape, DecodeTuning tuning);
bool decode_gemm_cluster(int64_t M, GroupShape shape, int64_t splits, DecodeTuning tuning);
bool decode_gemm_swiglu_supported(int64_t M, GroupShape shape, DecodeTuning tuning);
// A zeroed counter buffer of at least `count` for calls on `stream` (made on its first use there and
// kept), or nullptr when there is none yet and the stream is capturing a graph, or count is too large.
int* decode_gemm_counter_workspace(int64_t count, cudaStream_t stream);
// The wgmma form's token block (64 or 128) for this call, or 0 where the call takes another path.
int64_t wgmma_block_tokens(int64_t M, GroupShape shape, DecodeTuning tuning);
// Whether M tokens of K columns fit the staged kernel's 32-bit token offsets.
inline bool staged_gemm_fits(int64_t M, int64_t K) { return M * K < (int64_t(1) << 31); }
// tiles (wgmma_tiles_size elements) = x as the wgmma form reads it, by token blocks of `block` and
// 64-column tiles (x 16-byte aligned, K % 64 == 0), and sums (fp32, wgmma_sums_size of them) = x's sums
// over each part of a group in each of the `splits` K slices.
int64_t wgmma_tiles_size(int64_t M, int64_t K, int64_t block);
int64_t wgmma_sums_size(int64_t M, GroupShape shape, int64_t splits);
template <typename T>
void wgmma_tokens(const T* x, T* tiles, float* sums, int64_t M, GroupShape shape, int64_t splits, int64_t block,
                  cudaStream_t stream);
template <typename T>
void decode_gemm(const T* x, const T* x_wgmma, const float* x_sums, const uint8_t* tiled, const float* scale,
                 const float* zero, const T* bias, T* out, float* partial, int* counters, int64_t M, GroupShape shape,
                 int64_t splits, DecodeTuning tuning, bool swiglu, cudaStream_t stream);

// Grouped experts on the decode kernel (warp split, one launch): out [S, N] = each expert's rows of x [S, K]
// (sorted by expert; offs [experts] int32 on the device, the rows of experts 0..e) @ its deq(W_e)^T, W the
// experts' tiled [N, K] weights stacked ([experts * N] rows, scale and zero likewise); swiglu as
// decode_gemm's, per expert (each W_e = [gate_e; up_e]). Rows past offs[experts - 1] are set to zero; only
// the chosen experts' weights are read, and nothing is read on the host (CUDA graphs can hold it).
// expert_tokens: the tokens an expert is expected to take (a token tile's height); items: an int32 workspace
// of 2 * grouped_decode_items(S, experts).
int64_t grouped_decode_items(int64_t S, int64_t experts);
bool grouped_decode_supported(int64_t S, int64_t experts, int64_t expert_tokens, GroupShape shape, DecodeTuning tuning,
                              bool swiglu);
template <typename T>
void grouped_decode_gemm(const T* x, const uint8_t* tiled, const float* scale, const float* zero, const int* offs,
                         int* items, T* out, int64_t S, int64_t experts, int64_t expert_tokens, GroupShape shape,
                         DecodeTuning tuning, bool swiglu, cudaStream_t stream);

void group_code_dot(const float* dw, const uint8_t* packed, const float* zero, float* grad_scale,
                    GroupShape shape, cudaStream_t stream);

// QA-LoRA's pooling over groups of 8 * lanes inputs and its transpose, over `chunks` 8-element chunks of a
// contiguous, 16-byte-aligned [rows, K] tensor (group_sum: lanes a power of two <= 32).
template <typename T>
void group_sum(const T* x, T* out, int64_t chunks, int lanes, cudaStream_t stream);
template <typename T>
void group_expand(const T* t, T* out, int64_t chunks, int lanes, cudaStream_t stream);

}  // namespace qatext::cuda
