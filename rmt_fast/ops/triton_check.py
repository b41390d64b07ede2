"""Compile every Triton kernel of rmt_fast for GPU architectures on a machine without a GPU.

Triton's ahead-of-time compiler and the ptxas bundled with it need no GPU, so this checks on any machine (CI
included) that each kernel compiles for sm_80 (Ampere) and sm_90 (Hopper) at the launch configurations the ops
really use, and that each fits the architecture's shared memory per block. The configurations are not restated
here: the ops' own entry points are called on small CPU tensors inside :func:`rmt_fast.ops.launch.recording`,
which records each launch (kernel, arguments, constexprs, warps, stages) instead of running it.

Shared-memory limits (opt-in, per block): sm_90 227 KiB; sm_80 163 KiB, and an sm_80 build is also held to the
99 KiB of sm_86/sm_89 GPUs (RTX 30xx/40xx, L4), which run the same Ampere code path.

Run without ``TRITON_INTERPRET`` (under the interpreter the kernels are not compilable objects)::

    python -m rmt_fast.ops.triton_check [--arch 80 90] [--resources]

Prints one row per compiled kernel and exits with 1 if any kernel fails to compile or to fit. ``--resources`` adds
what the compiled code uses per thread, read from the cubin by the ``cuobjdump`` bundled with Triton: registers
(``REG``, at most 255) and stack bytes (``STACK``: register spills and local arrays), the first thing to look at when
a kernel is slower than its FLOPs suggest.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SHARED_LIMITS = {80: (166912, 101376), 90: (232448,)}  # bytes: the arch's own limit, then stricter relatives
_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32",
          torch.int64: "i64", torch.bool: "i1"}


@dataclass(frozen=True)
class KernelLaunch:
    """One distinct launch: the kernel, its argument types, constexprs and options."""

    fn: object
    signature: tuple  # (name, type) per parameter, "constexpr" for constexprs
    constexprs: tuple  # (name, value)
    options: tuple  # (("num_warps", w), ("num_stages", s)) as given
    min_arch: int = 80  # 90 for a launch with TMA tensor descriptors (Hopper and newer only)

    @property
    def name(self) -> str:
        return getattr(self.fn, "__name__", str(self.fn))

    def describe(self) -> str:
        types = sorted({t for _, t in self.signature if t.startswith("*") and t != "*i32" and t != "*i64"})
        consts = " ".join(f"{k}={_short(v)}" for k, v in self.constexprs)
        opts = " ".join(f"{k}={v}" for k, v in self.options)
        return f"{'/'.join(types)} {consts} {opts}".strip()


def _short(v) -> str:
    return str(v).replace("triton.language.", "").replace("tl.", "")


def _arg_type(a) -> str:
    if hasattr(a, "block_shape"):  # a TMA tensor descriptor: Triton's own type string, tensordesc<dtype[block]>
        from triton.runtime.jit import mangle_type

        return mangle_type(a)
    if isinstance(a, torch.Tensor):
        return "*" + _TYPES[a.dtype]
    if isinstance(a, bool):
        return "i1"
    if isinstance(a, int):
        return "i32" if -2**31 <= a < 2**31 else "i64"
    if isinstance(a, float):
        return "fp32"
    raise TypeError(f"unexpected kernel argument of type {type(a).__name__}")


def record_launches() -> list[KernelLaunch]:
    """Call each op's Triton entry points on small CPU tensors and return the distinct launches they make."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("triton_check needs TRITON_INTERPRET unset (interpreted kernels cannot be compiled)")
    from . import block_kernels, launch
    from .linear_cross_entropy import triton as lce
    from .memory_attention import triton as attention
    from .segment_handoff import triton as handoff

    e = torch.empty
    with launch.recording() as calls:
        for dtype in DTYPES:
            for d in (64, 80, 128):  # 80: a head dim below its power-of-two tile (masked columns)
                masks = [(True, True)] + ([(True, False), (False, False)] if dtype == torch.bfloat16 else [])
                q, k, v = e(2, 4, 48, d, dtype=dtype), e(2, 2, 48, d, dtype=dtype), e(2, 2, 48, d, dtype=dtype)
                lens = torch.full((2,), 16, dtype=torch.int32)
                for causal, bidir in masks:
                    out, lse = attention.forward(q, k, v, lens, 8, 8, causal, bidir, d ** -0.5)
                    for schedule in attention.SCHEDULES:
                        with attention.backward_schedule(schedule):
                            attention.backward(out, q, k, v, out, lse, lens, 8, 8, causal, bidir, d ** -0.5)
                    for schedule in ("split", "stored"):  # TMA row loads (sm_90+): forward, split/stored backward
                        with attention.row_loads("tma"), attention.backward_schedule(schedule):
                            out, lse = attention.forward(q, k, v, lens, 8, 8, causal, bidir, d ** -0.5)
                            attention.backward(out, q, k, v, out, lse, lens, 8, 8, causal, bidir, d ** -0.5)
            for width in (768, 4096):
                block_kernels.rms_norm(e(4, width, dtype=dtype), e(width, dtype=dtype), 1e-6)
            x = e(1, 4, 8, 64, dtype=dtype)
            block_kernels.rotary(x, e(1, 8, 64, dtype=dtype), e(1, 8, 64, dtype=dtype))
            block_kernels.silu_mul(e(4, 1536, dtype=dtype), e(4, 1536, dtype=dtype))
            memory, offsets = e(2, 8, 64, dtype=dtype), torch.zeros(2, dtype=torch.int64)
            handoff.gather_forward(e(2, 40, 64, dtype=dtype), memory, offsets)
            for writes in (offsets, None):
                handoff.place_forward(memory, e(2, 40, 64, dtype=dtype), 0, writes)
            for write_grad in (False, True):
                lce.cross_entropy_rows(e(4, 1000, dtype=dtype), torch.zeros(4, dtype=torch.int64), -100, write_grad)
        # The short-term cache's kernels (a key prefix of 20 rows, ragged lengths): the D64 and D128 half-precision
        # tiles, every schedule at D64, the fused backward at D128 and the TMA variants. The mask flags change only
        # the segment's code, which the launches above compile. (fp32 compiles take several times longer: left out.)
        for dtype, d, loads, schedules in ((torch.bfloat16, 64, "pointer", attention.SCHEDULES),
                                           (torch.float16, 128, "pointer", ("fused",)),
                                           (torch.bfloat16, 128, "tma", ("split", "stored"))):
            q, k = e(2, 4, 48, d, dtype=dtype), e(2, 2, 20 + 48, d, dtype=dtype)
            lens, cache_lens = torch.full((2,), 16, dtype=torch.int32), torch.full((2,), 12, dtype=torch.int32)
            args = (lens, 8, 8, True, True, d ** -0.5, 20, cache_lens)
            with attention.row_loads(loads):
                out, lse = attention.forward(q, k, k, *args)
                for schedule in schedules:
                    with attention.backward_schedule(schedule):
                        attention.backward(out, q, k, k, out, lse, *args)
    with launch.recording() as hopper_calls:  # the long-row tiles (N >= LONG_ROWS; sm_90+ only), both row loads
        n = attention.LONG_ROWS
        for dtype in (torch.float16, torch.bfloat16):
            for d in (80, 128):
                q, kv = e(1, 2, n, d, dtype=dtype), e(1, 1, n, d, dtype=dtype)
                lens = torch.full((1,), n - 16, dtype=torch.int32)
                for loads in ("pointer", "tma"):
                    with attention.row_loads(loads), attention.backward_schedule("stored"):
                        out, lse = attention.forward(q, kv, kv, lens, 8, 8, True, False, d ** -0.5)
                        attention.backward(out, q, kv, kv, out, lse, lens, 8, 8, True, False, d ** -0.5)
        # the cache kernels' long-row tiles with TMA loads (the forward's take the most shared memory)
        q, kv = e(1, 2, n, 128, dtype=torch.bfloat16), e(1, 1, 64 + n, 128, dtype=torch.bfloat16)
        args = (torch.full((1,), n - 16, dtype=torch.int32), 8, 8, True, False, 128 ** -0.5, 64,
                torch.full((1,), 40, dtype=torch.int32))
        with attention.row_loads("tma"), attention.backward_schedule("stored"):
            out, lse = attention.forward(q, kv, kv, *args)
            attention.backward(out, q, kv, kv, out, lse, *args)
    seen, out = set(), []
    for hopper, (fn, _grid, args, meta) in [(False, c) for c in calls] + [(True, c) for c in hopper_calls]:
        options = tuple((k, meta[k]) for k in ("num_warps", "num_stages") if k in meta)
        constexprs = tuple((k, v) for k, v in meta.items() if k not in ("num_warps", "num_stages"))
        names = [p.name for p in fn.params]
        signature = tuple(zip(names, [_arg_type(a) for a in args] + ["constexpr"] * (len(names) - len(args))))
        tma = any(t.startswith("tensordesc") for _, t in signature)
        item = KernelLaunch(fn, signature, constexprs, options, 90 if tma or hopper else 80)
        key = (id(fn), signature, tuple((k, _short(v)) for k, v in constexprs), options)
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


