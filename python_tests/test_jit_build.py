"""The just-in-time build of the CUDA extension (rmt_fast/ops/cuda.py) and the packaging that makes it possible.

Runs without a GPU: the cache key, the failure paths (one warning, then the other backends, nothing raised by the
public ops with backend="auto"), RMT_FAST_NO_EXT=1, no build on import, and the sdist and wheel carrying the
kernel sources. A real build of the kernels is the GPU machine's job (python_tests/test_cuda_ext.py).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

import rmt_fast.ops
from rmt_fast.ops import SegmentLayout, cuda
from rmt_fast.ops.memory_attention import memory_attention
from rmt_fast.ops.segment_handoff import segment_handoff

ROOT = Path(__file__).resolve().parent.parent
COMPILE_ERROR = ("Error building extension 'rmt_fast_C': [1/3] nvcc -c memory_attention.cu\n"
                 "FAILED: memory_attention.cuda.o\n"
                 "memory_attention.cu(12): error: identifier \"__hfma2\" is undefined\n"
                 "1 error detected in the compilation of \"memory_attention.cu\".")


@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    """A loader that has not looked yet, a private cache, and no extension settings from the environment."""
    monkeypatch.setattr(cuda, "_loaded", cuda._Loaded())
    monkeypatch.setattr(cuda, "prebuilt", lambda: (None, cuda.NO_PREBUILT))
    monkeypatch.setenv("RMT_FAST_CACHE", str(tmp_path / "cache"))
    for name in ("RMT_FAST_NO_EXT", "TORCH_CUDA_ARCH_LIST"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


@pytest.fixture
def build_calls(monkeypatch):
    """cpp_extension.load replaced by a compile error; the list of its calls."""
    calls = []

    def failing_load(name, sources, **kw):
        calls.append((name, sources, kw, os.environ.get("TORCH_CUDA_ARCH_LIST")))
        raise RuntimeError(COMPILE_ERROR)

    monkeypatch.setattr(cpp_extension, "load", failing_load)
    return calls


@pytest.fixture
def toolchain_ready(monkeypatch):
    """As if torch had CUDA and nvcc and ninja were installed: the build starts."""
    monkeypatch.setattr(cuda, "_target_blocker", lambda archs: None)
    monkeypatch.setattr(cuda, "_toolchain_blocker", lambda: None)


def _loader_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "rmt_fast._C is not available" in str(w.message)]


def test_cache_key_changes_with_sources_flags_arch_torch_cuda_python(tmp_path, monkeypatch):
    src = tmp_path / "csrc"
    shutil.copytree(cuda.sources_dir(), src, ignore=shutil.ignore_patterns("tests"))
    digest = cuda.source_hash(src)
    base = dict(torch_version="2.13.0", cuda_version="12.8", archs=["8.0"], sources=digest, python="311")
    key = cuda.cache_key(**base)
    assert cuda.cache_key(**base) == key and cuda.source_hash(src) == digest  # deterministic
    (src / "notes.txt").write_text("not a source")
    (src / "tests").mkdir()
    (src / "tests" / "smoke.cpp").write_text("int main() {}")
    assert cuda.source_hash(src) == digest  # only the top-level sources count
    (src / "common.cuh").write_text((src / "common.cuh").read_text() + "\n// changed\n")
    edited = cuda.source_hash(src)
    monkeypatch.setattr(cuda, "NVCC_FLAGS", cuda.NVCC_FLAGS + ["-G"])
    flagged = cuda.source_hash(src)
    variants = [dict(sources=edited), dict(sources=flagged), dict(torch_version="2.14.0"), dict(cuda_version="13.0"),
                dict(archs=["9.0"]), dict(archs=["8.0", "9.0"]), dict(archs=["8.0+PTX"]), dict(python="312")]
    keys = {key} | {cuda.cache_key(**{**base, **v}) for v in variants}
    assert len(keys) == 1 + len(variants)
    assert all(os.sep not in k and " " not in k for k in keys)


def test_cache_folder_honours_rmt_fast_cache_and_arch_list(fresh_loader, monkeypatch):
    assert cuda.target_archs() == [] or torch.cuda.is_available()  # no GPU here: nothing to build for
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0 9.0+PTX")
    assert cuda.target_archs() == ["8.0", "9.0+PTX"]
    directory = cuda.jit_dir()
    assert directory.parent == fresh_loader / "cache" / "ext"
    assert "sm80-90+ptx" in directory.name and torch.__version__ in directory.name
    assert cuda.jit_dir(["7.5"]) != directory
    monkeypatch.delenv("RMT_FAST_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(fresh_loader / "xdg"))
    assert cuda.cache_root() == fresh_loader / "xdg" / "rmt_fast" / "ext"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cuda.cache_root() == Path.home() / ".cache" / "rmt_fast" / "ext"


def test_flags_agree_with_setup_py():
    setup_py = (ROOT / "setup.py").read_text()
    assert f'"cxx": {json.dumps(cuda.CXX_FLAGS)}, "nvcc": {json.dumps(cuda.NVCC_FLAGS)}' in setup_py


def test_blocked_build_warns_once_and_never_compiles(fresh_loader, build_calls, monkeypatch):
    """Whatever blocks the build on this machine (a CPU torch, no GPU, no nvcc) is one warning with a fix."""
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    monkeypatch.setenv("CUDA_HOME", str(fresh_loader / "empty_cuda_home"))
    (fresh_loader / "empty_cuda_home").mkdir()
    blocker = cuda.build_blocker(["8.0"])
    assert blocker is not None  # a CPU torch, or no nvcc in the empty CUDA_HOME
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert cuda.load() is None
        assert cuda.load() is None
    messages = _loader_warnings(record)
    assert len(messages) == 1 and blocker[0] in messages[0] and "To fix: " + blocker[1] in messages[0]
    assert cuda.why_not() == blocker[0] and not build_calls


def test_broken_prebuilt_and_blocked_build_name_both(fresh_loader, build_calls, monkeypatch):
    monkeypatch.setattr(cuda, "prebuilt", lambda: (None, "the prebuilt rmt_fast._C does not import (undefined symbol)"))
    monkeypatch.setattr(cuda, "_target_blocker", lambda archs: ("no CUDA GPU to build for", "use a GPU"))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert cuda.load() is None
    [message] = _loader_warnings(record)
    assert "undefined symbol); and no CUDA GPU to build for" in message and not build_calls


def test_no_nvcc_is_the_reason_when_torch_has_cuda(fresh_loader, build_calls, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    monkeypatch.setenv("CUDA_HOME", str(fresh_loader))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert cuda.load() is None
    [message] = _loader_warnings(record)
    assert "no nvcc in $CUDA_HOME/bin" in message and "install the CUDA toolkit 12.8" in message
    assert not build_calls


def test_compile_error_warns_once_with_the_error_and_builds_once(fresh_loader, build_calls, toolchain_ready,
                                                                  monkeypatch, capfd):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert cuda.load() is None
        assert cuda.load() is None  # at most one build per process
        assert not cuda.available() and not cuda.has_op("memory_attention")
    [message] = _loader_warnings(record)
    assert 'error: identifier "__hfma2" is undefined' in message and "build.log" in message
    assert len(build_calls) == 1
    name, sources, kw, arch_list = build_calls[0]
    assert name == "rmt_fast_C" and arch_list == "8.6"
    assert sorted(Path(s).name for s in sources) == ["bindings.cpp", "memory_attention.cu", "segment_handoff.cu"]
    assert kw["extra_cuda_cflags"] == cuda.NVCC_FLAGS and Path(kw["build_directory"]) == cuda.jit_dir()
    assert COMPILE_ERROR in (cuda.jit_dir() / "build.log").read_text()
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.6"  # restored after the build
    building = [line for line in capfd.readouterr().err.splitlines() if "building the CUDA extension" in line]
    assert len(building) == 1 and "sm_86" in building[0]
    with pytest.raises(RuntimeError, match="identifier"):
        cuda.extension("memory_attention")


@pytest.mark.skipif(torch.version.cuda is not None, reason="the real build fails only under a CPU torch")
def test_real_build_under_cpu_torch_fails_fast_and_cleanly(fresh_loader, toolchain_ready, monkeypatch):
    """torch.utils.cpp_extension.load itself, on this machine: a CPU torch has no CUDA_HOME, so it stops early."""
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert cuda.load() is None
    assert time.perf_counter() - start < 60
    [message] = _loader_warnings(record)
    assert "the build failed" in message and "CUDA_HOME" in message
    assert not cuda.jit_library(cuda.jit_dir()).exists()


def test_cached_build_is_imported_without_building(fresh_loader, build_calls, toolchain_ready, monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    library = cuda.jit_library(cuda.jit_dir())
    library.parent.mkdir(parents=True)
    library.write_bytes(b"not a shared library")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert cuda.load() is None
    [message] = _loader_warnings(record)
    assert "does not import" in message and f"delete {library.parent}" in message
    assert not build_calls


def test_no_ext_never_builds_nor_warns(fresh_loader, build_calls, toolchain_ready, monkeypatch):
    monkeypatch.setenv("RMT_FAST_NO_EXT", "1")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    monkeypatch.setattr(cuda, "prebuilt", lambda: pytest.fail("RMT_FAST_NO_EXT=1 must not look for the extension"))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert cuda.load() is None
    assert not _loader_warnings(record) and not build_calls
    assert "RMT_FAST_NO_EXT=1" in cuda.why_not()


def test_auto_on_a_gpu_falls_back_after_a_failed_build(fresh_loader, build_calls, toolchain_ready, monkeypatch):
    """An sm_75 GPU without Triton: "auto" consults the extension, whose build fails: one loader warning, the
    reference path, and an explicit backend="cuda" is a ValueError without a second build."""
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    monkeypatch.setattr(rmt_fast.ops.backends, "triton_available", lambda: False)
    monkeypatch.setattr(rmt_fast.ops.backends, "_warned", set())
    resolve = rmt_fast.ops.backends._resolve_backend.__wrapped__  # uncached: other tests resolved "auto" already
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert resolve("auto", torch.device("cuda")) == "reference"
        with pytest.raises(ValueError, match="cuda"):
            resolve("cuda", torch.device("cuda"))
    assert len(_loader_warnings(record)) == 1 and len(build_calls) == 1
    assert build_calls[0][3] == "7.5"  # the current GPU only


def test_public_ops_with_auto_run_after_a_failed_build(fresh_loader, build_calls, toolchain_ready, monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert cuda.load() is None
    layout = SegmentLayout(2, 2, torch.tensor([3, 1]), causal=True, memory_bidirectional=True)
    q, k, v = (torch.randn(2, 2, 7, 8) for _ in range(3))
    assert memory_attention(q, k, v, layout, backend="auto").shape == (2, 2, 7, 8)
    new_memory, embeds = segment_handoff(torch.randn(2, 7, 8), torch.randn(2, 2, 8), torch.tensor([5, -1]),
                                         torch.randn(2, 7, 8), 0, torch.tensor([5, 3]), backend="auto")
    assert new_memory.shape == (2, 2, 8) and embeds.shape == (2, 7, 8)


def test_stale_build_lock_is_removed(tmp_path):
    lock = tmp_path / "lock"
    lock.write_text("")
    cuda._remove_stale_lock(tmp_path)
    assert lock.exists()  # a build in progress
    os.utime(lock, (time.time() - 7200, time.time() - 7200))
    cuda._remove_stale_lock(tmp_path)
    assert not lock.exists()


def test_import_never_builds():
    code = ("import rmt_fast, rmt_fast.ops, rmt_fast.env; from rmt_fast.ops import cuda; "
            "print(cuda._loaded.done, 'rmt_fast._C' in __import__('sys').modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split() == ["False", "False"]


def _copy_project(dest: Path) -> Path:
    """The files a build reads, without caches and built objects."""
    dest.mkdir()
    for name in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "CMakeLists.txt"):
        shutil.copy(ROOT / name, dest / name)
    skip = shutil.ignore_patterns("__pycache__", "*.so", "*.pyc")
    shutil.copytree(ROOT / "csrc", dest / "csrc", ignore=skip)
    shutil.copytree(ROOT / "rmt_fast", dest / "rmt_fast", ignore=skip)
    return dest


def _build(kind: str, project: Path, out: Path) -> Path:
    """One PEP 517 build in ``project`` with this interpreter's setuptools (no isolation: offline, seconds)."""
    code = f"import setuptools.build_meta as b; print(b.build_{kind}({str(out)!r}))"
    env = {**os.environ, "RMT_FAST_NO_EXT": "1"}  # only the packaging: no prebuilt extension
    r = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return out / r.stdout.strip().splitlines()[-1]


