"""rmt_fast.env: the machine report names every backend of every op, with a reason for each one that cannot run,
and never builds the CUDA extension. GPUs are simulated here (patched torch.cuda)."""
from __future__ import annotations

import pytest
import torch
from torch.utils import cpp_extension

import rmt_fast.env as env
from rmt_fast.experiments.cli import main
from rmt_fast.ops import BACKENDS, cuda


@pytest.fixture(autouse=True)
def no_build(monkeypatch, tmp_path):
    """A loader that has not looked, no prebuilt, a private cache, and a build that fails the test if it starts."""
    monkeypatch.setattr(cuda, "_loaded", cuda._Loaded())
    monkeypatch.setattr(cuda, "prebuilt", lambda: (None, cuda.NO_PREBUILT))
    monkeypatch.setattr(cpp_extension, "load", lambda *a, **k: pytest.fail("the report must not build"))
    monkeypatch.setenv("RMT_FAST_CACHE", str(tmp_path / "cache"))
    for name in ("RMT_FAST_NO_EXT", "TORCH_CUDA_ARCH_LIST"):
        monkeypatch.delenv(name, raising=False)


def fake_gpu(monkeypatch, capability, torch_cuda="12.8"):
    monkeypatch.setattr(torch.version, "cuda", torch_cuda)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Simulated GPU")


def test_report_names_every_backend_with_a_reason():
    info = env.report()
    assert info["torch"]["version"] == torch.__version__
    assert {"gpu", "triton", "liger_kernel", "extension", "backends", "auto"} <= set(info)
    assert set(BACKENDS) - {"auto"} == set(info["backends"]["memory_attention"])
    assert set(info["backends"]["segment_handoff"]) == {"reference", "triton", "cuda"}
    for op, backends in info["backends"].items():
        assert backends["reference"]["usable"]
        for name, state in backends.items():
            assert isinstance(state["usable"], bool) and state["detail"], (op, name)
    for key in ("prebuilt", "jit_cached", "nvcc", "ninja", "jit_dir", "sources"):
        assert key in info["extension"]
    assert info["extension"]["sources"] is not None  # the checkout's csrc/ (an installed wheel's rmt_fast/csrc)
    if not torch.cuda.is_available():
        assert info["gpu"] is None and not info["backends"]["memory_attention"]["cuda"]["usable"]
        assert info["auto"]["segment_handoff"] == "reference"
    assert not cuda._loaded.done  # looked, did not load


def test_format_report_is_short_and_names_everything():
    text = env.format_report()
    assert len(text.splitlines()) <= 16
    for word in ("torch", "GPU", "triton", "liger-kernel", "nvcc", "ninja", "memory_attention", "segment_handoff",
                 "reference", "sdpa", "cuda"):
        assert word in text


def test_old_gpu_without_nvcc(monkeypatch, tmp_path):
    fake_gpu(monkeypatch, (7, 5))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))  # no bin/nvcc there
    info = env.report()
    attention = info["backends"]["memory_attention"]
    assert info["gpu"]["arch"] == "sm_75"
    assert not attention["triton"]["usable"] and "needs sm_80+" in attention["triton"]["detail"]
    assert not attention["cuda"]["usable"] and "no nvcc" in attention["cuda"]["detail"]
    assert info["auto"]["segment_handoff"] == "reference"
    assert "sm_75" in env.format_report(info)


def test_new_gpu_with_a_cached_build(monkeypatch):
    fake_gpu(monkeypatch, (9, 0))
    library = cuda.jit_library(cuda.jit_dir())
    library.parent.mkdir(parents=True)
    library.write_bytes(b"")
    info = env.report()
    handoff = info["backends"]["segment_handoff"]
    assert info["extension"]["jit_cached"] and "sm90" in info["extension"]["jit_dir"]
    assert handoff["cuda"]["usable"] and "cached" in handoff["cuda"]["detail"]
    if info["triton"]["imports"]:
        assert handoff["triton"]["usable"] and info["auto"]["segment_handoff"] == "triton"
    assert info["auto"]["memory_attention"].startswith("sdpa for plain layouts, else ")


def test_gpu_that_would_build_on_first_use(monkeypatch):
    fake_gpu(monkeypatch, (8, 6))
    monkeypatch.setattr(cuda, "_toolchain_blocker", lambda: None)
    monkeypatch.setattr(env, "_triton", lambda: {"version": None, "imports": False, "error": None, "interpret": False})
    info = env.report()
    cuda_state = info["backends"]["memory_attention"]["cuda"]
    assert cuda_state["usable"] and "first use" in cuda_state["detail"]
    assert "not installed" in info["backends"]["memory_attention"]["triton"]["detail"]
    assert info["auto"]["segment_handoff"] == "cuda"


def test_no_ext_and_cpu_torch_reasons(monkeypatch):
    fake_gpu(monkeypatch, (8, 0), torch_cuda=None)
    assert "built without CUDA" in env.report()["backends"]["memory_attention"]["cuda"]["detail"]
    monkeypatch.setenv("RMT_FAST_NO_EXT", "1")
    info = env.report()
    assert "RMT_FAST_NO_EXT=1" in info["backends"]["segment_handoff"]["cuda"]["detail"]
    assert "RMT_FAST_NO_EXT=1" in env.format_report(info)


def test_failed_load_in_this_process_is_the_reason(monkeypatch):
    fake_gpu(monkeypatch, (8, 0))
    monkeypatch.setattr(cuda, "_loaded", cuda._Loaded(done=True, why_not="the build failed after 3 s: boom"))
    detail = env.report()["backends"]["memory_attention"]["cuda"]["detail"]
    assert "the build failed after 3 s: boom" in detail


def test_cli_env_prints_the_report(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("rmt_fast ") and "memory_attention" in out and "segment_handoff" in out
