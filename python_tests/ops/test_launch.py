"""rmt_fast.ops.launch.Launcher: direct launches of compiled Triton kernels.

The bookkeeping (launch keys, constexpr order, the fallback) is tested on the CPU with a stand-in for a
``@triton.jit`` function; the real kernels through the direct path on a GPU (results bit-equal to Triton's
ordinary launch, a misaligned view getting its own compiled kernel).
"""
from __future__ import annotations

import contextlib
import types
import warnings

import pytest
import torch

from op_backends import TRITON
from rmt_fast.ops import launch

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
_NEEDS_TRITON = TRITON.marks[0]  # the skip mark of the "triton" backend param


class FakeCompiled:
    """A compiled kernel: its launcher records the call."""

    function, packed_metadata = "function", "packed"

    def __init__(self, calls):
        self.calls = calls

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, g0, g1, g2, stream, function, packed, metadata, enter_hook, exit_hook, *args):
        assert (stream, function, packed) == ("stream", "function", "packed")
        self.calls.append(("direct", (g0, g1, g2), args))


class FakeJit:
    """A ``@triton.jit`` function with signature ``(X, n, scale, A: constexpr, B: constexpr)``."""

    def __init__(self, names=("X", "n", "scale", "A", "B"), constexpr=(False, False, False, True, True),
                 compiled=True):
        self.params = [types.SimpleNamespace(name=n, is_constexpr=c) for n, c in zip(names, constexpr)]
        self.calls = []
        self.compiled_kernels = 0
        self.compiled = compiled
        self.__name__ = "fake_kernel"

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.calls.append(("ordinary", grid, args, meta))
            self.compiled_kernels += 1
            return FakeCompiled(self.calls) if self.compiled else None
        return run


@pytest.fixture
def gpu_less(monkeypatch):
    """The direct path on the CPU: not under the interpreter, device 0, a Triton version it was written for."""
    monkeypatch.setattr(launch, "_INTERPRET", False)
    monkeypatch.setattr(launch, "_current_stream", lambda device: "stream")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(launch, "TRITON_VERSION", "3.5.1")


def test_first_launch_ordinary_then_direct_with_constexprs_in_signature_order(gpu_less):
    fn = FakeJit()
    run = launch.Launcher(fn)
    x = torch.zeros(8)
    run((4,), x, 8, 0.5, B=2, A=1, num_warps=4)
    run((4,), x, 8, 0.25, B=2, A=1, num_warps=4)  # another float value: same key
    run((5,), x, 8, 0.25, B=2, A=1, num_warps=4)
    kinds = [c[0] for c in fn.calls]
    assert kinds == ["ordinary", "direct", "direct"]
    assert fn.calls[1] == ("direct", (4, 1, 1), (x, 8, 0.25, 1, 2))  # A then B, as declared
    assert fn.calls[2][1] == (5, 1, 1)


def test_launch_key_covers_what_triton_specialises_on(gpu_less):
    fn = FakeJit()
    run = launch.Launcher(fn)
    buf = torch.zeros(64)
    run((1,), buf, 8, 0.5, A=1, B=2)
    run((1,), buf[1:], 8, 0.5, A=1, B=2)  # 4 bytes off: not 16-byte aligned
    run((1,), buf.double(), 8, 0.5, A=1, B=2)  # dtype
    run((1,), buf, 16, 0.5, A=1, B=2)  # an int value
    run((1,), buf, 8, 1, A=1, B=2)  # an int where a float was
    run((1,), buf, 8, 0.5, A=2, B=2)  # a constexpr
    run((1,), buf, 8, 0.5, A=1, B=2, num_warps=8)  # an option
    assert [c[0] for c in fn.calls] == ["ordinary"] * 7
    run((1,), buf[4:], 8, 0.5, A=1, B=2)  # 16 bytes off: aligned, the first key again
    assert fn.calls[-1][0] == "direct"


