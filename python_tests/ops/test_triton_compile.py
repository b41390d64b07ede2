"""Every Triton kernel compiles for sm_80 and sm_90 at the launch configurations the ops use, and fits the shared
memory of those GPUs (and of sm_86/sm_89): ``python -m rmt_fast.ops.triton_check`` with Triton's ahead-of-time
compiler, no GPU needed. The two architectures compile in parallel subprocesses, without TRITON_INTERPRET (under
the interpreter, which the CPU test session uses, kernels are not compilable)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_every_triton_kernel_compiles_for_sm80_and_sm90_and_fits_shared_memory():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default today; set to keep Triton 3.9 from warning
    # sm_90 also reports registers and stack bytes (--resources)
    procs = {arch: subprocess.Popen([sys.executable, "-m", "rmt_fast.ops.triton_check", "--arch", str(arch)]
                                    + (["--resources"] if arch == 90 else []),
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
             for arch in (80, 90)}
    outputs = {arch: p.communicate(timeout=1500)[0] for arch, p in procs.items()}
    kernels = ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel", "_bwd_fused_kernel", "_bwd_delta_kernel",
               "_bwd_dq_stored_kernel", "_fwd_cache_kernel", "_bwd_dq_cache_kernel", "_bwd_dkdv_cache_kernel",
               "_bwd_fused_cache_kernel", "_bwd_dq_stored_cache_kernel", "_rms_norm_kernel", "_rotary_kernel",
               "_silu_mul_kernel", "_gather_memory_kernel", "_place_memory_kernel", "_cross_entropy_rows")
    for arch, out in outputs.items():
        assert procs[arch].returncode == 0, out[-4000:]
        assert "FAIL" not in out and "compiled and fit" in out, out[-4000:]
        for name in kernels:
            assert f"sm_{arch} ok   {name}" in out, f"{name} not compiled for sm_{arch}"
    # the TMA row-load variants (tensor descriptors) compile for sm_90 only, and there for every kernel that has one
    with_tma = ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel", "_bwd_dq_stored_kernel", "_fwd_cache_kernel",
                "_bwd_dq_cache_kernel", "_bwd_dkdv_cache_kernel", "_bwd_dq_stored_cache_kernel")
    tma_lines = [line for line in outputs[90].splitlines() if "TMA=True" in line]
    for name in with_tma:
        assert any(line.startswith(f"sm_90 ok   {name}") for line in tma_lines), f"{name}: no TMA variant compiled"
    assert "TMA=True" not in outputs[80]
    from rmt_fast.ops import triton_check

    kernel_lines = [line for line in outputs[90].splitlines() if line.startswith("sm_90 ok")]
    if triton_check._cuobjdump() is not None:
        assert kernel_lines and all(" REG=" in line and " STACK=" in line for line in kernel_lines), kernel_lines[:3]
        regs = [int(line.split(" REG=")[1].split()[0]) for line in kernel_lines]
        assert all(1 <= r <= 255 for r in regs)
    else:
        assert "cuobjdump was not found" in outputs[90]
    assert " REG=" not in outputs[80]


def test_parse_resource_usage():
    from rmt_fast.ops.triton_check import parse_resource_usage

    text = """
Resource usage:
 Common:
  GLOBAL:11 CONSTANT[4]:8
 Function _bwd_dkdv_kernel:
  REG:255 STACK:80 SHARED:1024 LOCAL:0 CONSTANT[0]:664 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    assert parse_resource_usage(text) == {"registers": 255, "stack": 80}
    assert parse_resource_usage("cuobjdump fatal   : Could not open input file") is None
