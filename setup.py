"""Builds qatext._C with CMake (the one build); `pip install --no-build-isolation .` drives it.

Environment: QATEXT_CUDA=auto|ON|OFF, TORCH_CUDA_ARCH_LIST (e.g. "8.0;9.0a"), QATEXT_BUILD_DIR
(default build/, kept so rebuilds are incremental and ctest can run there), MAX_JOBS.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _tool(module: str, name: str) -> str:
    """cmake / ninja from this Python environment's PyPI packages when installed, else from PATH."""
    try:
        mod = __import__(module)
        return str(Path(getattr(mod, "CMAKE_BIN_DIR", getattr(mod, "BIN_DIR", ""))) / name)
    except (ImportError, AttributeError):
        return shutil.which(name) or name


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        out_dir = target.parent
        build_dir = Path(os.environ.get("QATEXT_BUILD_DIR", ROOT / "build")).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            _tool("cmake", "cmake"), "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={_tool('ninja', 'ninja')}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DQATEXT_CUDA={os.environ.get('QATEXT_CUDA', 'auto')}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('CMAKE_BUILD_TYPE', 'Release')}",
        ]
        subprocess.run(configure, check=True)
        build = [_tool("cmake", "cmake"), "--build", str(build_dir)]
        if os.environ.get("MAX_JOBS"):
            build += ["-j", os.environ["MAX_JOBS"]]
        subprocess.run(build, check=True)
        in_sources = ROOT / "qatext" / target.name
        if getattr(self, "editable_mode", False) and target != in_sources:
            # pip install -e: the package is imported from the sources, so the module goes there too.
            shutil.copy2(target, in_sources)


setup(ext_modules=[CMakeExtension("qatext._C")], cmdclass={"build_ext": CMakeBuild})
