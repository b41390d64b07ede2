"""The ``rmt-fast`` command: demo, train, eval, flops, bench, env. Every output goes under ``--out``.

    rmt-fast demo --out runs/demo          # curriculum-train a small RMT, evaluate it past its training length
    rmt-fast train --task memorize --backbone tiny-bert --max-segments 3 --out runs/x
    rmt-fast eval runs/x --out runs/x/eval  # the run's own lengths and samples again (or --lengths 1,2,4,8)
    rmt-fast flops --out runs/flops        # Fig. 3 of arXiv 2304.11062 (table + PNG)
    rmt-fast bench --list                  # the scripts in benchmarks/
    rmt-fast env                           # torch, GPU, Triton, the CUDA extension: which backends run here

Errors print one line (``--debug``: the traceback).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
import typing

__all__ = ["main", "build_parser", "demo_config", "run_demo", "add_config_arguments", "DEMO"]

BENCHMARKS = ("attention", "attention_host", "handoff", "e2e", "train")

#: the demo, the same on every machine (the README's "Set up and run" states these numbers; a test checks them)
DEMO = {"task": "memorize", "backbone": "tiny-bert", "tokenizer": "word", "hidden_size": 128, "num_layers": 2,
        "num_mem_tokens": 4, "segment_size": 16, "max_segments": 8, "lengths": [1, 2, 4, 8, 16, 32],
        "samples": 256}


# ------------------------------------------------------------------------------------------------------
# demo
# ------------------------------------------------------------------------------------------------------
def demo_config(device: str = "auto", quick: bool = False):
    """(TrainConfig, eval lengths, eval samples, eval batch) of the demo (:data:`DEMO`).

    A 2-layer, 128-wide random BERT with the built-in word tokenizer (no download, no optional package),
    4 memory tokens, 16-token segments, memorize, curriculum 1 -> 2 -> ... -> 8 segments (250 steps each at lr
    3e-4, batches of random length 1..n half of the time), evaluated up to 32 segments (4x the training length).
    fp32 everywhere (no bf16 on a GPU), so a GPU runs the same computation as the CPU, faster.
    quick: a few steps only (tests).
    """
    from .trainer import TrainConfig

    cfg = TrainConfig(task=DEMO["task"], backbone=DEMO["backbone"], tokenizer=DEMO["tokenizer"],
                      hidden_size=DEMO["hidden_size"], num_layers=DEMO["num_layers"],
                      num_mem_tokens=DEMO["num_mem_tokens"], segment_size=DEMO["segment_size"],
                      max_segments=DEMO["max_segments"], lr=3e-4, batch_size=32, min_steps_per_stage=250,
                      max_steps_per_stage=250, eval_every=50, eval_samples=128, threshold=0.99, mix_prob=0.5,
                      device=device, bf16=False, warmup_steps=25)
    lengths, samples, batch = list(DEMO["lengths"]), DEMO["samples"], 128
    if quick:
        cfg.max_segments, cfg.max_steps_per_stage, cfg.eval_every, cfg.eval_samples = 2, 4, 2, 8
        cfg.warmup_steps, cfg.min_steps_per_stage = 1, 0
        lengths, samples = [1, 2, 4], 8
    return cfg, lengths, samples, batch


def run_demo(out: str = "runs/demo", device: str = "auto", quick: bool = False, progress: bool = True) -> dict:
    """Train (curriculum) + evaluate the final model and every stage at every length; writes results under
    ``out``."""
    from .evaluate import evaluate_run, format_table
    from .trainer import train

    t0 = time.time()
    cfg, lengths, samples, batch = demo_config(device, quick)
    cfg.out_dir = out
    cfg.progress = progress
    print(f"rmt-fast demo: task {cfg.task}, backbone {cfg.backbone} ({cfg.num_layers} layers, width "
          f"{cfg.hidden_size}), tokenizer {cfg.tokenizer}, {cfg.num_mem_tokens} memory tokens, {cfg.segment_size}"
          f"-token segments, curriculum {cfg.stages()} segments; evaluation at {lengths} segments, {samples} "
          f"samples each; writing {out}", flush=True)
    res = train(cfg)
    t_train = time.time() - t0
    train_info = {"stages": res.stages, "seconds": res.seconds, "trained_segments": res.trained_segments}
    doc = evaluate_run(out, lengths=lengths, num_samples=samples, batch_size=batch, split="test", stages=True,
                       stage_samples=max(8, samples // 2), model=res.model, tokenizer=res.tokenizer, kind=res.kind,
                       train_info=train_info, out_dir=out, progress=progress)
    wall = time.time() - t0
    doc["wall_seconds"] = {"train": round(t_train, 1), "total": round(wall, 1)}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(doc, f, indent=2, default=str)
    print()
    print(f"trained on up to {res.trained_segments} segments x {cfg.segment_size} tokens "
          f"({res.trained_segments * cfg.segment_size} tokens) in {t_train:.0f}s; accuracy of the final model "
          f"({doc['memory_measure']}):")
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
def _base_type(tp):
    """``int | None`` -> (int, True); ``int`` -> (int, False)."""
    args = typing.get_args(tp)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def add_config_arguments(parser: argparse.ArgumentParser, cls, required=()) -> None:
    """One option per field of the dataclass ``cls``, from the field metadata (``help``, ``group``, optional
    ``flags`` and ``choices``): ``--field-name`` by default; a bool that defaults to True gets ``--no-...``
    (store_false), one that defaults to False a switch; lists are read as "1,2,4" strings. ``required``: field
    names that must be given."""
    hints = typing.get_type_hints(cls)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "help" not in meta:
            continue
        group = meta.get("group", "options")
        if group not in groups:
            groups[group] = parser.add_argument_group(group)
        g = groups[group]
        flags = list(meta.get("flags") or ["--" + f.name.replace("_", "-")])
        help_text = meta["help"].replace("%", "%%")
        tp, _ = _base_type(hints[f.name])
        if tp is bool:
            g.add_argument(*flags, dest=f.name, action="store_false" if f.default else "store_true", help=help_text)
            continue
        kw = {"dest": f.name, "default": f.default, "type": str if tp is list else tp,
              "help": help_text + (" (default: %(default)s)" if f.default is not None else "")}
        if "choices" in meta:
            kw["choices"] = list(meta["choices"])
        if f.name in required:
            kw.update(required=True, default=None)
            kw["help"] = help_text
        g.add_argument(*flags, **kw)


def _debug_flag(p: argparse.ArgumentParser, top: bool = False) -> None:
    p.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                   help="on an error, show the traceback")


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line: what is wrong and where the options are listed (not the whole usage)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the options)\n")


def _lengths(text: str) -> list[int]:
    """An argparse type: the segment counts of :func:`~rmt_fast.experiments.evaluate.parse_lengths`, so a bad spec is
    reported with the option's name."""
    from .evaluate import parse_lengths

    try:
        return parse_lengths(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("lengths: ")) from None


