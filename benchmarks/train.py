"""Training-step benchmarks (issue: training at graph speed with flat memory), side by side in one run.

Paths per configuration (bf16 autocast, AdamW step included only in the memory-task part):
  official      the official loop restated (rmt_fast/experiments/official.py): full BPTT, all activations kept
  default       rmt_fast.wrap(model) with no flags (full BPTT replayed as forward/backward CUDA graphs of the whole
                call, rmt_fast.graphs.CallGraphs; decoders keep logits, captured since RESULTS.md "2026-11-30: lean
                Triton launches")
  full_eager    full BPTT with cuda_graphs=False (what `default` was before the step graphs)
  no_logits     decoders: keep_logits=False (the fused linear + cross-entropy loss; full BPTT as step graphs)
  no_logits_eager  the same with cuda_graphs=False
  ckpt_eager    checkpoint_segments=True, cuda_graphs=False: the two-sweep schedule, eager
  ckpt_graphed  checkpoint_segments=True, cuda_graphs=True: both sweeps replay CUDA graphs
  ckpt_graphed_compiled  the same with torch_compile=True (only with --compile; a copy of the model is compiled)

Parts (``--parts``): gpt2 (GPT-2 small, B=4, m=16, 16 x 512 tokens; peaks at 1/16/256 segments), bert (BERT-base
classifier, B=8, m=10, 16 x 499 tokens; peaks at 1/16/256), task (the memory-task configuration: MiniLM-L6-shaped
BERT, m=10, 499-token segments, 5 segments, batch 32, AdamW: the old trainer settings vs the new ones), curriculum
(the same model over a curriculum stage's mixed lengths 1..n: call-graph captures per length vs one, the two-sweep
schedule, eager, the official loop), loops (GPT-2 small B=4 and BERT-base B=8, 16 segments: the training loops
users write, LOOPS, each against the official loop).
Writes CSV and PNG under --out and, with --append-results, a section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import append_results, markdown_table, peak_gib, timeit, write_csv  # noqa: E402

import rmt_fast  # noqa: E402
from rmt_fast.experiments.official import official_decoder, official_encoder  # noqa: E402

PATHS = {
    "default": dict(),
    "full_eager": dict(cuda_graphs=False),
    "no_logits": dict(keep_logits=False),
    "no_logits_eager": dict(keep_logits=False, cuda_graphs=False),
    "ckpt_eager": dict(checkpoint_segments=True, cuda_graphs=False, keep_logits=False),
    "ckpt_graphed": dict(checkpoint_segments=True, cuda_graphs=True, keep_logits=False),
    "ckpt_graphed_compiled": dict(checkpoint_segments=True, cuda_graphs=True, keep_logits=False, torch_compile=True),
}


def _autocast(dev):
    return torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda")


def bench_paths(args, rows, part, model, make_ids, labels_of, wrap_kw, official_step, seg_tokens, paths, batch):
    dev = args.device
    n_main = args.segments
    results = {}
    for name in ["official"] + paths:
        for n_seg in ([1, n_main] + ([args.long] if name == "ckpt_graphed" and args.long else [])
                      if name != "ckpt_graphed_compiled" else [n_main]):
            ids = make_ids(n_seg)
            labels = labels_of(ids)
            if name == "official":
                def step():
                    with _autocast(dev):
                        loss = official_step(ids, labels)
                    loss.backward()
                    model.zero_grad(set_to_none=True)
            else:
                target = model
                if PATHS[name].get("torch_compile"):
                    import copy

                    target = copy.deepcopy(model)  # compiled in place: keep the other paths' model eager
                rmt = rmt_fast.wrap(target, **wrap_kw, **PATHS[name]).to(dev)
                rmt.train()

                def step():
                    with _autocast(dev):
                        loss = rmt(ids, labels=labels).loss
                    loss.backward()
                    rmt.zero_grad(set_to_none=True)
            try:
                peak = peak_gib(step)
                # A 1-segment step is short, and its median of --reps 2 after one warm-up read 0.56x of a standalone
                # timing of the same step (RESULTS.md "2026-11-30: the targets re-measured"); more warm-ups
                # and repetitions cost little here.
                short = n_seg == 1
                t = timeit(step, warmup=3 if short else 1,
                           reps=1 if n_seg > n_main else max(args.reps, 7) if short else args.reps)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                rows.append(dict(part=part, path=name, segments=n_seg, error="out of memory"))
                continue
            tok = batch * n_seg * seg_tokens
            row = dict(part=part, path=name, segments=n_seg, seconds=t, tok_per_s=tok / t, peak_gib=peak)
            results[(name, n_seg)] = row
            rows.append(row)
            print(f"{part:5s} {name:13s} {n_seg:4d} seg  {tok / t / 1e3:8.1f}k tok/s  {peak:6.2f} GiB", flush=True)
    for (name, n_seg), row in results.items():
        ref = results.get(("official", n_seg))
        one = results.get((name, 1))
        if ref:
            row["speed_vs_official"] = row["tok_per_s"] / ref["tok_per_s"]
        if one and one["peak_gib"]:
            row["peak_vs_1seg"] = row["peak_gib"] / one["peak_gib"]


def part_gpt2(args, rows):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config() if not args.smoke else GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=128)
    cfg.n_positions = max(cfg.n_positions, args.gpt2_seg + 2 * 16)
    model = GPT2LMHeadModel(cfg).to(args.device).train()
    seg, m, b = args.gpt2_seg, 16, 4
    mem = torch.randn(m, cfg.n_embd, device=args.device) * 0.02

    def make_ids(n):
        return torch.randint(0, cfg.vocab_size, (b, n * seg), device=args.device)

    bench_paths(args, rows, "gpt2", model, make_ids, lambda ids: ids, dict(num_mem_tokens=m, segment_size=seg),
                lambda ids, labels: official_decoder(model, mem, ids, seg, labels=labels)[2], seg,
                [p for p in PATHS if p != "full_eager" and (args.compile or p != "ckpt_graphed_compiled")
                 and (not args.paths or p in args.paths.split(","))], b)


def part_bert(args, rows):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(num_labels=6) if not args.smoke else BertConfig(num_labels=6, num_hidden_layers=2, hidden_size=64,
                                                                     num_attention_heads=4, intermediate_size=128,
                                                                     max_position_embeddings=64)
    model = BertForSequenceClassification(cfg).to(args.device).train()
    b, m = 8, 10
    seg = cfg.max_position_embeddings - m - 3
    mem = torch.randn(m, cfg.hidden_size, device=args.device) * 0.02
    labels = torch.randint(0, 6, (b,), device=args.device)

    def make_ids(n):
        return torch.randint(1000, cfg.vocab_size, (b, n * seg), device=args.device)

    def official_step(ids, lab):
        out, _ = official_encoder(model, mem, ids, seg, 101, 102, 0)
        return torch.nn.functional.cross_entropy(out.logits.float(), lab)

    bench_paths(args, rows, "bert", model, make_ids, lambda ids: labels,
                dict(num_mem_tokens=m, cls_token_id=101, sep_token_id=102, pad_token_id=0), official_step, seg,
                ["default", "full_eager", "ckpt_eager", "ckpt_graphed"], b)


def part_task(args, rows):
    """One optimizer step of the memory-task configuration: the old trainer settings vs the new ones."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                     intermediate_size=1536, num_labels=6)
    if args.smoke:
        cfg = BertConfig(num_labels=6, num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                         intermediate_size=128, max_position_embeddings=64)
    model = BertForSequenceClassification(cfg).to(args.device).train()
    m, b, n_seg = 10, 32 if not args.smoke else 4, 5
    seg = cfg.max_position_embeddings - m - 3
    ids = torch.randint(1000, cfg.vocab_size, (b, n_seg * seg), device=args.device)
    labels = torch.randint(0, 6, (b,), device=args.device)
    kw = dict(num_mem_tokens=m, cls_token_id=101, sep_token_id=102, pad_token_id=0, segment_size=seg)
    settings = {"before (full BPTT, AdamW)": (dict(keep_logits=False, cuda_graphs=False), False),
                "graphed two-sweep, fused AdamW": (dict(checkpoint_segments=True, cuda_graphs=True,
                                                        keep_logits=False), True),
                "full BPTT as step graphs, fused AdamW": (dict(keep_logits=False), True)}
    if args.compile or args.device == "cuda":  # what `rmt-fast train` runs on CUDA (torch_compile "auto")
        settings["trainer default: step graphs + torch_compile, fused AdamW"] = (dict(keep_logits=False,
                                                                                      torch_compile=True), True)
    times = {}
    for name, (wkw, fused) in settings.items():
        target = model
        if wkw.get("torch_compile"):
            import copy

            target = copy.deepcopy(model)
        rmt = rmt_fast.wrap(target, **kw, **wkw).to(args.device)
        opt = torch.optim.AdamW(rmt.parameters(), lr=1e-5, weight_decay=1e-3,
                                fused=fused and args.device == "cuda")

        def step():
            with _autocast(args.device):
                loss = rmt(ids, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(rmt.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        peak = peak_gib(step)
        t = timeit(step, warmup=1, reps=args.reps)
        times[name] = t
        rows.append(dict(part="task", path=name, segments=n_seg, seconds=t, tok_per_s=b * n_seg * seg / t,
                         peak_gib=peak))
        print(f"task  {name:40s} {t * 1e3:8.1f} ms/step  {peak:6.2f} GiB", flush=True)
    before = times[next(iter(times))]
    for row in rows[-len(times):]:
        row["speed_vs_before"] = before / row["seconds"]


def _timed_steps(args, step, warm_args, timed_args, rmt) -> dict:
    """``step(x)`` for every x of ``warm_args``, then timed over ``timed_args``: mean seconds per step, the timed
    calls' executor counts (``rmt`` None: the official loop), the warm-up's captures, the share of graphed calls and
    the peak memory allocated and reserved (graph pools count) of the timed steps."""
    for x in warm_args:
        step(x)
    warm_counts = rmt.executor_counts(reset=True) if rmt is not None else {}
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for x in timed_args:
        step(x)
    if cuda:
        torch.cuda.synchronize()
    sec = (time.perf_counter() - t0) / len(timed_args)
    counts = rmt.executor_counts() if rmt is not None else {}
    graphed = sum(v for c, v in counts.items() if "graphed" in c or "captured" in c)
    return dict(seconds=sec, graphed_share=graphed / max(1, sum(counts.values())),
                warmup_captures=warm_counts.get("full-BPTT captured", 0),
                peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else 0,
                peak_reserved_gib=torch.cuda.max_memory_reserved() / 2 ** 30 if cuda else 0)


def part_curriculum(args, rows):
    """A curriculum stage as the experiments' trainer runs it (mix_prob 0.5: half the steps on n segments, the other
    half on a random 1..n): MiniLM-L6-shaped BERT, m=10, 499-token segments, batch 32, bf16 autocast, fused AdamW,
    gradient clipping. Every path runs the same sequence of lengths; ms per step over --curriculum-steps after
    40 warm-up steps (each length captured on its second call), the training calls by executor, peak reserved."""
    import numpy as np
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                     intermediate_size=1536, num_labels=6)
    b, n, steps, warm = 32, args.curriculum_segments, args.curriculum_steps, 40
    if args.smoke:
        cfg = BertConfig(num_labels=6, num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                         intermediate_size=128, max_position_embeddings=64)
        b, n, steps, warm = 4, 3, 6, 4
    model = BertForSequenceClassification(cfg).to(args.device).train()
    m = 10
    seg = cfg.max_position_embeddings - m - 3
    rng = np.random.default_rng(0)
    lengths = [int(rng.integers(1, n + 1)) if rng.random() < 0.5 else n for _ in range(warm + steps)]
    ids = {k: torch.randint(1000, cfg.vocab_size, (b, k * seg), device=args.device) for k in range(1, n + 1)}
    labels = torch.randint(0, 6, (b,), device=args.device)
    kw = dict(num_mem_tokens=m, cls_token_id=101, sep_token_id=102, pad_token_id=0, segment_size=seg)
    total = torch.cuda.get_device_properties(0).total_memory if args.device == "cuda" else 0
    paths = {"official loop (full BPTT, eager)": None,
             "default (full BPTT, call graphs, 1/4 of the GPU)": (dict(), None),
             "full BPTT, call graphs, 3/4 of the GPU": (dict(), int(0.75 * total)),
             "full BPTT, one call capture": (dict(), 0),
             "two-sweep graphed": (dict(checkpoint_segments=True), None),
             "full BPTT eager": (dict(cuda_graphs=False), None)}
    base = None
    for name, spec in paths.items():
        if spec is None:  # the official loop runs first, on the model before any wrap
            mem = torch.nn.Parameter(torch.randn(m, cfg.hidden_size, device=args.device) * 0.02)
            params = [mem, *model.parameters()]
            rmt = None
        else:
            rmt = rmt_fast.wrap(model, **kw, **spec[0]).to(args.device)
            if spec[1] is not None:
                rmt.set_capture_memory(spec[1])
            params = list(rmt.parameters())
        opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-3, fused=args.device == "cuda")

        def step(k):
            with _autocast(args.device):
                if rmt is None:
                    out, _ = official_encoder(model, mem, ids[k], seg, 101, 102, 0)
                    loss = torch.nn.functional.cross_entropy(out.logits.float(), labels)
                else:
                    loss = rmt(ids[k], labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        try:
            timed = _timed_steps(args, step, lengths[:warm], lengths[warm:], rmt)
            t = timed["seconds"]
            row = dict(part="curriculum", path=name, segments=n, **timed,
                       ms_per_segment_step=1e3 * t * steps / sum(lengths[warm:]),
                       tok_per_s=b * seg * sum(lengths[warm:]) / (t * steps))
        except torch.cuda.OutOfMemoryError as e:
            row = dict(part="curriculum", path=name, segments=n, error=f"OOM: {e}"[:120])
        base = base or row.get("seconds")
        if base and row.get("seconds"):
            row["speed_vs_official"] = base / row["seconds"]
        rows.append(row)
        print(f"curriculum {name:50s} " + (f"{row['ms_per_segment_step']:6.1f} ms/segment-step, graphed "
              f"{row['graphed_share']:.0%}, {row['peak_reserved_gib']:.1f} GiB reserved" if "seconds" in row
              else row["error"]), flush=True)
        del rmt, opt
        if args.device == "cuda":
            torch.cuda.empty_cache()


# The training loops users write (issue: graph speed in every one, or eager with one warning that names why). Each
# entry: wrap() keywords, and how the loop differs from the plain one (bf16 autocast, AdamW fused, zero_grad(None)).
LOOPS = {
    "plain: bf16 autocast, fused AdamW, zero_grad(set_to_none=True)": {},
    "zero_grad(set_to_none=False)": dict(set_to_none=False),
    "gradient accumulation over 4 calls": dict(accumulate=4),
    "AdamW foreach": dict(optimizer="foreach"),
    "SGD": dict(optimizer="sgd"),
    "fp16 autocast + GradScaler": dict(precision="fp16"),
    "bf16 weights, no autocast": dict(precision="bf16-weights"),
    "only the memory trainable": dict(trainable="memory"),
    "PEFT LoRA on a frozen backbone": dict(trainable="lora"),
    "train()/eval() switched between steps": dict(eval_between=True),
    "a smaller last batch every 5th step": dict(short_batch=5),
    "length not a multiple of the segment": dict(ragged=True),
    "checkpoint_segments=True (defaults otherwise)": dict(wrap=dict(checkpoint_segments=True)),
    "transformers.Trainer (bf16, fused AdamW, its defaults)": dict(trainer={}),
    "transformers.Trainer with activation checkpointing": dict(trainer=dict(checkpointing=True)),
}


def _trainer_timed(args, rmt, ids, labels, loop: dict, warm: int, steps: int) -> dict:
    """``transformers.Trainer`` over ``rmt`` for ``warm + steps`` optimizer steps (its own loop: bf16 on CUDA, fused
    AdamW, its gradient clipping and schedule); what :func:`_timed_steps` returns, for the steps after ``warm``
    (timed from a callback at the end of step ``warm`` to the end of training)."""
    import inspect

    from transformers import Trainer, TrainerCallback, TrainingArguments

    cuda = args.device == "cuda"
    mark = {}

    class StepTimer(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            if state.global_step == warm:
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                mark["warm"] = rmt.executor_counts(reset=True)
                mark["t0"] = time.perf_counter()

    name = ("activation_checkpointing" if "activation_checkpointing" in inspect.signature(TrainingArguments).parameters
            else "gradient_checkpointing")
    targs = TrainingArguments(os.path.join(args.out, "trainer-loop"), per_device_train_batch_size=ids.shape[0],
                              max_steps=warm + steps, learning_rate=1e-5, bf16=cuda, use_cpu=not cuda,
                              optim="adamw_torch_fused" if cuda else "adamw_torch", save_strategy="no",
                              report_to="none", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
                              **{name: bool(loop["trainer"].get("checkpointing"))})
    data = [{"input_ids": x, "labels": y} for x, y in zip(ids.cpu(), labels.cpu())]
    Trainer(model=rmt, args=targs, train_dataset=data, callbacks=[StepTimer()]).train()
    if cuda:
        torch.cuda.synchronize()
    sec = (time.perf_counter() - mark["t0"]) / steps
    counts = rmt.executor_counts()
    graphed = sum(v for c, v in counts.items() if "graphed" in c or "captured" in c)
    return dict(seconds=sec, graphed_share=graphed / max(1, sum(counts.values())),
                warmup_captures=mark["warm"].get("full-BPTT captured", 0),
                peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else 0,
                peak_reserved_gib=torch.cuda.max_memory_reserved() / 2 ** 30 if cuda else 0)


def _loop_step(args, rmt, model, opt, scaler, ids, labels, loop: dict, i: int):
    """One optimizer step of ``loop`` (a LOOPS entry); ``i``: the step's index."""
    dev = args.device
    dtype = torch.float16 if loop.get("precision") == "fp16" else torch.bfloat16
    autocast = torch.autocast(dev, dtype=dtype, enabled=dev == "cuda" and loop.get("precision") != "bf16-weights")
    if loop.get("short_batch") and i % loop["short_batch"] == loop["short_batch"] - 1:
        ids, labels = ids[:-1], labels[:-1]
    k = loop.get("accumulate", 1)
    for _ in range(k):
        with autocast:
            loss = rmt(ids, labels=labels).loss / k
        (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=loop.get("set_to_none", True))
    if loop.get("eval_between"):
        rmt.eval()
        with torch.no_grad(), autocast:
            rmt(ids[:1])
        rmt.train()


def part_loops(args, rows):
    """Every loop of LOOPS for --loop-steps optimizer steps after 3 warm-up steps, on GPT-2 small (B=4, 16 x 512
    tokens) and a BERT-base classifier (B=8, 16 x 499), beside the official loop's restatement (bf16 autocast, fused
    AdamW): tokens/s, peak memory allocated and reserved (graph pools count), the share of graphed calls."""
    import copy

    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    n_seg, steps, warm = (16, args.loop_steps, 3) if not args.smoke else (3, 2, 1)
    models = {}
    if args.smoke:
        models["gpt2"] = (GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64)), 16, 4, 4)
        models["bert"] = (BertForSequenceClassification(BertConfig(num_labels=6, num_hidden_layers=2, hidden_size=64,
                                                                   num_attention_heads=4, intermediate_size=128,
                                                                   max_position_embeddings=64)), 16, 4, 4)
    else:
        cfg = GPT2Config()
        cfg.n_positions = 512 + 2 * 16
        models["gpt2"] = (GPT2LMHeadModel(cfg), 512, 16, 4)
        models["bert"] = (BertForSequenceClassification(BertConfig(num_labels=6)), 499, 10, 8)
    for part, (base, seg, m, b) in models.items():
        base = base.to(args.device).train()
        vocab = base.config.vocab_size
        kw = dict(num_mem_tokens=m, segment_size=seg)
        if part == "bert":
            kw.update(cls_token_id=101 % vocab, sep_token_id=102 % vocab, pad_token_id=0)
        official_tps = None
        for name, loop in {"official loop (restated)": None, **LOOPS}.items():
            if loop is not None and loop.get("trainable") == "lora":
                try:
                    import peft  # noqa: F401
                except ImportError:
                    rows.append(dict(part=f"loops-{part}", path=name, error="peft is not installed"))
                    continue
            model = copy.deepcopy(base)
            t = n_seg * seg - (seg // 5 + 1 if (loop or {}).get("ragged") else 0)
            ids = torch.randint(1000 % vocab, vocab, (b, t), device=args.device)
            labels = ids if part == "gpt2" else torch.randint(0, 6, (b,), device=args.device)
            if loop is None:
                mem = torch.nn.Parameter(torch.randn(m, model.config.hidden_size, device=args.device) * 0.02)
                params = [mem, *model.parameters()]
                opt = torch.optim.AdamW(params, lr=1e-5, fused=args.device == "cuda")

                def step(i):
                    with _autocast(args.device):
                        if part == "gpt2":
                            loss = official_decoder(model, mem, ids, seg, labels=labels)[2]
                        else:
                            out, _ = official_encoder(model, mem, ids, seg, kw["cls_token_id"], kw["sep_token_id"], 0)
                            loss = torch.nn.functional.cross_entropy(out.logits.float(), labels)
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                rmt = None
            else:
                if loop.get("precision") == "bf16-weights":
                    model = model.to(torch.bfloat16)
                if loop.get("trainable") == "lora":
                    from peft import LoraConfig, get_peft_model

                    target = ["c_attn"] if part == "gpt2" else ["query", "value"]
                    model = get_peft_model(model, LoraConfig(r=8, target_modules=target))
                rmt = rmt_fast.wrap(model, **kw, **loop.get("wrap", {})).to(args.device).train()
                if loop.get("trainable") == "memory":
                    for p_ in rmt.model.parameters():
                        p_.requires_grad_(False)
                params = [p_ for p_ in rmt.parameters() if p_.requires_grad]
                kind = loop.get("optimizer", "fused")
                opt = (torch.optim.SGD(params, lr=1e-4) if kind == "sgd" else
                       torch.optim.AdamW(params, lr=1e-5, fused=kind == "fused" and args.device == "cuda",
                                         foreach=kind == "foreach"))
                scaler = (torch.amp.GradScaler(args.device) if loop.get("precision") == "fp16"
                          and args.device == "cuda" else None)

                def step(i, rmt=rmt, opt=opt, scaler=scaler, loop=loop):
                    _loop_step(args, rmt, model, opt, scaler, ids, labels, loop, i)
            try:
                if (loop or {}).get("trainer") is not None:
                    timed = _trainer_timed(args, rmt, ids, labels, loop, warm, steps)
                else:
                    timed = _timed_steps(args, step, range(warm), range(warm, warm + steps), rmt)
                k = (loop or {}).get("accumulate", 1)
                tps = k * b * t / timed["seconds"]
                row = dict(part=f"loops-{part}", path=name, segments=n_seg, tok_per_s=tps, **timed)
                official_tps = official_tps or tps
                row["speed_vs_official"] = tps / official_tps
            except torch.cuda.OutOfMemoryError:
                row = dict(part=f"loops-{part}", path=name, segments=n_seg, error="out of memory")
            rows.append(row)
            print(f"loops {part:4s} {name:55s} " + (f"{row['tok_per_s'] / 1e3:8.1f}k tok/s "
                  f"{row['speed_vs_official']:5.2f}x graphed {row['graphed_share']:.0%}" if "tok_per_s" in row
                  else row["error"]), flush=True)
            del model, opt, rmt
            if args.device == "cuda":
                torch.cuda.empty_cache()


def _replay_ms(graph, reps=20) -> float:
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def _bare_fwd_bwd_graph(base, x, with_head=None, labels=None):
    """A captured forward+backward of the bare backbone on ``x`` (optionally with LM head + cross-entropy)."""
    params = [p for p in base.parameters() if p.requires_grad] + ([with_head.weight] if with_head is not None else [])

    def body():
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            h = base(inputs_embeds=x).last_hidden_state
            if with_head is None:
                loss = h.float().square().mean()
            else:
                loss = torch.nn.functional.cross_entropy(with_head(h).flatten(0, 1).float(), labels.flatten())
        return torch.autograd.grad(loss, params, allow_unused=True)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            body()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        body()
    return g


def part_breakdown(args, rows):
    """Where a graphed checkpointed GPT-2 segment spends its time: the forward-sweep graph, the backward graph,
    with and without the LM loss, beside the bare backbone's captured forward+backward."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config() if not args.smoke else GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=128)
    cfg.n_positions = max(cfg.n_positions, args.gpt2_seg + 32)
    model = GPT2LMHeadModel(cfg).to(args.device).train()
    seg, m, b = args.gpt2_seg, 16, 4
    ids = torch.randint(0, cfg.vocab_size, (b, 2 * seg), device=args.device)
    for name, labels in (("with LM loss", ids), ("no LM head", None)):
        rmt = rmt_fast.wrap(model, num_mem_tokens=m, segment_size=seg, checkpoint_segments=True, cuda_graphs=True,
                            keep_logits=False).to(args.device)
        with _autocast(args.device):
            out = rmt(ids, labels=labels)
        (out.loss if labels is not None else out.memory.float().square().mean()).backward()
        (graphs,) = rmt.runner.captures.of_kind("segment training")
        fwd, bwd = _replay_ms(graphs.fwd), _replay_ms(graphs.bwd)
        rows.append(dict(part="breakdown", path=f"forward-sweep graph, {name}", seconds=fwd / 1e3))
        rows.append(dict(part="breakdown", path=f"backward graph, {name}", seconds=bwd / 1e3))
        print(f"breakdown {name:14s} forward {fwd:6.2f} ms  backward {bwd:6.2f} ms per segment", flush=True)
        model.zero_grad(set_to_none=True)
    from rmt_fast.ops.linear_cross_entropy import aligned, chunked, linear_cross_entropy

    h0 = torch.randn(b * seg, cfg.n_embd, device=args.device, dtype=torch.bfloat16)
    w0 = (torch.randn(cfg.vocab_size, cfg.n_embd, device=args.device) * 0.02).to(torch.bfloat16)
    tgt = torch.randint(0, cfg.vocab_size, (b * seg,), device=args.device)
    default_chunk = chunked.CHUNK_ELEMENTS
    for name, backend, chunk in (("reference", "reference", None), ("chunked 2^24", "chunked", 1 << 24),
                                 ("chunked 2^27", "chunked", 1 << 27), ("liger", "liger", None),
                                 ("triton, vocab padded (default)", "triton", None),
                                 ("triton, no vocab padding", "triton", "nopad")):
        aligned.ENABLED = chunk != "nopad"
        if isinstance(chunk, int):
            chunked.CHUNK_ELEMENTS = chunk
        hh, ww = h0.clone().requires_grad_(), w0.clone().requires_grad_()

        def lce():
            linear_cross_entropy(hh, ww, None, tgt, backend=backend).backward()

        try:
            t = timeit(lce, warmup=2, reps=5)
        except Exception as e:  # liger missing or failing: say so
            print(f"breakdown LCE {name}: {type(e).__name__}: {e}", flush=True)
            continue
        finally:
            chunked.CHUNK_ELEMENTS = default_chunk
            aligned.ENABLED = True
        rows.append(dict(part="breakdown", path=f"linear+CE fwd+bwd {name} [{b * seg}x{cfg.vocab_size}]", seconds=t))
        print(f"breakdown LCE {name:14s} {t * 1e3:6.2f} ms", flush=True)
    x = torch.randn(b, seg + 2 * m, cfg.n_embd, device=args.device, requires_grad=False)
    lab = torch.randint(0, cfg.vocab_size, (b, seg + 2 * m), device=args.device)
    for name, head in (("bare backbone fwd+bwd", None), ("bare backbone + LM head + CE fwd+bwd", model.lm_head)):
        ms = _replay_ms(_bare_fwd_bwd_graph(model.transformer, x, head, lab))
        rows.append(dict(part="breakdown", path=name, seconds=ms / 1e3))
        print(f"breakdown {name:40s} {ms:6.2f} ms", flush=True)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [p for p in ("gpt2", "bert") if any(r["part"] == p for r in rows)]
    if not parts:
        return
    fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 4), squeeze=False)
    for ax, part in zip(axes[0], parts):
        sel = [r for r in rows if r["part"] == part and "tok_per_s" in r and r["segments"] > 1]
        sel = [r for r in sel if r["segments"] == min(x["segments"] for x in sel)]
        names = [r["path"] for r in sel]
        ax.bar(names, [r["tok_per_s"] / 1e3 for r in sel], color="tab:blue")
        for i, r in enumerate(sel):
            ax.text(i, r["tok_per_s"] / 1e3, f"{r['peak_gib']:.1f} GiB", ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{part}: training, {sel[0]['segments']} segments (label: peak memory)")
        ax.set_ylabel("k tokens / s")
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="gpt2,bert,task",
                   help="comma list of gpt2, bert, task, curriculum, loops, breakdown (CUDA)")
    p.add_argument("--loop-steps", type=int, default=20, help="timed optimizer steps per loop of the loops part")
    p.add_argument("--curriculum-segments", type=int, default=7, help="the stage length n of the curriculum part")
    p.add_argument("--curriculum-steps", type=int, default=200, help="timed steps of the curriculum part")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--segments", type=int, default=16)
    p.add_argument("--long", type=int, default=256, help="segments of the long flat-memory check (0: skip)")
    p.add_argument("--gpt2-seg", type=int, default=512)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="tiny models (CPU check of the script)")
    p.add_argument("--append-results", action="store_true")
    p.add_argument("--compile", action="store_true", help="also time paths with torch_compile=True")
    p.add_argument("--paths", default="",
                   help="gpt2 part: only these paths (comma list; the official loop always runs)")
    args = p.parse_args(argv)
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        args.gpt2_seg, args.segments, args.long, args.reps = 16, 3, 0, 1
    rows = []
    for part in args.parts.split(","):
        {"gpt2": part_gpt2, "bert": part_bert, "task": part_task, "curriculum": part_curriculum,
         "loops": part_loops, "breakdown": part_breakdown}[part](args, rows)
        write_csv(os.path.join(args.out, "train.csv"), rows)
    plot(rows, os.path.join(args.out, "train.png"))
    cols = ["part", "path", "segments", "tok_per_s", "speed_vs_official", "peak_gib", "peak_vs_1seg", "seconds",
            "speed_vs_before", "ms_per_segment_step", "graphed_share", "peak_reserved_gib", "error"]
    table = markdown_table(rows, cols)
    print(table)
    if args.append_results:
        append_results(os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md"),
                       "Training steps (benchmarks/train.py)", table + "\n\n![train](results/train.png)")


if __name__ == "__main__":
    main()
