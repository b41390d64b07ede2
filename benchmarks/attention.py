"""Memory-token attention at RMT segment shapes: how close does the fused kernel get to plain causal flash?

Compares, forward and forward+backward, under the RMT decoder mask (16 read + 16 write slots):

- ``reference``: ``memory_attention_ref`` (fp32 math, dense mask);
- ``sdpa_mask``: ``F.scaled_dot_product_attention`` with the boolean mask ``layout.allowed(N)``;
- ``flex``: compiled FlexAttention with a block mask built from a ``mask_mod`` that reads ``seq_lens``;
- ``triton``: ours (``rmt_fast/ops/memory_attention/triton.py``);
- ``cuda``: the ``rmt_fast._C`` kernel, fp16 inputs (only when the extension is built and has the op);
- ``sdpa_causal``: SDPA ``is_causal=True`` without memory semantics: the ceiling to aim for.

``--cache-sizes 0 128 512`` adds a short-term cache of k keys in front of each segment's keys (issue 29's
``num_cache_tokens``: keys ``[cache | segment]``, every cached key visible to every valid query; with ``--ragged``
each row keeps a random [k/2, k] of them); ``sdpa_causal`` stays on the segment's own keys (the k = 0 ceiling), and
the table's "time / k=0" column divides each method's time by its own at k = 0.

Masks (SDPA's tensor, Flex's block mask) are built once, outside the timed region; ours needs none.
Before timing, ours (and the CUDA kernel) are checked against the reference (max abs error of O, dQ, dK, dV).

FLOPs are counted honestly from the mask: with ``P`` = the number of allowed (query, key) pairs summed over
the batch, forward = ``4 * Hq * D * P`` (two matmuls, 2 FLOPs per multiply-add) and forward+backward =
``14 * Hq * D * P`` (the backward does five matmuls: S again, dP, dV, dK, dQ = 2.5x the forward).
For a causal mask of length L, ``P = L (L + 1) / 2`` per row; ``sdpa_causal`` is credited with that.

By default calls are timed eagerly, so at small shapes Python and kernel-launch overhead count: ``--iters``
back-to-back calls between two synchronisations (what a training loop issues; the time per call is the larger
of host and GPU time), median of ``--rounds`` rounds in which the methods take turns (the host's speed drifts
during a run and hits them alike). ``--graph`` times CUDA-graph replays instead (``triton.testing.do_bench``; every
method is captured first, then ``--graph-rounds`` rounds in which the methods take turns, median), which is what a
graph-captured RMT segment step sees.

Writes ``<out>/attention.csv`` and ``<out>/attention.png`` (``attention_graph.*`` with --graph), prints a table,
and with ``--append-results FILE`` appends a dated section (GPU, versions, command, table) to FILE.
``--sweep`` instead times every candidate tile config of our kernels (the forward, the split backward's dQ and
dK/dV kernels, the fused backward, the stored backward's dQ kernel; dK/dV under ``--sweep-schedule``) at the
chosen shapes, to retune ``_launch_config`` on a new GPU.
``--methods triton_split triton_fused triton_stored`` time ours with one backward schedule forced ("triton" is
the automatic choice; ``triton_stored_whole``: stored in one chunk, with no cap on its dS buffer);
``triton_one_stream`` with the stored schedule's chunks on the caller's stream only (no second stream);
``triton_tma triton_pointer`` with its row loads forced (TMA tensor descriptors on sm_90+,
or pointer arithmetic). ``--loads`` sets the row loads of everything the run times (sweeps included).

Example: ``python benchmarks/attention.py --append-results benchmarks/RESULTS.md``
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import math
import os
import sys
from pathlib import Path

DEFAULT_SHAPES = ("8x12x544x64", "4x16x2080x128", "1x16x8224x128")
DEFAULT_METHODS = ("reference", "sdpa_mask", "flex", "triton", "cuda", "sdpa_causal")
# ours with one backward schedule forced (rmt_fast/ops/memory_attention/triton.py ``_schedule``); "triton" is the
# automatic choice
SCHEDULE_METHODS = ("triton_split", "triton_fused", "triton_stored")
# the stored schedule in one chunk whatever its dS takes (StoredBackward.max_bytes unlimited): what chunking costs
WHOLE_METHODS = ("triton_stored_whole",)
# ours with the row loads forced (``row_loads``): TMA tensor descriptors or pointer arithmetic
LOADS_METHODS = ("triton_tma", "triton_pointer")
# ours with the stored schedule's chunks on one stream (the caller's) instead of two
STREAM_METHODS = ("triton_one_stream",)
VARIANTS = SCHEDULE_METHODS + WHOLE_METHODS + LOADS_METHODS + STREAM_METHODS  # ours under a context
METHODS = DEFAULT_METHODS + VARIANTS
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), metavar="BxHxNxD",
                   help="B x Hq x N x D, N including the memory slots (default: %(default)s)")
    p.add_argument("--num-read", type=int, default=16, help="read slots per row (default: 16)")
    p.add_argument("--num-write", type=int, default=16, help="write slots per row (default: 16)")
    p.add_argument("--gqa", type=int, default=1, help="query heads per k/v head (default: 1)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="input dtype (the cuda kernel: fp16)")
    p.add_argument("--bidirectional", choices=["both", "off", "on"], default="both",
                   help="memory_bidirectional mask variants to run (default: both)")
    p.add_argument("--cache-sizes", nargs="+", type=int, default=[0], metavar="K",
                   help="short-term cache keys in front of each segment (0: none; default: 0)")
    p.add_argument("--ragged", action="store_true",
                   help="random token counts per row in [L/2, L] instead of full rows (padding at the end)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(DEFAULT_METHODS),
                   help="what to time (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms (default: 25)")
    p.add_argument("--iters", type=int, default=100, help="eager: calls per timed round (default: 100)")
    p.add_argument("--rounds", type=int, default=15, help="eager: timed rounds, median taken (default: 15)")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms (default: 100)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="CSV/PNG folder (default: %(default)s)")
    p.add_argument("--append-results", type=Path, metavar="FILE", help="append a markdown section to FILE")
    p.add_argument("--graph", action="store_true",
                   help="time replays of CUDA graphs (no Python/launch overhead: what a graph-captured step sees)")
    p.add_argument("--graph-rounds", type=int, default=3,
                   help="with --graph: rounds in which the methods take turns; the median is reported (default: 3)")
    p.add_argument("--sweep", action="store_true", help="time candidate tile configs of our kernels instead")
    p.add_argument("--sweep-kernels", nargs="+", choices=["fwd", "dkdv", "dq", "fused", "dq_stored"],
                   help="with --sweep: the kernels to sweep (default: all)")
    p.add_argument("--sweep-schedule", choices=["split", "stored"], default="split",
                   help="with --sweep: the backward schedule the dkdv kernel is swept under (default: split)")
    p.add_argument("--sweep-configs", nargs="+", metavar="A,B,..,WARPS,STAGES",
                   help="with --sweep: time these configs (blocks, warps, stages, comma-separated; 6 numbers for "
                        "fused, else 4) and the default instead of the built-in candidate list")
    p.add_argument("--loads", choices=["auto", "tma", "pointer"], default="auto",
                   help="row loads of our kernels for the whole run (default: auto)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.graph_rounds < 1:
        p.error(f"--graph-rounds must be at least 1, got {args.graph_rounds}")
    if any(k < 0 for k in args.cache_sizes):
        p.error(f"--cache-sizes must be >= 0, got {args.cache_sizes}")
    return args


def parse_shape(text: str) -> tuple[int, int, int, int]:
    try:
        b, h, n, d = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--shapes: expected BxHxNxD (e.g. 8x12x544x64), got {text!r}")
    return b, h, n, d


# ----------------------------------------------------------------------------------------------------------------
# Problem set-up
# ----------------------------------------------------------------------------------------------------------------


class Problem:
    """Inputs, layout and the per-method callables for one (shape, mask variant, cache size)."""

    def __init__(self, args, shape, bidir, torch, num_cache: int = 0):
        import torch.nn.functional as F

        from rmt_fast.ops import SegmentLayout

        self.torch = torch
        b, h, n, d = shape
        if h % args.gqa:
            raise SystemExit(f"--gqa {args.gqa} does not divide {h} heads")
        self.shape, self.bidir, self.num_cache = shape, bidir, num_cache
        self.h_kv = h // args.gqa
        dev = "cuda"
        dtype = getattr(torch, DTYPES[args.dtype])
        gen = torch.Generator(device=dev).manual_seed(args.seed)
        tokens = n - args.num_read - args.num_write
        if tokens < 0:
            raise SystemExit(f"N={n} is smaller than --num-read + --num-write")
        if args.ragged:
            lens = torch.randint(tokens // 2, tokens + 1, (b,), device=dev, generator=gen)
        else:
            lens = torch.full((b,), tokens, device=dev)
        cache_lens = None
        if num_cache and args.ragged:
            cache_lens = torch.randint(num_cache // 2, num_cache + 1, (b,), device=dev, generator=gen)
        self.layout = SegmentLayout(args.num_read, args.num_write, lens.to(torch.int32), causal=True,
                                    memory_bidirectional=bidir, num_cache=num_cache, cache_lens=cache_lens)
        self.scale = d ** -0.5

        def rand(*s):
            return torch.randn(*s, device=dev, dtype=dtype, generator=gen).requires_grad_(True)

        nk = num_cache + n
        self.q, self.k, self.v = rand(b, h, n, d), rand(b, self.h_kv, nk, d), rand(b, self.h_kv, nk, d)
        self.do = torch.randn(b, h, n, d, device=dev, dtype=dtype, generator=gen)
        self.allowed = self.layout.allowed(n)  # [B, N, num_cache + N]
        self.pairs = int(self.allowed.sum())
        self.causal_pairs = b * n * (n + 1) // 2
        self.gqa = h != self.h_kv

        allowed4 = self.allowed.unsqueeze(1)
        lay, scale, gqa = self.layout, self.scale, self.gqa
        self.fns = {
            "reference": lambda q, k, v: _ref(q, k, v, lay, scale),
            "sdpa_mask": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=allowed4, scale=scale,
                                                                        enable_gqa=gqa),
            # the segment's own keys: the k = 0 ceiling
            "sdpa_causal": lambda q, k, v: F.scaled_dot_product_attention(q, k[:, :, num_cache:], v[:, :, num_cache:],
                                                                          is_causal=True, scale=scale, enable_gqa=gqa),
            "triton": lambda q, k, v: _triton(q, k, v, lay, scale),
        }
        for method in VARIANTS:
            self.fns[method] = self.fns["triton"]
        self.skipped: dict[str, str] = {}
        if "flex" in args.methods:
            self._add_flex(args)
        if "cuda" in args.methods:
            self._add_cuda()

    def _add_flex(self, args):
        torch = self.torch
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        except ImportError as e:
            self.skipped["flex"] = f"FlexAttention unavailable ({e})"
            return
        b, _, n, _ = self.shape
        r, w = args.num_read, args.num_write
        from rmt_fast.ops.memory_attention.spec import mask_rule

        lens = self.layout.seq_lens
        valid, write_start = lens + (r + w), lens + r
        bidir, c = self.bidir, self.num_cache
        cache_start = torch.as_tensor(self.layout.cache_start, device=lens.device).reshape(-1).expand(b)

        def mask_mod(bi, hi, qi, ki):
            return mask_rule(qi, ki, valid[bi], r, write_start[bi], True, bidir, c, cache_start[bi])

        block_mask = create_block_mask(mask_mod, b, None, n, c + n, device="cuda")
        flex = _compiled_flex(torch, flex_attention)
        scale, gqa = self.scale, self.gqa
        self.fns["flex"] = lambda q, k, v: flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)

    def _add_cuda(self):
        from rmt_fast.ops import cuda as cuda_ops
        from rmt_fast.ops.memory_attention import memory_attention

        if not cuda_ops.has_op("memory_attention"):
            self.skipped["cuda"] = "rmt_fast._C not built or has no memory_attention op"
            return
        half = self.torch.float16
        self.q16, self.k16, self.v16 = (x.detach().to(half).requires_grad_(True) for x in (self.q, self.k, self.v))
        self.do16 = self.do.to(half)
        lay, scale = self.layout, self.scale
        self.fns["cuda"] = lambda q, k, v: memory_attention(q, k, v, lay, scale, backend="cuda")

    def context(self, method):
        """What ``method`` runs its forward and backward under: the forced backward schedule or row loads of a
        ``triton_*`` method, else nothing."""
        import contextlib
        import importlib

        attention = importlib.import_module("rmt_fast.ops.memory_attention.triton")
        if method in SCHEDULE_METHODS:
            return attention.backward_schedule(method.removeprefix("triton_"))
        if method in LOADS_METHODS:
            return attention.row_loads(method.removeprefix("triton_"))
        if method in WHOLE_METHODS:
            return _stored_whole(attention)
        if method in STREAM_METHODS:
            return attention.stored_streams(1)
        return contextlib.nullcontext()

    def inputs(self, method):
        if method == "cuda":
            return (self.q16, self.k16, self.v16), self.do16
        return (self.q, self.k, self.v), self.do


_FLEX = None


@contextlib.contextmanager
def _stored_whole(attention):
    """The stored schedule with an unlimited dS budget (one chunk of heads)."""
    saved = attention.set_stored_backward(attention.StoredBackward(max_bytes=2 ** 62))
    try:
        with attention.backward_schedule("stored"):
            yield
    finally:
        attention.set_stored_backward(saved)


def _compiled_flex(torch, flex_attention):
    global _FLEX
    if _FLEX is None:
        # One compiled graph per shape and grad mode: allow more recompiles than the default.
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 64)
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def _ref(q, k, v, layout, scale):
    from rmt_fast.ops.memory_attention.reference import memory_attention_ref

    return memory_attention_ref(q, k, v, layout, scale)


def _triton(q, k, v, layout, scale):
    from rmt_fast.ops.memory_attention import memory_attention

    return memory_attention(q, k, v, layout, scale, backend="triton")


# ----------------------------------------------------------------------------------------------------------------
# Correctness and timing
# ----------------------------------------------------------------------------------------------------------------


def max_errors(prob: Problem, method: str) -> dict[str, float]:
    """Max abs error of O, dQ, dK, dV against the reference, at valid query positions (O) and everywhere (grads);
    ``pad_dkdv``: the largest dK/dV at keys no valid query attends (must be 0)."""
    torch = prob.torch
    (q, k, v), do = prob.inputs(method)
    with prob.context(method):
        out = prob.fns[method](q, k, v)
        grads = torch.autograd.grad(out, (q, k, v), do)
    ref = _ref(q, k, v, prob.layout, prob.scale)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do)
    n = q.shape[2]
    valid = (torch.arange(n, device=q.device)[None, :] < prob.layout.valid_lens[:, None])[:, None, :, None]
    errs = {"o": float(((out.float() - ref.float()) * valid).abs().max())}
    for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
        errs[name] = float((g.float() - rg.float()).abs().max())
    unseen = ~prob.allowed.any(1)[:, None, :, None]  # [B, 1, num_cache + N, 1]
    errs["pad_dkdv"] = float(max((grads[1] * unseen).abs().max(), (grads[2] * unseen).abs().max()))
    return errs


def time_graphs(prob: Problem, methods, args) -> tuple[dict, dict, dict]:
    """Graphed timing: each method's forward (no grad) and forward+backward are captured in CUDA graphs first, then
    replayed in ``--graph-rounds`` rounds in which the methods take turns (each replay timed by
    ``triton.testing.do_bench``, median), so a drift of the GPU's clocks during the run hits all methods alike.
    Returns ``(times, samples, failed)``: the median ms over the rounds of (forward, forward+backward) per method,
    the per-round values, and the methods whose capture failed (with the error text)."""
    import statistics

    from triton.testing import do_bench

    torch = prob.torch
    replays, failed = {}, {}
    for method in methods:
        (q, k, v), _do = prob.inputs(method)
        try:  # _captured and do_bench reset the grads themselves
            replays[method] = [_captured(step, (q, k, v), torch) for step in _steps(prob, method, clear_grads=False)]
        except Exception as e:  # e.g. a method that cannot be captured in a CUDA graph
            failed[method] = f"{type(e).__name__}: {e}"
    samples = {method: ([], []) for method in replays}
    for _ in range(args.graph_rounds):
        for method, steps in replays.items():
            (q, k, v), _do = prob.inputs(method)
            for i, replay in enumerate(steps):
                samples[method][i].append(do_bench(replay, warmup=args.warmup, rep=args.rep, grad_to_none=[q, k, v],
                                                   return_mode="median"))
    times = {method: tuple(statistics.median(s) for s in samples[method]) for method in replays}
    return times, samples, failed


def _steps(prob: Problem, method: str, clear_grads: bool = True):
    """(forward without grad, forward+backward) of ``method`` on the problem's inputs, as callables; with
    ``clear_grads`` forward+backward also resets the inputs' grads (as a training step's zero_grad does)."""
    torch = prob.torch
    (q, k, v), do = prob.inputs(method)
    fn = prob.fns[method]

    def fwd():
        with torch.no_grad(), prob.context(method):
            fn(q, k, v)

    def fwd_bwd():
        with prob.context(method):
            fn(q, k, v).backward(do)
        if clear_grads:
            q.grad = k.grad = v.grad = None

    return fwd, fwd_bwd


def time_eager(prob: Problem, methods, args) -> dict[str, tuple[float, float]]:
    """Eager ms per call of each method: back-to-back calls (what a training loop issues), ``--iters`` calls
    between two synchronisations, median over ``--rounds`` rounds; the methods take turns within each round, so
    a change of host speed during the run (the eager time of small shapes is host time) hits all of them alike."""
    import time

    torch = prob.torch
    steps = {m: _steps(prob, m) for m in methods}
    samples = {m: ([], []) for m in methods}
    for m in methods:  # warm-up: compile, autotune, allocator
        for step in steps[m]:
            for _ in range(3):
                step()
    for _ in range(args.rounds):
        for m in methods:
            for i, step in enumerate(steps[m]):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(args.iters):
                    step()
                torch.cuda.synchronize()
                samples[m][i].append((time.perf_counter() - t0) * 1e3 / args.iters)
    return {m: tuple(sorted(s)[len(s) // 2] for s in samples[m]) for m in methods}


def _captured(step, leaves, torch):
    """``step`` captured in a CUDA graph (after warm-up on a side stream); returns the replay callable."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
            for x in leaves:
                x.grad = None
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def tflops(pairs: int, h: int, d: int, ms: float, factor: int) -> float:
    return factor * h * d * pairs / (ms * 1e-3) / 1e12


