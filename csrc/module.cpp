// The Python module qatext._C: importing it registers the ops; it also reports how it was built.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include <sstream>
#include <string>
#include <vector>

#include "build_info.h"
#include "ops/common.h"
#include "ops/decode_autotune.h"

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
  // The tuning knobs, bound from their one table (ops/tuning.cpp); qatext.tuning() wraps these.
  m.def(
      "tuning_get", [](const std::string& name) { return qatext::ops::tuning(qatext::ops::knob_by_name(name.c_str())); },
      py::arg("name"));
  m.def(
      "tuning_set",
      [](const std::string& name, int64_t value) {
        qatext::ops::set_tuning(qatext::ops::knob_by_name(name.c_str()), value);
      },
      py::arg("name"), py::arg("value"));
  // Not an op: it times kernels (and synchronises), once per shape, where a layer takes its decode layout.
  m.def("tune_decode_gemm", &qatext::ops::tune_decode_gemm, py::arg("tiled"), py::arg("scale"), py::arg("zero"),
        py::arg("bits"), py::arg("group_size"), py::arg("in_features"));
  m.def("decode_gemm_crossover", &qatext::ops::decode_gemm_crossover, py::arg("device"), py::arg("out_features"),
        py::arg("in_features"), py::arg("bits"), py::arg("group_size"));
  m.def("staged_gemm_limit", &qatext::ops::staged_gemm_limit, py::arg("device"), py::arg("out_features"),
        py::arg("in_features"), py::arg("bits"), py::arg("group_size"));
  m.def("decode_gemm_choice", &qatext::ops::decode_gemm_choice, py::arg("device"), py::arg("out_features"),
        py::arg("in_features"), py::arg("bits"), py::arg("group_size"), py::arg("tokens"));
  m.def("tuning_table", [] {
    py::list table;
    for (int i = 0; i < int(qatext::ops::Knob::Count); ++i) {
      const auto& info = qatext::ops::knob_info(qatext::ops::Knob(i));
      py::dict row;
      row["name"] = info.name;
      row["default"] = info.default_value;
      row["min"] = info.min_value;
      row["max"] = info.max_value;
      row["doc"] = info.doc;
      table.append(row);
    }
    return table;
  });
}
