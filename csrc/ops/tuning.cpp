#include "ops/tuning.h"

#include <array>
#include <atomic>
#include <cstring>
#include <string>

#include <c10/util/Exception.h>

namespace qatext::ops {

namespace {

constexpr int64_t kMax = INT64_MAX;

// The one table. Defaults measured: see benchmarks/NOTES.md.
constexpr std::array<KnobInfo, int(Knob::Count)> kKnobs{{
    {"value_checks", 1, 0, 2,
     "Data-dependent argument checks (scale > 0, codes < 2^bits): 0 never; 1 on CPU tensors, where they are "
     "free (QuantLinear checks its own once when made or loaded); 2 also on a GPU, where each one syncs it."},
    {"dw_chunk_elements", int64_t(10) << 20, 1, kMax,
     "Cap on the fp32 dW block (rows x K) that e2eqp_scale_grad forms at once (40 MiB)."},
    {"dequant_gemm_max_m", 64, 0, kMax,
     "Largest token count for which CUDA dequant_matmul uses the fused kernel (0: never)."},
    {"decode_gemm_max_m", -1, -1, kMax,
     "Largest token count for which CUDA dequant_matmul_tiled and packed layers use the decode kernel (0: never). "
     "-1: the crossover tune_decode_gemm measured for the weight's shape against the path beyond it (16, 32, "
     "64 or 128 tokens), 16 for shapes it has not measured."},
    {"decode_gemm_min_slice", 8, 1, kMax,
     "Fewest 64-column tiles per K slice of the decode kernel's split-K (else: split to fill one wave)."},
    {"decode_gemm_row_tiles", 4, 1, 4,
     "Most 16-row weight tiles per warp of the decode kernel: 1, 2 or 4 (4 for blocks of 1-8 or 32 tokens where "
     "the grid stays full)."},
    {"decode_gemm_stages", 4, 2, 8,
     "Stages of each decode warp's copy ring: 4 or 8 for blocks of up to 16 tokens (8: a whole 8-tile K slice in "
     "flight, one block per SM; 2 and 3 take 4), 2, 3 or 4 for blocks of 32 tokens (fewer: more blocks share an "
     "SM; 8 takes 4; at 4 row tiles a warp 2 takes 3)."},
    {"decode_gemm_cluster", 0, 0, 1,
     "Decode split-K of at most 8 slices summed in a thread-block cluster (sm_90, where the grid's clusters are "
     "all resident), else through global partials and a counter."},
    {"decode_gemm_warp_split", 1, 0, 1,
     "The decode kernel's 8 warps of a block take the same row tiles and split K among themselves, summed in "
     "shared memory (no split-K across blocks; decode_gemm_min_slice and _cluster unused). 0: split-K across "
     "blocks, shaped by decode_gemm_min_slice and _cluster."},
    {"decode_gemm_autotune", 1, 0, 1,
     "Decode ring depth, split-K reduction and split-K shape as measured fastest for the weight's shape by "
     "tune_decode_gemm (run where a layer takes its decode layout), in place of decode_gemm_stages / _cluster / "
     "_min_slice / _row_tiles / _warp_split (which rule shapes not measured)."},
    {"decode_swiglu", 1, 0, 1,
     "A SwiGLU MLP (transformers' Llama family) whose gate and up projections decode as one GEMM applies "
     "silu(gate) * up in that GEMM's epilogue (swiglu_matmul_tiled): one kernel a layer fewer. 0: the MLP's own "
     "forward (the GEMM, then silu and the product). Read where a compiled model is traced."},
    {"staged_gemm_max_m", -1, -1, kMax,
     "Largest token count for which CUDA dequant_matmul_tiled and packed layers, beyond the decode kernel, use the "
     "staged kernel (a block's tokens staged once in shared memory for its warps, the weight dequantised to 16 bits "
     "in registers); beyond it the fused kernel or dequant + cuBLAS. -1: the limit tune_decode_gemm measured for the "
     "weight's shape against that path (0, 32, 64 or 128), 0 (never) for shapes it has not measured."},
    {"staged_gemm_cluster", 1, 0, 1,
     "The staged kernel's split-K of at most 8 slices summed in a thread-block cluster (sm_90, where the grid's "
     "clusters are all resident), else through global partials and a counter."},
    {"lrqat_fused", 1, 0, 1,
     "CUDA LR-QAT with 16-bit adapters uses the tensor-core kernels (else fp32 A B + elementwise)."},
    {"lrqat_fused_blocks", 0, 0, kMax,
     "Most blocks of the LR-QAT tile kernels, each running through a contiguous run of tiles (0: as many as "
     "fill the GPU once). Tests set a few, so that a block crosses column tiles and row groups."},
    {"lrqat_rank_kernel", 1, 0, 1,
     "CUDA LR-QAT with 16-bit adapters takes dA = dU B^T and dB = A^T dU from one read of dU (one kernel and a "
     "small sum of its partials), else as two cuBLAS GEMMs, each reading dU."},
}};

std::atomic<int64_t>* values() {
  static std::atomic<int64_t> v[int(Knob::Count)];
  static const bool initialised = [] {
    for (int i = 0; i < int(Knob::Count); ++i) v[i].store(kKnobs[i].default_value);
    return true;
  }();
  (void)initialised;
  return v;
}

}  // namespace

const KnobInfo& knob_info(Knob knob) { return kKnobs[int(knob)]; }

int64_t tuning(Knob knob) { return values()[int(knob)].load(std::memory_order_relaxed); }

void set_tuning(Knob knob, int64_t value) {
  const KnobInfo& info = knob_info(knob);
  TORCH_CHECK_VALUE(value >= info.min_value && value <= info.max_value, "qatext.tuning: ", info.name, " must be in [",
                    info.min_value, ", ", info.max_value, "], got ", value);
  TORCH_CHECK_VALUE(knob != Knob::DecodeGemmRowTiles || value != 3,
                    "qatext.tuning: decode_gemm_row_tiles must be 1, 2 or 4, got ", value);
  TORCH_CHECK_VALUE(knob != Knob::DecodeGemmStages || (value >= 2 && value <= 4) || value == 8,
                    "qatext.tuning: decode_gemm_stages must be 2, 3, 4 or 8, got ", value);
  values()[int(knob)].store(value, std::memory_order_relaxed);
}

Knob knob_by_name(const char* name) {
  std::string known;
  for (int i = 0; i < int(Knob::Count); ++i) {
    if (std::strcmp(kKnobs[i].name, name) == 0) return Knob(i);
    known += (i ? ", " : "") + std::string(kKnobs[i].name);
  }
  TORCH_CHECK_VALUE(false, "qatext.tuning: unknown knob '", name, "'; known: ", known);
}

}  // namespace qatext::ops
