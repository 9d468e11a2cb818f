// The decode kernel's per-shape tuning: its ring depth, split-K reduction and split-K shape measured
// once per device, weight shape and token bucket (decode_autotune.cpp), and the decode path that it times.
#pragma once

#include <tuple>

#include "ops/common.h"

namespace qatext::ops {

#ifdef QATEXT_WITH_CUDA
// The decode kernel's tuning for a call of M tokens: what tune_decode_gemm measured fastest for this
// shape on this device where it did (and decode_gemm_autotune is on), else the knobs. Reads a table;
// never times anything.
cuda::DecodeTuning decode_tuning_for(int device, GroupShape shape, int64_t M);

// dequant_matmul_tiled's decode path (tile_ops.cpp): a [M, K] 16-bit, w the tiled codes, scale and
// zero fp32, b the bias in a's dtype or undefined; swiglu: silu(gate) * up [M, N / 2] (warp split taken,
// cuda::decode_gemm_swiglu_supported checked by the caller).
at::Tensor decode_matmul(const at::Tensor& a, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& zero,
                         const at::Tensor& b, GroupShape shape, cuda::DecodeTuning decode_tuning, bool swiglu = false);
#endif

#ifdef QATEXT_WITH_CUDA
// The staged kernel's tuning for a weight of this shape: split-K across blocks, slices of at least
// decode_gemm_min_slice tiles, the row tiles a warp that tune_decode_gemm measured faster (else
// decode_gemm_row_tiles, at most 2), the cluster as staged_gemm_cluster says.
cuda::DecodeTuning staged_tuning_for(int device, GroupShape shape);
#endif

// The largest token count for which dequant_matmul_tiled (and a packed layer) takes the staged kernel
// beyond the decode kernel: staged_gemm_max_m where it is set (>= 0), else its measured limit (0 where
// tune_decode_gemm has measured none).
int64_t staged_max_tokens(int device, GroupShape shape);
// The staged kernel's limit as tune_decode_gemm measured it (0, 32, 64 or 128; 0 where it has not).
int64_t staged_gemm_limit(int device, int64_t N, int64_t K, int64_t bits, int64_t group_size);

// The largest token count for which dequant_matmul_tiled (and a packed layer) takes the decode kernel
// for a weight of this shape on a device: decode_gemm_max_m where it is set (>= 0), else the crossover.
int64_t decode_max_tokens(int device, GroupShape shape);

// The token count up to which the decode kernel beat the path beyond it for this shape on a device, as
// tune_decode_gemm measured it (16, 32, 64 or 128), or 16 where it has not (or decode_gemm_autotune is
// off).
int64_t decode_gemm_crossover(int device, int64_t N, int64_t K, int64_t bits, int64_t group_size);

// Times the decode kernel's variants on this weight (random activations of 1, 8 and 16 tokens; with
// decode_gemm_max_m set, each bucket up to it of 1, 8, 16, 32, 64 and 128) and keeps the fastest per
// bucket for every later call on a weight of this shape: 4 or 8 stages (2, 3 or 4 from 32 tokens), cluster
// or partials, 4, 8 or 16 tiles a K slice, at most 1, 2 or 4 row tiles a warp, or the warps of a block
// splitting K (42 settings, 56 from 32 tokens: 4 row tiles take 3 or 4 stages).
// With staged_gemm_max_m at -1 it times the staged kernel (1 and 2 row tiles a warp) against the path
// beyond it at 32, 64 and 128 tokens, for its limit; with decode_gemm_max_m at -1 it then times the
// decode kernel against the path beyond it (the staged kernel within its limit) at the same counts, for
// the crossover, the decode kernel's variant tuned at each count first.
// Synchronises the GPU, so it runs where a layer takes its decode layout, not in a forward.
// Nothing to do for CPU tensors, shapes the kernel does not take, a capturing stream, shapes already
// measured, or with decode_gemm_autotune off. Returns false only where the GPU had no memory left for
// the timing copies (then nothing was measured, and the shape keeps the defaults until a later call).
bool tune_decode_gemm(const at::Tensor& tiled, const at::Tensor& scale, const at::Tensor& zero, int64_t bits,
                      int64_t group_size, int64_t in_features);

// What tune_decode_gemm chose for a weight of this shape for M's token bucket on a device: {stages,
// cluster, min slice, row tiles, warp split}, or {0, false, 0, 0, false} where it has not measured that
// bucket (a call then takes the nearest smaller bucket's choice, or the knobs).
using DecodeChoice = std::tuple<int, bool, int64_t, int, bool>;
DecodeChoice decode_gemm_choice(int device, int64_t N, int64_t K, int64_t bits, int64_t group_size, int64_t M);

}  // namespace qatext::ops
