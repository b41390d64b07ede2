"""Accuracy of a trained RMT at many input lengths (up to 4096 x 499 = 2,043,904 tokens) with flat memory.

Every evaluation runs under ``torch.no_grad`` with the memory carried from segment to segment and nothing
kept per segment: encoders keep only the last segment's logits; decoders run all but the last segment with
``return_logits=False`` and only the last segment (where the answer is) with logits. A tqdm bar runs over the
segments of each batch (``progress=`` of the forward). Peak memory per length: see
:mod:`rmt_fast.experiments.metrics` (GPU: max_memory_allocated; CPU: bytes of the tensors the forward creates),
measured on the first batch of each length.

Outputs (:func:`write_results`): ``results.json`` ``{"accuracy": {"<segments>": acc}, "ci95": {...},
"peak_memory_mib": {...}, "memory_measure": "...", "tokens": {...}, "config": ..., "train": ..., "heatmap": ...}``,
``results.csv``, ``accuracy.png`` (accuracy vs segments on a log2 axis, as Fig. 1 of arXiv 2304.11062) and,
when several curriculum stages are evaluated, ``heatmap.png``/``heatmap.csv`` (train length x eval length, as
Fig. 5).
"""
from __future__ import annotations

import csv
import json
import os
import time

import torch

from .metrics import PeakMemory, accuracy, memory_measure, wilson_interval
from .rundir import CONFIG_FILE, RESULTS_FILE, SUMMARY_FILE, find_results, load_checkpoint, stage_dirs
from .runtime import autocast_ctx

__all__ = ["predict_correct", "dataset_accuracy", "evaluate_lengths", "evaluate_run", "write_results",
           "format_table", "parse_lengths", "DEFAULT_LENGTHS"]

#: 1, 2, 4, ..., 4096 segments (4096 x 499 = 2,043,904 tokens)
DEFAULT_LENGTHS = tuple(2 ** i for i in range(13))


