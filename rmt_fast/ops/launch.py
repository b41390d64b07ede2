"""Launching ``@triton.jit`` kernels with less Python per call, on the Triton versions this module was written for.

``kernel[grid](*args)`` runs Triton's ``JITFunction.run`` on every call: it binds and specialises every argument
(tensor alignment, integer values), hashes the result and looks up the compiled kernel, then launches. An eager
training step at segment shapes is host-bound (its attention kernels take less GPU time than the host takes to
issue them), so each launch's Python counts (RESULTS.md "2026-11-30: lean Triton launches" has the host times).

:class:`Launcher` does that once per *launch key* and then calls the compiled kernel's own launcher. The key holds
everything the specialisation depends on: each tensor's dtype and whether its address is 16-byte aligned, the
value of every integer argument, the type of every other argument, the constexprs and the launch options, and
the current device. Two calls with one key therefore get the same compiled kernel from ``JITFunction.run``;
keying on integer values (shapes, strides) is finer than Triton's own ``== 1`` / ``% 16`` specialisation, so a
new shape costs one ordinary launch and then launches directly.

Where the installed Triton's compiled launcher has the known form (Triton 3.5-3.6: a generated C function taking
``"iiiKKppOOOOOO"`` before the kernel's arguments), the kernel needs no scratch buffers and no launch hook is
registered (``triton.knobs.runtime.launch_enter_hook`` / ``launch_exit_hook``, which profilers such as Proton
set), :class:`Launcher` calls that C function itself (a *lean* launch): no ``launch_metadata`` object, no Python
``CudaLauncher.__call__``, no calls into empty hook chains, and the pointer arguments passed as the integer
addresses it already read for the key, so the C launcher neither calls ``data_ptr()`` nor asks the driver about
each pointer (``cuPointerGetAttribute``). Any other case takes the compiled kernel's ordinary runner.

An op that calls the same kernel with the same shapes again and again (an eager training step at segment shapes)
can skip even the launch key: :meth:`Launcher.plan` turns one call into a :class:`Plan` that holds the compiled
kernel with every non-pointer argument fixed, and the op keeps it under a key of its own inputs (shapes, strides,
dtypes, flags: whatever determines those arguments). A plan launches only the lean way and only with 16-byte
aligned pointers; anything else (a hook, recording, another device, a misaligned tensor) returns False and the op
takes its ordinary path.

All of that reads Triton internals (the compiled kernel's runner and its arguments, the launch hooks, the
generated launcher's format), which change between Triton releases. So a :class:`Launcher` launches directly only
on the versions in :data:`DIRECT_TRITON_VERSIONS` (see :func:`direct_launches`); on any other Triton, under
``TRITON_INTERPRET=1`` (CPU tests), with a CPU-only torch, or if a compiled kernel lacks the launcher interface
this module calls (checked on each kernel's first direct launch, one warning), every call is Triton's public
``kernel[grid](*args, **meta)``.
"""
from __future__ import annotations

import contextlib
import os
import re
import types
import warnings

import torch
import triton
from torch import Tensor

try:  # the generated launcher's leading argument format, whose form the lean launch knows (see above)
    from triton.backends.nvidia.driver import _BASE_ARGS_FORMAT as _LAUNCH_FORMAT
except ImportError:  # another Triton layout, or no NVIDIA backend: no lean launches
    _LAUNCH_FORMAT = None
# grid x3, stream, function, cooperative, pdl, 2 scratch buffers, packed metadata, launch metadata, 2 hooks
_LEAN_FORMAT = "iiiKKppOOOOOO"

# What Triton's own launch path calls for the stream (absent from CPU-only builds of torch: no direct launches).
_current_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# (major, minor) releases of Triton whose compiled-kernel interface the direct path calls
DIRECT_TRITON_VERSIONS = ((3, 5), (3, 6))
TRITON_VERSION = triton.__version__  # the installed one; tests set another to take the public path


def direct_launches(version: str | None = None) -> bool:
    """Whether Triton ``version`` (default: :data:`TRITON_VERSION`, the installed one) is one the direct path was
    written for: its "major.minor" in :data:`DIRECT_TRITON_VERSIONS` ("3.5.1", "3.6.0+git1234" are; "3.4.0",
    "3.7.0" and unparsable strings are not)."""
    match = re.match(r"(\d+)\.(\d+)", TRITON_VERSION if version is None else version)
    return match is not None and (int(match[1]), int(match[2])) in DIRECT_TRITON_VERSIONS


MAX_KEYS = 4096  # launch keys kept per kernel; past that the table starts over
_recording: list | None = None


@contextlib.contextmanager
def recording():
    """Inside this context every :class:`Launcher` call is recorded as ``(jit_function, grid, args, meta)`` instead
    of launched (outputs stay unwritten): how ``rmt_fast/ops/triton_check.py`` learns what the ops launch, to
    compile it for GPU architectures on a machine without a GPU, and how ``benchmarks/attention_host.py`` gets one
    kernel's exact launch to time it alone."""
    global _recording
    saved, _recording = _recording, []
    try:
        yield _recording
    finally:
        _recording = saved