# ----------------------------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------------------------


def build_rows(results):
    """One row per (shape, variant, cache size, method, pass) with speedups against the other methods of the same
    problem, and the time against the same method without a cache (``time_vs_k0``)."""
    rows = []
    for key, per_method in results.items():
        shape_txt, bidir, cache = key
        plain = results.get((shape_txt, bidir, 0), {})
        for pass_name, col in (("fwd", 0), ("fwd+bwd", 1)):
            ms_of = {m: r["ms"][col] for m, r in per_method.items()}
            for method, r in per_method.items():
                ms = r["ms"][col]

                def ratio(other):
                    return ms_of[other] / ms if other in ms_of else float("nan")

                rows.append({
                    "shape": shape_txt, "bidirectional": bidir, "cache": cache, "method": method, "pass": pass_name,
                    "ms": ms, "tflops": r["tflops"][col],
                    "speedup_vs_sdpa_mask": ratio("sdpa_mask"), "speedup_vs_flex": ratio("flex"),
                    "time_vs_sdpa_causal": ms / ms_of["sdpa_causal"] if "sdpa_causal" in ms_of else float("nan"),
                    "time_vs_k0": ms / plain[method]["ms"][col] if method in plain else float("nan"),
                    "max_err": r.get("err", ""),
                })
    return rows


