"""Curriculum training of an RMT on the memory tasks (arXiv 2304.11062, Sec. 4).

Start with one segment per sample; train until the validation accuracy reaches ``threshold`` (or the stage
runs out of patience or steps), then add segments (``+segment_step``, or the next entry of an explicit
``schedule``) and go on with the same weights. Each stage: AdamW (weight decay 1e-3), linear warmup then
linear decay of the learning rate, gradient clipping, bf16 autocast on CUDA, full BPTT (``bptt_depth``).

Encoders are trained as 6-way classifiers of the answer; decoders with the LM loss on the answer tokens (their
accuracy: the greedy argmax at every answer token equals the answer).

Distributed: run under ``torchrun --nproc_per_node=N`` (gloo on CPU, nccl on CUDA). The model is wrapped in
DistributedDataParallel, the batch (``batch_size`` is the global batch) and the validation samples are split by
rank, validation counts are all-reduced so every rank takes the same curriculum decisions, and only rank 0
writes files and shows progress.

Files under ``out_dir``::

    train_config.json              the TrainConfig
    stage-0003seg/                 after each stage: rmt.save_pretrained(...) + stage.json
    checkpoint-last/               model + optimizer.pt + scheduler.pt + state.json (for --resume)
    train_summary.json             stages, validation history, times

Usage::

    from rmt_fast.train import TrainConfig, train
    res = train(TrainConfig(task="memorize", backbone="tiny-bert", segment_size=16, num_mem_tokens=4,
                            max_segments=3, out_dir="runs/x"))
    res.model, res.stages
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["TrainConfig", "TrainResult", "StageTracker", "build_schedule", "train", "seed_everything",
           "dist_info", "STAGE_PREFIX", "LAST_CHECKPOINT"]

STAGE_PREFIX = "stage-"
LAST_CHECKPOINT = "checkpoint-last"
CONFIG_FILE = "train_config.json"
SUMMARY_FILE = "train_summary.json"
STATE_FILE = "state.json"


# ------------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Everything :func:`train` needs. Lengths are in segments of ``segment_size`` content tokens.

    Curriculum: ``schedule`` (explicit list of segment counts, e.g. ``[1, 2, 4, 8]``) or
    ``start_segments, start_segments + segment_step, ..., max_segments``. A stage ends when the validation
    accuracy (every ``eval_every`` steps, on ``eval_samples`` samples) is ``>= threshold`` after at least
    ``min_steps_per_stage`` steps, when ``patience`` validations in a row brought no improvement
    (0 = no patience rule), or after ``max_steps_per_stage`` steps; then the next stage starts with the same
    weights. ``mix_prob``: probability that a training batch uses a random length in ``1..n`` instead of the
    stage's ``n`` (helps generalisation to other lengths; 0 = the paper's fixed length per stage).
    ``batch_size`` is the global batch (split across ranks). ``warmup_steps`` defaults to 10% of
    ``max_steps_per_stage``. ``adam_eps`` 1e-6 (as BERT): with 1e-8, once the loss is ~0 at one length, the
    first large gradient of the next, longer stage can blow the weights up.
    ``max_time_s``: stop the whole curriculum after this many seconds; ``max_stage_time_s``: end a stage after
    this many seconds (reason "stage_time"), a time budget spread over the stages; both checked at validations.
    ``device``: "auto" (cuda if available), "cpu", "cuda", "cuda:1". ``find_unused_parameters``: for DDP; not
    needed for the BERT classifiers and GPT-2/Llama LMs (every parameter gets a gradient).
    """

    task: str = "memorize"
    backbone: str = "tiny-bert"
    tokenizer: str = "auto"
    hidden_size: int = 64
    num_layers: int = 2
    num_mem_tokens: int = 4
    segment_size: int = 16
    start_segments: int = 1
    max_segments: int = 3
    segment_step: int = 1
    schedule: list | None = None
    threshold: float = 0.99
    max_steps_per_stage: int = 500
    min_steps_per_stage: int = 0
    patience: int = 0
    eval_every: int = 50
    eval_samples: int = 128
    eval_batch_size: int = 64
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-3
    adam_eps: float = 1e-6
    warmup_steps: int | None = None
    grad_clip: float = 1.0
    mix_prob: float = 0.0
    reset_optimizer: bool = False
    seed: int = 0
    device: str = "auto"
    bf16: bool = True
    backend: str = "auto"
    bptt_depth: int | None = None
    checkpoint_segments: bool = False
    noise: str | None = None
    babi_path: str | None = None
    out_dir: str | None = None
    resume: bool = False
    save_every: int = 0
    save_stages: bool = True
    find_unused_parameters: bool = False
    progress: bool = True
    max_time_s: float | None = None
    max_stage_time_s: float | None = None

    def stages(self) -> list[int]:
        return build_schedule(self.start_segments, self.max_segments, self.segment_step, self.schedule)

    def validate(self) -> None:
        from .tasks import TASKS

        if self.task not in TASKS:
            raise ValueError(f"task: unknown task {self.task!r}; choose one of {list(TASKS)}")
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
        if self.patience < 0 or self.min_steps_per_stage < 0 or self.save_every < 0:
            raise ValueError("patience, min_steps_per_stage and save_every must be >= 0")
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

    ``update(step, metric)`` returns None (go on) or the reason the stage ends: "threshold" (metric >=
    threshold once ``step >= min_steps``), "patience" (``patience`` validations without a new best),
    "max_steps" (``step >= max_steps``).
    """

    def __init__(self, threshold: float, max_steps: int, min_steps: int = 0, patience: int = 0):
        self.threshold, self.max_steps, self.min_steps, self.patience = threshold, max_steps, min_steps, patience
        self.best = -math.inf
        self.since_best = 0
        self.last = None

    def update(self, step: int, metric: float | None = None) -> str | None:
        if metric is not None:
            self.last = float(metric)
            if metric > self.best:
                self.best, self.since_best = float(metric), 0
            else:
                self.since_best += 1
            if step >= self.min_steps:
                if metric >= self.threshold:
                    return "threshold"
                if self.patience and self.since_best >= self.patience:
                    return "patience"
        if step >= self.max_steps:
            return "max_steps"
        return None

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

    @property
    def trained_segments(self) -> int:
        return self.stages[-1]["num_segments"] if self.stages else 0

    def to_dict(self) -> dict:
        return {"config": self.config.to_dict(), "kind": self.kind, "stages": self.stages, "history": self.history,
                "seconds": self.seconds, "trained_segments": self.trained_segments}


# ------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def dist_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank); (0, 1, 0) outside torch.distributed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return 0, 1, 0


def _init_distributed(device_pref: str) -> bool:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1). Returns True if we did."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    use_cuda = torch.cuda.is_available() and device_pref != "cpu"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return True


def resolve_device(pref: str = "auto", local_rank: int = 0) -> torch.device:
    if pref in (None, "auto"):
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(pref)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device: CUDA was asked for but torch.cuda.is_available() is False")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    return dev


def autocast_ctx(device: torch.device, bf16: bool):
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_model(cfg: TrainConfig, device: torch.device):
    """(rmt, tokenizer, kind) for the config (backbone + wrap), on ``device``."""
    from .backbones import load_backbone
    from .wrap import wrap

    m = cfg.num_mem_tokens
    slots = max(2 * m, m + 3)
    model, tok, kind = load_backbone(cfg.backbone, tokenizer=cfg.tokenizer, hidden_size=cfg.hidden_size,
                                     num_layers=cfg.num_layers, max_positions=max(512, cfg.segment_size + slots),
                                     seed=cfg.seed)
    rmt = wrap(model, num_mem_tokens=m, segment_size=cfg.segment_size, tokenizer=tok, backend=cfg.backend,
               bptt_depth=cfg.bptt_depth, checkpoint_segments=cfg.checkpoint_segments, keep_logits=False)
    return rmt.to(device), tok, kind


def make_dataset(cfg: TrainConfig, tokenizer, kind: str, num_segments: int, split: str, length: int | None = None):
    from .tasks import make_task

    return make_task(cfg.task, tokenizer, num_segments, cfg.segment_size, split=split, seed=cfg.seed,
                     noise=cfg.noise, babi_path=cfg.babi_path, for_decoder=(kind == "decoder"), length=length)


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


def _atomic_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=_json_default)
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    return str(o)


def load_weights_into(rmt, directory: str) -> None:
    """Load the weights saved by ``rmt.save_pretrained(directory)`` into ``rmt`` (same architecture)."""
    from .model import from_pretrained

    src = from_pretrained(directory)
    missing, unexpected = rmt.load_state_dict(src.state_dict(), strict=False)
    if unexpected or [k for k in missing if not k.endswith("lm_head.weight")]:
        raise ValueError(f"checkpoint {directory!r} does not match the model: missing {missing}, "
                         f"unexpected {unexpected}")


def stage_dirs(out_dir: str) -> list[tuple[int, str]]:
    """[(segments, path)] of the stage checkpoints under ``out_dir``, shortest first."""
    if not os.path.isdir(out_dir):
        return []
    found = []
    for name in os.listdir(out_dir):
        if name.startswith(STAGE_PREFIX) and name.endswith("seg"):
            try:
                n = int(name[len(STAGE_PREFIX):-3])
            except ValueError:
                continue
            if os.path.isfile(os.path.join(out_dir, name, "rmt_config.json")):
                found.append((n, os.path.join(out_dir, name)))
    return sorted(found)


# ------------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------------
def train(config: TrainConfig | None = None, **overrides) -> TrainResult:
    """Run the curriculum; see the module docstring. ``overrides`` replace fields of ``config``."""
    from tqdm.auto import tqdm

    from .evaluate import dataset_accuracy

    cfg = dataclasses.replace(config or TrainConfig(), **overrides)
    if cfg.schedule is not None and not isinstance(cfg.schedule, list):
        cfg.schedule = build_schedule(schedule=cfg.schedule)
    cfg.validate()
    we_initialised = _init_distributed(cfg.device)
    try:
        return _train(cfg, tqdm, dataset_accuracy)
    finally:
        if we_initialised:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(cfg: TrainConfig, tqdm, dataset_accuracy) -> TrainResult:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from .tasks import collate

    rank, world, local_rank = dist_info()
    is_main = rank == 0
    device = resolve_device(cfg.device, local_rank)
    if cfg.batch_size % world:
        raise ValueError(f"batch_size ({cfg.batch_size}) must be divisible by the number of processes ({world})")
    per_rank = cfg.batch_size // world
    seed_everything(cfg.seed)
    rmt, tok, kind = build_model(cfg, device)
    stages = cfg.stages()
    out = cfg.out_dir
    last_dir = os.path.join(out, LAST_CHECKPOINT) if out else None

    # ---- resume ---------------------------------------------------------------------------------------
    state = {"stage_index": 0, "step_in_stage": 0, "global_step": 0, "tracker": None, "stages": [],
             "history": [], "elapsed": 0.0, "done": False}
    resumed = False
    if cfg.resume and last_dir and os.path.isfile(os.path.join(last_dir, STATE_FILE)):
        with open(os.path.join(last_dir, STATE_FILE)) as f:
            state = json.load(f)
        saved_cfg = state.get("config", {})
        for key in ("task", "backbone", "num_mem_tokens", "segment_size", "tokenizer"):
            if key in saved_cfg and saved_cfg[key] != getattr(cfg, key):
                raise ValueError(f"resume: checkpoint was trained with {key}={saved_cfg[key]!r}, "
                                 f"this run has {key}={getattr(cfg, key)!r}")
        load_weights_into(rmt, last_dir)
        resumed = True
    if is_main and out:
        os.makedirs(out, exist_ok=True)
        _atomic_json(os.path.join(out, CONFIG_FILE), cfg.to_dict())

    module = rmt
    if world > 1:
        ddp_kw = {"find_unused_parameters": cfg.find_unused_parameters}
        if device.type == "cuda":
            ddp_kw.update(device_ids=[device.index], output_device=device.index)
        model = DDP(rmt, **ddp_kw)
    else:
        model = rmt

    def new_optimizer():
        return torch.optim.AdamW(rmt.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.adam_eps)

    optimizer = new_optimizer()
    if resumed and os.path.isfile(os.path.join(last_dir, "optimizer.pt")):
        optimizer.load_state_dict(torch.load(os.path.join(last_dir, "optimizer.pt"), map_location=device,
                                             weights_only=True))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, cfg.max_steps_per_stage // 10)
    warmup = max(1, min(warmup, cfg.max_steps_per_stage))
    datasets: dict = {}

    def ds(n, split):
        key = (n, split)
        if key not in datasets:
            datasets[key] = make_dataset(cfg, tok, kind, n, split,
                                         length=max(cfg.eval_samples, 1) if split == "valid" else None)
        return datasets[key]

    history, done_stages = list(state["history"]), list(state["stages"])
    t_start = time.time() - float(state.get("elapsed", 0.0))
    global_step = int(state["global_step"])
    stop_all = False  # a resumed run goes on with the stages left (none if the schedule is done)

    def save_last(stage_index, step_in_stage, tracker, scheduler, done=False):
        st = {"stage_index": stage_index, "step_in_stage": step_in_stage, "global_step": global_step,
              "tracker": tracker.state_dict() if tracker else None, "stages": done_stages, "history": history,
              "elapsed": time.time() - t_start, "done": done, "config": cfg.to_dict(),
              "num_segments": stages[min(stage_index, len(stages) - 1)]}
        if is_main:
            tmp = last_dir + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            rmt.save_pretrained(tmp)
            torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
            if scheduler is not None:
                torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
            _atomic_json(os.path.join(tmp, STATE_FILE), st)
            _atomic_json(os.path.join(tmp, CONFIG_FILE), cfg.to_dict())
            shutil.rmtree(last_dir, ignore_errors=True)
            os.replace(tmp, last_dir)
        if world > 1:
            dist.barrier()

    def validate(n):
        rmt.eval()
        with torch.no_grad(), autocast_ctx(device, cfg.bf16):
            correct, total = dataset_accuracy(rmt, ds(n, "valid"), kind, range(cfg.eval_samples),
                                              cfg.eval_batch_size, device, rank=rank, world=world)
        rmt.train()
        return correct / max(total, 1)

    def any_rank(flag: bool) -> bool:
        if world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    rmt.train()
    stage_index = int(state["stage_index"])
    while stage_index < len(stages) and not stop_all:
        n = stages[stage_index]
        tracker = StageTracker(cfg.threshold, cfg.max_steps_per_stage, cfg.min_steps_per_stage, cfg.patience)
        step = 0
        if stage_index > 0 and cfg.reset_optimizer and not (resumed and state["step_in_stage"]):
            optimizer = new_optimizer()
        for g in optimizer.param_groups:
            g["lr"] = cfg.lr
            g["initial_lr"] = cfg.lr
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(warmup, cfg.max_steps_per_stage))
        if resumed and state["stage_index"] == stage_index and state["step_in_stage"]:
            step = int(state["step_in_stage"])
            if state.get("tracker"):
                tracker.load_state_dict(state["tracker"])
            sp = os.path.join(last_dir, "scheduler.pt")
            if os.path.isfile(sp):
                scheduler.load_state_dict(torch.load(sp, weights_only=False))
                for g, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
                    g["lr"] = lr
        resumed = False
        t_stage = time.time()
        bar = tqdm(total=cfg.max_steps_per_stage, initial=step, desc=f"stage {stage_index + 1}/{len(stages)}: "
                   f"{n} seg x {cfg.segment_size}", disable=not (is_main and cfg.progress), dynamic_ncols=True,
                   leave=True)
        reason, loss_val, acc = None, float("nan"), None
        while reason is None:
            # ---- one optimisation step (batch chosen by the global step: deterministic and resumable) ----
            rng = np.random.default_rng([cfg.seed, global_step, 0x7472])
            n_batch = n
            if cfg.mix_prob > 0 and n > 1 and rng.random() < cfg.mix_prob:
                n_batch = int(rng.integers(1, n + 1))
            data = ds(n_batch, "train")
            base = (global_step * world + rank) * per_rank
            batch = collate([data[(base + j) % len(data)] for j in range(per_rank)])
            ids = batch["input_ids"].to(device, non_blocking=True)
            labels = batch["labels"].to(device, non_blocking=True)
            with autocast_ctx(device, cfg.bf16):
                outp = model(input_ids=ids, labels=labels, return_logits=False)
            loss = outp.loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip and cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(rmt.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            global_step += 1
            bar.update(1)
            metric = None
            if step % cfg.eval_every == 0 or step >= cfg.max_steps_per_stage:
                lt = loss.detach().float().reshape(1)
                if world > 1:  # log the mean over ranks (every rank logs the same)
                    dist.all_reduce(lt)
                    lt = lt / world
                loss_val = float(lt.item())
                acc = validate(n)
                metric = acc
                rec = {"stage": stage_index, "num_segments": n, "step": step, "global_step": global_step,
                       "loss": loss_val, "val_accuracy": acc, "lr": scheduler.get_last_lr()[0],
                       "time_s": round(time.time() - t_start, 3)}
                history.append(rec)
                bar.set_postfix(loss=f"{loss_val:.3f}", val_acc=f"{acc:.3f}")
            reason = tracker.update(step, metric)
            if metric is not None and reason is None and cfg.max_time_s is not None:
                if any_rank(time.time() - t_start > cfg.max_time_s):
                    reason, stop_all = "time", True
            if metric is not None and reason is None and cfg.max_stage_time_s is not None:
                if any_rank(time.time() - t_stage > cfg.max_stage_time_s):
                    reason = "stage_time"
            if reason is None and cfg.save_every and out and step % cfg.save_every == 0:
                save_last(stage_index, step, tracker, scheduler)
        bar.close()
        if acc is None or history[-1]["global_step"] != global_step:
            acc = validate(n)
        rec = {"stage": stage_index, "num_segments": n, "steps": step, "reason": reason,
               "val_accuracy": acc, "best_val_accuracy": max(tracker.best, acc),
               "seconds": round(time.time() - t_stage, 3), "global_step": global_step, "checkpoint": None}
        if out and cfg.save_stages:
            sdir = os.path.join(out, f"{STAGE_PREFIX}{n:04d}seg")
            if is_main:
                rmt.save_pretrained(sdir)
                _atomic_json(os.path.join(sdir, "stage.json"), rec)
                _atomic_json(os.path.join(sdir, CONFIG_FILE), cfg.to_dict())
            rec["checkpoint"] = sdir
        done_stages.append(rec)
        if is_main and cfg.progress:
            print(f"stage {stage_index + 1}/{len(stages)} ({n} segments) done after {step} steps ({reason}): "
                  f"val accuracy {acc:.3f}, {rec['seconds']:.1f}s", flush=True)
        stage_index += 1
        if out:
            save_last(stage_index, 0, None, None, done=stop_all or stage_index >= len(stages))
        elif world > 1:
            dist.barrier()

    result = TrainResult(model=rmt, tokenizer=tok, kind=kind, config=cfg, stages=done_stages, history=history,
                         seconds=round(time.time() - t_start, 3), out_dir=out)
    if is_main and out:
        _atomic_json(os.path.join(out, SUMMARY_FILE), result.to_dict())
    rmt.eval()
    return result
