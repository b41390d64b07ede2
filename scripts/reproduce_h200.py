"""Reproduce the RMT paper's memory-task experiments (arXiv 2304.11062, Fig. 1 and Fig. 5) on one H200.

Per task (memorize, detect_memorize, reasoning): MiniLM-L6 (pretrained, 6-way classifier head), m=10 memory
tokens, 499-token segments; curriculum 1 -> 2 -> ... -> 5 segments (a stage ends at the validation threshold or
its step limit or its share of --train-time seconds); then accuracy at 1, 2, 4, ..., 4096
segments (4096 x 499 = 2,043,904 tokens) on --eval-samples test samples per length (default 64: one batch of
64; the paper does not say how many it used), and every curriculum stage at 1..--heatmap-max segments for the
train x eval heatmap (Fig. 5). Budget per task: ~5 min training + ~1-2 min evaluation, under 10 minutes.

Deviations from the paper, for the 10-minute budget: MiniLM-L6 instead of bert-base-cased, lr 1e-4 instead of
1e-5, a few hundred steps per stage instead of 3000 (memorize/detect) or 20000 (reasoning), 5 stages.

Writes OUT/<task>/ (checkpoints, results.json, results.csv, accuracy.png, heatmap.png) and OUT/results.json,
OUT/results.csv, OUT/accuracy.png (all tasks, as Fig. 1); the summary table is printed last.

    python scripts/reproduce_h200.py --out runs/h200                 # all three tasks
    python scripts/reproduce_h200.py --out runs/h200 --tasks memorize
    python scripts/reproduce_h200.py --out /tmp/x --dry-run          # (= --smoke) tiny CPU configuration, < 1 min
    python scripts/reproduce_h200.py --out runs/h200 --estimate-only # seconds per task from the steps and lengths
    # across 10-minute GPU runs: --skip-eval --transfer-out $OUT/carry, then --resume-from carry (see --help)
    # tasks trained and evaluated by separate runs, one table and figure (OUT/results.json, .csv, accuracy.png):
    python scripts/reproduce_h200.py --out benchmarks/results/reproduction --collect runs/a/memorize runs/b/detect_memorize
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

T_START = time.time()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TASK_LR = {"memorize": 1e-4, "detect_memorize": 1e-4, "reasoning": 1e-4}
PAPER = {  # Fig. 1, accuracy (%) at 16 / 64 / 256 / 1024 / 4096 segments
    "memorize": {16: 100.0, 64: 98.2, 256: 95.2, 1024: 92.7, 4096: 90.6},
    "detect_memorize": {16: 99.9, 64: 99.7, 256: 98.5, 1024: 97.1, 4096: 96.1},
    "reasoning": {16: 93.2, 64: 89.3, 256: 87.6, 1024: 83.5, 4096: 81.9},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tasks", default="memorize,detect_memorize,reasoning", help="comma-separated (%(default)s)")
    p.add_argument("--max-segments", type=int, default=5, help="last curriculum stage (%(default)s)")
    p.add_argument("--schedule", default=None, metavar="N,N,...",
                   help="the curriculum's stages as increasing segment counts, e.g. 6 or 6,8 (overrides "
                   "1..--max-segments; with --init-from, a run that goes on training a curriculum's model at its "
                   "last lengths)")
    p.add_argument("--train-time", type=float, default=300.0,
                   help="training time per task in seconds, split evenly over the stages; 0: no limit (%(default)s)")
    p.add_argument("--max-steps-per-stage", type=int, default=400, help="(%(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="training batch (%(default)s)")
    p.add_argument("--lr", type=float, default=None, help="peak lr (default: per task, 1e-4)")
    p.add_argument("--threshold", type=float, default=0.98, help="validation accuracy ending a stage (%(default)s)")
    p.add_argument("--mix-prob", type=float, default=0.5, help="batches of random length 1..n (%(default)s)")
    p.add_argument("--lengths", default="1-4096", help="evaluation lengths in segments (%(default)s)")
    p.add_argument("--eval-samples", type=int, default=256, help="test samples per length (%(default)s)")
    p.add_argument("--eval-batch-size", type=int, default=256, help="(%(default)s)")
    p.add_argument("--heatmap-max", type=int, default=64, help="stage heatmap up to this many segments (%(default)s)")
    p.add_argument("--heatmap-samples", type=int, default=32, help="(%(default)s)")
    p.add_argument("--cuda-graphs", action="store_true", help="evaluate with CUDA-graph replay of the segment step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="resume each task's training from OUT/<task>")
    p.add_argument("--backbone", default="minilm", help="minilm, or a folder written by scripts/minilm_fp16.py "
                   "(for a machine without the MiniLM package) (%(default)s)")
    p.add_argument("--min-steps-per-stage", type=int, default=0, help="steps at least per stage (%(default)s)")
    p.add_argument("--validate-at-multiple", type=int, default=1,
                   help="a stage ends only when K x its length is solved too (%(default)s)")
    p.add_argument("--validate-max-segments", type=int, default=None, help="cap of the K x validation length")
    p.add_argument("--resume-from", default=None,
                   help="folder of transfer copies (<task>/ each, from --transfer-out of an earlier call): installed "
                   "as OUT/<task>/checkpoint-last, then training resumes")
    p.add_argument("--transfer-out", default=None,
                   help="after training, write a bf16 transfer copy of each task's checkpoint-last (shards < 16 MiB) "
                   "to DIR/<task>/ (put DIR under $OUT on the device; carry it into the next call)")
    p.add_argument("--skip-eval", action="store_true", help="train only (a later call evaluates)")
    p.add_argument("--pause-after", type=float, default=None,
                   help="pause training after SECONDS (a stage that would not end in time is not started); the task is "
                   "then not evaluated, and --transfer-out / --resume-from carry it into the next call")
    p.add_argument("--no-eval-after", type=float, default=None,
                   help="when training ends more than SECONDS after the start, leave the evaluation to the next call "
                   "(which resumes, finds nothing to train, and evaluates)")
    p.add_argument("--stage-eval", action="store_true",
                   help="evaluate each stage's model at 1..--heatmap-max segments when the stage ends (kept in the "
                   "training state, so the heatmap needs no stage checkpoints from earlier calls)")
    p.add_argument("--eval-every", type=int, default=50, help="steps between validations (%(default)s)")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warm-up steps of each stage (default: 10%% of the max steps, at most 50)")
    p.add_argument("--checkpoint-segments", choices=("auto", "on", "off"), default="auto",
                   help="the two-sweep schedule: auto (full BPTT up to 8 segments on CUDA), on, off (%(default)s)")
    p.add_argument("--capture-memory", type=float, default=None,
                   help="share of the GPU's memory for the full-BPTT graph captures (default: the library's 1/4)")
    p.add_argument("--train-same-axis", type=float, default=None, metavar="P",
                   help="reasoning: the probability that a TRAINING sample's two facts lie on one axis (default: the "
                   "task's own 1/3; validation and test keep it); other tasks ignore it")
    p.add_argument("--train-facts-early", type=float, default=None, metavar="P",
                   help="detect_memorize, reasoning: the probability that every fact of a TRAINING sample lies before "
                   "its last segment, where only the memory carries it (default: the task's own placement; "
                   "validation and test keep it); memorize ignores it")
    p.add_argument("--fact-placement", choices=("anywhere", "segment_start"), default="anywhere",
                   help="detect_memorize, reasoning: where the facts lie in training, validation and test: anywhere "
                   "(at noise-sentence boundaries, the paper's text) or segment_start (each at the start of a "
                   "randomly chosen segment, the official reasoning script's placement) (%(default)s); memorize "
                   "ignores it")
    p.add_argument("--train-hub-share", type=float, default=None, metavar="P",
                   help="reasoning: the probability that a TRAINING question asks about the hub, the place both facts "
                   "name, whose answer needs a fact's direction (default: the task's own, about 1/2; validation and "
                   "test keep it); other tasks ignore it")
    p.add_argument("--reconstruction-coef", type=float, default=0.0, metavar="W",
                   help="weight of the memory reconstruction loss (each memory rebuilds masked tokens of the segment "
                   "that wrote it; rmt_fast.experiments.reconstruction) (%(default)s: off)")
    p.add_argument("--reconstruction-mask-prob", type=float, default=0.15, metavar="P",
                   help="share of a segment's tokens masked for it (%(default)s)")
    p.add_argument("--no-reconstruction-last", dest="reconstruction_last", action="store_false",
                   help="the last segment's memory is not reconstructed (only memories a later segment reads)")
    p.add_argument("--distill-coef", type=float, default=0.0, metavar="W",
                   help="weight of the context distillation loss (the last segment's states, read through the memory, "
                   "match the model's own on the whole row as one segment; rmt_fast.experiments.distillation; rows "
                   "must fit the backbone's positions) (%(default)s: off)")
    p.add_argument("--distill-layers", choices=("all", "last"), default="all",
                   help="layers it compares: all (the training call runs eagerly) or last (the training call keeps "
                   "CUDA graphs) (%(default)s)")
    p.add_argument("--distill-order", choices=("last_first", "natural"), default="last_first",
                   help="the teacher's segment: the last segment's tokens first, at the student's positions, or the "
                   "row as it is (%(default)s)")
    p.add_argument("--init-from", default=None, metavar="DIR",
                   help="start the tasks' runs from a saved RMT instead of the pretrained backbone (m=10; e.g. a "
                   "one-segment reasoning model of scripts/reasoning_one_segment.py: OUT/<config>/checkpoint-last, "
                   "or an unpacked transfer copy); a resumed run ignores it. When the --backbone folder is missing "
                   "it is written from DIR (which then needs the tokenizer/ a transfer copy holds)")
    p.add_argument("--estimate-only", action="store_true", help="print the time estimate and exit")
    p.add_argument("--dry-run", "--smoke", dest="dry_run", action="store_true",
                   help="tiny CPU configuration (tiny-bert, 32-token segments, a few steps, lengths 1-4): checks the "
                   "pipeline, not the result")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--collect", nargs="+", default=None, metavar="TASK_DIR",
                   help="train nothing: read TASK_DIR/results.json of each task evaluated by an earlier run (the task "
                   "is the folder's name) and write OUT/results.json, results.csv and accuracy.png for them together")
    a = p.parse_args(argv)
    for flag, v in (("--train-same-axis", a.train_same_axis), ("--train-facts-early", a.train_facts_early),
                    ("--train-hub-share", a.train_hub_share)):
        if v is not None and not 0 <= v <= 1:
            p.error(f"{flag}: a probability in [0, 1], got {v}")
    if a.schedule is not None:
        from rmt_fast.experiments.trainer import build_schedule

        try:
            a.schedule = build_schedule(schedule=a.schedule)
        except ValueError as e:
            p.error(f"--schedule {a.schedule!r}: {e}")
    return a


def collect(dirs) -> dict:
    """{task: results.json document} from task folders written by earlier runs (TASK_DIR/results.json)."""
    from rmt_fast.experiments.tasks import TASKS

    docs = {}
    for d in dirs:
        task = os.path.basename(os.path.normpath(d))
        path = os.path.join(d, "results.json")
        if task not in TASKS:
            raise ValueError(f"--collect {d!r}: the folder's name must be a task ({', '.join(TASKS)}), got {task!r}")
        if not os.path.isfile(path):
            raise ValueError(f"--collect {d!r}: no results.json there (the task was not evaluated)")
        if task in docs:
            raise ValueError(f"--collect: task {task!r} given twice")
        with open(path) as f:
            doc = json.load(f)
        if "accuracy" not in doc:
            raise ValueError(f"--collect {path!r}: no 'accuracy' in it (not written by evaluate_run)")
        docs[task] = doc
    return docs


def task_config(a, task: str):
    from rmt_fast.experiments.trainer import TrainConfig

    if a.dry_run:
        # 32 tokens: the reasoning facts + question fit in one segment (built-in word tokenizer)
        return TrainConfig(task=task, backbone="tiny-bert", num_mem_tokens=2, segment_size=32, hidden_size=32,
                           max_segments=a.schedule[-1] if a.schedule else 2, schedule=a.schedule,
                           max_steps_per_stage=3, eval_every=3, eval_samples=8, eval_batch_size=8,
                           batch_size=4, lr=1e-3, warmup_steps=1, threshold=1.01, device="cpu", seed=a.seed,
                           out_dir=os.path.join(a.out, task), resume=a.resume or bool(a.resume_from),
                           progress=a.progress, validate_at_multiple=a.validate_at_multiple,
                           validate_max_segments=a.validate_max_segments, pause_after_s=a.pause_after,
                           stage_eval_lengths="1-2" if a.stage_eval else None, stage_eval_samples=8,
                           init_from=a.init_from)
    from rmt_fast.experiments.trainer import build_schedule

    stages = build_schedule(1, a.max_segments, schedule=a.schedule)
    warmup = a.warmup_steps if a.warmup_steps is not None else min(50, a.max_steps_per_stage // 10 or 1)
    return TrainConfig(task=task, backbone=a.backbone, num_mem_tokens=10, segment_size=499, max_segments=stages[-1],
                       schedule=stages if a.schedule is not None else None,
                       max_steps_per_stage=a.max_steps_per_stage, eval_every=a.eval_every, eval_samples=128,
                       eval_batch_size=128, batch_size=a.batch_size, lr=a.lr or TASK_LR[task],
                       warmup_steps=warmup, threshold=a.threshold, mix_prob=a.mix_prob,
                       max_stage_time_s=a.train_time / len(stages) if a.train_time else None,
                       max_time_s=1.2 * a.train_time if a.train_time else None, seed=a.seed,
                       out_dir=os.path.join(a.out, task), resume=a.resume or bool(a.resume_from), progress=a.progress,
                       min_steps_per_stage=a.min_steps_per_stage, validate_at_multiple=a.validate_at_multiple,
                       validate_max_segments=a.validate_max_segments, pause_after_s=a.pause_after,
                       stage_eval_lengths=f"1-{a.heatmap_max}" if a.stage_eval else None,
                       stage_eval_samples=a.heatmap_samples, checkpoint_segments=a.checkpoint_segments,
                       capture_memory=a.capture_memory,
                       train_same_axis=a.train_same_axis if task == "reasoning" else None,
                       train_facts_early=a.train_facts_early if task != "memorize" else None,
                       train_hub_share=a.train_hub_share if task == "reasoning" else None, init_from=a.init_from,
                       fact_placement=a.fact_placement if task != "memorize" else "anywhere",
                       reconstruction_coef=a.reconstruction_coef,
                       reconstruction_mask_prob=a.reconstruction_mask_prob,
                       reconstruction_last=a.reconstruction_last, distill_coef=a.distill_coef,
                       distill_layers=a.distill_layers, distill_order=a.distill_order)


def run_task(a, task: str) -> dict:
    from rmt_fast.experiments.evaluate import evaluate_run, parse_lengths
    from rmt_fast.experiments.trainer import train

    from rmt_fast.experiments.backbones import BACKBONES
    from rmt_fast.experiments.rundir import (LAST_CHECKPOINT, backbone_from_transfer, install_transfer_copy,
                                             save_transfer_copy)

    t0 = time.time()
    cfg = task_config(a, task)

    def backbone_from(copy: str, what: str) -> None:
        # the backbone folder did not travel (the copy alone fills the transfer): its architecture and tokenizer
        # come from the copy (the weights too, which the copy's own replace again when the run starts)
        if cfg.backbone not in BACKBONES and not os.path.exists(cfg.backbone):
            print(f"=== {task}: no backbone folder {cfg.backbone}: written from {what} {copy}", flush=True)
            try:
                backbone_from_transfer(copy, cfg.backbone)
            except (FileNotFoundError, OSError, ValueError) as e:
                raise ValueError(f"--backbone {cfg.backbone!r} does not exist and cannot be written from {what} "
                                 f"{copy!r}: {e}") from e

    if a.resume_from:
        src = os.path.join(a.resume_from, task)
        if os.path.isdir(src):
            print(f"=== {task}: resuming from the transfer copy {src}", flush=True)
            install_transfer_copy(src, cfg.out_dir)
            backbone_from(src, "the transfer copy")
    if a.init_from and not (cfg.resume and os.path.isfile(os.path.join(cfg.out_dir, LAST_CHECKPOINT, "state.json"))):
        backbone_from(a.init_from, "--init-from")
    print(f"=== {task}: {cfg.backbone}, m={cfg.num_mem_tokens}, {cfg.segment_size}-token segments, curriculum "
          f"{cfg.stages()}, lr {cfg.lr}, batch {cfg.batch_size}, at most {cfg.max_steps_per_stage} steps and "
          f"{cfg.max_stage_time_s or 0:.0f} s per stage", flush=True)
    res = train(cfg)
    t_train = time.time() - t0
    from rmt_fast.experiments.plots import plot_curves

    curves = plot_curves(os.path.join(cfg.out_dir, "curves.png"), {task: res.history},
                         title=f"{task}: training loss and validation accuracy, curriculum {cfg.stages()}")
    shutil.copy2(curves, os.path.join(a.out, f"curves_{task}.png"))
    if a.transfer_out:
        dest = save_transfer_copy(os.path.join(cfg.out_dir, LAST_CHECKPOINT), os.path.join(a.transfer_out, task))
        print(f"=== {task}: transfer copy in {dest}", flush=True)
    late = a.no_eval_after is not None and time.time() - T_START > a.no_eval_after
    if a.skip_eval or res.paused or late:
        print(f"=== {task}: {'paused' if res.paused else 'trained'} after {t_train:.0f}s, stages done "
              f"{[s['num_segments'] for s in res.stages]}; not evaluated"
              + (f" (past --no-eval-after {a.no_eval_after:.0f}s)" if late and not res.paused else ""), flush=True)
        return {"train": {"stages": res.stages, "seconds": res.seconds, "trained_segments": res.trained_segments,
                          "paused": res.paused}}
    lengths = parse_lengths("1-4" if a.dry_run else a.lengths)
    heat_lengths = [n for n in lengths if n <= (2 if a.dry_run else a.heatmap_max)]
    samples = 8 if a.dry_run else a.eval_samples
    batch = 8 if a.dry_run else a.eval_batch_size
    if a.cuda_graphs:
        res.model.rmt_config.cuda_graphs = True
    train_info = {"stages": res.stages, "seconds": res.seconds, "trained_segments": res.trained_segments}
    doc = evaluate_run(cfg.out_dir, lengths=lengths, num_samples=samples, batch_size=batch, split="test",
                       stages=True, stage_lengths=heat_lengths, stage_samples=8 if a.dry_run else a.heatmap_samples,
                       model=res.model, tokenizer=res.tokenizer, kind=res.kind, train_info=train_info,
                       out_dir=cfg.out_dir, progress=a.progress)
    doc["wall_seconds"] = {"train": round(t_train, 1), "total": round(time.time() - t0, 1)}
    with open(os.path.join(cfg.out_dir, "results.json"), "w") as f:
        json.dump(doc, f, indent=2, default=str)
    heat = os.path.join(cfg.out_dir, "heatmap.png")
    if os.path.isfile(heat):
        shutil.copy2(heat, os.path.join(a.out, f"heatmap_{task}.png"))
    print(f"=== {task}: train {t_train:.0f}s, total {time.time() - t0:.0f}s", flush=True)
    return doc


# rough costs (MiniLM-L6, 512 positions, bf16): seconds per segment of one training step of batch 32 (forward +
# backward, graphed; 12 ms per segment on an H100 in stages of 3-4 segments, 2026-12-06, validations included)
# and per segment of an evaluation batch of 256 (forward only)
TRAIN_S_PER_SEGMENT_STEP = 0.012
EVAL_S_PER_SEGMENT_BATCH = 0.05


def estimate(a) -> dict:
    """Seconds per task from the configured steps and lengths (rough, from the constants above)."""
    from rmt_fast.experiments.evaluate import parse_lengths
    from rmt_fast.experiments.trainer import build_schedule, expected_segments

    stages = build_schedule(1, a.max_segments, schedule=a.schedule)
    k = max(1, a.validate_at_multiple)
    train_s = sum(a.max_steps_per_stage * expected_segments(n, a.mix_prob) * TRAIN_S_PER_SEGMENT_STEP
                  * a.batch_size / 32 for n in stages)
    val_s = sum((a.max_steps_per_stage // a.eval_every + 1) * (n + min(k * n, a.validate_max_segments or k * n))
                * EVAL_S_PER_SEGMENT_BATCH * 128 / 256 for n in stages)
    train_s = min(train_s + val_s, 1.2 * a.train_time) if a.train_time else train_s + val_s
    lengths = parse_lengths(a.lengths)
    batches = -(-a.eval_samples // a.eval_batch_size)
    eval_s = sum(lengths) * batches * EVAL_S_PER_SEGMENT_BATCH * a.eval_batch_size / 256
    heat = [n for n in lengths if n <= a.heatmap_max]
    heat_s = len(stages) * sum(heat) * EVAL_S_PER_SEGMENT_BATCH * max(1, a.heatmap_samples) / 256
    return {"train_s": round(train_s), "eval_s": round(0 if a.skip_eval else eval_s),
            "heatmap_s": round(0 if a.skip_eval else heat_s),
            "total_s": round(train_s + (0 if a.skip_eval else eval_s + heat_s) + 30)}


def _train_seconds(doc: dict):
    """The task's training time over every call that trained it (the stages' seconds, kept in the training state),
    else this call's."""
    sec = doc.get("train", {}).get("seconds")
    return round(sec) if isinstance(sec, (int, float)) else doc.get("wall_seconds", {}).get("train", "?")


