// CUDA packing, unpacking and dequantisation of b-bit codes (simple versions: one thread per
// byte or element), and the per-group code dot product of E2E-QP's scale gradient.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "core/quant_math.h"
#include "core/tile_layout.h"
#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace qatext::cuda {
namespace {

__global__ void pack_kernel(const uint8_t* __restrict__ codes, uint8_t* __restrict__ packed, int64_t N,
                            int64_t K, int bits) {
  const int64_t row_bytes = packed_row_bytes(K, bits);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < N * row_bytes;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / row_bytes;
    packed[i] = pack_byte(codes + n * K, K, i % row_bytes, bits);
  }
}

__global__ void unpack_kernel(const uint8_t* __restrict__ packed, uint8_t* __restrict__ codes, int64_t N,
                              int64_t K, int bits) {
  const int64_t row_bytes = packed_row_bytes(K, bits);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < N * K; i += int64_t(gridDim.x) * blockDim.x) {
    codes[i] = uint8_t(read_code(packed + (i / K) * row_bytes, i % K, bits));
  }
}

// One tiled byte per thread, gathered from the packed rows (once per weight, at load time).
__global__ void tile_kernel(const uint8_t* __restrict__ packed, uint8_t* __restrict__ tiled, int64_t bytes, int64_t K,
                            int bits) {
  const int64_t row_bytes = packed_row_bytes(K, bits);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < bytes; i += int64_t(gridDim.x) * blockDim.x) {
    tiled[i] = tiled_byte(packed, row_bytes, i, K, bits);
  }
}

// The packed rows from the tiled layout, one thread per lane of a tile (untile_lane: word loads
// coalesced across a warp, one store a row). One thread per packed byte, each gathering its codes
// (as tile_kernel does), spent ~35 ms a 7B prefill.
template <int BITS>
__global__ void untile_kernel(const uint8_t* __restrict__ tiled, uint8_t* __restrict__ packed, int64_t lanes,
                              int64_t K) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < lanes; i += int64_t(gridDim.x) * blockDim.x) {
    untile_lane<BITS>(tiled, packed, i, K);
  }
}

// dequant from the tiled layout, one thread per tile lane, its two rows in turn (dequant_lane_row: vector
// loads, whole-sector stores). One row's codes in registers at a time: holding both rows' took 72-95
// registers (3 blocks an SM) and ran at 1.11-1.35x the packed path's prefill GEMM; one row at a time
// takes 48 (0.92-1.06x), and a thread per row 40, but ~3% slower again (twice the threads and loads).
template <typename T, int BITS>
__global__ void dequant_tiled_kernel(const uint8_t* __restrict__ tiled, const float* __restrict__ scale,
                                     const float* __restrict__ zero, T* __restrict__ out, int64_t lanes,
                                     GroupShape shape) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < lanes; i += int64_t(gridDim.x) * blockDim.x) {
    dequant_lane_row<T, BITS>(tiled, scale, zero, out, i, 0, shape);
    dequant_lane_row<T, BITS>(tiled, scale, zero, out, i, 1, shape);
  }
}

template <typename T>
__global__ void dequant_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ scale,
                               const float* __restrict__ zero, T* __restrict__ out, GroupShape shape) {
  const int64_t row_bytes = packed_row_bytes(shape.K, shape.bits);
  const int64_t G = shape.groups();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < shape.numel();
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / shape.K, k = i % shape.K, ng = n * G + k / shape.group_size;
    out[i] = T(dequant_value(read_code(packed + n * row_bytes, k, shape.bits), scale[ng], zero[ng]));
  }
}

// Eight codes per thread (BITS whole bytes in, one 16- or 32-byte vector out); K % 8 == 0 and
// group_size % 8 == 0 so the eight share a group. Same arithmetic as dequant_kernel. Rows and groups
// tile the [N, K] array in order, so chunk c's bytes start at c * BITS and its group is c / (g / 8):
// one division, in 32 bits where the tensor allows (the 64-bit divisions of the row and the group,
// ~100 instructions per chunk, made this kernel instruction-bound at about half the copy rate).
template <int BITS>
__device__ __forceinline__ uint64_t load_chunk(const uint8_t* src) {
  if constexpr (BITS == 2) return __ldg(reinterpret_cast<const uint16_t*>(src));
  if constexpr (BITS == 4) return __ldg(reinterpret_cast<const uint32_t*>(src));
  if constexpr (BITS == 8) return __ldg(reinterpret_cast<const unsigned long long*>(src));
  uint64_t bits = 0;  // 3, 5, 6, 7: no aligned word holds them
#pragma unroll
  for (int i = 0; i < BITS; ++i) bits |= uint64_t(__ldg(src + i)) << (8 * i);
  return bits;
}