def test_a_none_where_a_tensor_led_gets_its_own_key(gpu_less):
    """The key is built from the leading tensors of the first call; a later call with None in such a slot (an
    optional pointer) takes the general key and its own compiled kernel, then launches directly."""
    fn = FakeJit()
    run = launch.Launcher(fn)
    run((1,), torch.zeros(4), 4, 0.5, A=1, B=1)
    run((1,), None, 4, 0.5, A=1, B=1)
    run((1,), None, 4, 0.5, A=1, B=1)
    run((1,), torch.zeros(4), 4, 0.5, A=1, B=1)
    assert [c[0] for c in fn.calls] == ["ordinary", "ordinary", "direct", "direct"]


def test_tensor_descriptors_are_keyed_by_dtype_and_block(gpu_less):
    """A TMA tensor descriptor in a tensor slot (first or later call) is keyed by its dtype and block shape, which
    Triton's ``tensordesc<dtype[block]>`` type specialises on; not by its address or shape (encoded per launch)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    def desc(x, block):
        return TensorDescriptor(x, list(x.shape), list(x.stride()), block)

    fn = FakeJit()
    run = launch.Launcher(fn)
    a = torch.zeros(64, 16)
    run((1,), desc(a, [16, 16]), 4, 0.5, A=1, B=1)
    run((1,), desc(torch.zeros(32, 16), [16, 16]), 4, 0.5, A=1, B=1)  # other shape and address: same kernel
    run((1,), desc(a, [32, 16]), 4, 0.5, A=1, B=1)  # block shape
    run((1,), desc(a.half(), [16, 16]), 4, 0.5, A=1, B=1)  # dtype
    run((1,), a, 4, 0.5, A=1, B=1)  # a plain tensor in the same slot
    run((1,), a, 4, 0.5, A=1, B=1)
    assert [c[0] for c in fn.calls] == ["ordinary", "direct", "ordinary", "ordinary", "ordinary", "direct"]


def test_device_is_part_of_the_key(gpu_less, monkeypatch):
    fn = FakeJit()
    run = launch.Launcher(fn)
    x = torch.zeros(4)
    run((1,), x, 4, 0.5, A=1, B=1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    run((1,), x, 4, 0.5, A=1, B=1)
    assert [c[0] for c in fn.calls] == ["ordinary", "ordinary"]


def test_runtime_parameter_after_a_constexpr_keeps_the_ordinary_path(gpu_less):
    fn = FakeJit(names=("X", "A", "n"), constexpr=(False, True, False))
    run = launch.Launcher(fn)
    assert not run.direct
    for _ in range(2):
        run((1,), torch.zeros(2), A=1, n=2)
    assert [c[0] for c in fn.calls] == ["ordinary", "ordinary"]


def test_no_launchable_compiled_kernel_falls_back_with_one_warning(gpu_less):
    fn = FakeJit(compiled=False)
    run = launch.Launcher(fn)
    with pytest.warns(RuntimeWarning, match="direct launches of fake_kernel are off"):
        run((1,), torch.zeros(2), 2, 0.5, A=1, B=1)
    run((1,), torch.zeros(2), 2, 0.5, A=1, B=1)
    assert [c[0] for c in fn.calls] == ["ordinary", "ordinary"]


class BrokenCompiled(FakeCompiled):
    """A compiled kernel whose launcher rejects the arguments (a Triton whose launcher differs)."""

    def run(self, *args):
        raise TypeError("function takes exactly 9 arguments")


class BrokenJit(FakeJit):
    def __getitem__(self, grid):
        def run(*args, **meta):
            self.calls.append(("ordinary", grid, args, meta))
            return BrokenCompiled(self.calls)
        return run


def test_a_failing_direct_launch_falls_back_and_launches_once(gpu_less):
    fn = BrokenJit()
    run = launch.Launcher(fn)
    x = torch.zeros(2)
    run((1,), x, 2, 0.5, A=1, B=1)
    with pytest.warns(RuntimeWarning, match="TypeError"):
        run((1,), x, 2, 0.5, A=1, B=1)  # the direct launch fails; the ordinary one runs instead
    run((1,), x, 2, 0.5, A=1, B=1)
    assert [c[0] for c in fn.calls] == ["ordinary", "ordinary", "ordinary"]
    assert not run.direct


def test_interpreter_keeps_the_ordinary_path(monkeypatch):
    monkeypatch.setattr(launch, "_INTERPRET", True)
    fn = FakeJit()
    run = launch.Launcher(fn)
    run((1,), torch.zeros(2), 2, 0.5, A=1, B=1)
    run((1,), torch.zeros(2), 2, 0.5, A=1, B=1)
    assert not run.direct and [c[0] for c in fn.calls] == ["ordinary", "ordinary"]


class LeanRunner:
    """The compiled kernel's runner of Triton 3.5-3.6 (``CudaLauncher``): its generated C ``launch`` function (here
    recording) and the attributes the lean launch reads."""

    def __init__(self, calls, scratch=0, fail=False):
        self.calls, self.fail = calls, fail
        self.global_scratch_size, self.profile_scratch_size = scratch, 0
        self.launch_cooperative_grid, self.launch_pdl = False, True

    def launch(self, *args):
        if self.fail:
            raise TypeError("function takes exactly 60 arguments")
        self.calls.append(("lean", args))

    def __call__(self, *args):
        self.calls.append(("runner", args))


class LeanCompiled(FakeCompiled):
    def __init__(self, calls, **kw):
        super().__init__(calls)
        self.run = LeanRunner(calls, **kw)


class LeanJit(FakeJit):
    def __init__(self, **kw):
        super().__init__()
        self.kw = kw

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.calls.append(("ordinary", grid, args, meta))
            return LeanCompiled(self.calls, **self.kw)
        return run


@pytest.fixture
def lean(gpu_less, monkeypatch):
    """Triton 3.5-3.6's launcher form, the fake runner's ``launch`` taken for the generated C function."""
    monkeypatch.setattr(launch, "_LAUNCH_FORMAT", launch._LEAN_FORMAT)
    monkeypatch.setattr(launch, "_c_function", lambda f: True)


def test_lean_launch_passes_addresses_and_no_metadata_or_hooks(lean):
    fn = LeanJit()
    run = launch.Launcher(fn)
    x = torch.zeros(8)
    run((4,), x, 8, 0.5, B=2, A=1, num_warps=4)
    run((4, 3), x, 8, 0.25, B=2, A=1, num_warps=4)
    assert [c[0] for c in fn.calls] == ["ordinary", "lean"]
    # grid, stream, function, cooperative, pdl, 2 scratch, packed metadata, launch metadata, 2 hooks, the arguments
    assert fn.calls[1][1] == (4, 3, 1, "stream", "function", False, True, None, None, "packed", None, None, None,
                              x.data_ptr(), 8, 0.25, 1, 2)


@pytest.mark.parametrize("case", ["hook", "scratch", "format", "None after a tensor"])
def test_lean_launch_only_where_it_is_the_same_launch(lean, monkeypatch, case):
    """A registered launch hook (a profiler), a kernel needing scratch memory, another launcher form, or a None in a
    slot where the first call had a tensor (keyed argument by argument): the compiled kernel's own runner launches
    instead."""
    import triton

    fn = LeanJit(scratch=64 if case == "scratch" else 0)
    if case == "format":
        monkeypatch.setattr(launch, "_LAUNCH_FORMAT", "iiiKKOOOO")
    run = launch.Launcher(fn)
    x = torch.zeros(8)
    if case == "None after a tensor":
        run((4,), x, 8, 0.5, B=2, A=1)
        fn.calls.clear()
        x = None
    seen = []  # the hook
    hooks = triton.knobs.runtime.launch_enter_hook
    if case == "hook":
        if not hasattr(hooks, "add"):
            pytest.skip("this Triton has no launch hook chain")
        hooks.add(seen.append)
    try:
        for _ in range(2):
            run((4,), x, 8, 0.5, B=2, A=1)
    finally:
        if case == "hook":
            hooks.remove(seen.append)
    assert [c[0] for c in fn.calls] == ["ordinary", "runner"]
    if case == "hook":  # the runner got the hook chain to call (the generated C launcher calls it)
        assert fn.calls[1][1][7] is hooks


def test_a_failing_lean_launch_falls_back_and_launches_once(lean):
    fn = LeanJit(fail=True)
    run = launch.Launcher(fn)
    x = torch.zeros(2)
    run((1,), x, 2, 0.5, A=1, B=1)
    with pytest.warns(RuntimeWarning, match="60 arguments"):
        run((1,), x, 2, 0.5, A=1, B=1)
    run((1,), x, 2, 0.5, A=1, B=1)
    assert [c[0] for c in fn.calls] == ["ordinary", "ordinary", "ordinary"]


def test_plan_after_a_verified_lean_launch_launches_with_the_fixed_arguments(lean):
    fn = LeanJit()
    run = launch.Launcher(fn)
    x, y = torch.zeros(8), torch.zeros(8)
    assert run.plan((4,), x, 8, 0.5, B=2, A=1) is None  # the kernel never ran
    run((4,), x, 8, 0.5, B=2, A=1)
    assert run.plan((4,), x, 8, 0.5, B=2, A=1) is None  # ran once, through the ordinary launch: not verified yet
    run((4,), x, 8, 0.5, B=2, A=1)
    plan = run.plan((4,), x, 8, 0.5, B=2, A=1)
    assert run.plan((4,), torch.zeros(9)[1:], 8, 0.5, B=2, A=1) is None  # a misaligned pointer: no plan
    assert run.plan((4,), x, 9, 0.5, B=2, A=1) is None  # another launch key, never launched
    assert isinstance(plan, launch.Plan) and plan(y) is True
    assert fn.calls[-1] == ("lean", (4, 1, 1, "stream", "function", False, True, None, None, "packed", None, None,
                                     None, y.data_ptr(), 8, 0.5, 1, 2))


@pytest.mark.parametrize("case", ["format", "scratch", "None pointer", "interpreter"])
def test_no_plan_where_there_will_never_be_one(lean, monkeypatch, case):
    """False (not None, "not yet"): the op then stops asking for this key. Another launcher form, a kernel whose
    verified direct launch is not lean (scratch memory), a pointer slot holding None, no direct launches at all."""
    fn = LeanJit(scratch=64 if case == "scratch" else 0)
    if case == "format":
        monkeypatch.setattr(launch, "_LAUNCH_FORMAT", "iiiKKOOOO")
    if case == "interpreter":
        monkeypatch.setattr(launch, "_INTERPRET", True)
    run = launch.Launcher(fn)
    x = torch.zeros(8)
    for _ in range(2):
        run((4,), x, 8, 0.5, B=2, A=1)
    if case == "None pointer":
        assert run.plan((4,), None, 8, 0.5, B=2, A=1) is False
    else:
        assert run.plan((4,), x, 8, 0.5, B=2, A=1) is False


@pytest.mark.parametrize("case", ["misaligned", "recording", "hook", "device"])
def test_plan_declines_what_it_cannot_stand_for(lean, monkeypatch, case):
    import triton

    fn = LeanJit()
    run = launch.Launcher(fn)
    x = torch.zeros(8)
    for _ in range(2):
        run((4,), x, 8, 0.5, B=2, A=1)
    plan = run.plan((4,), x, 8, 0.5, B=2, A=1)
    fn.calls.clear()
    arg = torch.zeros(9)[1:] if case == "misaligned" else x
    hooks = triton.knobs.runtime.launch_enter_hook
    if case == "hook" and not hasattr(hooks, "add"):
        pytest.skip("this Triton has no launch hook chain")
    if case == "device":
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    with launch.recording() if case == "recording" else contextlib.nullcontext() as calls:
        if case == "hook":
            hooks.add(print)
        try:
            assert plan(arg) is False
        finally:
            if case == "hook":
                hooks.remove(print)
    assert fn.calls == [] and not calls


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_attention_direct_launch_equals_ordinary_launch(dtype, monkeypatch):
    """The real kernels: the second call of each shape launches directly and is bit-equal to the first (ordinary)
    one; a misaligned view of q gets its own compiled kernel and matches the reference."""
    from rmt_fast.ops.memory_attention import SegmentLayout, memory_attention
    from rmt_fast.ops.memory_attention import triton as attention
    from rmt_fast.ops.memory_attention.reference import memory_attention_ref

    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("the Triton backend needs sm_80+")
    if not launch.direct_launches():
        pytest.skip(f"no direct launches on Triton {launch.TRITON_VERSION}")
    for name in ("_fwd", "_bwd_dq", "_bwd_dkdv", "_bwd_fused"):
        monkeypatch.setattr(attention, name, launch.Launcher(getattr(attention, name).fn))
    monkeypatch.setattr(attention, "_plans", {})  # plans made by earlier tests would bypass these launchers
    b, h, n, d = 2, 4, 75, 64
    layout = SegmentLayout(4, 4, torch.tensor([40, 67], device="cuda"), causal=True, memory_bidirectional=True)
    g = torch.Generator(device="cuda").manual_seed(1)
    buf = torch.randn(3 * b * h * n * d + 1, device="cuda", dtype=dtype, generator=g)

    def run(offset):
        q, k, v = (buf[offset + i * b * h * n * d: offset + (i + 1) * b * h * n * d].view(b, h, n, d).detach()
                   .requires_grad_(True) for i in range(3))
        out = memory_attention(q, k, v, layout, backend="triton")
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        return (q, k, v), (out, *grads)

    _, first = run(0)
    assert not any(e[2] for e in attention._fwd._compiled.values())
    _, second = run(0)
    assert attention._fwd.direct and all(e[2] for e in attention._fwd._compiled.values())
    assert all(e[2] for e in attention._bwd_dq._compiled.values())
    assert all(e[2] for e in attention._bwd_dkdv._compiled.values())
    assert attention._bwd_fused._compiled and all(e[2] for e in attention._bwd_fused._compiled.values())
    if launch._LAUNCH_FORMAT == launch._LEAN_FORMAT:  # Triton 3.5-3.6: the lean launch ran, plans were made
        assert all(e[3] is not None for e in (*attention._fwd._compiled.values(),
                                              *attention._bwd_fused._compiled.values()))
        assert sorted(key[0] for key in attention._plans) == ["bwd", "fwd"]
        for _ in range(2):  # through the plans: the same bits, the launchers untouched
            calls = {name: len(getattr(attention, name)._compiled) for name in ("_fwd", "_bwd_fused")}
            _, planned = run(0)
            for x, y in zip(first, planned):
                assert torch.equal(x, y)
            assert calls == {name: len(getattr(attention, name)._compiled) for name in ("_fwd", "_bwd_fused")}
    for x, y in zip(first, second):
        assert torch.equal(x, y)
    keys = len(attention._fwd._compiled)
    (q, k, v), odd = run(1)  # 2 or 4 bytes off: another launch key
    assert len(attention._fwd._compiled) == keys + 1
    ref = memory_attention_ref(q, k, v, layout)
    ref_grads = torch.autograd.grad(ref, (q, k, v), torch.ones_like(ref))
    valid = (torch.arange(n, device="cuda")[None, :] < layout.valid_lens[:, None])[:, None, :, None]
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close((odd[0] * valid).float(), (ref * valid).float(), atol=tol, rtol=tol)
    for got, want in zip(odd[1:], ref_grads):
        torch.testing.assert_close(got.float(), want.float(), atol=5 * tol, rtol=5 * tol)


@pytest.mark.parametrize("version,direct", [("3.5.0", True), ("3.5.1", True), ("3.6.0+git1a2b3c4", True),
                                            ("3.4.0", False), ("3.7.0", False), ("4.0.0", False), ("2.3.1", False),
                                            ("dev", False)])
def test_direct_launches_only_on_the_triton_versions_written_for(version, direct, monkeypatch):
    assert launch.direct_launches(version) is direct
    monkeypatch.setattr(launch, "TRITON_VERSION", version)
    assert launch.direct_launches() is direct


@pytest.mark.parametrize("version", ["3.4.0", "3.7.0"])
def test_another_triton_version_takes_the_public_path_silently(lean, monkeypatch, version):
    """Everything else in place for lean launches (a GPU, the known launcher format): on a Triton outside
    DIRECT_TRITON_VERSIONS every call is ``fn[grid](...)``, no direct launch is tried, no warning, no plan."""
    monkeypatch.setattr(launch, "TRITON_VERSION", version)
    fn = LeanJit()
    run = launch.Launcher(fn)
    x = torch.zeros(8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            run((4,), x, 8, 0.5, B=2, A=1)
        assert run.plan((4,), x, 8, 0.5, B=2, A=1) is False
    assert not run.direct and [c[0] for c in fn.calls] == ["ordinary"] * 3
    assert fn.calls[0] == ("ordinary", (4,), (x, 8, 0.5), {"B": 2, "A": 1})


@_NEEDS_TRITON
def test_another_triton_version_gives_the_same_results_in_the_interpreter(monkeypatch):
    """The real kernels under TRITON_INTERPRET=1, launched by Launchers made as on a GPU machine (not interpreting,
    a CUDA stream) whose Triton is another version: they take the public path, without a warning, and give the
    bits the module's own Launchers give."""
    import rmt_fast.ops.memory_attention.triton as attention
    import rmt_fast.ops.segment_handoff.triton as handoff
    from rmt_fast.ops.memory_attention import SegmentLayout, memory_attention
    from rmt_fast.ops.segment_handoff import segment_handoff

    layout = SegmentLayout(2, 2, torch.tensor([5, 3]), causal=True, memory_bidirectional=True)
    q, k, v = (torch.randn(2, 2, 11, 16, requires_grad=True) for _ in range(3))
    hidden, memory, tok = torch.randn(2, 9, 16), torch.randn(2, 2, 16), torch.randn(2, 9, 16)
    gather, write = torch.tensor([5, -1]), torch.tensor([7, 5])

    def run():
        out = memory_attention(q, k, v, layout, backend="triton")
        grads = torch.autograd.grad(out, (q, k, v), torch.randn(out.shape, generator=torch.Generator().manual_seed(0)))
        return (out, *grads, *segment_handoff(hidden, memory, gather, tok, 0, write, backend="triton"))

    want = run()
    monkeypatch.setattr(launch, "_INTERPRET", False)
    monkeypatch.setattr(launch, "_current_stream", lambda device: pytest.fail("no direct launch on another Triton"))
    monkeypatch.setattr(launch, "TRITON_VERSION", "3.7.0")
    launchers = 0
    for module in (attention, handoff):
        for name, value in list(vars(module).items()):
            if isinstance(value, launch.Launcher):
                fresh = launch.Launcher(value.fn)
                assert not fresh.direct
                monkeypatch.setattr(module, name, fresh)
                launchers += 1
    assert launchers == 13  # attention: 6 kernels and 5 cache twins; handoff: 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = run()
    for x, y in zip(want, got):
        assert torch.equal(x, y)