def test_sdist_and_wheel_carry_the_kernel_sources(tmp_path):
    sources = sorted(p.name for p in (ROOT / "csrc").iterdir() if p.suffix in (".cu", ".cuh", ".h", ".cpp"))
    assert "bindings.cpp" in sources and "memory_attention.cu" in sources
    project = _copy_project(tmp_path / "project")
    sdist = _build("sdist", project, tmp_path / "dist")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        tar.extractall(tmp_path / "unpacked", filter="data")
    assert {f"csrc/{s}" for s in sources} | {"CMakeLists.txt", "csrc/tests/kernel_smoke.cpp"} <= names
    # the wheel, as `pip install .` and `python -m build` (from the sdist) make it
    for where in (project, next((tmp_path / "unpacked").iterdir())):
        wheel = _build("wheel", where, tmp_path / f"wheel_{where.name}")
        with zipfile.ZipFile(wheel) as zf:
            shipped = sorted(n.split("/")[-1] for n in zf.namelist() if n.startswith("rmt_fast/csrc/"))
            assert shipped == sources
            zf.extractall(tmp_path / f"site_{where.name}")
    # the installed package finds them, and keys its builds as a checkout does
    code = "from rmt_fast.ops import cuda; d = cuda.sources_dir(); print(d); print(cuda.source_hash(d))"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / f"site_{project.name}")}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env,
                         timeout=300, check=True).stdout.split()
    assert out == [str(tmp_path / f"site_{project.name}" / "rmt_fast" / "csrc"), cuda.source_hash(ROOT / "csrc")]
