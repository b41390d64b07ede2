"""Segment handoff throughput: memory gather + next input placement, against the device copy bandwidth.

For each shape, times ``segment_handoff`` per backend (gather the memory from the last hidden states and place
it into the next segment's input, ``[memory | tokens | memory]``: the two halves the recurrence calls), counts
the bytes it must move (read token embeddings + write the input + read/write the memory rows), and compares with
a plain device-to-device copy of the same input tensor. Also reports the handoff's share of a GPT-2-small segment step,
and each backend's largest difference from the reference outputs (a copy: 0 expected).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import append_results, markdown_table, write_csv  # noqa: E402

from rmt_fast.ops.segment_handoff import segment_handoff  # noqa: E402

SHAPES = [(4, 512, 16, 768), (16, 512, 16, 768), (64, 512, 10, 384), (8, 2048, 32, 2048), (32, 2048, 32, 4096)]


def bench(fn, reps=50):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=reps)  # ms


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--append-results", default=None)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("handoff.py needs a CUDA GPU (see --help)")
    dt = getattr(torch, args.dtype)
    from rmt_fast.ops import cuda as cuda_ext

    backends = ["reference", "triton"] + (["cuda"] if cuda_ext.has_op("segment_handoff") else [])
    rows = []
    for b, s, m, d in SHAPES:
        n = s + 2 * m
        hidden = torch.randn(b, n, d, device="cuda", dtype=dt)
        memory = torch.randn(b, m, d, device="cuda", dtype=dt)
        tok = torch.randn(b, n, d, device="cuda", dtype=dt)
        lens = torch.randint(s // 2, s + 1, (b,), device="cuda")
        gather = lens + m
        write = lens + m
        elt = tok.element_size()
        nbytes = (2 * b * n * d + 3 * b * m * d) * elt
        dst = torch.empty_like(tok)
        t_copy = bench(lambda: dst.copy_(tok))
        copy_bw = 2 * b * n * d * elt / (t_copy * 1e-3) / 1e12
        want = segment_handoff(hidden, memory, gather, tok, 0, write, backend="reference")
        for be in backends:
            try:
                got = segment_handoff(hidden, memory, gather, tok, 0, write, backend=be)
                err = max((g - w).abs().max().item() for g, w in zip(got, want) if g is not None)  # copies: 0
                ms = bench(lambda: segment_handoff(hidden, memory, gather, tok, 0, write, backend=be))
            except Exception as e:
                rows.append(dict(shape=f"B{b} N{n} m{m} d{d}", backend=be, error=f"{type(e).__name__}: {e}"))
                continue
            bw = nbytes / (ms * 1e-3) / 1e12
            rows.append(dict(shape=f"B{b} N{n} m{m} d{d}", backend=be, ms=ms, tb_per_s=bw,
                             copy_tb_per_s=copy_bw, fraction_of_copy=bw / copy_bw, max_abs_err_vs_reference=err))
    # share of a GPT-2 small segment step (B=4, 512 + 2x16), eager bf16 forward
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config()).cuda().to(dt).eval()
    x = torch.randn(4, 544, 768, device="cuda", dtype=dt)
    with torch.no_grad():
        t_step = bench(lambda: model(inputs_embeds=x, use_cache=False), reps=30)
    for r in rows:
        if r.get("shape") == "B4 N544 m16 d768" and "ms" in r:
            r["share_of_gpt2_step"] = r["ms"] / t_step
    os.makedirs(args.out, exist_ok=True)
    write_csv(os.path.join(args.out, "handoff.csv"), rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4))
        for be in backends:
            rs = [r for r in rows if r.get("backend") == be and "fraction_of_copy" in r]
            ax.plot([r["shape"] for r in rs], [r["fraction_of_copy"] for r in rs], marker="o", label=be)
        ax.axhline(0.7, ls="--", c="gray", label="target 0.7")
        ax.set_ylabel("fraction of device copy bandwidth")
        ax.tick_params(axis="x", rotation=20)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "handoff.png"), dpi=120)
    except Exception as e:
        print("plot failed:", e)
    table = markdown_table(rows, ["shape", "backend", "ms", "tb_per_s", "copy_tb_per_s", "fraction_of_copy",
                                  "share_of_gpt2_step", "max_abs_err_vs_reference", "error"])
    table += f"\n\nGPT-2 small eager segment step (B=4, N=544, bf16 forward): {t_step:.3f} ms"
    if args.append_results:
        append_results(args.append_results, "Segment handoff (benchmarks/handoff.py)", table)
    print(table)


if __name__ == "__main__":
    main()
