// The shape of a group-wise quantized weight [N, K] with scales and zeros [N, K / group_size].
#pragma once

#include <cstdint>

#include "core/macros.h"

namespace qatext {

struct GroupShape {
  int64_t N;           // rows (out features)
  int64_t K;           // columns (in features), quantization groups run along K
  int64_t group_size;  // resolved: divides K (per-channel is group_size == K)
  int bits;            // 2..8

  QATEXT_HOST_DEVICE int64_t groups() const { return K / group_size; }
  QATEXT_HOST_DEVICE int64_t numel() const { return N * K; }
};

}  // namespace qatext
