"""Where the host time of one eager memory_attention forward+backward goes (CUDA; a diagnostic, not a race).

At RMT segment shapes an eager attention call is host-bound: its kernels take less GPU time than Python, the
Triton launches and the autograd engine take on the CPU. This times pieces of the call in isolation, each as
back-to-back calls between two synchronisations (median of rounds): the whole op, its forward, its backward
through autograd, the kernel entry points without autograd, the backward's first kernel launched four ways
(rmt_fast's direct launch; its lean C launch alone, without the launch key; the compiled kernel's runner, which
the direct launch called before its lean form; Triton's ordinary launch), the op and SDPA with the autograd
engine's backward on the calling thread (``set_multithreading_enabled(False)``), a trivial Python autograd
Function and a one-op C++ autograd graph (the engine's own cost), and SDPA with the explicit mask for comparison.
"host" is the time until the last call returned, "wall" until the GPU finished: host == wall means host-bound.

Writes ``<out>/attention_host.csv`` and prints a table.

Example: ``python benchmarks/attention_host.py --shape 8x12x544x64``
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="8x12x544x64", help="B x H x N x D (default: %(default)s)")
    p.add_argument("--iters", type=int, default=200, help="calls per round (default: 200)")
    p.add_argument("--rounds", type=int, default=7, help="rounds, median taken (default: 7)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="CSV folder (default: %(default)s)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/attention_host.py needs a CUDA GPU")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import rmt_fast.ops.memory_attention.triton as att
    from rmt_fast.ops.memory_attention import SegmentLayout, memory_attention

    b, h, n, d = (int(x) for x in args.shape.lower().split("x"))
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16)
    layout = SegmentLayout(16, 16, torch.full((b,), n - 32, device="cuda", dtype=torch.int32), causal=True)
    mask = layout.allowed(n).unsqueeze(1)
    seq_lens, scale = layout.seq_lens_int32, d ** -0.5

    def timed(fn):
        for _ in range(5):
            fn()
        samples = []
        for _ in range(args.rounds):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.iters):
                fn()
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            samples.append(((t1 - t0) * 1e6 / args.iters, (time.perf_counter() - t0) * 1e6 / args.iters))
        return sorted(samples)[len(samples) // 2]

    def clear():
        q.grad = k.grad = v.grad = None

    def op_fwd_bwd():
        memory_attention(q, k, v, layout, backend="triton").backward(do)
        clear()

    def sdpa_fwd_bwd():
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask).backward(do)
        clear()

    kept = memory_attention(q, k, v, layout, backend="triton")
    out, lse = att.forward(q, k, v, seq_lens, 16, 16, True, False, scale)

    class Identity(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            return g

    def python_function():
        Identity.apply(q).backward(do)
        clear()

    def _single_threaded(fn):  # the backward on the calling thread: no hand-off to the device thread and back
        with torch.autograd.set_multithreading_enabled(False):
            fn()

    def cpp_graph():
        (q * 1).backward(do)
        clear()

    from rmt_fast.ops import launch

    with launch.recording() as calls:  # the backward's own first launch (arguments, grid, constexprs), not run
        att.backward(do, q, k, v, out, lse, seq_lens, 16, 16, True, False, scale)
    kernel, grid, launch_args, meta = calls[0]
    launcher = next(x for x in vars(att).values() if isinstance(x, launch.Launcher) and x.fn is kernel)
    name = kernel.__name__.strip("_").removesuffix("_kernel")
    launcher(grid, *launch_args, **meta)  # first launches: compiled, then verified (lean where this Triton allows)
    launcher(grid, *launch_args, **meta)
    kernel_pieces = [(f"{name} kernel, Triton's launch", lambda: kernel[grid](*launch_args, **meta))]
    if launcher.direct:
        compiled, constexprs, _, lean = next(iter(launcher._compiled.values()))
        device, grid3, runner_args = torch.cuda.current_device(), launch.grid3(grid), (*launch_args, *constexprs)
        print(f"direct launches of {name}: {'lean (the generated C launcher called directly)' if lean else 'runner'}")
        tensors = launcher._leading_tensors  # the pointer arguments, as the direct launch counted them

        def lean_alone():  # what a direct launch costs past its launch key
            if lean is None:
                return launch._launch(compiled, grid3, device, runner_args)
            launch._lean_launch(lean, grid3, device, [a.data_ptr() for a in launch_args[:tensors]],
                                launch_args[tensors:], constexprs)

        kernel_pieces = [
            (f"{name} kernel ({len(calls)} launch(es) per backward), direct launch",
             lambda: launcher(grid, *launch_args, **meta)),
            (f"{name} kernel, the lean launch alone (no launch key)", lean_alone),
            (f"{name} kernel, the compiled kernel's runner",
             lambda: launch._launch(compiled, grid3, device, runner_args)),
            *kernel_pieces,
        ]
    else:
        print(f"no direct launches on Triton {launch.TRITON_VERSION} (see rmt_fast.ops.launch.direct_launches): "
              f"{name} takes Triton's launch")
    pieces = [
        ("memory_attention fwd+bwd (eager)", op_fwd_bwd),
        ("SDPA + explicit mask fwd+bwd", sdpa_fwd_bwd),
        ("memory_attention forward, grad on", lambda: memory_attention(q, k, v, layout, backend="triton")),
        ("its backward via autograd.grad", lambda: torch.autograd.grad(kept, (q, k, v), do, retain_graph=True)),
        ("triton.forward (no autograd)", lambda: att.forward(q, k, v, seq_lens, 16, 16, True, False, scale)),
        ("triton.backward (no autograd)",
         lambda: att.backward(do, q, k, v, out, lse, seq_lens, 16, 16, True, False, scale)),
        *kernel_pieces,
        ("memory_attention fwd+bwd, autograd multithreading off", lambda: _single_threaded(op_fwd_bwd)),
        ("SDPA + explicit mask fwd+bwd, multithreading off", lambda: _single_threaded(sdpa_fwd_bwd)),
        ("trivial Python autograd.Function fwd+bwd", python_function),
        ("one-op C++ autograd graph fwd+bwd", cpp_graph),
    ]
    rows = []
    print(f"{'piece':60s} {'host us':>9s} {'wall us':>9s}")
    for name, fn in pieces:
        host, wall = timed(fn)
        rows.append({"shape": args.shape, "piece": name, "host_us": round(host, 1), "wall_us": round(wall, 1)})
        print(f"{name:60s} {host:9.1f} {wall:9.1f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "attention_host.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out / 'attention_host.csv'}")


if __name__ == "__main__":
    main()
