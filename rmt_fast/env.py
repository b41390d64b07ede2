"""What this machine offers rmt_fast: torch, GPU, Triton, the CUDA extension, and which op backends can run.

:func:`report` returns a dict, :func:`format_report` a short text (``rmt-fast env`` prints it). Neither builds
the CUDA extension nor runs a kernel: they only look.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import re
import subprocess

import torch

from .ops import cuda

#: the backends of each op that a report covers ("auto" picks among them; the handoff has no SDPA form)
OP_BACKENDS = {
    "memory_attention": ("reference", "sdpa", "triton", "cuda"),
    "segment_handoff": ("reference", "triton", "cuda"),
}


def report() -> dict:
    """torch, GPU, Triton, liger-kernel, the CUDA extension and its toolchain, and per op each backend as
    ``{"usable": bool, "detail": str}`` (``detail``: why not, or how it runs) and what "auto" picks."""
    gpu = _gpu()
    triton = _triton()
    ext = _extension(gpu)
    backend_state = {
        "reference": (True, "plain PyTorch, any device"),
        "sdpa": (True, "plain layouts only (causal or full masks); other layouts run the backend auto picks"),
        "triton": _triton_usable(gpu, triton),
        "cuda": _cuda_usable(gpu, ext),
    }
    backends = {op: {name: {"usable": backend_state[name][0], "detail": backend_state[name][1]} for name in names}
                for op, names in OP_BACKENDS.items()}
    return {
        "rmt_fast": _version("rmt_fast"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": {"version": torch.__version__, "cuda": torch.version.cuda},
        "gpu": gpu,
        "triton": triton,
        "liger_kernel": _liger(),
        "extension": ext,
        "backends": backends,
        "auto": {op: _auto(op, gpu, backends[op]) for op in OP_BACKENDS},
        "fused_blocks": {"usable": backend_state["triton"][0],  # rmt_fast/fusion.py needs what Triton needs
                         "detail": backend_state["triton"][1]},
    }


def format_report(info: dict | None = None) -> str:
    """:func:`report` (or ``info``) as a few lines of text."""
    r = report() if info is None else info
    gpu, tri, lig, ext = r["gpu"], r["triton"], r["liger_kernel"], r["extension"]
    gpu_text = "none" if gpu is None else f"{gpu['name']} ({gpu['arch']})" + (
        f" x{gpu['count']}" if gpu["count"] > 1 else "")
    lines = [
        f"rmt_fast {r['rmt_fast']} | python {r['python']} | {r['platform']}",
        f"torch {r['torch']['version']} (CUDA {r['torch']['cuda'] or 'none'}) | GPU: {gpu_text}",
        f"triton: {tri['version'] or 'not installed'}"
        + ("" if tri["imports"] or tri["version"] is None else f" (does not import: {tri['error']})")
        + f" | liger-kernel: {lig['version'] or 'not installed'}"
        + ("" if lig["imports"] or lig["version"] is None else " (does not import)"),
        f"CUDA extension: prebuilt {'yes' if ext['prebuilt'] else 'no'} | JIT build "
        + (f"cached in {ext['jit_dir']}" if ext["jit_cached"] else
           f"not cached ({ext['jit_dir'] or 'no target architecture'})")
        + f" | nvcc {_tool(ext['nvcc'], ext['nvcc_version'])} | ninja {_tool(ext['ninja'])}"
        + (" | RMT_FAST_NO_EXT=1" if ext["disabled"] else ""),
    ]
    for op, backends in r["backends"].items():
        lines.append(f"{op} (auto: {r['auto'][op]})")
        width = max(map(len, backends))
        for name, state in backends.items():
            lines.append(f"  {name:<{width}}  {'yes' if state['usable'] else 'no '}  {state['detail']}")
    fb = r.get("fused_blocks")
    if fb is not None:
        lines.append(f"fused block kernels (Llama-family inference, fused_kernels=True): "
                     f"{'yes' if fb['usable'] else 'no'} ({fb['detail']})")
    return "\n".join(lines)


def _tool(path: str | None, version: str | None = None) -> str:
    if path is None:
        return "not found"
    return f"{path} ({version})" if version else path


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _gpu() -> dict | None:
    if not torch.cuda.is_available():
        return None
    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return {"name": torch.cuda.get_device_name(index), "arch": f"sm_{major}{minor}", "capability": [major, minor],
            "count": torch.cuda.device_count()}


def _import_error(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 -- a broken install is something to report, not to raise
        return f"{type(e).__name__}: {e}".splitlines()[0][:200]
    return None


def _triton() -> dict:
    version = _version("triton")
    error = None if version is None else _import_error("triton")
    if version is not None and error is None:  # rmt_fast's own kernels import too
        error = _import_error("rmt_fast.ops.memory_attention.triton") or _import_error(
            "rmt_fast.ops.segment_handoff.triton")
    return {"version": version, "imports": version is not None and error is None, "error": error,
            "interpret": os.environ.get("TRITON_INTERPRET") == "1"}


def _liger() -> dict:
    version = _version("liger-kernel")
    return {"version": version, "imports": version is not None and _import_error("liger_kernel") is None}


def _nvcc_version(nvcc: str | None) -> str | None:
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release ([\d.]+)", out)
    return found.group(1) if found else None


def _extension(gpu: dict | None) -> dict:
    module, prebuilt_note = cuda.prebuilt()
    directory = cuda.jit_dir()
    nvcc = cuda.find_nvcc()
    return {
        "prebuilt": module is not None,
        "prebuilt_note": prebuilt_note,
        "loaded": cuda.loaded() is not None,
        "why_not": cuda.why_not(),
        "sources": None if cuda.sources_dir() is None else str(cuda.sources_dir()),
        "target_archs": cuda.target_archs(),
        "jit_dir": None if directory is None else str(directory),
        "jit_cached": directory is not None and cuda.jit_library(directory).is_file(),
        "nvcc": nvcc,
        "nvcc_version": _nvcc_version(nvcc),
        "ninja": cuda.find_ninja(),
        "disabled": cuda.disabled(),
        "build_blocker": None if gpu is None else _join(cuda.build_blocker(cuda.target_archs())),
    }


def _join(reason: tuple[str, str] | None) -> str | None:
    return None if reason is None else f"{reason[0]} (fix: {reason[1]})"


def _triton_usable(gpu: dict | None, triton: dict) -> tuple[bool, str]:
    if triton["version"] is None:
        return False, "triton is not installed (pip install triton)"
    if not triton["imports"]:
        return False, f"triton does not import: {triton['error']}"
    if gpu is None:
        if triton["interpret"]:
            return True, "CPU tensors in the interpreter (TRITON_INTERPRET=1: slow, for tests)"
        return False, "needs a CUDA GPU (sm_80+), or TRITON_INTERPRET=1 for CPU tensors"
    if gpu["capability"][0] < 8:
        return False, f"needs sm_80+, this GPU is {gpu['arch']}"
    return True, f"triton {triton['version']} on {gpu['arch']}"


def _cuda_usable(gpu: dict | None, ext: dict) -> tuple[bool, str]:
    if ext["disabled"]:
        return False, "disabled by RMT_FAST_NO_EXT=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is built without CUDA"
    if gpu is None:
        return False, "no CUDA GPU"
    if tuple(gpu["capability"]) < cuda.MIN_ARCH:
        return False, f"needs sm_61+, this GPU is {gpu['arch']}"
    if ext["loaded"]:
        return True, "loaded in this process"
    if ext["why_not"] is not None:
        return False, f"extension not available: {ext['why_not']}"
    if ext["prebuilt"]:
        return True, "prebuilt rmt_fast._C"
    if ext["jit_cached"]:
        return True, f"JIT build cached in {ext['jit_dir']}"
    if ext["build_blocker"] is not None:
        return False, f"extension {ext['build_blocker']}"
    return True, f"built on first use (once, about 1-2 minutes), then cached in {ext['jit_dir']}"


def _auto(op: str, gpu: dict | None, backends: dict) -> str:
    """What backend="auto" runs for ``op`` here (rmt_fast.ops.resolve_backend's rule)."""
    plain = "sdpa for plain layouts, else " if "sdpa" in backends else ""
    if gpu is None:
        return plain + "reference"
    fused = next((b for b in ("triton", "cuda") if backends[b]["usable"]), "reference")
    return plain + fused
