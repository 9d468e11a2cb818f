// CPU packing of b-bit codes and dequantisation of packed weights.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "core/quant_math.h"
#include "core/tile_layout.h"
#include "cpu/kernels.h"
#include "cpu/parallel.h"

namespace qatext::cpu {

void pack(const uint8_t* codes, uint8_t* packed, int64_t N, int64_t K, int bits) {
  const int64_t row_bytes = packed_row_bytes(K, bits);
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t j = 0; j < row_bytes; ++j) packed[n * row_bytes + j] = pack_byte(codes + n * K, K, j, bits);
    }
  });
}

void unpack(const uint8_t* packed, uint8_t* codes, int64_t N, int64_t K, int bits) {
  const int64_t row_bytes = packed_row_bytes(K, bits);
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t k = 0; k < K; ++k) codes[n * K + k] = uint8_t(read_code(packed + n * row_bytes, k, bits));
    }
  });
}

void tile_packed(const uint8_t* packed, uint8_t* tiled, int64_t N, int64_t K, int bits) {
  const int64_t row_bytes = packed_row_bytes(K, bits);
  at::parallel_for(0, N * row_bytes, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) tiled[i] = tiled_byte(packed, row_bytes, i, K, bits);
  });
}

void untile_packed(const uint8_t* tiled, uint8_t* packed, int64_t N, int64_t K, int bits) {
  at::parallel_for(0, tile_lanes(N, K), 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) untile_lane(tiled, packed, i, K, bits);
  });
}

template <typename T>
void dequant(const uint8_t* packed, const float* scale, const float* zero, T* out, GroupShape shape) {
  const int64_t row_bytes = packed_row_bytes(shape.K, shape.bits);
  const int64_t G = shape.groups();
  at::parallel_for(0, shape.N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const uint8_t* row = packed + n * row_bytes;
      for (int64_t k = 0; k < shape.K; ++k) {
        const int64_t ng = n * G + k / shape.group_size;
        out[n * shape.K + k] = T(dequant_value(read_code(row, k, shape.bits), scale[ng], zero[ng]));
      }
    }
  });
}

template <typename T>
void dequant_tiled(const uint8_t* tiled, const float* scale, const float* zero, T* out, GroupShape shape) {
  at::parallel_for(0, tile_lanes(shape.N, shape.K), 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      for (int half = 0; half < 2; ++half) {
        if (shape.bits == 2) dequant_lane_row<T, 2>(tiled, scale, zero, out, i, half, shape);
        if (shape.bits == 3) dequant_lane_row<T, 3>(tiled, scale, zero, out, i, half, shape);
        if (shape.bits == 4) dequant_lane_row<T, 4>(tiled, scale, zero, out, i, half, shape);
      }
    }
  });
}

void group_code_dot(const float* dw, const uint8_t* packed, const float* zero, float* grad_scale,
                    GroupShape shape) {
  const int64_t row_bytes = packed_row_bytes(shape.K, shape.bits);
  parallel_groups(shape, [&](int64_t ng, int64_t n, int64_t k0) {
    const uint8_t* row = packed + n * row_bytes;
    float acc = 0.f;
    for (int64_t k = k0; k < k0 + shape.group_size; ++k) {
      acc += dw[n * shape.K + k] * (float(read_code(row, k, shape.bits)) - zero[ng]);
    }
    grad_scale[ng] = acc;
  });
}

template void dequant<float>(const uint8_t*, const float*, const float*, float*, GroupShape);
template void dequant<c10::Half>(const uint8_t*, const float*, const float*, c10::Half*, GroupShape);
template void dequant<c10::BFloat16>(const uint8_t*, const float*, const float*, c10::BFloat16*, GroupShape);
template void dequant_tiled<float>(const uint8_t*, const float*, const float*, float*, GroupShape);
template void dequant_tiled<c10::Half>(const uint8_t*, const float*, const float*, c10::Half*, GroupShape);
template void dequant_tiled<c10::BFloat16>(const uint8_t*, const float*, const float*, c10::BFloat16*, GroupShape);

}  // namespace qatext::cpu
