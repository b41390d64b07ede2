"""The ``rmt-fast`` command: demo, train, eval, flops, bench.

    rmt-fast demo --out runs/demo          # curriculum-train a small RMT, evaluate it past its training length
    rmt-fast train --task memorize --backbone tiny-bert --max-segments 3 --out runs/x
    rmt-fast eval runs/x --lengths 1,2,4,8 --out runs/x/eval
    rmt-fast flops --out runs/flops        # Fig. 3 of arXiv 2304.11062 (table + PNG)
    rmt-fast bench --list                  # the scripts in benchmarks/
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

__all__ = ["main", "build_parser", "demo_config", "run_demo"]

BENCHMARKS = ("attention", "handoff", "e2e")


# ------------------------------------------------------------------------------------------------------
# demo
# ------------------------------------------------------------------------------------------------------
def demo_config(device: str = "auto", quick: bool = False):
    """(TrainConfig, eval lengths, eval samples, eval batch) of the demo for this device.

    CPU: a 2-layer, 128-wide random BERT with the MiniLM WordPiece tokenizer, 4 memory tokens, 16-token
    segments, memorize, curriculum 1 -> 2 -> ... -> 8 segments (250 steps each at lr 3e-4, batches of random length
    1..n half of the time), evaluated up to 32 segments (4x the training length); ~5 minutes on 2 cores.
    CUDA: pretrained MiniLM-L6, m=10, 499-token segments, curriculum 1 -> 5 (at most 60 s per stage),
    evaluated up to 64 segments.
    quick: a few steps only (tests).
    """
    import torch

    from .train import TrainConfig

    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        cfg = TrainConfig(task="memorize", backbone="minilm", num_mem_tokens=10, segment_size=499, max_segments=5,
                          lr=1e-4, batch_size=32, max_steps_per_stage=400, eval_every=50, eval_samples=128,
                          eval_batch_size=128, threshold=0.98, mix_prob=0.5, device=device, warmup_steps=40,
                          max_stage_time_s=60.0)
        lengths, samples, batch = [1, 2, 4, 8, 16, 32, 64], 128, 64
    else:
        from .backbones import minilm_available

        # the memorize fact + question is 11 WordPiece tokens but 51 characters (CharTokenizer fallback)
        cfg = TrainConfig(task="memorize", backbone="tiny-bert", hidden_size=128, num_layers=2, num_mem_tokens=4,
                          segment_size=16 if minilm_available() else 64, max_segments=8, lr=3e-4,
                          batch_size=32, min_steps_per_stage=250,
                          max_steps_per_stage=250, eval_every=50, eval_samples=128, threshold=0.99, mix_prob=0.5,
                          device=device, warmup_steps=25)
        lengths, samples, batch = [1, 2, 4, 8, 16, 32], 256, 128
    if quick:
        cfg.max_segments, cfg.max_steps_per_stage, cfg.eval_every, cfg.eval_samples = 2, 4, 2, 8
        cfg.warmup_steps, cfg.min_steps_per_stage = 1, 0
        lengths, samples = [1, 2, 4], 8
    return cfg, lengths, samples, batch


def run_demo(out: str = "runs/demo", device: str = "auto", quick: bool = False, progress: bool = True) -> dict:
    """Train (curriculum) + evaluate every stage at every length; writes results under ``out``."""
    from .evaluate import evaluate_run, format_table
    from .train import train

    t0 = time.time()
    cfg, lengths, samples, batch = demo_config(device, quick)
    cfg.out_dir = out
    cfg.progress = progress
    print(f"rmt-fast demo: task {cfg.task}, backbone {cfg.backbone}, {cfg.num_mem_tokens} memory tokens, "
          f"{cfg.segment_size}-token segments, curriculum {cfg.stages()} segments; evaluation at {lengths} "
          f"segments, {samples} samples each; writing {out}", flush=True)
    res = train(cfg)
    t_train = time.time() - t0
    train_info = {"stages": res.stages, "seconds": res.seconds, "trained_segments": res.trained_segments}
    doc = evaluate_run(out, lengths=lengths, num_samples=samples, batch_size=batch, stages=True,
                       stage_samples=max(8, samples // 2), model=res.model, tokenizer=res.tokenizer, kind=res.kind,
                       train_info=train_info, out_dir=out, progress=progress)
    wall = time.time() - t0
    doc["wall_seconds"] = {"train": round(t_train, 1), "total": round(wall, 1)}
    import json

    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(doc, f, indent=2, default=str)
    print()
    print(f"trained on up to {res.trained_segments} segments x {cfg.segment_size} tokens "
          f"({res.trained_segments * cfg.segment_size} tokens) in {t_train:.0f}s; accuracy of the final model:")
    print(format_table(doc))
    longest = max(doc["accuracy"], key=int)
    print(f"longest input: {int(longest)} segments = {int(longest) / max(1, res.trained_segments):.0f}x the training "
          f"length, accuracy {100 * doc['accuracy'][longest]:.1f}%; total {wall:.0f}s")
    print(f"wrote {os.path.join(out, 'results.json')}, results.csv, accuracy.png"
          + (", heatmap.png" if "heatmap" in doc else ""))
    return doc


# ------------------------------------------------------------------------------------------------------
# parser
# ------------------------------------------------------------------------------------------------------
def _add_train_args(p: argparse.ArgumentParser) -> None:
    from .backbones import BACKBONES
    from .tasks import TASKS
    from .train import TrainConfig

    d = TrainConfig()
    g = p.add_argument_group("task and model")
    g.add_argument("--task", choices=TASKS, default=d.task, help="memory task (default: %(default)s)")
    g.add_argument("--backbone", default=d.backbone,
                   help=f"one of {sorted(BACKBONES)} or a saved HF model directory (default: %(default)s)")
    g.add_argument("--tokenizer", choices=("auto", "minilm", "char"), default=d.tokenizer,
                   help="tokenizer of the tiny backbones (default: %(default)s = MiniLM WordPiece if installed)")
    g.add_argument("--hidden-size", type=int, default=d.hidden_size, help="tiny backbones: width (%(default)s)")
    g.add_argument("--num-layers", type=int, default=d.num_layers, help="tiny backbones: layers (%(default)s)")
    g.add_argument("--num-mem-tokens", "-m", type=int, default=d.num_mem_tokens, help="memory tokens (%(default)s)")
    g.add_argument("--segment-size", type=int, default=d.segment_size,
                   help="content tokens per segment (%(default)s; 499 for MiniLM with m=10)")
    g.add_argument("--noise", default=None, help="noise text file(s)/dataset dir (default: Python's pydoc texts)")
    g.add_argument("--babi-path", default=None, help="bAbI file or en/ directory for the facts")
    g = p.add_argument_group("curriculum")
    g.add_argument("--start-segments", type=int, default=d.start_segments, help="first stage (%(default)s)")
    g.add_argument("--max-segments", type=int, default=d.max_segments, help="last stage (%(default)s)")
    g.add_argument("--segment-step", type=int, default=d.segment_step, help="segments added per stage (%(default)s)")
    g.add_argument("--schedule", default=None, help="explicit stages, e.g. 1,2,4,8 (overrides the three above)")
    g.add_argument("--threshold", type=float, default=d.threshold,
                   help="validation accuracy that ends a stage (%(default)s; > 1: always run max steps)")
    g.add_argument("--max-steps-per-stage", type=int, default=d.max_steps_per_stage, help="(%(default)s)")
    g.add_argument("--min-steps-per-stage", type=int, default=d.min_steps_per_stage, help="(%(default)s)")
    g.add_argument("--patience", type=int, default=d.patience,
                   help="validations without improvement that end a stage (0 = off; %(default)s)")
    g.add_argument("--mix-prob", type=float, default=d.mix_prob,
                   help="probability of a batch of random length 1..n (%(default)s)")
    g.add_argument("--max-time", type=float, default=None, dest="max_time_s", help="stop training after SECONDS")
    g.add_argument("--max-stage-time", type=float, default=None, dest="max_stage_time_s",
                   help="end each stage after SECONDS")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch (%(default)s)")
    g.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (%(default)s)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (%(default)s)")
    g.add_argument("--adam-eps", type=float, default=d.adam_eps, help="AdamW epsilon (%(default)s)")
    g.add_argument("--warmup-steps", type=int, default=None, help="per stage (default: 10%% of the max steps)")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm (%(default)s)")
    g.add_argument("--reset-optimizer", action="store_true", help="fresh AdamW state at every stage")
    g.add_argument("--bptt-depth", type=int, default=None, help="truncate BPTT (default: full)")
    g.add_argument("--checkpoint-segments", action="store_true", help="recompute segments in backward")
    g.add_argument("--seed", type=int, default=d.seed, help="(%(default)s)")
    g = p.add_argument_group("run")
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between validations (%(default)s)")
    g.add_argument("--eval-samples", type=int, default=d.eval_samples, help="validation samples (%(default)s)")
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size, help="(%(default)s)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (%(default)s)")
    g.add_argument("--no-bf16", dest="bf16", action="store_false", help="no bf16 autocast on CUDA")
    g.add_argument("--backend", default="auto", help="attention/handoff backend (%(default)s)")
    g.add_argument("--find-unused-parameters", action="store_true",
                   help="DDP: find_unused_parameters=True (for backbones with parameters that get no gradient)")
    g.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps (0 = stage ends only)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rmt-fast", description="Recurrent Memory Transformer: memory tasks, curriculum training, long-input "
        "evaluation, FLOP estimates and benchmarks.", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 1)[1])
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    d = sub.add_parser("demo", help="train a small RMT with the curriculum and evaluate it past its training length",
                       description="Curriculum-train an RMT on the memorize task and evaluate it on inputs longer "
                       "than it was trained on. CPU: a tiny BERT, 16-token segments, 1..8 segments, evaluated up to "
                       "32 segments (about 5 minutes on 2 cores). GPU: MiniLM-L6, m=10, 499-token segments. Writes "
                       "OUT/results.json, results.csv, accuracy.png, heatmap.png and the checkpoints.")
    d.add_argument("--out", default="runs/demo", help="output directory (%(default)s)")
    d.add_argument("--device", default="auto", help="auto | cpu | cuda (%(default)s)")
    d.add_argument("--quick", action="store_true", help="a few steps only (smoke test; does not learn)")
    d.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")

    t = sub.add_parser("train", help="curriculum training on a memory task (torchrun-aware)",
                       description="Curriculum training: start with --start-segments, train until the validation "
                       "accuracy reaches --threshold (or patience / max steps), add segments, repeat. Under torchrun "
                       "--nproc_per_node=N it trains with DistributedDataParallel. Checkpoints go to OUT/stage-*seg/ "
                       "and OUT/checkpoint-last/ (--resume continues from it).")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint-last")
    t.add_argument("--eval-lengths", default=None,
                   help="after training, evaluate at these segment counts (e.g. 1,2,4,8) into OUT/eval")
    _add_train_args(t)

    e = sub.add_parser("eval", help="accuracy at many input lengths (flat memory), results.json + PNGs",
                       description="Evaluate a training run directory (its last stage, and with --stages every "
                       "stage for the train x eval heatmap) or one checkpoint at a list of lengths in segments "
                       "(default 1,2,4,...,4096: up to 4096 x 499 = 2,043,904 tokens for MiniLM).")
    e.add_argument("checkpoint", help="training run directory or stage checkpoint")
    e.add_argument("--lengths", default="1-4096", help="segment counts: 1,2,4 or a power-of-two range 1-4096 "
                   "(%(default)s)")
    e.add_argument("--samples", type=int, default=128, help="samples per length (%(default)s)")
    e.add_argument("--batch-size", type=int, default=32, help="(%(default)s)")
    e.add_argument("--stages", action="store_true", help="also evaluate every curriculum stage (heatmap)")
    e.add_argument("--stage-lengths", default=None, help="lengths for the stage heatmap (default: --lengths)")
    e.add_argument("--stage-samples", type=int, default=None, help="samples per length for the heatmap")
    e.add_argument("--split", default="test", choices=("valid", "test"), help="(%(default)s)")
    e.add_argument("--out", default=None, help="output directory (default: CHECKPOINT/eval)")
    e.add_argument("--device", default="auto", help="(%(default)s)")
    e.add_argument("--no-bf16", dest="bf16", action="store_false", help="no bf16 autocast on CUDA")
    e.add_argument("--cuda-graphs", action="store_true", help="replay the segment step as a CUDA graph")
    e.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")

    f = sub.add_parser("flops", help="Fig. 3: FLOPs of full attention / RMT for OPT models (table + PNG)",
                       description="Print the Fig. 3 table of arXiv 2304.11062 (FLOPs of a full-attention OPT model "
                       "over N tokens / RMT's N/512 x F(512)) and write a log-log PNG.")
    f.add_argument("--out", default=".", help="directory for flops_<accounting>.png (%(default)s)")
    f.add_argument("--accounting", choices=("paper", "chinchilla"), default="paper",
                   help="'paper' reproduces the figure; 'chinchilla' is the textbook count (%(default)s)")
    f.add_argument("--segment-size", type=int, default=512, help="(%(default)s)")
    f.add_argument("--num-mem-tokens", type=int, default=0, help="(%(default)s; Fig. 3 uses 0)")
    f.add_argument("--tokens", default=None, help="token counts, e.g. 8192,64000,2048000 (default: the figure's)")

    b = sub.add_parser("bench", help="run the scripts in benchmarks/ (attention, handoff, e2e)",
                       description="Run benchmark scripts from the source tree's benchmarks/ folder with this "
                       "python, one after another. Arguments after -- go to every script, e.g. "
                       "'rmt-fast bench e2e -- --parts p1 --out runs/bench'. The benchmarks need a CUDA GPU.")
    b.add_argument("names", nargs="*", help=f"which: {', '.join(BENCHMARKS)} (default: all that exist)")
    b.add_argument("--dir", default=None, help="benchmarks directory (default: <repo>/benchmarks or ./benchmarks)")
    b.add_argument("--list", action="store_true", help="list the scripts found and exit")
    b.add_argument("--dry-run", action="store_true", help="print the commands only")
    return p


# ------------------------------------------------------------------------------------------------------
# verbs
# ------------------------------------------------------------------------------------------------------
def _cmd_train(a) -> int:
    from .train import TrainConfig, train

    fields = {f for f in TrainConfig.__dataclass_fields__}
    kw = {k: v for k, v in vars(a).items() if k in fields}
    kw["out_dir"] = a.out
    res = train(TrainConfig(**kw))
    rank = int(os.environ.get("RANK", "0"))  # under torchrun only rank 0 reports and evaluates
    if rank == 0:
        print(f"trained stages: " + ", ".join(f"{s['num_segments']} seg: {s['val_accuracy']:.3f} ({s['reason']})"
                                              for s in res.stages))
    if a.eval_lengths and rank == 0:
        from .evaluate import evaluate_run, format_table

        doc = evaluate_run(a.out, lengths=a.eval_lengths, num_samples=a.eval_samples,
                           batch_size=a.eval_batch_size, stages=False, model=res.model, tokenizer=res.tokenizer,
                           kind=res.kind, out_dir=os.path.join(a.out, "eval"), progress=a.progress)
        print(format_table(doc))
    return 0


def _cmd_eval(a) -> int:
    from .evaluate import evaluate_run, format_table, load_checkpoint

    model = tok = kind = None
    if a.cuda_graphs:
        model, tok, kind, _ = load_checkpoint(a.checkpoint, a.device)
        model.rmt_config.cuda_graphs = True
    out = a.out or os.path.join(a.checkpoint, "eval")
    doc = evaluate_run(a.checkpoint, lengths=a.lengths, num_samples=a.samples, batch_size=a.batch_size,
                       stages=a.stages, stage_samples=a.stage_samples, stage_lengths=a.stage_lengths,
                       device=a.device, bf16=a.bf16, progress=a.progress, out_dir=out, split=a.split,
                       model=model, tokenizer=tok, kind=kind)
    print(format_table(doc))
    print(f"wrote {out}/results.json, results.csv, accuracy.png" + (", heatmap.png" if "heatmap" in doc else ""))
    return 0


def _cmd_flops(a) -> int:
    from . import flops

    tokens = [float(x) for x in a.tokens.split(",")] if a.tokens else None
    print(f"FLOPs of full attention / FLOPs of RMT ({a.segment_size}-token segments, {a.num_mem_tokens} memory "
          f"tokens), accounting '{a.accounting}' (Fig. 3 of arXiv 2304.11062):")
    print(flops.format_table(a.accounting, token_counts=tokens, segment_size=a.segment_size,
                             num_mem_tokens=a.num_mem_tokens))
    os.makedirs(a.out, exist_ok=True)
    path = flops.plot_speedup(os.path.join(a.out, f"flops_{a.accounting}.png"), a.accounting, token_counts=tokens,
                              segment_size=a.segment_size, num_mem_tokens=a.num_mem_tokens)
    print(f"wrote {path}")
    return 0


def _bench_dir(given: str | None) -> str | None:
    cands = [given] if given else [os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                "benchmarks"), os.path.join(os.getcwd(), "benchmarks")]
    for c in cands:
        if c and os.path.isdir(c):
            return c
    return None


def _cmd_bench(a) -> int:
    d = _bench_dir(a.dir)
    if d is None:
        print("bench: no benchmarks/ directory found (it is in the source tree, not in an installed wheel); "
              "pass --dir", file=sys.stderr)
        return 2
    found = [n for n in BENCHMARKS if os.path.isfile(os.path.join(d, f"{n}.py"))]
    if a.list:
        for n in BENCHMARKS:
            print(f"{n:<10} {'found' if n in found else 'missing'}  {os.path.join(d, n + '.py')}")
        return 0
    names = a.names or found
    bad = [n for n in names if n not in BENCHMARKS]
    if bad:
        print(f"bench: unknown benchmark(s) {bad}; choose from {list(BENCHMARKS)}", file=sys.stderr)
        return 2
    missing = [n for n in names if n not in found]
    if missing:
        print(f"bench: not found in {d}: {missing}", file=sys.stderr)
        return 2
    extra = list(a.extra or [])
    rc = 0
    for n in names:
        cmd = [sys.executable, os.path.join(d, f"{n}.py")] + extra
        print("$ " + " ".join(cmd), flush=True)
        if a.dry_run:
            continue
        r = subprocess.run(cmd)
        if r.returncode:
            print(f"bench: {n} exited with {r.returncode}", file=sys.stderr)
            rc = rc or r.returncode
    return rc


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if argv and argv[0] == "bench" and "--" in argv:  # rmt-fast bench e2e -- --parts p1
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    a = parser.parse_args(argv)
    a.extra = extra
    if a.command in ("demo", "train", "eval"):
        import transformers

        transformers.utils.logging.disable_progress_bar()  # no "Writing model shards" bars per checkpoint
    if a.command == "demo":
        run_demo(a.out, a.device, a.quick, a.progress)
        return 0
    if a.command == "train":
        return _cmd_train(a)
    if a.command == "eval":
        return _cmd_eval(a)
    if a.command == "flops":
        return _cmd_flops(a)
    if a.command == "bench":
        return _cmd_bench(a)
    parser.error(f"unknown command {a.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
