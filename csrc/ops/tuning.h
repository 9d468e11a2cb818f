// Runtime tuning knobs of the ops layer: one table (tuning.cpp) of named integer settings with their
// defaults, valid values and meaning, read by the ops and bound to Python from the same table.
#pragma once

#include <cstdint>
#include <initializer_list>

namespace qatext::ops {

enum class Knob : int {
  ValueChecks,         // data-dependent checks (scale > 0, codes < 2^bits): 0 off, 1 host tensors, 2 all
  DwChunkElements,     // fp32 elements of dW the E2E-QP scale gradient forms at once (rows x K)
  DequantGemmMaxM,     // largest M for which CUDA dequant_matmul takes the fused kernel (0: never)
  DecodeGemmMaxM,      // largest M for the decode kernel (0: never; -1: the per-shape crossover measured)
  DecodeGemmMinSlice,  // fewest 64-column tiles per K slice of the decode kernel's split-K
  DecodeGemmRowTiles,  // most 16-row weight tiles per decode warp: 1, 2 or 4
  DecodeGemmStages,    // stages of each decode warp's copy ring: 2, 3, 4 or 8
  DecodeGemmCluster,   // decode split-K summed through a thread-block cluster where it fits (sm_90)
  DecodeGemmWarpSplit, // decode warps of a block split K over the same row tiles (no split-K across blocks)
  DecodeGemmAutotune,  // decode ring depth and split-K reduction from tune_decode_gemm's measurements
  DecodeSwiglu,        // a SwiGLU MLP's gate/up decode GEMM applies silu(gate) * up in its epilogue
  StagedGemmMaxM,      // largest M for which a tiled weight beyond the decode kernel takes the staged kernel
  StagedGemmCluster,   // the staged kernel's split-K summed through a thread-block cluster where it fits
  LrqatFused,          // CUDA LR-QAT with 16-bit adapters on the tensor-core kernels (else fp32 A B)
  LrqatFusedBlocks,    // most blocks of the LR-QAT tile kernels (0: one wave of the GPU)
  LrqatRankKernel,     // LR-QAT's dA and dB from one read of dU (else two cuBLAS GEMMs)
  Count,
};

struct KnobInfo {
  const char* name;
  int64_t default_value;
  int64_t min_value;
  int64_t max_value;
  const char* doc;
};

const KnobInfo& knob_info(Knob knob);
int64_t tuning(Knob knob);
// Checks the value against the knob's range (DecodeGemmRowTiles against 1, 2, 4; DecodeGemmStages 4, 8).
void set_tuning(Knob knob, int64_t value);
// By name, for the Python binding; an unknown name is a ValueError listing the known ones.
Knob knob_by_name(const char* name);

// Whether to run a data-dependent check on a tensor: level 1 (the default) checks host tensors only,
// where reading a value back is free; level 2 also tensors on a GPU, where each check synchronises it
// (the layers check their own values once, where they are made or loaded).
inline bool value_checks_enabled(bool on_accelerator) {
  const int64_t level = tuning(Knob::ValueChecks);
  return level >= 2 || (level == 1 && !on_accelerator);
}

}  // namespace qatext::ops