def all_launchers() -> dict[str, object]:
    """Every :class:`~rmt_fast.ops.launch.Launcher` defined in a module of ``rmt_fast.ops``, by kernel name."""
    import importlib
    import pkgutil

    from . import launch

    package = importlib.import_module(__package__)
    found = {}
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if info.name == __name__:
            continue
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if isinstance(value, launch.Launcher):
                found[getattr(value.fn, "__name__", str(value.fn))] = value.fn
    return found


def compile_launch(item: KernelLaunch, arch: int):
    """Compile ``item`` for ``sm_<arch>``; returns Triton's compiled kernel (``metadata.shared`` in bytes)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = [name for name, _ in item.signature]
    constexprs = {(names.index(k),): v for k, v in item.constexprs}
    src = ASTSource(fn=item.fn, signature=dict(item.signature), constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(item.options))


def _cuobjdump() -> str | None:
    """The ``cuobjdump`` bundled with Triton's NVIDIA backend, or None."""
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.access(path, os.X_OK) else None


_USAGE = re.compile(r"REG:(\d+) STACK:(\d+)")


def parse_resource_usage(text: str) -> dict[str, int] | None:
    """``{"registers": n, "stack": bytes}`` from ``cuobjdump -res-usage`` output of a one-kernel cubin, or None."""
    m = _USAGE.search(text)
    return None if m is None else {"registers": int(m.group(1)), "stack": int(m.group(2))}


