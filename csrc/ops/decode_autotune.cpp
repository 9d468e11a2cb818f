// Measured choice of the decode kernel's ring depth (4 or 8 stages; 2, 3 or 4 for 32-token blocks),
// split-K reduction (a cluster, global partials, or the warps of a block splitting K) and split-K shape
// (slice length, row tiles a warp) per weight shape and token bucket, and of the token count up to which
// the decode kernel beats the path beyond it (its crossover).
// Which is fastest depends on the shape and the GPU (benchmarks/NOTES.md, decode GEMM versions 8 and
// 13: each wins somewhere by 10-25% and loses elsewhere), so it is timed once per device and shape
// ahead of inference, as cuBLAS and Triton pick their kernels by measurement.
#include "ops/decode_autotune.h"

#include "ops/ops.h"

#include <algorithm>
#include <array>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <tuple>
#include <vector>

#ifdef QATEXT_WITH_CUDA
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace qatext::ops {

// The crossover of shapes not measured: the decode kernel beat the path beyond it at 16 tokens on every
// shape measured (benchmarks/NOTES.md).
constexpr int64_t kUnmeasuredCrossover = 16;

#ifdef QATEXT_WITH_CUDA
namespace {

// A launch setting the tuner times: ring depth, split-K reduction, and the split-K shape (the fewest
// 64-column tiles a K slice: more slices, more blocks; the most 16-row tiles a warp); or, with warp
// split, a block's warps splitting K over the same row tiles (ring depth and row tiles only).
struct Variant {
  int stages;
  bool cluster;
  int64_t min_slice;
  int row_tiles;
  bool warp_split;
};
// The variants timed at M tokens, with the ring depths a block of that many tokens takes: 4 or 8 up to 16
// tokens; 2, 3 or 4 with 32 tokens a block, where 4 leave one block a SM (42 or 56 settings).
std::vector<Variant> variants_at(int64_t M) {
  const std::vector<int> depths = cuda::decode_token_tiles(M) == 4 ? std::vector<int>{2, 3, 4} : std::vector<int>{4, 8};
  std::vector<Variant> v;
  for (const int row_tiles : {1, 2, 4}) {
    for (const int stages : depths) {
      if (row_tiles == 4 && stages == 2) continue;  // 4 row tiles read 2 stages as 3; fewer are (2, 2)'s instance
      for (const int64_t min_slice : {4, 8, 16}) {
        for (const bool cluster : {false, true}) v.push_back({stages, cluster, min_slice, row_tiles, false});
      }
      v.push_back({stages, false, 0, row_tiles, true});
    }
  }
  return v;
}

// Token buckets (one token; one 8-token tile; two; then the crossover's counts), each timed at its
// largest M. The first three are tuned up front; the others as the crossover is measured, each at its
// count before the decode kernel is timed there against the path beyond it (a variant tuned at 16
// tokens ran 19 or 29 us at 64 tokens on 4096 x 4096 from one tuning to the next).
constexpr std::array<int64_t, 6> kBucketTokens{1, 8, 16, 32, 64, 128};
constexpr int kUpFrontBuckets = 3;
int bucket(int64_t M) {
  int b = 0;
  while (b + 1 < int(kBucketTokens.size()) && M > kBucketTokens[b]) ++b;
  return b;
}

// The crossover: the largest count of the buckets past the up-front ones (32, 64, 128) up to which the
// decode kernel beat the path beyond it at each (the last up-front bucket, 16, where it lost at 32).
constexpr int kCrossoverBucket = -1;  // the crossover's key
// Token counts at which the staged kernel is timed against the path beyond it (on sm_90a its wgmma
// form reaches prefill sizes).
constexpr std::array<int64_t, 5> kStagedTokens{32, 64, 128, 256, 512};
constexpr int kStagedBucket = -2;     // the staged kernel's limit's key

// The staged kernel's measured limit (0: it lost at the smallest count) and its faster row tiles a warp.
struct StagedChoice {
  int64_t limit;
  int row_tiles;
};

// device, N, K, bits, group size, token bucket (or kCrossoverBucket).
using Key = std::tuple<int, int64_t, int64_t, int, int64_t, int>;
Key key(int device, GroupShape shape, int b) {
  return {device, shape.N, shape.K, shape.bits, shape.group_size, b};
}

// The tables of choices and crossovers, read by every decode call and written by the tuner (any thread).
std::mutex table_mutex;
std::map<Key, Variant> table;
std::map<Key, int64_t> crossovers;
std::map<Key, StagedChoice> staged_choices;

template <typename V>
std::optional<V> measured(const std::map<Key, V>& in, const Key& k) {
  const std::lock_guard<std::mutex> lock(table_mutex);
  const auto it = in.find(k);
  return it == in.end() ? std::nullopt : std::optional<V>(it->second);
}
std::optional<Variant> measured(const Key& k) { return measured(table, k); }

// The variant tuned for M's bucket, or where that one is not measured, for the nearest bucket below.
std::optional<Variant> measured_variant(int device, GroupShape shape, int64_t M) {
  for (int b = bucket(M); b >= 0; --b) {
    if (const std::optional<Variant> v = measured(key(device, shape, b))) return v;
  }
  return std::nullopt;
}

template <typename V>
void remember(std::map<Key, V>& in, const Key& k, V v) {
  const std::lock_guard<std::mutex> lock(table_mutex);
  in[k] = v;
}

cuda::DecodeTuning knob_tuning() {
  return {tuning(Knob::DecodeGemmMinSlice), int(tuning(Knob::DecodeGemmRowTiles)), int(tuning(Knob::DecodeGemmStages)),
          tuning(Knob::DecodeGemmCluster) != 0, tuning(Knob::DecodeGemmWarpSplit) != 0};
}

cuda::DecodeTuning with_variant(Variant v) { return {v.min_slice, v.row_tiles, v.stages, v.cluster, v.warp_split}; }

// Copies of a weight (codes, scales, zeros) whose bytes together are at least twice the L2 cache, so
// that each timed call reads its weight from DRAM as a model's decode step does (each layer's weight
// once per token): a 4096 x 4096 W4 weight (9 MB) timed back to back on itself would be served from
// the 50 MB L2 and reward the variants that do best on cached bytes.
struct ColdCopies {
  std::vector<at::Tensor> w, scale, zero;
  ColdCopies(const at::Tensor& w0, const at::Tensor& s0, const at::Tensor& z0) {
    int l2 = 0;
    cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, w0.get_device());
    const int64_t bytes = w0.nbytes() + s0.nbytes() + z0.nbytes();
    const int64_t n = std::clamp<int64_t>((2 * int64_t(l2) + bytes - 1) / std::max<int64_t>(bytes, 1), 2, 64);
    for (int64_t i = 0; i < n; ++i) {
      w.push_back(i == 0 ? w0 : w0.clone());
      scale.push_back(i == 0 ? s0 : s0.clone());
      zero.push_back(i == 0 ? z0 : z0.clone());
    }
  }
  size_t size() const { return w.size(); }
};

// One call of a timed candidate on cold copy `c`.
using Call = std::function<void(size_t c)>;

// The best time (ms) of each candidate's back-to-back calls (at least 10, each on the next of `copies`
// cold copies). Each candidate's calls are captured in a CUDA graph on a side stream (eager calls at
// these sizes would time the host's dispatch, not the kernel; a decode loop runs under graphs anyway),
// after one eager call there (which makes the stream's split-K counters); each graph is replayed three
// times, interleaved with the others so that clock changes hit every candidate alike, and its best
// replay counts.
std::vector<float> best_replay_ms(const std::vector<Call>& candidates, size_t copies, int device) {
  const int calls = int(std::max<size_t>(10, copies));
  c10::cuda::device_synchronize();  // the inputs are ready for the side stream
  const at::cuda::CUDAStream side = at::cuda::getStreamFromPool(false, device);
  const c10::cuda::CUDAStreamGuard on_side(side);
  std::vector<std::unique_ptr<at::cuda::CUDAGraph>> graphs(candidates.size());
  for (size_t v = 0; v < candidates.size(); ++v) {
    candidates[v](0);
    graphs[v] = std::make_unique<at::cuda::CUDAGraph>();
    // One memory pool for all: each graph's temporaries are freed by its capture's end, so the next
    // reuses them (a private pool each would hold every set at once).
    graphs[v]->capture_begin(v == 0 ? at::cuda::MempoolId_t{0, 0} : graphs[0]->pool());
    for (int call = 0; call < calls; ++call) candidates[v](size_t(call) % copies);
    graphs[v]->capture_end();
    graphs[v]->replay();  // warm
  }
  cudaEvent_t start = nullptr, stop = nullptr;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  std::vector<float> best(candidates.size(), std::numeric_limits<float>::infinity());
  for (int round = 0; round < 3; ++round) {
    for (size_t v = 0; v < candidates.size(); ++v) {
      cudaEventRecord(start, side.stream());
      graphs[v]->replay();
      cudaEventRecord(stop, side.stream());
      cudaEventSynchronize(stop);
      float ms = 0.f;
      if (cudaEventElapsedTime(&ms, start, stop) == cudaSuccess) best[v] = std::min(best[v], ms);
    }
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return best;
}

at::Tensor random_tokens(const ColdCopies& copies, GroupShape shape, int64_t M) {
  return at::randn({M, shape.K}, copies.w[0].options().dtype(at::kBFloat16));
}

// The decode kernel at M tokens with `t`, on cold copy c.
Call decode_call(const ColdCopies& copies, const at::Tensor& a, GroupShape shape, cuda::DecodeTuning t) {
  return [&copies, a, shape, t](size_t c) {
    decode_matmul(a, copies.w[c], copies.scale[c], copies.zero[c], at::Tensor(), shape, t);
  };
}

// The fastest variant at M tokens.
Variant fastest(const ColdCopies& copies, GroupShape shape, int64_t M) {
  const at::Tensor a = random_tokens(copies, shape, M);
  const std::vector<Variant> variants = variants_at(M);
  std::vector<Call> calls;
  for (const Variant& v : variants) calls.push_back(decode_call(copies, a, shape, with_variant(v)));
  const std::vector<float> best = best_replay_ms(calls, copies.size(), copies.w[0].get_device());
  return variants[size_t(std::min_element(best.begin(), best.end()) - best.begin())];
}

// The staged kernel's row tiles a warp where nothing was measured: decode_gemm_row_tiles, at most 2.
int knob_staged_row_tiles() { return int(std::min<int64_t>(tuning(Knob::DecodeGemmRowTiles), 2)); }

cuda::DecodeTuning staged_tuning(int row_tiles) {
  cuda::DecodeTuning t{tuning(Knob::DecodeGemmMinSlice), row_tiles, 4, tuning(Knob::StagedGemmCluster) != 0, false};
  t.staged = true;
  return t;
}

// The staged kernel (1 and 2 row tiles a warp) against the path beyond it (tiled_matmul_beyond_staged)
// at each of kStagedTokens: the largest count up to which its faster setting won at each, and the
// setting that won there ({0, knob} where it lost at the first).
StagedChoice staged_choice(const ColdCopies& copies, GroupShape shape) {
  StagedChoice choice{0, knob_staged_row_tiles()};
  for (const int64_t M : kStagedTokens) {
    if (!cuda::staged_gemm_fits(M, shape.K)) break;
    const at::Tensor a = random_tokens(copies, shape, M);
    const Call beyond_call = [&copies, a, shape](size_t c) {
      tiled_matmul_beyond_staged(a, copies.w[c], copies.scale[c], copies.zero[c], shape, std::nullopt);
    };
    const std::vector<float> ms = best_replay_ms(
        {decode_call(copies, a, shape, staged_tuning(1)), decode_call(copies, a, shape, staged_tuning(2)), beyond_call},
        copies.size(), copies.w[0].get_device());
    if (std::min(ms[0], ms[1]) >= ms[2]) break;
    choice = {M, ms[0] <= ms[1] ? 1 : 2};
  }
  return choice;
}

// The largest count of the buckets past the up-front ones up to which the decode kernel (with the
// variant tuned for its bucket, tuned here first where it is not yet) beat the path a tiled weight takes
// beyond it (tiled_matmul_beyond_decode: what a layer that holds only the tiled codes runs) at each, else
// kUnmeasuredCrossover.
int64_t crossover(const ColdCopies& copies, GroupShape shape) {
  const int device = copies.w[0].get_device();
  int64_t limit = kUnmeasuredCrossover;
  for (int b = kUpFrontBuckets; b < int(kBucketTokens.size()); ++b) {
    const int64_t M = kBucketTokens[b];
    const Key at_bucket = key(device, shape, b);
    if (!measured(at_bucket)) remember(table, at_bucket, fastest(copies, shape, M));
    const at::Tensor a = random_tokens(copies, shape, M);
    const Call beyond_call = [&copies, a, shape](size_t c) {
      tiled_matmul_beyond_decode(a, copies.w[c], copies.scale[c], copies.zero[c], shape, std::nullopt);
    };
    const std::vector<float> ms =
        best_replay_ms({decode_call(copies, a, shape, decode_tuning_for(device, shape, M)), beyond_call},
                       copies.size(), device);
    if (ms[0] >= ms[1]) break;
    limit = M;
  }
  return limit;
}

}  // namespace

cuda::DecodeTuning decode_tuning_for(int device, GroupShape shape, int64_t M) {
  const cuda::DecodeTuning knobs = knob_tuning();
  if (tuning(Knob::DecodeGemmAutotune) == 0) return knobs;
  const std::optional<Variant> v = measured_variant(device, shape, M);
  return v ? with_variant(*v) : knobs;
}

cuda::DecodeTuning staged_tuning_for(int device, GroupShape shape) {
  if (tuning(Knob::DecodeGemmAutotune) != 0) {
    if (const std::optional<StagedChoice> c = measured(staged_choices, key(device, shape, kStagedBucket))) {
      return staged_tuning(c->row_tiles);
    }
  }
  return staged_tuning(knob_staged_row_tiles());
}
#endif

namespace {
int64_t decode_crossover(int device, GroupShape shape) {
#ifdef QATEXT_WITH_CUDA
  if (tuning(Knob::DecodeGemmAutotune) != 0) {
    if (const std::optional<int64_t> m = measured(crossovers, key(device, shape, kCrossoverBucket))) return *m;
  }
#else
  (void)device, (void)shape;
#endif
  return kUnmeasuredCrossover;
}
}  // namespace

int64_t decode_max_tokens(int device, GroupShape shape) {
  const int64_t knob = tuning(Knob::DecodeGemmMaxM);
  return knob >= 0 ? knob : decode_crossover(device, shape);
}

namespace {
// The staged kernel's limit as tune_decode_gemm measured it, 0 where it has not.
int64_t measured_staged_limit(int device, GroupShape shape) {
#ifdef QATEXT_WITH_CUDA
  if (const std::optional<StagedChoice> c = measured(staged_choices, key(device, shape, kStagedBucket))) return c->limit;
#else
  (void)device, (void)shape;
#endif
  return 0;
}
}  // namespace

int64_t staged_max_tokens(int device, GroupShape shape) {
  const int64_t knob = tuning(Knob::StagedGemmMaxM);
  if (knob >= 0) return knob;
  return tuning(Knob::DecodeGemmAutotune) != 0 ? measured_staged_limit(device, shape) : 0;
}

int64_t staged_gemm_limit(int device, int64_t N, int64_t K, int64_t bits, int64_t group_size) {
  return measured_staged_limit(device, make_shape("qatext.staged_gemm_limit", N, K, bits, group_size));
}

int64_t decode_gemm_crossover(int device, int64_t N, int64_t K, int64_t bits, int64_t group_size) {
  return decode_crossover(device, make_shape("qatext.decode_gemm_crossover", N, K, bits, group_size));
}

DecodeChoice decode_gemm_choice(int device, int64_t N, int64_t K, int64_t bits, int64_t group_size, int64_t M) {
#ifdef QATEXT_WITH_CUDA
  const GroupShape shape = make_shape("qatext.decode_gemm_choice", N, K, bits, group_size);
  if (const std::optional<Variant> v = measured(key(device, shape, bucket(M)))) {  // (M's bucket only)
    return {v->stages, v->cluster, v->min_slice, v->row_tiles, v->warp_split};
  }
#else
  (void)device, (void)N, (void)K, (void)bits, (void)group_size, (void)M;
#endif
  return {0, false, 0, 0, false};
}

bool tune_decode_gemm(const at::Tensor& tiled, const at::Tensor& scale, const at::Tensor& zero, int64_t bits,
                      int64_t group_size, int64_t in_features) {
  const GroupShape shape =
      check_packed_weight("qatext.tune_decode_gemm", tiled, scale, zero, bits, group_size, in_features);
#ifdef QATEXT_WITH_CUDA
  if (!tiled.is_cuda() || tuning(Knob::DecodeGemmAutotune) == 0 || !cuda::decode_gemm_supported(shape)) return true;
  const at::OptionalDeviceGuard guard(at::device_of(tiled));
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(current_stream(tiled), &capture) != cudaSuccess ||
      capture != cudaStreamCaptureStatusNone) {
    return true;
  }
  const int device = tiled.get_device();
  const int64_t max_m = tuning(Knob::DecodeGemmMaxM);  // (-1: the crossover rules, measured below)
  std::optional<ColdCopies> copies;  // made only if something is still to be timed
  // The copies, or null where the GPU has no room for them: then this shape keeps the defaults (nothing
  // is remembered, so a later call tunes it) and loading the model goes on.
  const auto cold = [&]() -> const ColdCopies* {
    if (!copies) {
      try {
        copies.emplace(tiled.contiguous(), as_float(scale), as_float(zero));
      } catch (const c10::OutOfMemoryError&) {
        return nullptr;
      }
    }
    return &*copies;
  };
  // The buckets up front; with decode_gemm_max_m set (no crossover to measure), every one up to it.
  const int buckets = max_m < 0 ? kUpFrontBuckets : int(kBucketTokens.size());
  for (int b = 0; b < buckets && (max_m < 0 || kBucketTokens[b] <= max_m); ++b) {
    const Key at_bucket = key(device, shape, b);
    if (measured(at_bucket)) continue;
    const ColdCopies* c = cold();
    if (c == nullptr) return false;
    remember(table, at_bucket, fastest(*c, shape, kBucketTokens[b]));
  }
  // The staged kernel's limit first: the decode kernel's crossover is measured against the path beyond
  // it, which takes the staged kernel within that limit.
  const Key at_staged = key(device, shape, kStagedBucket);
  if (tuning(Knob::StagedGemmMaxM) < 0 && !measured(staged_choices, at_staged)) {
    const ColdCopies* c = cold();
    if (c == nullptr) return false;
    remember(staged_choices, at_staged, staged_choice(*c, shape));
  }
  const Key at_crossover = key(device, shape, kCrossoverBucket);
  if (max_m < 0 && !measured(crossovers, at_crossover)) {
    const ColdCopies* c = cold();
    if (c == nullptr) return false;
    remember(crossovers, at_crossover, crossover(*c, shape));
  }
#else
  (void)shape;
#endif
  return true;
}

}  // namespace qatext::ops
