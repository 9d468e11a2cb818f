// QA-LoRA's pooling of the input over its quantization groups, and its transpose, as streaming
// kernels over 8-element chunks (16-byte vectors for 16-bit types):
//   group_sum:    out[r, j] = sum_{i < g} x[r, j g + i]   (fp32 sum, one rounding to x's dtype)
//   group_expand: out[r, k] = t[r, k / g]
// Rows and groups tile the contiguous [rows, K] array in order, so chunk c lies in group c / (g / 8)
// of the flattened [rows * K / g] side. torch's own ops ran at 40% (the reduction over a [.., G, g]
// view) and 27% (the broadcast copy: stride 0 innermost, so not vectorised) of the copy rate.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace qatext::cuda {
namespace {

template <typename T>
struct alignas(16) Chunk {
  T v[8];
};

// The lanes of a group (L = g / 8 of them, a power of two <= 32) sit side by side in a warp: a fixed
// xor-shuffle tree sums them (deterministic).
template <typename T, int L>
__global__ void __launch_bounds__(kThreads) group_sum_kernel(const T* __restrict__ x, T* __restrict__ out,
                                                             uint32_t chunks) {
  const uint32_t c = blockIdx.x * blockDim.x + threadIdx.x;
  float s = 0.f;
  if (c < chunks) {
    const Chunk<T> v = reinterpret_cast<const Chunk<T>*>(x)[c];
#pragma unroll
    for (int e = 0; e < 8; ++e) s += float(v.v[e]);
  }
#pragma unroll
  for (int o = L / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (c < chunks && c % L == 0) out[c / L] = T(s);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) group_expand_kernel(const T* __restrict__ t, T* __restrict__ out,
                                                                uint32_t chunks, uint32_t lanes) {
  for (uint32_t c = blockIdx.x * blockDim.x + threadIdx.x; c < chunks; c += gridDim.x * blockDim.x) {
    const T v = t[c / lanes];
    Chunk<T> o;
#pragma unroll
    for (int e = 0; e < 8; ++e) o.v[e] = v;
    reinterpret_cast<Chunk<T>*>(out)[c] = o;
  }
}

}  // namespace

template <typename T>
void group_sum(const T* x, T* out, int64_t chunks, int lanes, cudaStream_t stream) {
  if (chunks == 0) return;
  const unsigned blocks = unsigned((chunks + kThreads - 1) / kThreads);
  switch (lanes) {
#define QATEXT_LANES(L)                                                                                \
  case L:                                                                                              \
    group_sum_kernel<T, L><<<blocks, kThreads, 0, stream>>>(x, out, uint32_t(chunks));                 \
    break;
    QATEXT_LANES(1) QATEXT_LANES(2) QATEXT_LANES(4) QATEXT_LANES(8) QATEXT_LANES(16) QATEXT_LANES(32)
#undef QATEXT_LANES
    default: throw std::invalid_argument("qatext: group_sum takes 1 to 32 lanes a group, a power of two");
  }
  check_launch("group_sum");
}

template <typename T>
void group_expand(const T* t, T* out, int64_t chunks, int lanes, cudaStream_t stream) {
  if (chunks == 0) return;
  group_expand_kernel<T><<<grid_for(chunks), kThreads, 0, stream>>>(t, out, uint32_t(chunks), uint32_t(lanes));
  check_launch("group_expand");
}

#define QATEXT_INSTANTIATE(T)                                                      \
  template void group_sum<T>(const T*, T*, int64_t, int, cudaStream_t);            \
  template void group_expand<T>(const T*, T*, int64_t, int, cudaStream_t);
QATEXT_INSTANTIATE(float)
QATEXT_INSTANTIATE(c10::Half)
QATEXT_INSTANTIATE(c10::BFloat16)
#undef QATEXT_INSTANTIATE

}  // namespace qatext::cuda
