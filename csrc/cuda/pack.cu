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
// group_size % 8 == 0 so the eight share a group. Same arithmetic as dequant_kernel.
template <typename T, int BITS>
__global__ void dequant_vec_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ scale,
                                   const float* __restrict__ zero, T* __restrict__ out, GroupShape shape) {
  const int64_t chunks_per_row = shape.K / 8, G = shape.groups();
  for (int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; c < shape.N * chunks_per_row;
       c += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = c / chunks_per_row, k = (c % chunks_per_row) * 8, ng = n * G + k / shape.group_size;
    const uint8_t* src = packed + n * (shape.K / 8 * BITS) + (k / 8) * BITS;
    uint64_t bits = 0;
#pragma unroll
    for (int i = 0; i < BITS; ++i) bits |= uint64_t(src[i]) << (8 * i);
    const float s = scale[ng], z = zero[ng];
    alignas(16) T v[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = T(dequant_value(uint32_t(bits >> (e * BITS)) & ((1u << BITS) - 1u), s, z));
    constexpr int kWords = sizeof(T) * 8 / 16;  // 16-byte words per 8 outputs
#pragma unroll
    for (int i = 0; i < kWords; ++i) {
      reinterpret_cast<uint4*>(out + n * shape.K + k)[i] = reinterpret_cast<const uint4*>(v)[i];
    }
  }
}

template <typename T, int BITS>
void launch_dequant_vec(const uint8_t* packed, const float* scale, const float* zero, T* out, GroupShape shape,
                        cudaStream_t stream) {
  dequant_vec_kernel<T, BITS><<<grid_for(shape.numel() / 8), kThreads, 0, stream>>>(packed, scale, zero, out, shape);
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
// row-major [N, K] array, so linear element index / g is the group's index in grad_scale.
// BITS = 0: the width comes from shape.bits (the bit-stream read); 4: one 32-bit load.
template <int BITS>
__global__ void group_code_dot_vec_kernel(const float* __restrict__ dw, const uint8_t* __restrict__ packed,
                                          const float* __restrict__ zero, float* __restrict__ grad_scale,
                                          GroupShape shape) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;  // chunk of 8 columns
  const int64_t chunks = shape.numel() / 8, per_row = shape.K / 8;
  const int lanes = int(shape.group_size / 8);
  float acc = 0.f;
  if (i < chunks) {
    const int64_t n = i / per_row, k = (i % per_row) * 8, ng = i * 8 / shape.group_size;
    const int bits = BITS ? BITS : shape.bits;
    const uint8_t* row = packed + n * packed_row_bytes(shape.K, bits);
    const float4 d0 = __ldg(reinterpret_cast<const float4*>(dw + i * 8));
    const float4 d1 = __ldg(reinterpret_cast<const float4*>(dw + i * 8 + 4));
    const float d[8] = {d0.x, d0.y, d0.z, d0.w, d1.x, d1.y, d1.z, d1.w};
    const float z = __ldg(zero + ng);
    uint32_t bits4 = 0;
    if (BITS == 4) bits4 = __ldg(reinterpret_cast<const unsigned int*>(row + k / 2));
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const uint32_t q = BITS == 4 ? (bits4 >> (4 * e)) & 15u : read_code(row, k + e, bits);
      acc += d[e] * (float(q) - z);
    }
  }
  for (int o = 1; o < lanes; o <<= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (i < chunks && i % lanes == 0) grad_scale[i * 8 / shape.group_size] = acc;
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
  if (shape.K % 8 == 0 && shape.group_size % 8 == 0) {
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
  if (g >= 8 && g <= 256 && (g & (g - 1)) == 0 && reinterpret_cast<uintptr_t>(dw) % 16 == 0) {
    const unsigned blocks = unsigned((shape.numel() / 8 + kThreads - 1) / kThreads);
    if (shape.bits == 4) {
      group_code_dot_vec_kernel<4><<<blocks, kThreads, 0, stream>>>(dw, packed, zero, grad_scale, shape);
    } else {
      group_code_dot_vec_kernel<0><<<blocks, kThreads, 0, stream>>>(dw, packed, zero, grad_scale, shape);
    }
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