template <typename T, int BITS, typename Index>
__global__ void __launch_bounds__(kThreads) dequant_vec_kernel(const uint8_t* __restrict__ packed,
                                                               const float* __restrict__ scale,
                                                               const float* __restrict__ zero, T* __restrict__ out,
                                                               Index chunks, Index chunks_per_group) {
  for (Index c = blockIdx.x * Index(blockDim.x) + threadIdx.x; c < chunks; c += Index(gridDim.x) * blockDim.x) {
    const uint64_t bits = load_chunk<BITS>(packed + int64_t(c) * BITS);
    const Index ng = c / chunks_per_group;
    const float s = __ldg(scale + ng), z = __ldg(zero + ng);
    alignas(16) T v[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = T(dequant_value(uint32_t(bits >> (e * BITS)) & ((1u << BITS) - 1u), s, z));
    constexpr int kWords = sizeof(T) * 8 / 16;  // 16-byte words per 8 outputs
#pragma unroll
    for (int i = 0; i < kWords; ++i) reinterpret_cast<uint4*>(out + int64_t(c) * 8)[i] = reinterpret_cast<const uint4*>(v)[i];
  }
}

template <typename T, int BITS>
void launch_dequant_vec(const uint8_t* packed, const float* scale, const float* zero, T* out, GroupShape shape,
                        cudaStream_t stream) {
  const int64_t chunks = shape.numel() / 8, per_group = shape.group_size / 8;
  if (chunks < (int64_t(1) << 31)) {
    dequant_vec_kernel<T, BITS, uint32_t><<<grid_for(chunks), kThreads, 0, stream>>>(
        packed, scale, zero, out, uint32_t(chunks), uint32_t(per_group));
  } else {
    dequant_vec_kernel<T, BITS, int64_t><<<grid_for(chunks), kThreads, 0, stream>>>(packed, scale, zero, out, chunks,
                                                                                   per_group);
  }
}

// Whether the vector kernel may run: whole chunks in whole groups, 16-byte output vectors, and the
// packed bytes aligned for its word loads (BITS 2, 4, 8: 2, 4, 8 bytes; others read bytes).
bool dequant_vec_ok(const uint8_t* packed, const void* out, GroupShape shape) {
  const int align = shape.bits == 2 || shape.bits == 4 || shape.bits == 8 ? shape.bits : 1;
  return shape.K % 8 == 0 && shape.group_size % 8 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(packed) % align == 0;
}

__global__ void group_code_dot_kernel(const float* __restrict__ dw, const uint8_t* __restrict__ packed,
                                      const float* __restrict__ zero, float* __restrict__ grad_scale,
                                      GroupShape shape) {
  const int64_t ng = blockIdx.x, G = shape.groups();
  const int64_t n = ng / G, k0 = (ng % G) * shape.group_size;
  const uint8_t* row = packed + n * packed_row_bytes(shape.K, shape.bits);
  const float z = zero[ng];
  float acc = 0.f;
  for (int64_t k = k0 + threadIdx.x; k < k0 + shape.group_size; k += kThreads) {
    acc += dw[n * shape.K + k] * (float(read_code(row, k, shape.bits)) - z);
  }
  acc = block_sum<kThreads>(acc);
  if (threadIdx.x == 0) grad_scale[ng] = acc;
}

// Same dot, 8 columns per thread: the lanes of one group (g / 8 of them, a power of two <= 32)
// sit side by side in a warp, so a fixed xor-shuffle tree sums the group. Groups tile the
// row-major [N, K] array, so chunk i's codes start at bit 8 i b of the packed array and its group
// is i / (g / 8) (32-bit indices where the tensor allows: no 64-bit division per chunk).
// BITS = 0: the width comes from shape.bits (the bit-stream read); 4: one 32-bit load.
template <int BITS, typename Index>
__global__ void group_code_dot_vec_kernel(const float* __restrict__ dw, const uint8_t* __restrict__ packed,
                                          const float* __restrict__ zero, float* __restrict__ grad_scale,
                                          Index chunks, int bits, int lanes) {
  const Index i = Index(blockIdx.x) * blockDim.x + threadIdx.x;  // chunk of 8 columns
  const Index ng = i >> (__ffs(lanes) - 1);                         // lanes: a power of two
  float acc = 0.f;
  if (i < chunks) {
    const uint8_t* codes = packed + int64_t(i) * (BITS ? BITS : bits);
    const float4 d0 = __ldg(reinterpret_cast<const float4*>(dw + int64_t(i) * 8));
    const float4 d1 = __ldg(reinterpret_cast<const float4*>(dw + int64_t(i) * 8 + 4));
    const float d[8] = {d0.x, d0.y, d0.z, d0.w, d1.x, d1.y, d1.z, d1.w};
    const float z = __ldg(zero + ng);
    uint32_t bits4 = 0;
    if (BITS == 4) bits4 = __ldg(reinterpret_cast<const unsigned int*>(codes));
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const uint32_t q = BITS == 4 ? (bits4 >> (4 * e)) & 15u : read_code(codes, e, bits);
      acc += d[e] * (float(q) - z);
    }
  }
  for (int o = 1; o < lanes; o <<= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (i < chunks && (i & Index(lanes - 1)) == 0) grad_scale[ng] = acc;
}

template <int BITS, typename Index>
void launch_group_code_dot_vec(const float* dw, const uint8_t* packed, const float* zero, float* grad_scale,
                               GroupShape shape, cudaStream_t stream) {
  const int64_t chunks = shape.numel() / 8;
  const unsigned blocks = unsigned((chunks + kThreads - 1) / kThreads);
  group_code_dot_vec_kernel<BITS, Index><<<blocks, kThreads, 0, stream>>>(dw, packed, zero, grad_scale, Index(chunks),
                                                                         shape.bits, int(shape.group_size / 8));
}

}  // namespace

