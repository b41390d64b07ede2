"""The files of a training run directory: what the trainer writes and what evaluation reads back.

::

    train_config.json              the TrainConfig (tokenizer spelled out: "word", not "auto")
    tokenizer/                     the tokenizer itself (WordTokenizer vocabulary or HF tokenizer files)
    stage-0003seg/                 after each stage: rmt.save_pretrained(...) + stage.json + train_config.json
                                   + tokenizer/
    checkpoint-last/               model + optimizer.pt + scheduler.pt + state.json (for --resume)

A *transfer copy* (:func:`save_transfer_copy`) is checkpoint-last made small enough to travel between machines: the
backbone in bf16 as safetensors shards under 16 MiB, the memory in fp32, state.json, scheduler.pt, the config and
the tokenizer, no optimizer state (the AdamW moments are twice the model). :func:`install_transfer_copy` puts it
back as OUT/checkpoint-last (+ the last finished stage's stage-*seg/), and ``--resume`` goes on from there with a
fresh AdamW state (exact up to bf16 rounding at a stage start with ``--reset-optimizer``).
    train_summary.json             stages, validation history, times
    results.json ...               evaluation (rmt-fast demo / eval)

A checkpoint carries its tokenizer, so it evaluates with the ids it was trained on whatever is installed later.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

__all__ = ["CONFIG_FILE", "SUMMARY_FILE", "STATE_FILE", "RESULTS_FILE", "STAGE_PREFIX", "LAST_CHECKPOINT",
           "TOKENIZER_DIR", "atomic_json", "stage_dir", "stage_dirs", "save_tokenizer", "load_checkpoint",
           "load_weights_into", "find_results", "save_transfer_copy", "install_transfer_copy", "TRANSFER_FILE",
           "backbone_from_transfer"]

STAGE_PREFIX = "stage-"
LAST_CHECKPOINT = "checkpoint-last"
CONFIG_FILE = "train_config.json"
SUMMARY_FILE = "train_summary.json"
STATE_FILE = "state.json"
RESULTS_FILE = "results.json"
TOKENIZER_DIR = "tokenizer"
TRANSFER_FILE = "transfer.json"


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    return str(o)


def atomic_json(path: str, obj) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file (a crash never leaves half a file)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=_json_default)
    os.replace(tmp, path)


def stage_dir(out_dir: str, num_segments: int) -> str:
    return os.path.join(out_dir, f"{STAGE_PREFIX}{num_segments:04d}seg")


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


def save_tokenizer(tokenizer, directory: str) -> str:
    """Save ``tokenizer`` (``save_pretrained``) into ``directory/tokenizer``."""
    path = os.path.join(directory, TOKENIZER_DIR)
    tokenizer.save_pretrained(path)
    return path


def _beside(path: str, name: str) -> str | None:
    """``path/name``, else the same in the parent (a stage checkpoint inside a run directory)."""
    for d in (path, os.path.dirname(os.path.abspath(path))):
        if os.path.exists(os.path.join(d, name)):
            return os.path.join(d, name)
    return None


def _checkpoint_path(path: str) -> str:
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint: {path!r} does not exist")
    if os.path.isfile(os.path.join(path, "rmt_config.json")):
        return path
    st = stage_dirs(path)
    if not st:
        raise ValueError(f"checkpoint: {path!r} is neither an RMT checkpoint (rmt_config.json) nor a training run "
                         "directory with stage-*seg/ checkpoints")
    return st[-1][1]


def load_checkpoint(path: str, device="auto"):
    """(rmt, tokenizer, kind, train_config dict) from a stage checkpoint or a training run directory (then its
    last stage). The tokenizer is the one saved with the run; runs from before tokenizers were saved get
    ``load_tokenizer(backbone, tokenizer)``, checked against the model's vocabulary."""
    from ..model import from_pretrained
    from .backbones import load_tokenizer
    from .runtime import resolve_device
    from .tasks import load_saved_tokenizer

    path = _checkpoint_path(path)
    cfg_path = _beside(path, CONFIG_FILE)
    if cfg_path is None:
        raise ValueError(f"checkpoint: no {CONFIG_FILE} at {path!r} or its parent (which task and backbone?)")
    with open(cfg_path) as f:
        tcfg = json.load(f)
    rmt = from_pretrained(path).to(resolve_device(device)).eval()
    tok_dir = _beside(path, TOKENIZER_DIR)
    if tok_dir is not None:
        tok = load_saved_tokenizer(tok_dir)
    else:
        tok = load_tokenizer(tcfg["backbone"], tcfg.get("tokenizer", "auto"))
    vocab = rmt.model.get_input_embeddings().num_embeddings
    if len(tok) > vocab:
        raise ValueError(f"checkpoint: the tokenizer found for {path!r} has {len(tok)} tokens but the model embeds "
                         f"{vocab}; the run was trained with another tokenizer (save it as {TOKENIZER_DIR}/)")
    return rmt, tok, rmt.rmt_config.mode, tcfg


def load_weights_into(rmt, directory: str) -> None:
    """Load the weights saved by ``rmt.save_pretrained(directory)`` into ``rmt`` (same architecture)."""
    from ..model import from_pretrained

    src = from_pretrained(directory)
    try:
        missing, unexpected = rmt.load_state_dict(src.state_dict(), strict=False)
    except RuntimeError as e:  # shapes differ (another width, vocabulary or number of memory tokens)
        raise ValueError(f"checkpoint {directory!r} does not match the model: {e}") from e
    if unexpected or [k for k in missing if not k.endswith("lm_head.weight")]:
        raise ValueError(f"checkpoint {directory!r} does not match the model: missing {missing}, "
                         f"unexpected {unexpected}")


