# Decide whether to build CUDA kernels (QATEXT_CUDA=auto|ON|OFF) and prepare the toolkit.
#
# CPU machines may carry nvcc with a partial toolkit (no cuBLAS/nvrtc); a CUDA build of torch
# brings those libraries and headers in site-packages/nvidia/cu*/. torch's CMake config needs them,
# so point FindCUDAToolkit there when the toolkit itself lacks them.
include(CheckLanguage)
set(QATEXT_WITH_CUDA OFF)
set(QATEXT_ARCH_STRING "")
set(QATEXT_EXTRA_CUDA_INCLUDES "")

string(TOUPPER "${QATEXT_CUDA}" _qatext_cuda_mode)
if(NOT _qatext_cuda_mode STREQUAL "OFF")
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER AND QATEXT_TORCH_CUDA_VERSION)
    set(QATEXT_WITH_CUDA ON)
  elseif(_qatext_cuda_mode STREQUAL "ON")
    message(FATAL_ERROR "qatext: QATEXT_CUDA=ON but nvcc (${CMAKE_CUDA_COMPILER}) or a CUDA build of torch "
                        "(torch.version.cuda='${QATEXT_TORCH_CUDA_VERSION}') is missing")
  endif()
endif()

if(QATEXT_WITH_CUDA)
  # Architectures: TORCH_CUDA_ARCH_LIST ("8.0;9.0a") if set, else sm_80 and sm_90a.
  if(DEFINED ENV{TORCH_CUDA_ARCH_LIST} AND NOT "$ENV{TORCH_CUDA_ARCH_LIST}" STREQUAL "")
    string(REPLACE " " ";" _archs "$ENV{TORCH_CUDA_ARCH_LIST}")
    set(CMAKE_CUDA_ARCHITECTURES "")
    foreach(_a IN LISTS _archs)
      string(REPLACE "." "" _a "${_a}")
      string(REPLACE "+PTX" "" _a "${_a}")
      list(APPEND CMAKE_CUDA_ARCHITECTURES "${_a}")
    endforeach()
  elseif(NOT CMAKE_CUDA_ARCHITECTURES)
    set(CMAKE_CUDA_ARCHITECTURES "80;90a")
  endif()
  # torch's CMake config resets CMAKE_CUDA_ARCHITECTURES; the archs go on our target instead
  # (QATEXT_CUDA_ARCHITECTURES), and TORCH_CUDA_ARCH_LIST keeps torch from probing for a GPU.
  set(QATEXT_CUDA_ARCHITECTURES "${CMAKE_CUDA_ARCHITECTURES}")
  set(QATEXT_ARCH_STRING "${CMAKE_CUDA_ARCHITECTURES}")
  set(TORCH_CUDA_ARCH_LIST "")
  foreach(_a IN LISTS QATEXT_CUDA_ARCHITECTURES)
    string(REGEX REPLACE "^([0-9]+)([0-9])(a?)$" "\\1.\\2\\3" _dotted "${_a}")
    list(APPEND TORCH_CUDA_ARCH_LIST "${_dotted}")
  endforeach()
  set(CMAKE_CUDA_STANDARD 20)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  set(CMAKE_CUDA_RUNTIME_LIBRARY Shared)  # one CUDA runtime in the process: torch's
  enable_language(CUDA)
  unset(CMAKE_CUDA_ARCHITECTURES)
  # nvcc may be a wrapper outside the toolkit; torch's FindCUDA derives the root from nvcc's path.
  if(NOT CUDA_TOOLKIT_ROOT_DIR AND CMAKE_CUDA_COMPILER_TOOLKIT_ROOT)
    set(CUDA_TOOLKIT_ROOT_DIR "${CMAKE_CUDA_COMPILER_TOOLKIT_ROOT}" CACHE PATH "CUDA toolkit root")
  endif()

  file(GLOB _qatext_wheel_cuda_dirs "${QATEXT_SITE_PACKAGES}/nvidia/cu*")
  foreach(_dir IN LISTS _qatext_wheel_cuda_dirs)
    if(EXISTS "${_dir}/include/cublas_v2.h")
      list(APPEND QATEXT_EXTRA_CUDA_INCLUDES "${_dir}/include")
    endif()
    foreach(_lib nvrtc cublas cublasLt cusparse cufft curand cusolver nvJitLink cupti)
      file(GLOB _found "${_dir}/lib/lib${_lib}.so*")
      list(FILTER _found EXCLUDE REGEX "builtins|alt")
      if(_found AND NOT CUDA_${_lib}_LIBRARY)
        find_library(_qatext_probe_${_lib} ${_lib} PATHS "${CUDAToolkit_LIBRARY_ROOT}" "/usr/local/cuda/lib64" NO_DEFAULT_PATH)
        if(NOT _qatext_probe_${_lib})
          list(GET _found 0 _first)
          set(CUDA_${_lib}_LIBRARY "${_first}" CACHE FILEPATH "qatext: ${_lib} from the torch wheel")
        endif()
      endif()
    endforeach()
  endforeach()
  if(QATEXT_EXTRA_CUDA_INCLUDES)
    # FindCUDAToolkit and torch's targets look for headers (cublas_v2.h, ...) on these paths too.
    list(APPEND CMAKE_INCLUDE_PATH ${QATEXT_EXTRA_CUDA_INCLUDES})
    include_directories(AFTER SYSTEM ${QATEXT_EXTRA_CUDA_INCLUDES})
  endif()
  message(STATUS "qatext: building CUDA kernels for ${QATEXT_CUDA_ARCHITECTURES}")
else()
  message(STATUS "qatext: building without CUDA kernels")
endif()