void pack(const uint8_t* codes, uint8_t* packed, int64_t N, int64_t K, int bits, cudaStream_t stream) {
  const int64_t total = N * packed_row_bytes(K, bits);
  if (total == 0) return;
  pack_kernel<<<grid_for(total), kThreads, 0, stream>>>(codes, packed, N, K, bits);
  check_launch("pack");
}

void unpack(const uint8_t* packed, uint8_t* codes, int64_t N, int64_t K, int bits, cudaStream_t stream) {
  if (N * K == 0) return;
  unpack_kernel<<<grid_for(N * K), kThreads, 0, stream>>>(packed, codes, N, K, bits);
  check_launch("unpack");
}

void tile_packed(const uint8_t* packed, uint8_t* tiled, int64_t N, int64_t K, int bits, cudaStream_t stream) {
  const int64_t bytes = N * packed_row_bytes(K, bits);
  if (bytes == 0) return;
  tile_kernel<<<grid_for(bytes), kThreads, 0, stream>>>(packed, tiled, bytes, K, bits);
  check_launch("tile_packed");
}

void untile_packed(const uint8_t* tiled, uint8_t* packed, int64_t N, int64_t K, int bits, cudaStream_t stream) {
  const int64_t lanes = tile_lanes(N, K);
  if (lanes == 0) return;
  const unsigned grid = grid_for(lanes);
  if (bits == 2) untile_kernel<2><<<grid, kThreads, 0, stream>>>(tiled, packed, lanes, K);
  if (bits == 3) untile_kernel<3><<<grid, kThreads, 0, stream>>>(tiled, packed, lanes, K);
  if (bits == 4) untile_kernel<4><<<grid, kThreads, 0, stream>>>(tiled, packed, lanes, K);
  check_launch("untile_packed");
}