def test_recording_collects_launches_instead_of_running_them(gpu_less):
    fn = FakeJit()
    run = launch.Launcher(fn)
    x = torch.zeros(2)
    with launch.recording() as calls:
        run((1,), x, 2, 0.5, A=1, B=3, num_warps=4)
    assert fn.calls == [] and calls == [(fn, (1,), (x, 2, 0.5), {"A": 1, "B": 3, "num_warps": 4})]
    run((1,), x, 2, 0.5, A=1, B=3)  # outside the context: launched again
    assert [c[0] for c in fn.calls] == ["ordinary"]


@cuda
def test_gpu_launch_hooks_see_direct_launches(monkeypatch):
    """With a launch hook registered (what a profiler such as Proton does) a direct launch goes through the
    compiled kernel's runner, which calls the hook with the kernel's launch metadata; results stay bit-equal."""
    import triton

    from rmt_fast.ops.memory_attention import SegmentLayout, memory_attention
    from rmt_fast.ops.memory_attention import triton as attention

    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("the Triton backend needs sm_80+")
    hooks = triton.knobs.runtime.launch_enter_hook
    if not hasattr(hooks, "add"):
        pytest.skip("this Triton has no launch hook chain")
    monkeypatch.setattr(attention, "_fwd", launch.Launcher(attention._fwd.fn))
    monkeypatch.setattr(attention, "_plans", {})
    layout = SegmentLayout(4, 4, torch.tensor([40, 67], device="cuda"), causal=True)
    q, k, v = (torch.randn(2, 4, 75, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    plain = [memory_attention(q, k, v, layout, backend="triton") for _ in range(2)]
    seen = []

    def hook(metadata):
        seen.append(metadata.get()["name"] if metadata is not None else None)

    hooks.add(hook)
    try:
        hooked = memory_attention(q, k, v, layout, backend="triton")
    finally:
        hooks.remove(hook)
    assert seen == ["_fwd_kernel"]
    assert torch.equal(hooked, plain[0]) and torch.equal(plain[1], plain[0])