def summary(out: str, docs: dict) -> str:
    from rmt_fast.experiments.plots import plot_accuracy

    lengths = sorted({int(k) for d in docs.values() for k in d["accuracy"]})
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"tasks": docs, "paper_fig1": PAPER}, f, indent=2, default=str)
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "segments", "tokens", "accuracy", "ci95_low", "ci95_high", "samples", "peak_memory_mib",
                    "seconds", "paper_accuracy"])
        for task, d in docs.items():
            for k in sorted(d["accuracy"], key=int):
                w.writerow([task, k, d["tokens"][k], d["accuracy"][k], *d["ci95"][k], d["samples"][k],
                            d["peak_memory_mib"][k], d["seconds"][k], PAPER.get(task, {}).get(int(k), "")])
    first = next(iter(docs.values()))
    mem = {k: max(d["peak_memory_mib"].get(k, 0) for d in docs.values()) for k in first["peak_memory_mib"]}
    plot_accuracy(os.path.join(out, "accuracy.png"), {t: d["accuracy"] for t, d in docs.items()}, memory=mem,
                  memory_label=first["memory_measure"] + ", the largest over the tasks",
                  intervals={t: d["ci95"] for t, d in docs.items()}, segment_size=first["config"].get("segment_size"),
                  trained_segments=first.get("train", {}).get("trained_segments"),
                  title=f"RMT ({os.path.basename(str(first['config'].get('backbone')))}, "
                        f"m={first['config'].get('num_mem_tokens')}, "
                        f"{first['config'].get('segment_size')}-token segments) accuracy vs input length")
    head = f"{'segments':>8} {'tokens':>11} " + " ".join(f"{t[:15]:>15}" for t in docs) + f" {'peak MiB':>9}"
    lines = [head, "-" * len(head)]
    for n in lengths:
        k = str(n)
        cells = []
        for t, d in docs.items():
            acc = d["accuracy"].get(k)
            ref = PAPER.get(t, {}).get(n)
            cell = "" if acc is None else f"{100 * acc:.1f}" + (f" ({ref:.1f})" if ref is not None else "")
            cells.append(f"{cell:>15}")
        tok = first["tokens"].get(k, "")
        lines.append(f"{n:>8} {tok:>11,} " + " ".join(cells) + f" {mem.get(k, 0):>9.1f}")
    lines.append("accuracy % (paper's Fig. 1 in parentheses); trained segments: "
                 + ", ".join(f"{t} {d.get('train', {}).get('trained_segments')} in "
                             f"{_train_seconds(d)}s of training" for t, d in docs.items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    a = parse_args(argv)
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    from rmt_fast.experiments.tasks import TASKS

    if a.collect:
        try:
            docs = collect(a.collect)
        except ValueError as e:
            print(e, file=sys.stderr)
            return 2
        os.makedirs(a.out, exist_ok=True)
        print(summary(a.out, docs))
        print(f"wrote {a.out}/results.json, results.csv, accuracy.png")
        return 0
    tasks = [t for t in a.tasks.split(",") if t]
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        print(f"unknown task(s) {bad}; choose from {list(TASKS)}", file=sys.stderr)
        return 2
    if not a.dry_run and not torch.cuda.is_available():
        print("warning: no CUDA device; this configuration is meant for an H200 (use --dry-run on a CPU)",
              file=sys.stderr)
    if torch.cuda.is_available():
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, transformers "
              f"{transformers.__version__}", flush=True)
    if not a.dry_run:
        est = estimate(a)
        print(f"estimate per task (rough): train {est['train_s']}s, eval {est['eval_s']}s, heatmap "
              f"{est['heatmap_s']}s, total {est['total_s']}s x {len(tasks)} task(s)"
              + ("  -- over a 10-minute call: split the tasks/calls" if est["total_s"] * len(tasks) > 570 else ""),
              flush=True)
        if a.estimate_only:
            return 0
    os.makedirs(a.out, exist_ok=True)
    docs = {}
    t0 = time.time()
    for t in tasks:
        docs[t] = run_task(a, t)
    docs = {t: d for t, d in docs.items() if "accuracy" in d}
    if not docs:
        print(f"trained {', '.join(tasks)} in {time.time() - t0:.0f}s (not evaluated: --skip-eval or paused)")
        return 0
    table = summary(a.out, docs)
    print()
    print(f"all tasks done in {time.time() - t0:.0f}s; wrote {a.out}/results.json, results.csv, accuracy.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