def parse_lengths(spec) -> list[int]:
    """"1,2,4" or "1-4096" (powers of two from a to b) or a list -> sorted unique ints >= 1."""
    if isinstance(spec, str):
        text = spec.strip()
        ranged = "-" in text and "," not in text
        try:
            numbers = [int(x) for x in text.split("-" if ranged else ",") if x.strip() or ranged]
        except ValueError:
            raise ValueError(f"lengths: expected segment counts such as 1,2,4 or a power-of-two range such as "
                             f"1-4096, got {spec!r}") from None
        if ranged:
            if len(numbers) != 2 or not 1 <= numbers[0] <= numbers[1]:
                raise ValueError(f"lengths: bad range {spec!r} (a-b with 1 <= a <= b)")
            a, b = numbers
            out = [a << i for i in range((b // a).bit_length())]
            return out if out[-1] == b else out + [b]
        spec = numbers
    out = sorted({int(x) for x in spec})
    if not out or out[0] < 1:
        raise ValueError(f"lengths: expected segment counts >= 1, got {spec!r}")
    return out


# ------------------------------------------------------------------------------------------------------
# one batch
# ------------------------------------------------------------------------------------------------------
def predict_correct(rmt, input_ids: torch.Tensor, labels: torch.Tensor, kind: str, progress=None,
                    chunk_segments: int | None = 256) -> torch.Tensor:
    """Bool ``[B]``: is each row's answer right? (call under no_grad; rows must share one length).

    encoder: argmax of the class logits == label. decoder: greedy argmax at every answer token (labels !=
    -100) equals the token; only the last segment's logits are computed.

    ``input_ids`` may stay on the CPU: when the length is a whole number of segments, the input is fed in
    chunks of ``chunk_segments`` segments with the memory carried between calls (the same segments, so the
    same result), so device memory does not grow with the length. ``progress`` wraps each call's segment
    range (as the forward's ``progress=``).
    """
    device = rmt.device
    cfg = rmt.rmt_config
    s = cfg.segment_size
    b, t = input_ids.shape
    labels = labels.to(device)
    whole = t % s == 0
    n = -(-t // s)
    chunk = chunk_segments if (chunk_segments and whole) else n

    def carry(ids, memory):  # run whole segments, return the memory after them
        for a in range(0, ids.shape[1] // s, chunk):
            x = ids[:, a * s:(a + chunk) * s].to(device, non_blocking=True)
            memory = rmt(input_ids=x, memory=memory, return_logits=False, progress=progress).memory
        return memory

    if kind == "encoder":
        if chunk >= n:
            out = rmt(input_ids=input_ids.to(device), progress=progress)
        else:
            cut = ((n - 1) // chunk) * chunk * s  # the last chunk gives the logits
            mem = carry(input_ids[:, :cut], None)
            out = rmt(input_ids=input_ids[:, cut:].to(device), memory=mem, progress=progress)
        return out.logits.argmax(-1) == labels
    cut = ((t - 1) // s) * s  # start of the last (left-aligned) segment
    if cfg.segment_alignment != "left" or (cut > 0 and bool((labels[:, cut] != -100).any())):
        logits = rmt(input_ids=input_ids.to(device), return_logits=True, progress=progress).logits
        lab = labels
    elif cut > 0:
        mem = carry(input_ids[:, :cut], None) if whole else rmt(
            input_ids=input_ids[:, :cut].to(device), return_logits=False, progress=progress).memory
        logits = rmt(input_ids=input_ids[:, cut:].to(device), memory=mem, return_logits=True).logits
        lab = labels[:, cut:]
    else:
        logits = rmt(input_ids=input_ids.to(device), return_logits=True, progress=progress).logits
        lab = labels
    pred = logits[:, :-1].argmax(-1)
    target = lab[:, 1:]
    mask = target != -100
    ok = (pred == target) | ~mask
    return ok.all(1) & mask.any(1)


def _ticker(bar):
    """A forward ``progress=`` callable that advances one shared bar (over several chunked calls)."""
    def wrap(r):
        for i in r:
            yield i
            bar.update(1)

    return wrap


def dataset_accuracy(rmt, dataset, kind: str, indices, batch_size: int, device=None, rank: int = 0,
                     world: int = 1, progress=None, chunk_segments: int | None = 256) -> tuple[int, int]:
    """(correct, total) over ``dataset[i]`` for ``i`` in ``indices`` (this rank takes every world-th sample;
    the counts are all-reduced when world > 1). ``progress``: None or a callable(batch_no) returning a bar
    (anything with ``update(k)`` and ``close()``, e.g. tqdm) that counts the batch's segments."""
    from .tasks import collate

    idx = list(indices)[rank::world]
    correct = total = 0
    for b, start in enumerate(range(0, len(idx), batch_size)):
        batch = collate([dataset[i] for i in idx[start:start + batch_size]])
        bar = progress(b) if progress is not None else None
        ok = predict_correct(rmt, batch["input_ids"], batch["labels"], kind,
                             progress=_ticker(bar) if bar is not None else None, chunk_segments=chunk_segments)
        if bar is not None:
            bar.close()
        correct += int(ok.sum().item())
        total += int(ok.numel())
    if world > 1:
        import torch.distributed as dist

        t = torch.tensor([correct, total], dtype=torch.long, device=device if device is not None else rmt.device)
        dist.all_reduce(t)
        correct, total = int(t[0].item()), int(t[1].item())
    return correct, total


# ------------------------------------------------------------------------------------------------------
# many lengths
# ------------------------------------------------------------------------------------------------------
def evaluate_lengths(rmt, tokenizer, kind: str, task: str = "memorize", lengths=DEFAULT_LENGTHS,
                     num_samples: int = 128, batch_size: int = 32, seed: int = 0, split: str = "test",
                     noise=None, babi_path=None, bf16: bool = True, progress: bool = True,
                     rank: int = 0, world: int = 1, desc: str = "", chunk_segments: int | None = 256,
                     fact_placement: str = "anywhere") -> dict:
    """Accuracy at each length (segments of ``rmt.rmt_config.segment_size`` tokens).

    fact_placement: where the facts lie (``rmt_fast.experiments.tasks.PLACEMENTS``), as the model was trained.

    The input stays on the CPU and goes to the device ``chunk_segments`` segments at a time (memory carried), so
    peak device memory is flat in the length. Returns ``{segments: {"accuracy", "ci95", "correct", "samples",
    "tokens", "peak_memory_mib", "seconds"}}``; the peak is that of the first batch (all batches have one shape).
    """
    from tqdm.auto import tqdm

    from .tasks import make_task

    device = rmt.device
    s = rmt.rmt_config.segment_size
    lengths = parse_lengths(lengths)
    show = progress and rank == 0
    results = {}
    was_training = rmt.training
    rmt.eval()
    first = batch_size * world  # the samples of every rank's first batch
    for n in lengths:
        ds = make_task(task, tokenizer, n, s, split=split, seed=seed, noise=noise, babi_path=babi_path,
                       for_decoder=(kind == "decoder"), length=num_samples, fact_placement=fact_placement)
        nb = -(-len(range(rank, num_samples, world)) // batch_size)

        def bar(b, n=n, nb=nb):
            return tqdm(total=n, desc=f"{desc}eval {n} seg x {s} tok, batch {b + 1}/{nb}", unit="seg",
                        disable=not show or n < 64, leave=False, dynamic_ncols=True, mininterval=1.0)

        t0 = time.time()
        with torch.no_grad(), autocast_ctx(device, bf16):
            with PeakMemory(device) as peak:
                correct, total = dataset_accuracy(rmt, ds, kind, range(min(first, num_samples)), batch_size, device,
                                                  rank, world, progress=bar, chunk_segments=chunk_segments)
            more = dataset_accuracy(rmt, ds, kind, range(first, num_samples), batch_size, device, rank, world,
                                    progress=lambda b: bar(b + 1), chunk_segments=chunk_segments)
        dt = time.time() - t0
        correct, total = correct + more[0], total + more[1]
        results[n] = {"accuracy": accuracy(correct, total), "ci95": list(wilson_interval(correct, total)),
                      "correct": correct, "samples": total, "tokens": n * s,
                      "peak_memory_mib": round(peak.mib, 3), "seconds": round(dt, 3)}
        if show:
            r = results[n]
            print(f"{desc}{n:>5} segments ({n * s:>9,} tokens): accuracy {r['accuracy']:.3f} "
                  f"({correct}/{total}), peak memory {r['peak_memory_mib']:.1f} MiB, {dt:.1f}s", flush=True)
    rmt.train(was_training)
    return results


def evaluate_run(path: str, lengths=None, num_samples: int | None = None, batch_size: int | None = None,
                 stages: bool = True, stage_samples: int | None = None, stage_lengths=None, device="auto",
                 bf16: bool = True, progress: bool = True, out_dir: str | None = None, split: str | None = None,
                 model=None, tokenizer=None, kind: str | None = None, train_info: dict | None = None) -> dict:
    """Evaluate a training run (or one checkpoint) at ``lengths`` and, with ``stages``, every curriculum stage
    (at ``stage_lengths``, default ``lengths``) for the train x eval heatmap: from the accuracies the trainer
    measured at each stage's end (``TrainConfig.stage_eval_lengths``) when they cover ``stage_lengths``, else by
    evaluating the stage checkpoints. Writes the results to
    ``out_dir`` if given. Returns the results dict of :func:`write_results`.

    ``lengths``, ``num_samples``, ``batch_size``, ``split`` left None: those of the run's own evaluation
    (``results.json`` of the run, see :func:`rmt_fast.experiments.rundir.find_results`), so the same samples
    give the same accuracies; without one, 1-4096 segments, 128 samples, batches of 32, the test split.
    ``model``/``tokenizer``/``kind``: evaluate this in-memory model as the final one instead of loading the
    last stage checkpoint.
    """
    own = (find_results(path) or {}).get("config", {}) if path and os.path.isdir(path) else {}
    lengths = parse_lengths(lengths if lengths is not None else own.get("lengths", DEFAULT_LENGTHS))
    num_samples = num_samples or own.get("num_samples", 128)
    batch_size = batch_size or own.get("batch_size", 32)
    split = split or own.get("split", "test")
    if model is None:
        model, tokenizer, kind, tcfg = load_checkpoint(path, device)
    else:
        tcfg = {}
        if path and os.path.isfile(os.path.join(path, CONFIG_FILE)):
            with open(os.path.join(path, CONFIG_FILE)) as f:
                tcfg = json.load(f)
    task = tcfg.get("task", "memorize")
    seed = tcfg.get("seed", 0)
    noise, babi = tcfg.get("noise"), tcfg.get("babi_path")
    placement = tcfg.get("fact_placement") or "anywhere"  # the training run's (configs written before it: anywhere)
    final = evaluate_lengths(model, tokenizer, kind, task, lengths, num_samples, batch_size, seed, split, noise, babi,
                             bf16, progress, desc="[final] ", fact_placement=placement)
    if train_info is None and path and os.path.isfile(os.path.join(path, SUMMARY_FILE)):
        with open(os.path.join(path, SUMMARY_FILE)) as f:
            summ = json.load(f)
        train_info = {k: summ.get(k) for k in ("stages", "seconds", "trained_segments")}
    heat = None
    s_lengths = parse_lengths(stage_lengths) if stage_lengths is not None else lengths
    records = (train_info or {}).get("stages") or []
    sd = stage_dirs(path) if (stages and path and os.path.isdir(path)) else []
    if stages and len(records) > 1 and all(all(str(n) in r.get("eval", {}) for n in s_lengths) for r in records):
        # each stage was evaluated when it ended (TrainConfig.stage_eval_lengths)
        heat = {"train_segments": [r["num_segments"] for r in records], "eval_segments": s_lengths,
                "accuracy": [[r["eval"][str(n)] for n in s_lengths] for r in records]}
    elif len(sd) > 1:
        rows = []
        for n_train, p in sd:
            rmt_s, tok_s, kind_s, _ = load_checkpoint(p, model.device)
            res = evaluate_lengths(rmt_s, tok_s, kind_s, task, s_lengths, stage_samples or num_samples, batch_size,
                                   seed, split, noise, babi, bf16, progress, desc=f"[trained {n_train}] ",
                                   fact_placement=placement)
            rows.append([res[n]["accuracy"] for n in s_lengths])
            del rmt_s
        heat = {"train_segments": [n for n, _ in sd], "eval_segments": s_lengths, "accuracy": rows}
    config = {"task": task, "backbone": tcfg.get("backbone"), "tokenizer": tcfg.get("tokenizer"),
              "segment_size": model.rmt_config.segment_size, "num_mem_tokens": model.rmt_config.num_mem_tokens,
              "kind": kind, "lengths": lengths, "num_samples": num_samples, "batch_size": batch_size, "split": split,
              "seed": seed, "fact_placement": placement, "device": str(model.device), "train_config": tcfg}
    return write_results(out_dir, final, config=config, train=train_info, heatmap=heat)


# ------------------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------------------
def write_results(out_dir: str | None, results: dict, config: dict | None = None, train: dict | None = None,
                  heatmap: dict | None = None, label: str | None = None) -> dict:
    """Build the results dict and, if ``out_dir``, write results.json, results.csv, accuracy.png (and the
    heatmap files). ``results``: the output of :func:`evaluate_lengths`."""
    from .plots import plot_accuracy, plot_heatmap

    keys = sorted(results)
    config = config or {}
    doc = {key: {str(n): results[n][key] for n in keys}
           for key in ("accuracy", "ci95", "correct", "samples", "tokens", "peak_memory_mib", "seconds")}
    doc["memory_measure"] = memory_measure(config.get("device", "cpu"))
    doc["config"], doc["train"] = config, train or {}
    if heatmap is not None:
        doc["heatmap"] = heatmap
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, RESULTS_FILE), "w") as f:
            json.dump(doc, f, indent=2, default=str)
        with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["segments", "tokens", "accuracy", "ci95_low", "ci95_high", "correct", "samples",
                        "peak_memory_mib", "seconds"])
            for n in keys:
                r = results[n]
                w.writerow([n, r["tokens"], f"{r['accuracy']:.6f}", f"{r['ci95'][0]:.6f}", f"{r['ci95'][1]:.6f}",
                            r["correct"], r["samples"], r["peak_memory_mib"], r["seconds"]])
        name = label or config.get("task", "accuracy")
        title = None
        if config.get("backbone"):
            title = (f"RMT ({config['backbone']}, m={config.get('num_mem_tokens')}, {config.get('segment_size')}"
                     f"-token segments): {config.get('task')} accuracy vs length")
        plot_accuracy(os.path.join(out_dir, "accuracy.png"), {name: doc["accuracy"]}, intervals={name: doc["ci95"]},
                      memory=doc["peak_memory_mib"], memory_label=doc["memory_measure"],
                      segment_size=config.get("segment_size"), trained_segments=(train or {}).get("trained_segments"),
                      title=title)
        if heatmap is not None:
            plot_heatmap(os.path.join(out_dir, "heatmap.png"), heatmap)
            with open(os.path.join(out_dir, "heatmap.csv"), "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["train_segments \\ eval_segments"] + list(heatmap["eval_segments"]))
                for n, row in zip(heatmap["train_segments"], heatmap["accuracy"]):
                    w.writerow([n] + [f"{a:.6f}" for a in row])
    return doc


def format_table(doc: dict) -> str:
    """A short text table of a results dict (segments, tokens, accuracy with its 95% interval, peak memory)."""
    lines = [f"{'segments':>8} {'tokens':>11} {'accuracy':>9} {'95% interval':>14} {'samples':>8} {'peak MiB':>9} "
             f"{'sec':>7}", "-" * 72]
    for k in sorted(doc["accuracy"], key=int):
        lo, hi = doc["ci95"][k]
        lines.append(f"{int(k):>8} {doc['tokens'][k]:>11,} {100 * doc['accuracy'][k]:>8.1f}% "
                     f"{f'{100 * lo:.1f}-{100 * hi:.1f}%':>14} {doc['samples'][k]:>8} "
                     f"{doc['peak_memory_mib'][k]:>9.1f} {doc['seconds'][k]:>7.1f}")
    return "\n".join(lines)