template <typename T>
void dequant(const uint8_t* packed, const float* scale, const float* zero, T* out, GroupShape shape,
             cudaStream_t stream) {
  if (shape.numel() == 0) return;
  if (dequant_vec_ok(packed, out, shape)) {
    switch (shape.bits) {
      case 2: launch_dequant_vec<T, 2>(packed, scale, zero, out, shape, stream); break;
      case 3: launch_dequant_vec<T, 3>(packed, scale, zero, out, shape, stream); break;
      case 4: launch_dequant_vec<T, 4>(packed, scale, zero, out, shape, stream); break;
      case 5: launch_dequant_vec<T, 5>(packed, scale, zero, out, shape, stream); break;
      case 6: launch_dequant_vec<T, 6>(packed, scale, zero, out, shape, stream); break;
      case 7: launch_dequant_vec<T, 7>(packed, scale, zero, out, shape, stream); break;
      default: launch_dequant_vec<T, 8>(packed, scale, zero, out, shape, stream); break;
    }
    check_launch("dequant");
    return;
  }
  dequant_kernel<T><<<grid_for(shape.numel()), kThreads, 0, stream>>>(packed, scale, zero, out, shape);
  check_launch("dequant");
}

void group_code_dot(const float* dw, const uint8_t* packed, const float* zero, float* grad_scale,
                    GroupShape shape, cudaStream_t stream) {
  if (shape.numel() == 0) return;
  const int64_t g = shape.group_size;
  if (g >= 8 && g <= 256 && (g & (g - 1)) == 0 && shape.K % 8 == 0 && reinterpret_cast<uintptr_t>(dw) % 16 == 0) {
    const bool word = shape.bits == 4 && reinterpret_cast<uintptr_t>(packed) % 4 == 0;
    const bool narrow = shape.numel() / 8 < (int64_t(1) << 31);
    if (word && narrow) launch_group_code_dot_vec<4, uint32_t>(dw, packed, zero, grad_scale, shape, stream);
    if (word && !narrow) launch_group_code_dot_vec<4, int64_t>(dw, packed, zero, grad_scale, shape, stream);
    if (!word && narrow) launch_group_code_dot_vec<0, uint32_t>(dw, packed, zero, grad_scale, shape, stream);
    if (!word && !narrow) launch_group_code_dot_vec<0, int64_t>(dw, packed, zero, grad_scale, shape, stream);
  } else {
    group_code_dot_kernel<<<unsigned(shape.N * shape.groups()), kThreads, 0, stream>>>(dw, packed, zero,
                                                                                     grad_scale, shape);
  }
  check_launch("group_code_dot");
}

template <typename T>
void dequant_tiled(const uint8_t* tiled, const float* scale, const float* zero, T* out, GroupShape shape,
                   cudaStream_t stream) {
  const int64_t lanes = tile_lanes(shape.N, shape.K);
  if (lanes == 0) return;
  const unsigned grid = grid_for(lanes);
  if (shape.bits == 2) dequant_tiled_kernel<T, 2><<<grid, kThreads, 0, stream>>>(tiled, scale, zero, out, lanes, shape);
  if (shape.bits == 3) dequant_tiled_kernel<T, 3><<<grid, kThreads, 0, stream>>>(tiled, scale, zero, out, lanes, shape);
  if (shape.bits == 4) dequant_tiled_kernel<T, 4><<<grid, kThreads, 0, stream>>>(tiled, scale, zero, out, lanes, shape);
  check_launch("dequant_tiled");
}

template void dequant<float>(const uint8_t*, const float*, const float*, float*, GroupShape, cudaStream_t);
template void dequant<c10::Half>(const uint8_t*, const float*, const float*, c10::Half*, GroupShape, cudaStream_t);
template void dequant<c10::BFloat16>(const uint8_t*, const float*, const float*, c10::BFloat16*, GroupShape,
                                     cudaStream_t);

template void dequant_tiled<float>(const uint8_t*, const float*, const float*, float*, GroupShape, cudaStream_t);
template void dequant_tiled<c10::Half>(const uint8_t*, const float*, const float*, c10::Half*, GroupShape,
                                       cudaStream_t);
template void dequant_tiled<c10::BFloat16>(const uint8_t*, const float*, const float*, c10::BFloat16*, GroupShape,
                                           cudaStream_t);

}  // namespace qatext::cuda