def build_parser() -> argparse.ArgumentParser:
    from .trainer import TrainConfig

    p = _Parser(
        prog="rmt-fast", description="Recurrent Memory Transformer: memory tasks, curriculum training, long-input "
        "evaluation, FLOP estimates and benchmarks.", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 1)[1])
    _debug_flag(p, top=True)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    d = sub.add_parser("demo", help="train a small RMT with the curriculum and evaluate it past its training length",
                       description="Curriculum-train an RMT on the memorize task and evaluate it on inputs longer "
                       f"than it was trained on: a {DEMO['num_layers']}-layer random BERT with the built-in word "
                       f"tokenizer, {DEMO['num_mem_tokens']} memory tokens, {DEMO['segment_size']}-token segments, "
                       f"1..{DEMO['max_segments']} segments, evaluated up to {max(DEMO['lengths'])} segments, the "
                       "same on every machine (a few minutes on 2 CPU cores). Writes OUT/results.json, results.csv, "
                       "accuracy.png, heatmap.png and the checkpoints.")
    d.add_argument("--out", default="runs/demo", help="output directory (%(default)s)")
    d.add_argument("--device", default="auto", help="auto | cpu | cuda (%(default)s)")
    d.add_argument("--quick", action="store_true", help="a few steps only (smoke test; does not learn)")
    d.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    _debug_flag(d)

    t = sub.add_parser("train", help="curriculum training on a memory task (torchrun-aware)",
                       description="Curriculum training: start with --start-segments, train until the validation "
                       "accuracy reaches --threshold (or patience / max steps), add segments, repeat. Under torchrun "
                       "--nproc_per_node=N it trains with DistributedDataParallel. Checkpoints go to OUT/stage-*seg/ "
                       "and OUT/checkpoint-last/ (--resume continues from it). The options are the fields of "
                       "rmt_fast.experiments.trainer.TrainConfig.")
    t.add_argument("--eval-lengths", default=None, type=_lengths,
                   help="after training, evaluate at these segment counts (e.g. 1,2,4,8) into OUT/eval")
    add_config_arguments(t, TrainConfig, required=("out_dir",))
    _debug_flag(t)

    e = sub.add_parser("eval", help="accuracy at many input lengths (flat memory), results.json + PNGs",
                       description="Evaluate a training run directory (its last stage, and with --stages every "
                       "stage for the train x eval heatmap) or one checkpoint at a list of lengths in segments. "
                       "Without --lengths/--samples: the run's own evaluation again (its results.json: same "
                       "samples, same accuracies), else 1,2,4,...,4096 segments (up to 4096 x 499 = 2,043,904 "
                       "tokens for MiniLM) and 128 samples.")
    e.add_argument("checkpoint", help="training run directory or stage checkpoint")
    e.add_argument("--lengths", default=None, type=_lengths,
                   help="segment counts: 1,2,4 or a power-of-two range 1-4096 (default: the run's own, else 1-4096)")
    e.add_argument("--samples", type=int, default=None, help="samples per length (default: the run's own, else 128)")
    e.add_argument("--batch-size", type=int, default=None, help="(default: the run's own, else 32)")
    e.add_argument("--stages", action="store_true", help="also evaluate every curriculum stage (heatmap)")
    e.add_argument("--stage-lengths", default=None, type=_lengths,
                   help="lengths for the stage heatmap (default: --lengths)")
    e.add_argument("--stage-samples", type=int, default=None, help="samples per length for the heatmap")
    e.add_argument("--split", default=None, choices=("valid", "test"), help="(default: the run's own, else test)")
    e.add_argument("--out", default=None, help="output directory (default: CHECKPOINT/eval)")
    e.add_argument("--device", default="auto", help="(%(default)s)")
    e.add_argument("--no-bf16", dest="bf16", action="store_false", help="no bf16 autocast on CUDA")
    e.add_argument("--cuda-graphs", action="store_true", help="replay the segment step as a CUDA graph")
    e.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    _debug_flag(e)

    f = sub.add_parser("flops", help="Fig. 3: FLOPs of full attention / RMT for OPT models (table + PNG)",
                       description="Print the Fig. 3 table of arXiv 2304.11062 (FLOPs of a full-attention OPT model "
                       "over N tokens / RMT's N/512 x F(512)) and write a log-log PNG.")
    f.add_argument("--out", default="runs/flops", help="directory for flops_<accounting>.png (%(default)s)")
    f.add_argument("--accounting", choices=("paper", "chinchilla"), default="paper",
                   help="'paper' reproduces the figure; 'chinchilla' is the textbook count (%(default)s)")
    f.add_argument("--segment-size", type=int, default=512, help="(%(default)s)")
    f.add_argument("--num-mem-tokens", type=int, default=0, help="(%(default)s; Fig. 3 uses 0)")
    f.add_argument("--tokens", default=None, help="token counts, e.g. 8192,64000,2048000 (default: the figure's)")
    _debug_flag(f)

    b = sub.add_parser("bench", help=f"run the scripts in benchmarks/ ({', '.join(BENCHMARKS)})",
                       description="Run benchmark scripts from the source tree's benchmarks/ folder with this "
                       "python, one after another, each with --out OUT. Arguments after -- go to every script, e.g. "
                       "'rmt-fast bench e2e -- --parts p1'. The benchmarks need a CUDA GPU.")
    b.add_argument("names", nargs="*", help=f"which: {', '.join(BENCHMARKS)} (default: all that exist)")
    b.add_argument("--out", default="runs/bench", help="where the scripts write CSV and PNG (%(default)s)")
    b.add_argument("--dir", default=None, help="benchmarks directory (default: <repo>/benchmarks or ./benchmarks)")
    b.add_argument("--list", action="store_true", help="list the scripts found and exit")
    b.add_argument("--dry-run", action="store_true", help="print the commands only")
    _debug_flag(b)

    v = sub.add_parser("env", help="what this machine offers: torch, GPU, Triton, the CUDA extension, backends",
                       description="Print torch and its CUDA, the GPU, Triton, liger-kernel, the CUDA extension "
                       "(prebuilt, cached just-in-time build, nvcc, ninja) and which backends of each op can run "
                       "here, with the reason for each that cannot. Builds nothing.")
    _debug_flag(v)
    return p