def _launch(kernel, grid: tuple, device: int, args: tuple) -> None:
    """What ``kernel[grid](*args)`` does (Triton's CompiledKernel runner), minus its per-call closure and device
    lookup. ``grid`` has three dimensions: the compiled kernel's launcher reads three (JITFunction.run pads them)."""
    stream = _current_stream(device)
    runtime = triton.knobs.runtime
    enter, exit_ = runtime.launch_enter_hook, runtime.launch_exit_hook
    # the launch metadata is for the enter hook (profilers); without one Triton's runner computes None too
    metadata = None if enter is None else kernel.launch_metadata(grid, stream, *args)
    kernel.run(grid[0], grid[1], grid[2], stream, kernel.function, kernel.packed_metadata, metadata, enter, exit_,
               *args)


def grid3(grid: tuple) -> tuple:
    """``grid`` padded to three dimensions with 1s: the compiled kernel's launcher reads three."""
    return grid if len(grid) == 3 else (*grid, 1, 1)[:3]


def _lean_launch(lean: tuple, grid: tuple, device: int, ptrs: list, rest: tuple, constexprs: tuple) -> None:
    """Call the generated C launcher directly (see :func:`_lean_entry`): pointer arguments as integer addresses,
    no scratch buffers, no launch metadata, no hooks."""
    c_launch, function, cooperative, pdl, packed = lean
    c_launch(grid[0], grid[1], grid[2], _current_stream(device), function, cooperative, pdl, None, None, packed, None,
             None, None, *ptrs, *rest, *constexprs)


def _c_function(f) -> bool:
    return isinstance(f, types.BuiltinFunctionType)


def _lean_entry(kernel) -> tuple | None:
    """``(c_launch, function, cooperative, pdl, packed_metadata)`` for lean launches of the compiled ``kernel``, or
    None where the installed Triton's launcher is not the known form (see the module docstring), the launch function
    is wrapped in Python (tensor descriptors) or the kernel needs global or profile scratch memory."""
    if _LAUNCH_FORMAT != _LEAN_FORMAT:
        return None
    try:
        runner = kernel.run
        c_launch = runner.launch
        if not _c_function(c_launch) or runner.global_scratch_size or runner.profile_scratch_size:
            return None
        return c_launch, kernel.function, runner.launch_cooperative_grid, runner.launch_pdl, kernel.packed_metadata
    except AttributeError:
        return None


def _idle(hook) -> bool:
    """No launch hook: None, or Triton 3.5+'s hook chain with nothing in it."""
    return hook is None or (type(getattr(hook, "calls", None)) is list and not hook.calls)


def _hooks_idle() -> bool:
    runtime = triton.knobs.runtime
    return _idle(runtime.launch_enter_hook) and _idle(runtime.launch_exit_hook)


def _usual_key(device: int, nt: int, args: tuple, meta: dict) -> tuple[list, tuple]:
    """``(pointers, launch key)`` of a call whose first ``nt`` arguments are tensors (AttributeError otherwise): what
    :func:`_arg_key` gives, built for that form in one pass per part."""
    ptrs = [a.data_ptr() for a in args[:nt]]
    return ptrs, (device, tuple([(a.dtype, p % 16 == 0) for a, p in zip(args, ptrs)]),
                  tuple([a if type(a) is int else type(a) for a in args[nt:]]), tuple(meta.items()))


