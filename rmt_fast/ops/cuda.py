"""The compiled extension ``rmt_fast._C``: torch-free CUDA kernels (csrc/*.cu, sm_61+) and their torch bindings.

:func:`load` finds it, in this order, the first time a CUDA backend wants it (never on import):

1. the prebuilt ``rmt_fast._C`` (``pip install --no-build-isolation .`` on a machine with nvcc and a CUDA torch);
2. a just-in-time build of the same sources (``torch.utils.cpp_extension.load`` with ninja), cached in
   :func:`jit_dir`: ``$RMT_FAST_CACHE`` (default ``~/.cache/rmt_fast``) ``/ext/<key>``, the key naming Python,
   torch, its CUDA, the target architectures and a hash of the sources and flags, so a cached build is reused
   as is and anything that would change the binary builds anew.

The build targets ``TORCH_CUDA_ARCH_LIST``, by default the current GPU only (one architecture compiles in about
a minute). It runs at most once per process and says so on one line; when it cannot run or fails, the extension
stays unavailable for the process with one warning that says why and how to fix it (:func:`why_not` keeps the
reason). ``RMT_FAST_NO_EXT=1`` disables the extension, prebuilt or not, without a warning.

``memory_attention/cuda.py`` and ``segment_handoff/cuda.py`` call its functions; :mod:`rmt_fast.env` reports on it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import importlib.util
import os
import re
import shutil
import sys
import sysconfig
import threading
import time
import types
import warnings
from pathlib import Path

import torch

# op name -> the extension functions it needs
_OPS = {
    "memory_attention": ("memory_attention_fwd", "memory_attention_bwd"),
    "segment_handoff": ("gather_memory_fwd", "gather_memory_bwd", "place_memory_fwd", "place_memory_bwd"),
}
MIN_ARCH = (6, 1)
# The flags of setup.py's prebuilt extension (python_tests/test_jit_build.py checks that they agree).
CXX_FLAGS = ["-O3"]
NVCC_FLAGS = ["-O3", "--use_fast_math", "-lineinfo"]
_SOURCE_SUFFIXES = (".cu", ".cuh", ".h", ".cpp")
_JIT_NAME = "rmt_fast_C"
NO_PREBUILT = "no prebuilt rmt_fast._C"


@dataclasses.dataclass
class _Loaded:
    """What :func:`load` found in this process: it looks once."""
    done: bool = False
    ext: types.ModuleType | None = None
    why_not: str | None = None


_loaded = _Loaded()
_lock = threading.Lock()


def disabled() -> bool:
    return os.environ.get("RMT_FAST_NO_EXT") == "1"


def load() -> types.ModuleType | None:
    """The extension with every op (prebuilt, cached or built now), or None; see the module docstring.

    Looks once per process. Building needs a CUDA torch, a GPU (or ``TORCH_CUDA_ARCH_LIST``), nvcc and ninja.
    """
    with _lock:
        if not _loaded.done:
            _loaded.ext, reason = _find_or_build()
            _loaded.why_not = None if reason is None else reason[0]
            _loaded.done = True
            if reason is not None and not disabled():
                why, fix = reason
                warnings.warn(f"rmt_fast: the CUDA extension rmt_fast._C is not available: {why}. The other "
                              f"backends run instead (Triton on sm_80+, else the reference path). To fix: {fix}",
                              RuntimeWarning, stacklevel=2)
        return _loaded.ext


def loaded() -> types.ModuleType | None:
    """The extension :func:`load` found in this process, without looking (None if not found or not looked)."""
    return _loaded.ext


def why_not() -> str | None:
    """Why :func:`load` found no extension in this process; None if it did or has not looked yet."""
    return _loaded.why_not


def available() -> bool:
    """Whether a CUDA device is present and the extension is usable (loading or building it on first call)."""
    return torch.cuda.is_available() and load() is not None


def has_op(name: str) -> bool:
    """Whether the extension is usable and provides op ``name`` ("memory_attention" | "segment_handoff")."""
    if name not in _OPS:
        raise ValueError(f"name must be one of {tuple(_OPS)}, got {name!r}")
    return available()  # load() only accepts an extension with every op


def extension(op: str) -> types.ModuleType:
    """The extension module, or RuntimeError naming ``op`` and the reason when it is not usable."""
    if not has_op(op):
        reason = why_not() or "no CUDA device"
        raise RuntimeError(f"rmt_fast: the CUDA extension rmt_fast._C with {op} is not available ({reason}); "
                           "use backend='reference' or 'triton'")
    return _loaded.ext


# --- what exists, without building ---------------------------------------------------------------------------------

def prebuilt() -> tuple[types.ModuleType | None, str | None]:
    """``(module, None)`` for an importable prebuilt ``rmt_fast._C`` with every op, else ``(None, why)``."""
    try:
        module = importlib.import_module("rmt_fast._C")
    except ModuleNotFoundError as e:
        if e.name != "rmt_fast._C":
            return None, f"the prebuilt rmt_fast._C does not import ({e})"
        return None, NO_PREBUILT
    except ImportError as e:  # built against another torch: undefined symbols
        return None, f"the prebuilt rmt_fast._C does not import ({e})"
    missing = [fn for fns in _OPS.values() for fn in fns if not hasattr(module, fn)]
    if missing:
        return None, f"the prebuilt rmt_fast._C predates these sources (no {', '.join(missing)})"
    return module, None


def sources_dir() -> Path | None:
    """The kernel sources: ``rmt_fast/csrc`` in an installed wheel, ``csrc/`` beside the package in a checkout."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "csrc", package.parent / "csrc"):
        if (candidate / "rmt_fast_kernels.h").is_file() and (candidate / "bindings.cpp").is_file():
            return candidate
    return None


