// Parallel iteration over the quantization groups of a [N, K] weight.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>

#include "core/shape.h"

namespace qatext::cpu {

// fn(ng, n, k0): group ng = n * G + g covers columns [k0, k0 + group_size) of row n.
template <typename Fn>
void parallel_groups(const GroupShape& shape, const Fn& fn) {
  const int64_t G = shape.groups();
  at::parallel_for(0, shape.N * G, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ng = begin; ng < end; ++ng) fn(ng, ng / G, (ng % G) * shape.group_size);
  });
}

}  // namespace qatext::cpu