def format_table(rows) -> str:
    head = ["shape", "bidir", "k", "pass", "method", "ms", "TFLOP/s", "x vs sdpa+mask", "x vs flex", "time / causal",
            "time / k=0", "max err"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["shape"], "on" if r["bidirectional"] else "off", str(r["cache"]), r["pass"], r["method"],
            f"{r['ms']:.3f}", f"{r['tflops']:.1f}", _fmt(r["speedup_vs_sdpa_mask"]), _fmt(r["speedup_vs_flex"]),
            _fmt(r["time_vs_sdpa_causal"]), _fmt(r["time_vs_k0"]), f"{r['max_err']:.2g}" if r["max_err"] != "" else "",
        ]) + " |")
    return "\n".join(lines)


def _fmt(x: float) -> str:
    return "-" if x != x else f"{x:.2f}"


def write_csv(rows, path: Path):
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot(rows, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["shape"], r["bidirectional"], r["cache"]) for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(6 + 2.2 * len(groups), 4.5))
    width = 0.8 / len(methods)
    for ax, pass_name in zip(axes, ("fwd", "fwd+bwd")):
        for i, method in enumerate(methods):
            ms = [next((r["ms"] for r in rows if (r["shape"], r["bidirectional"], r["cache"]) == g
                        and r["method"] == method and r["pass"] == pass_name), float("nan")) for g in groups]
            ax.bar([x + i * width for x in range(len(groups))], ms, width, label=method)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(groups))])
        ax.set_xticklabels([f"{s}\nbidir {'on' if b else 'off'}" + (f"\nk={c}" if c else "") for s, b, c in groups],
                           fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("ms (median, log scale)")
        ax.set_title(f"memory attention, {pass_name}")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _timing_text(args) -> str:
    if args.graph:
        return (f"CUDA graph replays: median over {args.graph_rounds} rounds, the methods taking turns in each round, "
                "of triton.testing.do_bench medians")
    return (f"eager back-to-back calls (Python and launch overhead included), {args.iters} calls per round, median "
            f"of {args.rounds} rounds, the methods taking turns in each round")


def append_results(path: Path, table: str, notes: list[str], torch, args):
    import triton

    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:
        tf_version = "not installed"
    cmd = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    section = [
        f"\n## Memory attention ({datetime.date.today().isoformat()}, {torch.cuda.get_device_name()})\n",
        f"torch {torch.__version__}, triton {triton.__version__}, transformers {tf_version}.\n",
        f"Command: `{cmd}`\n",
        f"Timing: {_timing_text(args)}.\n",
        "FLOPs: forward 4·Hq·D·P, forward+backward 14·Hq·D·P, P = allowed (query, key) pairs summed over the batch "
        "(the causal ceiling is credited with its own L(L+1)/2 per row). Masks are built outside the timed region.\n",
    ]
    section += [f"- {n}\n" for n in notes]
    section += ["\n", table, "\n"]
    with path.open("a") as f:
        f.write("".join(section))


# ----------------------------------------------------------------------------------------------------------------
# Config sweep
# ----------------------------------------------------------------------------------------------------------------

SWEEP = {
    "fwd": [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3),
            (64, 128, 4, 3), (128, 64, 4, 4), (64, 32, 4, 4), (128, 64, 8, 2), (128, 64, 8, 4), (64, 64, 4, 2),
            (64, 128, 8, 3)],
    "dkdv": [(32, 128, 4, 3), (32, 64, 4, 3), (64, 64, 4, 3), (64, 128, 8, 3), (32, 128, 8, 3), (16, 128, 4, 3),
             (64, 64, 8, 2), (32, 64, 4, 4), (16, 64, 4, 4), (32, 128, 4, 4), (32, 128, 4, 5), (64, 128, 8, 2),
             (64, 64, 4, 4), (32, 64, 4, 5), (64, 128, 4, 2),
             # 8 warps at 32x64: no register spills at D128 (200-212 registers vs 255 + 48-80 stack bytes at 4 warps;
             # `python -m rmt_fast.ops.triton_check --arch 90 --resources`, RESULTS.md "2026-11-29: the stored
             # backward in chunks of heads"), not yet timed
             (32, 64, 8, 3), (32, 64, 8, 2), (16, 64, 8, 3)],
    "dq": [(128, 32, 4, 3), (64, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3), (128, 16, 4, 3),
           (64, 32, 4, 4), (32, 64, 4, 3), (64, 16, 4, 4), (128, 32, 4, 4), (128, 64, 8, 2), (64, 64, 4, 4),
           (128, 32, 8, 4), (64, 32, 4, 5), (128, 64, 4, 2)],
    # (BLOCK_M1, BLOCK_N1) of the dK/dV programs, (BLOCK_M2, BLOCK_N2) of the dQ programs, warps, stages
    "fused": [(16, 128, 64, 32, 4, 3), (32, 64, 64, 32, 4, 3), (32, 128, 64, 32, 4, 3), (16, 128, 64, 64, 4, 3),
              (32, 64, 64, 64, 4, 3), (16, 64, 64, 32, 4, 3), (16, 128, 128, 32, 4, 3), (32, 64, 64, 32, 8, 3),
              (32, 128, 128, 32, 8, 3), (16, 128, 64, 32, 4, 4), (32, 64, 64, 32, 4, 2),
              # at D64 the default (16, 128, 64, 32, 4, 3) spills (255 registers + 384 stack bytes); these do not
              # (176-248 registers; triton_check --resources, RESULTS.md "2026-11-29: the stored backward in chunks
              # of heads"), not yet timed at D64
              (16, 128, 64, 32, 8, 3), (16, 64, 64, 32, 8, 3), (16, 64, 64, 32, 4, 3)],
    # the "stored" schedule's dQ kernel (dQ = dS K from stored dS tiles)
    "dq_stored": [(64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 3), (128, 32, 4, 3), (64, 128, 4, 3), (128, 128, 8, 3),
                  (64, 64, 4, 4), (128, 64, 4, 3), (128, 64, 8, 4), (64, 128, 8, 3)],
}
# the backward schedule each backward kernel belongs to ("dkdv" is swept under --sweep-schedule)
_SWEEP_SCHEDULE = {"dq": "split", "fused": "fused", "dq_stored": "stored"}


