// Measured choice of the decode kernel's ring depth (4 or 8 stages), split-K reduction (a cluster or
// global partials) and split-K shape (slice length, row tiles a warp) per weight shape and token bucket.
// Which is fastest depends on the shape and the GPU (benchmarks/NOTES.md, decode GEMM version 8: each
// wins somewhere by 10-25% and loses elsewhere), so it is timed once per device and shape ahead of
// inference, as cuBLAS and Triton pick their kernels by measurement.
#include "ops/decode_autotune.h"

#include <algorithm>
#include <array>
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

#ifdef QATEXT_WITH_CUDA
namespace {

// A launch setting the tuner times: ring depth, split-K reduction, and the split-K shape (the fewest
// 64-column tiles a K slice: more slices, more blocks; the most 16-row tiles a warp).
struct Variant {
  int stages;
  bool cluster;
  int64_t min_slice;
  int row_tiles;
};
constexpr auto kVariants = [] {
  std::array<Variant, 36> v{};
  size_t i = 0;
  for (const int64_t min_slice : {4, 8, 16}) {
    for (const int row_tiles : {1, 2, 4}) {
      for (const int stages : {4, 8}) {
        for (const bool cluster : {false, true}) v[i++] = {stages, cluster, min_slice, row_tiles};
      }
    }
  }
  return v;
}();

// Token buckets (one token; one 8-token tile; two), each timed at its largest M.
constexpr std::array<int64_t, 3> kBucketTokens{1, 8, 16};
int bucket(int64_t M) { return M <= 1 ? 0 : M <= 8 ? 1 : 2; }

// device, N, K, bits, group size, token bucket.
using Key = std::tuple<int, int64_t, int64_t, int, int64_t, int>;
Key key(int device, GroupShape shape, int b) {
  return {device, shape.N, shape.K, shape.bits, shape.group_size, b};
}

// The table of choices, read by every decode call and written by the tuner (any thread).
std::mutex table_mutex;
std::map<Key, Variant> table;

std::optional<Variant> measured(const Key& k) {
  const std::lock_guard<std::mutex> lock(table_mutex);
  const auto it = table.find(k);
  return it == table.end() ? std::nullopt : std::optional<Variant>(it->second);
}

void remember(const Key& k, Variant v) {
  const std::lock_guard<std::mutex> lock(table_mutex);
  table[k] = v;
}

cuda::DecodeTuning knob_tuning() {
  return {tuning(Knob::DecodeGemmMinSlice), int(tuning(Knob::DecodeGemmRowTiles)), int(tuning(Knob::DecodeGemmStages)),
          tuning(Knob::DecodeGemmCluster) != 0};
}

cuda::DecodeTuning with_variant(Variant v) { return {v.min_slice, v.row_tiles, v.stages, v.cluster}; }

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

// The fastest variant at M tokens. Each variant's back-to-back calls (at least 10, each on the next of
// the cold copies) are captured in a CUDA graph on a side stream (eager calls at these sizes would time
// the host's dispatch, not the kernel; a decode loop runs under graphs anyway), after one eager call
// there that makes the stream's split-K counters; each graph is replayed three times, interleaved with
// the others so that clock changes hit every variant alike, and its best replay counts.
Variant fastest(const ColdCopies& copies, GroupShape shape, int64_t M) {
  const at::Tensor& w = copies.w[0];
  const at::Tensor a = at::randn({M, shape.K}, w.options().dtype(at::kBFloat16));
  const int calls = int(std::max<size_t>(10, copies.size()));
  c10::cuda::device_synchronize();  // a and the copies are ready for the side stream
  const at::cuda::CUDAStream side = at::cuda::getStreamFromPool(false, w.get_device());
  const c10::cuda::CUDAStreamGuard on_side(side);
  std::array<std::unique_ptr<at::cuda::CUDAGraph>, kVariants.size()> graphs;
  for (size_t v = 0; v < kVariants.size(); ++v) {
    const cuda::DecodeTuning t = with_variant(kVariants[v]);
    decode_matmul(a, w, copies.scale[0], copies.zero[0], at::Tensor(), shape, t);
    graphs[v] = std::make_unique<at::cuda::CUDAGraph>();
    // One memory pool for all: each graph's split-K partials are freed by its capture's end, so the
    // next reuses them (36 private pools would hold 36 sets at once).
    graphs[v]->capture_begin(v == 0 ? at::cuda::MempoolId_t{0, 0} : graphs[0]->pool());
    for (int call = 0; call < calls; ++call) {
      const size_t c = size_t(call) % copies.size();
      decode_matmul(a, copies.w[c], copies.scale[c], copies.zero[c], at::Tensor(), shape, t);
    }
    graphs[v]->capture_end();
    graphs[v]->replay();  // warm
  }
  cudaEvent_t start = nullptr, stop = nullptr;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  std::array<float, kVariants.size()> best;
  best.fill(std::numeric_limits<float>::infinity());
  for (int round = 0; round < 3; ++round) {
    for (size_t v = 0; v < kVariants.size(); ++v) {
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
  size_t pick = 0;
  for (size_t v = 1; v < kVariants.size(); ++v) pick = best[v] < best[pick] ? v : pick;
  return kVariants[pick];
}

}  // namespace

cuda::DecodeTuning decode_tuning_for(int device, GroupShape shape, int64_t M) {
  const cuda::DecodeTuning knobs = knob_tuning();
  if (tuning(Knob::DecodeGemmAutotune) == 0) return knobs;
  const std::optional<Variant> v = measured(key(device, shape, bucket(M)));
  return v ? with_variant(*v) : knobs;
}
#endif

DecodeChoice decode_gemm_choice(int device, int64_t N, int64_t K, int64_t bits, int64_t group_size, int64_t M) {
#ifdef QATEXT_WITH_CUDA
  const GroupShape shape = make_shape("qatext.decode_gemm_choice", N, K, bits, group_size);
  if (const std::optional<Variant> v = measured(key(device, shape, bucket(M)))) {
    return {v->stages, v->cluster, v->min_slice, v->row_tiles};
  }
#else
  (void)device, (void)N, (void)K, (void)bits, (void)group_size, (void)M;
#endif
  return {0, false, 0, 0};
}

void tune_decode_gemm(const at::Tensor& tiled, const at::Tensor& scale, const at::Tensor& zero, int64_t bits,
                      int64_t group_size, int64_t in_features) {
  const GroupShape shape =
      check_packed_weight("qatext.tune_decode_gemm", tiled, scale, zero, bits, group_size, in_features);
#ifdef QATEXT_WITH_CUDA
  if (!tiled.is_cuda() || tuning(Knob::DecodeGemmAutotune) == 0 || !cuda::decode_gemm_supported(shape)) return;
  const at::OptionalDeviceGuard guard(at::device_of(tiled));
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(current_stream(tiled), &capture) != cudaSuccess ||
      capture != cudaStreamCaptureStatusNone) {
    return;
  }
  const int device = tiled.get_device();
  std::optional<ColdCopies> copies;  // made only if a bucket is still to be timed
  for (int b = 0; b < int(kBucketTokens.size()) && kBucketTokens[b] <= tuning(Knob::DecodeGemmMaxM); ++b) {
    if (measured(key(device, shape, b))) continue;
    if (!copies) copies.emplace(tiled.contiguous(), as_float(scale), as_float(zero));
    remember(key(device, shape, b), fastest(*copies, shape, kBucketTokens[b]));
  }
#else
  (void)shape;
#endif
}

}  // namespace qatext::ops