# ------------------------------------------------------------------------------------------------------
# verbs
# ------------------------------------------------------------------------------------------------------
def _cmd_demo(a) -> int:
    run_demo(a.out, a.device, a.quick, a.progress)
    return 0


def _cmd_train(a) -> int:
    from .trainer import TrainConfig, train

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    res = train(TrainConfig(**{k: v for k, v in vars(a).items() if k in fields}))
    rank = int(os.environ.get("RANK", "0"))  # under torchrun only rank 0 reports and evaluates
    if rank == 0:
        print("trained stages: " + ", ".join(f"{s['num_segments']} seg: {s['val_accuracy']:.3f} ({s['reason']})"
                                             for s in res.stages))
    if res.paused:
        if rank == 0:
            print("paused (--pause-after); run again with --resume to go on"
                  + ("; no evaluation yet" if a.eval_lengths else ""))
        return 0
    if a.eval_lengths and rank == 0:
        from .evaluate import evaluate_run, format_table

        doc = evaluate_run(a.out_dir, lengths=a.eval_lengths, num_samples=a.eval_samples,
                           batch_size=a.eval_batch_size, split="test", stages=False, model=res.model,
                           tokenizer=res.tokenizer, kind=res.kind, out_dir=os.path.join(a.out_dir, "eval"),
                           progress=a.progress)
        print(format_table(doc))
    return 0


