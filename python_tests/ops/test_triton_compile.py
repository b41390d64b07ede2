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
    procs = {arch: subprocess.Popen([sys.executable, "-m", "rmt_fast.ops.triton_check", "--arch", str(arch)],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
             for arch in (80, 90)}
    outputs = {arch: p.communicate(timeout=1500)[0] for arch, p in procs.items()}
    kernels = ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel", "_bwd_fused_kernel", "_bwd_delta_kernel",
               "_bwd_dq_stored_kernel", "_rms_norm_kernel", "_rotary_kernel", "_silu_mul_kernel",
               "_gather_memory_kernel", "_place_memory_kernel", "_cross_entropy_rows")
    for arch, out in outputs.items():
        assert procs[arch].returncode == 0, out[-4000:]
        assert "FAIL" not in out and "compiled and fit" in out, out[-4000:]
        for name in kernels:
            assert f"sm_{arch} ok   {name}" in out, f"{name} not compiled for sm_{arch}"
    # the TMA row-load variants (tensor descriptors) compile for sm_90 only, and there for every kernel that has one
    with_tma = ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel", "_bwd_dq_stored_kernel")
    tma_lines = [line for line in outputs[90].splitlines() if "TMA=True" in line]
    for name in with_tma:
        assert any(line.startswith(f"sm_90 ok   {name}") for line in tma_lines), f"{name}: no TMA variant compiled"
    assert "TMA=True" not in outputs[80]