def _arg_key(a):
    """What the compiled kernel depends on in argument ``a``: a tensor's dtype and 16-byte alignment, a TMA tensor
    descriptor's dtype, block shape and padding (Triton's ``tensordesc<dtype[block]>`` type; the descriptor itself
    is encoded at every launch), an integer's value, any other argument's type."""
    if isinstance(a, Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    if type(a) is int:
        return a
    if hasattr(a, "block_shape"):
        return (type(a), a.base.dtype, tuple(a.block_shape), a.padding)
    return type(a)


class Plan:
    """One launch of a compiled kernel with everything but the pointers fixed: ``plan(*tensors)`` launches it with
    ``tensors`` in the leading (pointer) slots, in order, and returns True; it returns False, launching nothing,
    where it cannot stand for the ordinary launch: a launch hook is registered, launches are being recorded, the
    current device is another one, or a pointer is not 16-byte aligned (the plan was made from an all-aligned
    call). The caller guarantees the rest: tensors of the plan's dtypes, and a key that determines the other
    arguments (see :meth:`Launcher.plan`)."""

    __slots__ = ("lean", "grid", "device", "rest", "constexprs")

    def __init__(self, lean: tuple, grid: tuple, device: int, rest: tuple, constexprs: tuple):
        self.lean, self.grid, self.device, self.rest, self.constexprs = lean, grid, device, rest, constexprs

    def __call__(self, *tensors) -> bool:
        if _recording is not None or not _hooks_idle() or torch.cuda.current_device() != self.device:
            return False
        ptrs = [t.data_ptr() for t in tensors]
        aligned = 0
        for p in ptrs:
            aligned |= p
        if aligned & 15:
            return False
        _lean_launch(self.lean, self.grid, self.device, ptrs, self.rest, self.constexprs)
        return True


class Launcher:
    """``Launcher(fn)(grid, *args, **meta)`` launches ``fn[grid](*args, **meta)``.

    ``args`` are the kernel's non-constexpr parameters in signature order (tensors, ints, floats), ``meta`` its
    constexpr parameters by name plus Triton options (``num_warps``, ``num_stages``). The kernel must declare its
    constexpr parameters after all the others. ``direct`` is False where every call is the public launch (see the
    module docstring: another Triton version, the interpreter, no CUDA torch, or a kernel whose direct launch
    failed).
    """

    def __init__(self, fn):
        self.fn = fn
        self._compiled: dict = {}
        self.direct = not _INTERPRET and _current_stream is not None and direct_launches()
        params = getattr(fn, "params", None)
        if params is None:
            self.direct = False
            return
        flags = [bool(p.is_constexpr) for p in params]
        self._num_args = flags.index(True) if True in flags else len(flags)
        if any(not f for f in flags[self._num_args:]):
            self.direct = False  # a runtime parameter after a constexpr: the positional order below would not hold
        self._constexpr_names = tuple(p.name for p in params[self._num_args:])
        self._leading_tensors: int | None = None  # set by the first direct call: how many arguments lead as tensors

    def __call__(self, grid, *args, **meta):
        if _recording is not None:
            _recording.append((self.fn, grid, args, meta))
            return
        if not self.direct:
            self.fn[grid](*args, **meta)
            return
        if self._leading_tensors is None:  # tensors and tensor descriptors
            self._leading_tensors = next((i for i, a in enumerate(args) if not isinstance(a, Tensor)
                                          and not hasattr(a, "block_shape")), len(args))
        device = torch.cuda.current_device()
        nt = self._leading_tensors
        try:  # the usual form: the kernel's pointer arguments first, all tensors
            ptrs, key = _usual_key(device, nt, args, meta)
        except AttributeError:  # a tensor descriptor, or a None where the first call had a tensor
            ptrs = None
            key = (device, tuple([_arg_key(a) for a in args]), tuple(meta.items()))
        entry = self._compiled.get(key)
        if entry is None:
            self._first_launch(key, grid, args, meta)
            return
        kernel, constexprs, verified, lean = entry
        grid = grid3(grid)
        if verified:
            if lean is not None and ptrs is not None and _hooks_idle():
                _lean_launch(lean, grid, device, ptrs, args[nt:], constexprs)
                return
            _launch(kernel, grid, device, (*args, *constexprs))
            return
        try:  # the first direct launch of this kernel object: an installed Triton that differs fails here, once
            lean = _lean_entry(kernel) if ptrs is not None else None
            if lean is not None and _hooks_idle():
                _lean_launch(lean, grid, device, ptrs, args[nt:], constexprs)
            else:
                _launch(kernel, grid, device, (*args, *constexprs))
        except Exception as e:  # noqa: BLE001 - any failure of the direct path falls back to the ordinary one
            self._give_up(f"{type(e).__name__}: {e}")
            self.fn[grid](*args, **meta)
            return
        entry[2], entry[3] = True, lean

    def plan(self, grid, *args, **meta) -> Plan | bool | None:
        """A :class:`Plan` for calls like this one (same grid, non-pointer arguments, meta, tensor dtypes); None
        where there is none yet (a kernel's first two calls of a launch key go through the ordinary and the checked
        direct path; a pointer not 16-byte aligned); False where there will be none for such calls (no lean launches
        with this Triton or for this kernel, or pointer slots that are not all tensors). Launches nothing. The
        caller keeps the plan (or the False) under a key of its own that determines ``grid``, the non-pointer
        arguments, ``meta`` and the tensor dtypes."""
        if not self.direct or _LAUNCH_FORMAT != _LEAN_FORMAT:
            return False
        if self._leading_tensors is None:
            return None
        nt = self._leading_tensors
        try:
            ptrs, key = _usual_key(torch.cuda.current_device(), nt, args, meta)
        except AttributeError:
            return False
        entry = self._compiled.get(key)
        if entry is None or not entry[2]:
            return None
        if entry[3] is None:
            return False
        if any(p % 16 for p in ptrs):
            return None
        return Plan(entry[3], grid3(grid), key[0], tuple(args[nt:]), entry[1])

    def _first_launch(self, key, grid, args, meta) -> None:
        kernel = self.fn[grid](*args, **meta)  # the ordinary launch compiles (or finds) the kernel
        try:
            constexprs = tuple(meta[name] for name in self._constexpr_names)
        except KeyError as e:
            self._give_up(f"constexpr {e} not given")
            return
        if len(args) != self._num_args or not hasattr(kernel, "run"):
            self._give_up("the installed Triton returns no launchable compiled kernel")
            return
        if len(self._compiled) >= MAX_KEYS:
            self._compiled.clear()
        self._compiled[key] = [kernel, constexprs, False, None]

    def _give_up(self, why: str) -> None:
        self.direct = False
        self._compiled.clear()
        warnings.warn(f"rmt_fast: direct launches of {getattr(self.fn, '__name__', self.fn)} are off ({why}); "
                      "using Triton's ordinary launch path", RuntimeWarning, stacklevel=3)