def resource_usage(cubin: bytes, tool: str | None) -> dict[str, int] | None:
    """Registers and stack bytes per thread of a compiled kernel (None without the tool or on failure)."""
    if tool is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        try:
            out = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            return None
    return parse_resource_usage(out)


def check(archs=(80, 90), stream=sys.stdout, resources: bool = False) -> list[dict]:
    """Compile every recorded launch for each arch; one dict per (launch, arch) with ``ok`` and ``why`` (and with
    ``resources`` the per-thread ``registers`` and ``stack`` bytes of the compiled code, None where unknown)."""
    rows = []
    launches = record_launches()
    print(f"{len(launches)} distinct launches x {len(archs)} architectures", file=stream, flush=True)
    tool = _cuobjdump() if resources else None
    if resources and tool is None:
        print("--resources: Triton's bundled cuobjdump was not found; registers and stack are not shown", file=stream)
    recorded = {item.name for item in launches}
    for name in sorted(set(all_launchers()) - recorded):  # a kernel added without a line in record_launches
        rows.append({"kernel": name, "config": "", "arch": None, "shared_bytes": -1, "seconds": 0.0, "ok": False,
                     "why": "never launched by record_launches(): add a call there"})
        print(f"FAIL {name}: {rows[-1]['why']}", file=stream, flush=True)
    for arch in archs:
        limits = SHARED_LIMITS.get(arch, (SHARED_LIMITS[90][0],))
        for item in launches:
            if arch < item.min_arch:
                continue
            t0 = time.perf_counter()
            usage = None
            try:
                compiled = compile_launch(item, arch)
                shared = compiled.metadata.shared
                why = "" if shared <= min(limits) else f"needs {shared} B of shared memory (limit {min(limits)} B)"
                if tool is not None:
                    usage = resource_usage(compiled.asm["cubin"], tool)
            except Exception as exc:  # noqa: BLE001 - a compile error is the finding
                shared, why = -1, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            row = {"kernel": item.name, "config": item.describe(), "arch": arch, "shared_bytes": shared,
                   "seconds": round(time.perf_counter() - t0, 2), "ok": not why, "why": why}
            if resources:
                row.update(usage or {"registers": None, "stack": None})
            rows.append(row)
            regs = ""
            if usage is not None:
                regs = f"REG={usage['registers']:3d} STACK={usage['stack']:4d}  "
            print(f"sm_{arch} {'ok  ' if row['ok'] else 'FAIL'} {item.name:26s} {shared:7d} B  {regs}{item.describe()}"
                  + (f"  <- {why}" if why else ""), file=stream, flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities x10 (default: 80 90)")
    p.add_argument("--resources", action="store_true",
                   help="also show each compiled kernel's registers and stack (spill) bytes per thread")
    args = p.parse_args(argv)
    bad = [a for a in args.arch if a < 80]
    if bad:
        p.error(f"--arch: rmt_fast's Triton kernels run on sm_80 and newer, got {bad}")
    rows = check(tuple(args.arch), resources=args.resources)
    failed = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(failed)} of {len(rows)} compiled and fit" + (f"; {len(failed)} FAILED" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
