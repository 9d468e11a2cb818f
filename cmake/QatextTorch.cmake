# Ask the Python interpreter where torch lives and whether it is a CUDA build.
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
    "import torch, os; print(torch.utils.cmake_prefix_path); print(torch.version.cuda or ''); print(os.path.dirname(os.path.dirname(torch.__file__)))"
  OUTPUT_VARIABLE _qatext_torch_out
  OUTPUT_STRIP_TRAILING_WHITESPACE
  RESULT_VARIABLE _qatext_torch_rc)
if(NOT _qatext_torch_rc EQUAL 0)
  message(FATAL_ERROR "qatext: torch must be importable by ${Python_EXECUTABLE}")
endif()
string(REPLACE "\n" ";" _qatext_torch_out "${_qatext_torch_out}")
list(GET _qatext_torch_out 0 QATEXT_TORCH_CMAKE_PREFIX)
list(GET _qatext_torch_out 1 QATEXT_TORCH_CUDA_VERSION)
list(GET _qatext_torch_out 2 QATEXT_SITE_PACKAGES)
list(APPEND CMAKE_PREFIX_PATH "${QATEXT_TORCH_CMAKE_PREFIX}")