def _candidate(kernel, values):
    if not values:  # the default config
        return {}
    names = ("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2") if kernel == "fused" else ("BLOCK_M", "BLOCK_N")
    *blocks, warps, stages = values
    return {**dict(zip(names, blocks)), "num_warps": warps, "num_stages": stages}


def _sweep_list(kernel: str, configs: list[str] | None) -> list[tuple[int, ...]]:
    """The configs to time for ``kernel``: ``SWEEP[kernel]``, or ``configs`` (``--sweep-configs``) after the
    default."""
    if not configs:
        return SWEEP[kernel]
    size = 6 if kernel == "fused" else 4
    chosen = [()]  # the default
    for text in configs:
        try:
            values = tuple(int(x) for x in text.split(","))
        except ValueError:
            values = ()
        if len(values) != size:
            raise SystemExit(f"--sweep-configs: {kernel} takes {size} comma-separated integers, got {text!r}")
        chosen.append(values)
    return chosen


def sweep(args, torch):
    """Time each candidate config of one kernel (others at their defaults): fwd alone, or the backward alone
    (under the schedule that kernel belongs to)."""
    from triton.testing import do_bench

    import rmt_fast.ops.memory_attention.triton as attention

    default = attention._launch_config
    kernels = args.sweep_kernels or list(SWEEP)
    for shape_txt in args.shapes:
        shape = parse_shape(shape_txt)
        prob = Problem(args, shape, bidir=args.bidirectional != "off", torch=torch)
        q, k, v, do = prob.q, prob.k, prob.v, prob.do
        long_rows = shape[2] >= attention.LONG_ROWS
        print(f"\n== {shape_txt} {args.dtype} (default: "
              + ", ".join(f"{kn} {default(kn, shape[3], q.dtype, long_rows)}" for kn in kernels) + ")")
        for kernel in kernels:
            timings = []
            for values in _sweep_list(kernel, args.sweep_configs):
                cand = _candidate(kernel, values)
                attention._launch_config = lambda kn, d, dt, long_rows=False, cand=cand, kernel=kernel: (
                    {**default(kn, d, dt, long_rows), **cand} if kn == kernel else default(kn, d, dt, long_rows))
                try:
                    if kernel == "fwd":
                        with torch.no_grad():
                            ms = do_bench(lambda: _triton(q, k, v, prob.layout, prob.scale), warmup=args.warmup,
                                          rep=args.rep, return_mode="median")
                    else:
                        out = _triton(q, k, v, prob.layout, prob.scale)
                        with attention.backward_schedule(_SWEEP_SCHEDULE.get(kernel, args.sweep_schedule)):
                            ms = do_bench(lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True),
                                          warmup=args.warmup, rep=args.rep, return_mode="median")
                    timings.append((ms, {**default(kernel, shape[3], q.dtype, long_rows), **cand}, not cand))
                except Exception as e:  # out of shared memory / registers: not a usable config
                    print(f"  {kernel} {cand}: failed ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
                finally:
                    attention._launch_config = default
            for ms, cfg, is_default in sorted(timings, key=lambda t: t[0]):
                blocks = " ".join(f"{name[6:]}={value:3d}" for name, value in cfg.items() if name.startswith("BLOCK"))
                print(f"  {kernel:6s} {ms:8.4f} ms  {blocks} w={cfg['num_warps']} s={cfg['num_stages']}"
                      + ("  (default)" if is_default else ""))


# ----------------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/attention.py needs a CUDA GPU")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import importlib

    with importlib.import_module("rmt_fast.ops.memory_attention.triton").row_loads(args.loads):
        return sweep(args, torch) if args.sweep else run(args, torch)


def run(args, torch):
    """Time the methods at every shape, mask variant and cache size; write the CSV/PNG (and the RESULTS section)."""

    variants = {"both": (False, True), "off": (False,), "on": (True,)}[args.bidirectional]
    results, notes = {}, []
    for shape_txt in args.shapes:
        shape = parse_shape(shape_txt)
        b, h, n, d = shape
        for bidir, cache in ((bd, c) for bd in variants for c in args.cache_sizes):
            prob = Problem(args, shape, bidir, torch, cache)
            key = (shape_txt, bidir, cache)
            label = f"{shape_txt} bidir={bidir}" + (f" k={cache}" if cache else "")
            results[key] = {}
            errs, timed = {}, []
            for method in args.methods:
                if method in prob.skipped:
                    note = f"{method} skipped: {prob.skipped[method]}"
                    if note not in notes:
                        notes.append(note)
                        print(note)
                    continue
                errs[method] = ""
                if method in ("triton", "cuda", *VARIANTS):
                    e = max_errors(prob, method)
                    errs[method] = max(e["o"], e["dq"], e["dk"], e["dv"])
                    print(f"[check] {label} {method}: "
                          + " ".join(f"{kk}={vv:.3g}" for kk, vv in e.items()))
                    if not math.isfinite(errs[method]) or e["pad_dkdv"] != 0.0:
                        notes.append(f"{method} at {label}: bad check {e}")
                timed.append(method)
            if args.graph:
                times, samples, failed = time_graphs(prob, timed, args)
                for method, why in failed.items():
                    note = f"{method} at {label} not timed: {why}"
                    notes.append(note.splitlines()[0][:200])
                    print(notes[-1])
                for method, (_fwd, fwd_bwd) in samples.items():
                    print(f"  {label} {method:12s} fwd+bwd per round: "
                          + " ".join(f"{x:.3f}" for x in fwd_bwd) + " ms")
            else:
                times = time_eager(prob, timed, args)
            for method, (fwd, fwd_bwd) in times.items():
                pairs = prob.causal_pairs if method == "sdpa_causal" else prob.pairs
                results[key][method] = {
                    "ms": (fwd, fwd_bwd),
                    "tflops": (tflops(pairs, h, d, fwd, 4), tflops(pairs, h, d, fwd_bwd, 14)),
                    "err": errs[method],
                }
                print(f"  {label} {method:12s} fwd {fwd:8.3f} ms  fwd+bwd {fwd_bwd:8.3f} ms",
                      flush=True)
            del prob
            torch.cuda.empty_cache()

    rows = build_rows(results)
    table = format_table(rows)
    print()
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "attention_graph" if args.graph else "attention"
    write_csv(rows, args.out / f"{stem}.csv")
    plot(rows, args.out / f"{stem}.png")
    print(f"\nwrote {args.out / (stem + '.csv')} and {args.out / (stem + '.png')}")
    if args.append_results:
        append_results(args.append_results, table, notes, torch, args)
        print(f"appended to {args.append_results}")


if __name__ == "__main__":
    main()