def find_results(run_dir: str) -> dict | None:
    """The evaluation a run was reported with: ``RUN/results.json`` (demo) or ``RUN/eval/results.json``
    (``train --eval-lengths``); None if there is none."""
    for p in (os.path.join(run_dir, RESULTS_FILE), os.path.join(run_dir, "eval", RESULTS_FILE)):
        if os.path.isfile(p):
            with open(p) as f:
                return json.load(f)
    return None


def save_transfer_copy(checkpoint: str, dest: str, max_shard_size: str = "15MB", dtype=torch.bfloat16) -> str:
    """Write a small copy of ``checkpoint`` (a checkpoint-last/ or stage-*seg/ directory) to ``dest``: the backbone
    cast to ``dtype`` in safetensors shards of at most ``max_shard_size``, the memory in fp32, and state.json,
    scheduler.pt, train_config.json, stage.json, tokenizer/ when present; no optimizer.pt. Returns ``dest``."""
    import shutil

    from ..model import from_pretrained

    rmt = from_pretrained(checkpoint)
    memory = {n: p.detach().clone() for n, p in rmt.named_parameters() if not n.startswith("model.")}
    rmt.to(dtype)
    with torch.no_grad():                          # the memory (a few vectors) stays exact
        for n, p in rmt.named_parameters():
            if n in memory:
                p.data = memory[n]
    tmp = dest.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    rmt.save_pretrained(tmp, max_shard_size=max_shard_size)
    for name in (STATE_FILE, "scheduler.pt", CONFIG_FILE, "stage.json"):
        if os.path.isfile(os.path.join(checkpoint, name)):
            shutil.copy2(os.path.join(checkpoint, name), os.path.join(tmp, name))
    tok = os.path.join(checkpoint, TOKENIZER_DIR)
    if not os.path.isdir(tok):                     # checkpoint-last/: the run's own tokenizer/ beside it
        tok = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), TOKENIZER_DIR)
    if os.path.isdir(tok):
        shutil.copytree(tok, os.path.join(tmp, TOKENIZER_DIR))
    atomic_json(os.path.join(tmp, TRANSFER_FILE), {"source": os.path.abspath(checkpoint), "dtype": str(dtype),
                                                   "max_shard_size": max_shard_size, "optimizer": False})
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


def install_transfer_copy(transfer: str, out_dir: str) -> str:
    """Make ``out_dir`` resumable from a transfer copy (:func:`save_transfer_copy` of a checkpoint-last/):
    ``out_dir/checkpoint-last`` becomes a copy of it, and the last finished stage gets its stage-*seg/ (same
    weights) when the copy was taken at a stage end, so that evaluation finds the model. The top-level
    train_config.json and tokenizer/ are written too. Returns the checkpoint-last path."""
    import shutil

    if not os.path.isfile(os.path.join(transfer, STATE_FILE)):
        raise FileNotFoundError(f"transfer copy {transfer!r} has no {STATE_FILE} (not a copy of checkpoint-last/)")
    os.makedirs(out_dir, exist_ok=True)
    last = os.path.join(out_dir, LAST_CHECKPOINT)
    if os.path.abspath(transfer) != os.path.abspath(last):
        shutil.rmtree(last, ignore_errors=True)
        shutil.copytree(transfer, last)
    with open(os.path.join(last, STATE_FILE)) as f:
        state = json.load(f)
    for name in (CONFIG_FILE,):
        if os.path.isfile(os.path.join(last, name)):
            shutil.copy2(os.path.join(last, name), os.path.join(out_dir, name))
    if os.path.isdir(os.path.join(last, TOKENIZER_DIR)) and not os.path.isdir(os.path.join(out_dir, TOKENIZER_DIR)):
        shutil.copytree(os.path.join(last, TOKENIZER_DIR), os.path.join(out_dir, TOKENIZER_DIR))
    stages = state.get("stages") or []
    if stages and not state.get("step_in_stage"):
        rec = dict(stages[-1])
        sdir = stage_dir(out_dir, int(rec["num_segments"]))
        if not os.path.isdir(sdir):
            shutil.copytree(last, sdir, ignore=shutil.ignore_patterns(STATE_FILE, "scheduler.pt", "optimizer.pt"))
            rec["checkpoint"] = sdir
            atomic_json(os.path.join(sdir, "stage.json"), rec)
    return last


def backbone_from_transfer(transfer: str, dest: str, dtype=torch.float16) -> str:
    """Write a backbone folder (the HF model and its tokenizer, loadable as ``TrainConfig.backbone``) from a transfer
    copy, for a machine that holds the copy but not the backbone the run was started from. Resuming needs the
    backbone's architecture and tokenizer only: the weights written here are the copy's (trained) ones, and the
    resumed run replaces them with the copy's again. Returns ``dest``."""
    from ..model import from_pretrained
    from .tasks import load_saved_tokenizer

    tok_dir = os.path.join(transfer, TOKENIZER_DIR)
    if not os.path.isdir(tok_dir):
        raise FileNotFoundError(f"transfer copy {transfer!r} has no {TOKENIZER_DIR}/ (the backbone's tokenizer)")
    rmt = from_pretrained(transfer)
    rmt.model.to(dtype).save_pretrained(dest, max_shard_size="15MB")
    load_saved_tokenizer(tok_dir).save_pretrained(dest)
    return dest
