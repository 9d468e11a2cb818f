// Launch helpers and a deterministic block reduction shared by the CUDA kernels.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace qatext::cuda {

constexpr int kThreads = 256;

inline void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("qatext: CUDA launch of ") + what + " failed: " + cudaGetErrorString(err));
  }
}

inline unsigned int grid_for(int64_t n, int threads = kThreads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return unsigned(blocks < 65535 * 32 ? (blocks > 0 ? blocks : 1) : 65535 * 32);
}

// f.template operator()<BITS>() for bits 2, 3 or 4: the GEMM launchers' dispatch to a kernel instance
// (each composes its own further template arguments inside f the same way).
template <typename F>
auto with_bits(int bits, F&& f) {
  if (bits == 4) return f.template operator()<4>();
  return bits == 3 ? f.template operator()<3>() : f.template operator()<2>();
}

// A value fixed for a device (an attribute, an occupancy, a one-time kernel setting), computed on
// its first use there: launchers would otherwise pay these runtime queries on every call.
constexpr int kMaxDevices = 64;
template <typename F>
int per_device(std::atomic<int> (&memo)[kMaxDevices], F compute) {
  int device = 0;
  cudaGetDevice(&device);
  if (device < 0 || device >= kMaxDevices) return compute();
  int value = memo[device].load(std::memory_order_relaxed);
  if (value == 0) {  // 0: not yet known (two threads may both compute it: same value)
    value = compute();
    memo[device].store(value, std::memory_order_relaxed);
  }
  return value;
}

// An attribute of the current device, read once per device.
template <cudaDeviceAttr Attr>
int device_attribute() {
  static std::atomic<int> memo[kMaxDevices];
  return per_device(memo, [] {
    int device = 0, value = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&value, Attr, device);
    return value;
  });
}

// Streaming multiprocessors of the current device (split-K sizing).
inline int sm_count() { return std::max(device_attribute<cudaDevAttrMultiProcessorCount>(), 1); }

// Whether the current device is sm_90 (Hopper: wgmma, clusters).
inline bool is_sm90() { return device_attribute<cudaDevAttrComputeCapabilityMajor>() == 9; }

// The most shared memory a block of the current device may opt into (227 KB on sm_90, 163 KB on
// sm_80, 99 KB on sm_86 / sm_89).
inline int max_block_smem() {
  const int bytes = device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>();
  return bytes > 0 ? bytes : 48 * 1024;
}

// Lets `kernel` take `smem` bytes of dynamic shared memory (needed above 48 KB) on the current device.
template <typename Kernel>
void allow_smem(Kernel kernel, int smem, const char* what) {
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("qatext: ") + what + " shared memory: " + cudaGetErrorString(err));
  }
}

// allow_smem once per device and kernel (each kernel instance calls this from its own function, so `memo`
// is per instance).
template <typename Kernel>
void opt_in_smem(std::atomic<int> (&memo)[kMaxDevices], Kernel kernel, int smem, const char* what) {
  per_device(memo, [&] {
    allow_smem(kernel, smem, what);
    return 1;
  });
}

// Blocks of `kernel` resident a SM at `threads` a block and `smem` bytes of dynamic shared memory (at least
// 1), once per device and instance (`memo` per instance, as for opt_in_smem). It allows the shared memory
// first: the query honours that setting, and without it reads 0 for any block over 48 KB.
template <typename Kernel>
int resident_blocks(std::atomic<int> (&memo)[kMaxDevices], Kernel kernel, int threads, int smem, const char* what) {
  return per_device(memo, [&] {
    allow_smem(kernel, smem, what);
    int blocks = 0;
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem);
    return std::max(blocks, 1);
  });
}

// Sum over the block in a fixed order (same result every run). All threads get the result.
template <int Threads>
__device__ __forceinline__ float block_sum(float v) {
  static_assert(Threads % 32 == 0 && Threads <= 1024, "block_sum: whole warps only");
  __shared__ float warp_sums[Threads / 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // warp_sums may still be read by a previous call
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int i = 0; i < Threads / 32; ++i) total += warp_sums[i];
  return total;
}

template <int Threads>
__device__ __forceinline__ float block_min(float v) {
  __shared__ float warp_vals[Threads / 32];
  for (int o = 16; o > 0; o >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) warp_vals[warp] = v;
  __syncthreads();
  float r = warp_vals[0];
  for (int i = 1; i < Threads / 32; ++i) r = fminf(r, warp_vals[i]);
  return r;
}

template <int Threads>
__device__ __forceinline__ float block_max(float v) {
  return -block_min<Threads>(-v);
}

}  // namespace qatext::cuda
