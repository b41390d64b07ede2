"""Builds the optional CUDA extension ``rmt_fast._C`` and ships its sources; metadata lives in pyproject.toml.

The extension is prebuilt when torch with CUDA and an nvcc are present at build time (use
``pip install --no-build-isolation .`` so the build sees your torch) and ``RMT_FAST_NO_EXT`` is not 1.
Otherwise the package installs as pure Python with one message, and rmt_fast/ops/cuda.py builds the extension
just in time the first time a CUDA backend wants it, from the sources every wheel carries as ``rmt_fast/csrc``.
TORCH_CUDA_ARCH_LIST defaults to "6.1;8.0;9.0" minus what the found nvcc cannot target.
"""
import glob
import os
import re
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = ["6.1", "8.0", "9.0"]
SOURCE_SUFFIXES = (".cu", ".cuh", ".h", ".cpp")


def _say(msg: str) -> None:
    print(f"rmt_fast setup: {msg}", file=sys.stderr)


def _nvcc_archs(nvcc: str) -> set[str]:
    """The compute capabilities this nvcc can emit code for, as "X.Y" strings."""
    try:
        out = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return set(DEFAULT_ARCHS)
    return {f"{m[:-1]}.{m[-1]}" for m in re.findall(r"sm_(\d+)", out)}


def extension_modules():
    if os.environ.get("RMT_FAST_NO_EXT") == "1":
        _say("RMT_FAST_NO_EXT=1: skipping the CUDA extension (pure Python install)")
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu"))) + ["csrc/bindings.cpp"]
    if not os.path.exists(os.path.join(HERE, "csrc", "bindings.cpp")):
        _say("csrc/bindings.cpp not found: skipping the CUDA extension")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        _say("torch is not importable at build time (build isolation?): pure Python install; "
             "use `pip install --no-build-isolation .` to build the CUDA extension")
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        _say("torch has no CUDA or no nvcc was found: pure Python install (reference and Triton paths)")
        return [], {}
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
    wanted = os.environ.get("TORCH_CUDA_ARCH_LIST", ";".join(DEFAULT_ARCHS)).replace(" ", ";").split(";")
    wanted = [a.replace("+PTX", "") for a in wanted if a]
    can = _nvcc_archs(nvcc)
    archs = [a for a in wanted if a.rstrip("af") in can]  # "9.0a" needs an nvcc that targets 9.0
    dropped = [a for a in wanted if a.rstrip("af") not in can]
    if dropped:
        _say(f"{nvcc} cannot target {', '.join(dropped)}; building for {', '.join(archs) or 'nothing'}")
    if not archs:
        return [], {}
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)
    ext = CUDAExtension(
        name="rmt_fast._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        # the flags of the just-in-time build (CXX_FLAGS, NVCC_FLAGS in rmt_fast/ops/cuda.py)
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


class BuildPyWithKernelSources(build_py):
    """Copies csrc/'s sources (not its tests) into the package as rmt_fast/csrc, for the just-in-time build.

    Editable installs skip the copy: there the loader reads csrc/ beside the package.
    """

    def run(self):
        super().run()
        if self.editable_mode:
            return
        target = os.path.join(self.build_lib, "rmt_fast", "csrc")
        self.mkpath(target)
        for name in sorted(os.listdir(os.path.join(HERE, "csrc"))):
            if name.endswith(SOURCE_SUFFIXES):
                self.copy_file(os.path.join(HERE, "csrc", name), os.path.join(target, name))


ext_modules, cmdclass = extension_modules()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithKernelSources, **cmdclass})