def _cmd_eval(a) -> int:
    from .evaluate import evaluate_run, format_table
    from .rundir import load_checkpoint

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
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cands = [given] if given else [os.path.join(repo, "benchmarks"), os.path.join(os.getcwd(), "benchmarks")]
    for c in cands:
        if c and os.path.isdir(c):
            return c
    return None


def _cmd_bench(a) -> int:
    d = _bench_dir(a.dir)
    if d is None:
        raise FileNotFoundError("bench: no benchmarks/ directory found (it is in the source tree, not in an "
                                "installed wheel); pass --dir")
    found = [n for n in BENCHMARKS if os.path.isfile(os.path.join(d, f"{n}.py"))]
    if a.list:
        for n in BENCHMARKS:
            print(f"{n:<15} {'found' if n in found else 'missing'}  {os.path.join(d, n + '.py')}")
        return 0
    names = a.names or found
    bad = [n for n in names if n not in BENCHMARKS]
    if bad:
        raise ValueError(f"bench: unknown benchmark(s) {bad}; choose from {list(BENCHMARKS)}")
    missing = [n for n in names if n not in found]
    if missing:
        raise FileNotFoundError(f"bench: not found in {d}: {missing}")
    extra = list(a.extra or [])
    if "--out" not in extra:
        extra = ["--out", a.out] + extra
    rc = 0
    for n in names:
        cmd = [sys.executable, os.path.join(d, f"{n}.py")] + extra
        print("$ " + " ".join(cmd), flush=True)
        if a.dry_run:
            continue
        r = subprocess.run(cmd)
        if r.returncode:
            print(f"rmt-fast bench: {n} exited with {r.returncode}", file=sys.stderr)
            rc = rc or r.returncode
    return rc


def _cmd_env(a) -> int:
    from ..env import format_report

    print(format_report())
    return 0


COMMANDS = {"demo": _cmd_demo, "train": _cmd_train, "eval": _cmd_eval, "flops": _cmd_flops, "bench": _cmd_bench,
            "env": _cmd_env}


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "bench" in argv and "--" in argv:  # rmt-fast bench e2e -- --parts p1
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    a = parser.parse_args(argv)
    a.extra = extra
    if a.command in ("demo", "train", "eval"):
        import transformers

        transformers.utils.logging.disable_progress_bar()  # no "Writing model shards" bars per checkpoint
    try:
        return COMMANDS[a.command](a)
    except Exception as e:
        if a.debug:
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"rmt-fast {a.command}: error: {msg} ({type(e).__name__}; --debug shows the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