def source_hash(directory: Path) -> str:
    """A digest of every source file in ``directory`` (not its subfolders) and of the compile flags."""
    digest = hashlib.sha256(repr((CXX_FLAGS, NVCC_FLAGS)).encode())
    for path in sorted(p for p in directory.iterdir() if p.suffix in _SOURCE_SUFFIXES and p.is_file()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def target_archs() -> list[str]:
    """The architectures a build targets: ``TORCH_CUDA_ARCH_LIST`` ("8.0;9.0+PTX"), else the current GPU's, else []."""
    wanted = os.environ.get("TORCH_CUDA_ARCH_LIST", "").replace(",", ";").replace(" ", ";")
    if wanted.strip(";"):
        return [a for a in wanted.split(";") if a]
    if torch.version.cuda is None or not torch.cuda.is_available():
        return []
    major, minor = torch.cuda.get_device_capability()
    return [f"{major}.{minor}"]


def cache_key(torch_version: str, cuda_version: str | None, archs: list[str], sources: str,
              python: str = f"{sys.version_info.major}{sys.version_info.minor}") -> str:
    """The cache folder name of a build: anything that changes the binary changes the key."""
    arch = "-".join(a.lower().replace(".", "") for a in archs)
    key = f"py{python}-torch{torch_version}-cu{cuda_version}-sm{arch}-{sources}"
    return re.sub(r"[^\w.+-]", "_", key)


def cache_root() -> Path:
    """``$RMT_FAST_CACHE/ext``, else ``$XDG_CACHE_HOME/rmt_fast/ext`` (default ``~/.cache/rmt_fast/ext``)."""
    root = os.environ.get("RMT_FAST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "rmt_fast")
    return Path(root) / "ext"


def jit_dir(archs: list[str] | None = None) -> Path | None:
    """The cache folder of the build for ``archs`` (default :func:`target_archs`); None without sources or archs."""
    src, archs = sources_dir(), target_archs() if archs is None else archs
    if src is None or not archs:
        return None
    return cache_root() / cache_key(torch.__version__, torch.version.cuda, archs, source_hash(src))


def jit_library(directory: Path) -> Path:
    from torch.utils.cpp_extension import LIB_EXT

    return directory / f"{_JIT_NAME}{LIB_EXT}"


def find_nvcc() -> str | None:
    """nvcc where torch's builds look for it: ``$CUDA_HOME``/``$CUDA_PATH``, then PATH, then /usr/local/cuda."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        nvcc = os.path.join(home, "bin", "nvcc")
        return nvcc if os.access(nvcc, os.X_OK) else None
    on_path = shutil.which("nvcc")
    if on_path:
        return on_path
    nvcc = "/usr/local/cuda/bin/nvcc"
    return nvcc if os.access(nvcc, os.X_OK) else None


def find_ninja() -> str | None:
    """ninja on PATH, or in this interpreter's scripts folder (``pip install ninja`` in a venv not activated)."""
    return shutil.which("ninja") or shutil.which("ninja", path=sysconfig.get_path("scripts"))


def build_blocker(archs: list[str]) -> tuple[str, str] | None:
    """``(why, fix)`` when a build for ``archs`` cannot even start here; None when it can."""
    return _target_blocker(archs) or _toolchain_blocker()


def _target_blocker(archs: list[str]) -> tuple[str, str] | None:
    """What rules out any build for ``archs``, cached or not."""
    if disabled():
        return "disabled by RMT_FAST_NO_EXT=1", "unset RMT_FAST_NO_EXT"
    if torch.version.cuda is None:
        return (f"torch {torch.__version__} is built without CUDA",
                "install a CUDA build of torch (https://pytorch.org/get-started/locally/)")
    if sources_dir() is None:
        return "the kernel sources (rmt_fast/csrc) are not installed", "reinstall rmt_fast"
    if not archs:
        return ("no CUDA GPU to build for",
                "run on a machine with a GPU, or set TORCH_CUDA_ARCH_LIST (e.g. '8.0') to build without one")
    low = [a for a in archs if _arch_tuple(a) < MIN_ARCH]
    if low:
        return (f"the kernels need sm_61+, asked for {', '.join(low)}",
                "use a newer GPU (or backend='reference'), or drop it from TORCH_CUDA_ARCH_LIST")
    return None


def _toolchain_blocker() -> tuple[str, str] | None:
    """What a new build lacks: nvcc or ninja."""
    if find_nvcc() is None:
        where = "in $CUDA_HOME/bin" if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") else "on PATH"
        return (f"not built, and no nvcc {where} to build it",
                f"install the CUDA toolkit {torch.version.cuda} (nvcc) and set CUDA_HOME to it, or install a "
                "wheel built with `pip install --no-build-isolation .` on a machine that has one")
    if find_ninja() is None:
        return "not built, and no ninja to build it", "pip install ninja"
    return None


def _arch_tuple(arch: str) -> tuple[int, int]:
    major, _, minor = arch.partition(".")
    return int(major), int(re.sub(r"\D.*", "", minor) or 0)


# --- the search and the build ---------------------------------------------------------------------------------------

def _find_or_build() -> tuple[types.ModuleType | None, tuple[str, str] | None]:
    """``(module, None)`` or ``(None, (why, fix))``."""
    if disabled():
        return None, ("disabled by RMT_FAST_NO_EXT=1", "unset RMT_FAST_NO_EXT")
    module, note = prebuilt()
    if module is not None:
        return module, None
    module, reason = _find_or_build_jit()
    if reason is not None and note != NO_PREBUILT:  # a broken prebuilt: say so too
        reason = (f"{note}; and {reason[0]}", reason[1])
    return module, reason


def _find_or_build_jit() -> tuple[types.ModuleType | None, tuple[str, str] | None]:
    archs = target_archs()
    blocker = _target_blocker(archs)
    if blocker is not None:
        return None, blocker
    directory = jit_dir(archs)
    library = jit_library(directory)
    if library.is_file():
        try:
            return _import_library(library), None
        except ImportError as e:
            return None, (f"the cached build {library} does not import ({e})", f"delete {directory} to rebuild it")
    blocker = _toolchain_blocker()
    if blocker is not None:
        return None, blocker
    return _build(directory, archs)


def _import_library(library: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(_JIT_NAME, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(directory: Path, archs: list[str]) -> tuple[types.ModuleType | None, tuple[str, str] | None]:
    from torch.utils import cpp_extension

    src = sources_dir()
    sources = sorted(str(p) for p in src.glob("*.cu")) + [str(src / "bindings.cpp")]
    targets = ", ".join("sm_" + a.replace(".", "") for a in archs)
    print(f"rmt_fast: building the CUDA extension for {targets} (once, about 1-2 minutes) in {directory}",
          file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _remove_stale_lock(directory)
        with _build_environment(archs):
            module = cpp_extension.load(_JIT_NAME, sources, extra_cflags=CXX_FLAGS, extra_cuda_cflags=NVCC_FLAGS,
                                        extra_include_paths=[str(src)], build_directory=str(directory),
                                        with_cuda=True, verbose=False)
    except Exception as e:  # noqa: BLE001 -- any failure (toolchain, compiler, import) falls back, with the reason
        log = directory / "build.log"
        with contextlib.suppress(OSError):
            log.write_text(f"{type(e).__name__}: {e}\n")
        return None, (f"the build failed after {time.perf_counter() - start:.0f} s: {_first_error(e)}",
                      f"see {log}; a CUDA toolkit matching torch's CUDA {torch.version.cuda} and a host compiler "
                      "it supports usually fix it; RMT_FAST_NO_EXT=1 skips the build")
    missing = [fn for fns in _OPS.values() for fn in fns if not hasattr(module, fn)]
    if missing:
        return None, (f"the built extension lacks {', '.join(missing)}", f"delete {directory} and report this")
    return module, None


def _remove_stale_lock(directory: Path, max_age_s: float = 3600.0) -> None:
    """Deletes the lock of a build that was killed (cpp_extension would wait for it forever); a live build of
    these sources takes minutes, not an hour."""
    lock = directory / "lock"
    with contextlib.suppress(OSError):
        if time.time() - lock.stat().st_mtime > max_age_s:
            lock.unlink()


@contextlib.contextmanager
def _build_environment(archs: list[str]):
    """TORCH_CUDA_ARCH_LIST = ``archs`` and ninja's folder on PATH, for the duration of the build."""
    saved = {k: os.environ.get(k) for k in ("TORCH_CUDA_ARCH_LIST", "PATH")}
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)
    os.environ["PATH"] = os.path.dirname(find_ninja()) + os.pathsep + os.environ.get("PATH", "")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _first_error(e: Exception) -> str:
    """The compiler's first error line of a failed build, else the exception's first line."""
    text = str(e)
    for line in text.splitlines():
        if re.search(r"\berror\b", line, re.IGNORECASE) and not line.startswith("Error building extension"):
            return line.strip().rstrip(".")[:300]
    return (text.splitlines() or [type(e).__name__])[0].rstrip(".")[:300]
