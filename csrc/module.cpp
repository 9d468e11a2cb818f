// The Python module qatext._C: importing it registers the ops; it also reports how it was built.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <sstream>
#include <string>
#include <vector>

#include "build_info.h"
#include "ops/common.h"

namespace py = pybind11;

namespace {

std::vector<std::string> split_archs(const std::string& archs) {
  std::vector<std::string> out;
  std::stringstream ss(archs);
  for (std::string item; std::getline(ss, item, ';');) {
    if (!item.empty()) out.push_back("sm_" + item);
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "qatext compiled kernels";
  m.def("build_info", [] {
    py::dict info;
    info["torch_version_built"] = QATEXT_TORCH_VERSION;
#ifdef QATEXT_WITH_CUDA
    info["cuda_compiled"] = true;
#else
    info["cuda_compiled"] = false;
#endif
    info["cuda_archs"] = split_archs(QATEXT_CUDA_ARCHS);
    return info;
  });
  m.def("set_value_checks", &qatext::ops::set_value_checks, py::arg("enabled"),
        "Turn the data-dependent argument checks (scale > 0, codes < 2^bits) on or off.");
  m.def("value_checks_enabled", &qatext::ops::value_checks_enabled);
  m.def("set_dw_chunk_elements", &qatext::ops::set_dw_chunk_elements, py::arg("elements"),
        "Cap on the fp32 dW block (rows x K) that e2eqp_scale_grad forms at once.");
  m.def("dw_chunk_elements", &qatext::ops::dw_chunk_elements);
  m.def("set_dequant_gemm_max_m", &qatext::ops::set_dequant_gemm_max_m, py::arg("m"),
        "Largest token count for which CUDA dequant_matmul uses the fused kernel (0: never).");
  m.def("dequant_gemm_max_m", &qatext::ops::dequant_gemm_max_m);
  m.def("set_decode_gemm_max_m", &qatext::ops::set_decode_gemm_max_m, py::arg("m"),
        "Largest token count for which CUDA dequant_matmul_tiled uses the decode kernel (0: never).");
  m.def("decode_gemm_max_m", &qatext::ops::decode_gemm_max_m);
  m.def("set_decode_gemm_min_slice", &qatext::ops::set_decode_gemm_min_slice, py::arg("tiles"),
        "Fewest 64-column tiles per K slice of the decode kernel's split-K (else: split to fill one wave).");
  m.def("decode_gemm_min_slice", &qatext::ops::decode_gemm_min_slice);
  m.def("set_decode_gemm_row_tiles", &qatext::ops::set_decode_gemm_row_tiles, py::arg("tiles"),
        "Most 16-row weight tiles per warp of the decode kernel: 1, 2 or 4 (4 only for M <= 8 where the grid stays full).");
  m.def("decode_gemm_row_tiles", &qatext::ops::decode_gemm_row_tiles);
  m.def("set_lrqat_fused", &qatext::ops::set_lrqat_fused, py::arg("enabled"),
        "Whether CUDA LR-QAT with 16-bit adapters uses the tensor-core kernels (else fp32 A B + elementwise).");
  m.def("lrqat_fused_enabled", &qatext::ops::lrqat_fused_enabled);
}
