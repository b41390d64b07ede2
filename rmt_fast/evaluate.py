"""Accuracy of a trained RMT at many input lengths (up to 4096 x 499 = 2,043,904 tokens) with flat memory.

Every evaluation runs under ``torch.no_grad`` with the memory carried from segment to segment and nothing
kept per segment: encoders keep only the last segment's logits; decoders run all but the last segment with
``return_logits=False`` and only the last segment (where the answer is) with logits. A tqdm bar runs over the
segments of each batch (``progress=`` of the forward). Peak memory per length: ``torch.cuda.max_memory_allocated``
on CUDA (reset before each length), the process's high-water RSS (``ru_maxrss``) on the CPU.

Outputs (:func:`write_results`): ``results.json`` ``{"accuracy": {"<segments>": acc}, "peak_memory_gb": {...},
"tokens": {...}, "config": ..., "train": ..., "heatmap": ...}``, ``results.csv``, ``accuracy.png`` (accuracy vs
segments on a log2 axis, as Fig. 1 of arXiv 2304.11062) and, when several curriculum stages are evaluated,
``heatmap.png``/``heatmap.csv`` (train length x eval length, as Fig. 5).
"""
from __future__ import annotations

import csv
import json
import os
import resource
import sys
import time

import torch

__all__ = ["predict_correct", "dataset_accuracy", "evaluate_lengths", "evaluate_run", "load_checkpoint",
           "write_results", "plot_accuracy", "plot_heatmap", "format_table", "peak_memory_gb",
           "reset_peak_memory", "parse_lengths", "DEFAULT_LENGTHS"]

#: 1, 2, 4, ..., 4096 segments (4096 x 499 = 2,043,904 tokens)
DEFAULT_LENGTHS = tuple(2 ** i for i in range(13))


def parse_lengths(spec) -> list[int]:
    """"1,2,4" or "1-4096" (powers of two from a to b) or a list -> sorted unique ints >= 1."""
    if isinstance(spec, str):
        spec = spec.strip()
        if "-" in spec and "," not in spec:
            a, b = (int(x) for x in spec.split("-"))
            if a < 1 or b < a:
                raise ValueError(f"lengths: bad range {spec!r}")
            out, x = [], a
            while x <= b:
                out.append(x)
                x *= 2
            if out[-1] != b:
                out.append(b)
            return out
        spec = [int(x) for x in spec.split(",") if x.strip()]
    out = sorted({int(x) for x in spec})
    if not out or out[0] < 1:
        raise ValueError(f"lengths: expected segment counts >= 1, got {spec!r}")
    return out


# ------------------------------------------------------------------------------------------------------
# memory accounting
# ------------------------------------------------------------------------------------------------------
def reset_peak_memory(device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device) -> float:
    """GiB: CUDA max_memory_allocated since the last reset, or the process's peak RSS on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2 ** 30 if sys.platform == "darwin" else 2 ** 20)  # bytes on macOS, KiB on Linux


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
                     rank: int = 0, world: int = 1, desc: str = "", chunk_segments: int | None = 256) -> dict:
    """Accuracy at each length (segments of ``rmt.rmt_config.segment_size`` tokens).

    The input stays on the CPU and goes to the device ``chunk_segments`` segments at a time (memory carried), so
    peak device memory is flat in the length. Returns ``{segments: {"accuracy", "correct", "samples", "tokens",
    "peak_memory_gb", "seconds"}}``.
    """
    from tqdm.auto import tqdm

    from .tasks import make_task
    from .train import autocast_ctx

    device = rmt.device
    s = rmt.rmt_config.segment_size
    lengths = parse_lengths(lengths)
    show = progress and rank == 0
    results = {}
    was_training = rmt.training
    rmt.eval()
    for n in lengths:
        ds = make_task(task, tokenizer, n, s, split=split, seed=seed, noise=noise, babi_path=babi_path,
                       for_decoder=(kind == "decoder"), length=num_samples)
        nb = -(-len(range(rank, num_samples, world)) // batch_size)

        def bar(b, n=n, nb=nb):
            return tqdm(total=n, desc=f"{desc}eval {n} seg x {s} tok, batch {b + 1}/{nb}", unit="seg",
                        disable=not show or n < 64, leave=False, dynamic_ncols=True, mininterval=1.0)

        reset_peak_memory(device)
        t0 = time.time()
        with torch.no_grad(), autocast_ctx(device, bf16):
            correct, total = dataset_accuracy(rmt, ds, kind, range(num_samples), batch_size, device, rank, world,
                                              progress=bar, chunk_segments=chunk_segments)
        dt = time.time() - t0
        results[n] = {"accuracy": correct / max(total, 1), "correct": correct, "samples": total, "tokens": n * s,
                      "peak_memory_gb": round(peak_memory_gb(device), 4), "seconds": round(dt, 3)}
        if show:
            r = results[n]
            print(f"{desc}{n:>5} segments ({n * s:>9,} tokens): accuracy {r['accuracy']:.3f} "
                  f"({correct}/{total}), peak memory {r['peak_memory_gb']:.2f} GB, {dt:.1f}s", flush=True)
    rmt.train(was_training)
    return results


def load_checkpoint(path: str, device="auto"):
    """(rmt, tokenizer, kind, train_config dict) from a stage checkpoint or a training run directory
    (then its last stage)."""
    from .backbones import backbone_kind, load_tokenizer
    from .model import from_pretrained
    from .train import CONFIG_FILE, resolve_device, stage_dirs

    if not os.path.isfile(os.path.join(path, "rmt_config.json")):
        st = stage_dirs(path)
        if not st:
            raise ValueError(f"checkpoint: {path!r} is neither an RMT checkpoint (rmt_config.json) nor a training "
                             "run directory with stage-*seg/ checkpoints")
        path = st[-1][1]
    cfg_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        cfg_path = os.path.join(os.path.dirname(os.path.abspath(path)), CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        raise ValueError(f"checkpoint: no {CONFIG_FILE} at {path!r} or its parent (which backbone/tokenizer?)")
    with open(cfg_path) as f:
        tcfg = json.load(f)
    from .integrations import hf

    hf.register()  # from_pretrained does not register the attention function (wrap() does)
    device = resolve_device(device)
    rmt = from_pretrained(path).to(device).eval()
    tok = load_tokenizer(tcfg["backbone"], tcfg.get("tokenizer", "auto"))
    return rmt, tok, backbone_kind(tcfg["backbone"]), tcfg


def evaluate_run(path: str, lengths=DEFAULT_LENGTHS, num_samples: int = 128, batch_size: int = 32,
                 stages: bool = True, stage_samples: int | None = None, stage_lengths=None, device="auto",
                 bf16: bool = True, progress: bool = True, out_dir: str | None = None, split: str = "test",
                 model=None, tokenizer=None, kind: str | None = None, train_info: dict | None = None) -> dict:
    """Evaluate a training run (or one checkpoint) at ``lengths`` and, with ``stages``, every curriculum stage
    checkpoint (at ``stage_lengths``, default ``lengths``) for the train x eval heatmap. Writes the results to
    ``out_dir`` if given. Returns the results dict of :func:`write_results`.

    ``model``/``tokenizer``/``kind``: evaluate this in-memory model as the final one instead of loading the
    last stage checkpoint.
    """
    from .train import CONFIG_FILE, SUMMARY_FILE, stage_dirs

    lengths = parse_lengths(lengths)
    if model is None:
        model, tokenizer, kind, tcfg = load_checkpoint(path, device)
    else:
        cp = os.path.join(path, CONFIG_FILE) if path else None
        tcfg = json.load(open(cp)) if cp and os.path.isfile(cp) else {}
    task = tcfg.get("task", "memorize")
    seed = tcfg.get("seed", 0)
    noise, babi = tcfg.get("noise"), tcfg.get("babi_path")
    final = evaluate_lengths(model, tokenizer, kind, task, lengths, num_samples, batch_size, seed, split, noise, babi,
                             bf16, progress, desc="[final] ")
    heat = None
    sd = stage_dirs(path) if (stages and path and os.path.isdir(path)) else []
    if len(sd) > 1:
        s_lengths = parse_lengths(stage_lengths) if stage_lengths is not None else lengths
        rows = []
        for n_train, p in sd:
            rmt_s, tok_s, kind_s, _ = load_checkpoint(p, model.device)
            res = evaluate_lengths(rmt_s, tok_s, kind_s, task, s_lengths, stage_samples or num_samples, batch_size,
                                   seed, split, noise, babi, bf16, progress, desc=f"[trained {n_train}] ")
            rows.append([res[n]["accuracy"] for n in s_lengths])
            del rmt_s
        heat = {"train_segments": [n for n, _ in sd], "eval_segments": s_lengths, "accuracy": rows}
    if train_info is None and path and os.path.isfile(os.path.join(path, SUMMARY_FILE)):
        with open(os.path.join(path, SUMMARY_FILE)) as f:
            summ = json.load(f)
        train_info = {k: summ.get(k) for k in ("stages", "seconds", "trained_segments")}
    config = {"task": task, "backbone": tcfg.get("backbone"), "segment_size": model.rmt_config.segment_size,
              "num_mem_tokens": model.rmt_config.num_mem_tokens, "kind": kind, "num_samples": num_samples,
              "batch_size": batch_size, "split": split, "device": str(model.device), "train_config": tcfg}
    return write_results(out_dir, final, config=config, train=train_info, heatmap=heat)


# ------------------------------------------------------------------------------------------------------
# files and figures
# ------------------------------------------------------------------------------------------------------
def write_results(out_dir: str | None, results: dict, config: dict | None = None, train: dict | None = None,
                  heatmap: dict | None = None, label: str | None = None) -> dict:
    """Build the results dict and, if ``out_dir``, write results.json, results.csv, accuracy.png (and the
    heatmap files). ``results``: the output of :func:`evaluate_lengths`."""
    keys = sorted(results)
    doc = {
        "accuracy": {str(n): results[n]["accuracy"] for n in keys},
        "peak_memory_gb": {str(n): results[n]["peak_memory_gb"] for n in keys},
        "tokens": {str(n): results[n]["tokens"] for n in keys},
        "samples": {str(n): results[n]["samples"] for n in keys},
        "seconds": {str(n): results[n]["seconds"] for n in keys},
        "config": config or {},
        "train": train or {},
    }
    if heatmap is not None:
        doc["heatmap"] = heatmap
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(doc, f, indent=2, default=str)
        with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["segments", "tokens", "accuracy", "correct", "samples", "peak_memory_gb", "seconds"])
            for n in keys:
                r = results[n]
                w.writerow([n, r["tokens"], f"{r['accuracy']:.6f}", r["correct"], r["samples"],
                            r["peak_memory_gb"], r["seconds"]])
        trained = (train or {}).get("trained_segments")
        c = config or {}
        name = label or c.get("task", "accuracy")
        title = None
        if c.get("backbone"):
            title = (f"RMT ({c['backbone']}, m={c.get('num_mem_tokens')}, {c.get('segment_size')}-token segments): "
                     f"{c.get('task')} accuracy vs length")
        plot_accuracy(os.path.join(out_dir, "accuracy.png"), {name: doc["accuracy"]}, title=title,
                      memory=doc["peak_memory_gb"], segment_size=(config or {}).get("segment_size"),
                      trained_segments=trained, memory_label=_memory_label(config))
        if heatmap is not None:
            plot_heatmap(os.path.join(out_dir, "heatmap.png"), heatmap)
            with open(os.path.join(out_dir, "heatmap.csv"), "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["train_segments \\ eval_segments"] + list(heatmap["eval_segments"]))
                for n, row in zip(heatmap["train_segments"], heatmap["accuracy"]):
                    w.writerow([n] + [f"{a:.6f}" for a in row])
    return doc


def _memory_label(config) -> str:
    dev = str((config or {}).get("device", ""))
    return "peak GPU memory (GB)" if dev.startswith("cuda") else "peak process RSS (GB)"


def _figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def plot_accuracy(path: str, curves: dict, memory: dict | None = None, segment_size: int | None = None,
                  trained_segments: int | None = None, title: str | None = None,
                  memory_label: str = "peak memory (GB)") -> str:
    """Accuracy (%) vs input length in segments (log2 axis; tokens on the top axis), one line per curve
    (``{label: {segments: accuracy}}``), as Fig. 1 of the paper; peak memory in a lower panel."""
    fig = _figure((8, 6.5 if memory else 4.8))
    if memory:
        gs = fig.add_gridspec(2, 1, height_ratios=[3, 1], hspace=0.08)
        ax, axm = fig.add_subplot(gs[0]), fig.add_subplot(gs[1])
    else:
        ax, axm = fig.add_subplot(1, 1, 1), None
    all_x = set()
    for label, acc in curves.items():
        xs = sorted(int(k) for k in acc)
        ys = [100.0 * float(acc[str(x)] if str(x) in acc else acc[x]) for x in xs]
        all_x.update(xs)
        ax.plot(xs, ys, marker="o", lw=2, label=label)
        for x, y in zip(xs, ys):
            ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
    from matplotlib.ticker import NullLocator

    xs = sorted(all_x)
    for a in (ax, axm):
        if a is not None:
            a.set_xscale("log", base=2)
            a.set_xticks(xs)
            a.set_xticklabels([str(x) for x in xs])
            a.xaxis.set_minor_locator(NullLocator())
            a.grid(True, alpha=0.3)
    if trained_segments:
        ax.axvline(trained_segments, color="gray", ls="--", lw=1)
        ax.text(trained_segments, 2, f" trained on {trained_segments}", color="gray", fontsize=8, va="bottom")
    ax.set_ylim(0, 108)
    ax.set_ylabel("accuracy (%)")
    ax.legend(loc="best")
    if segment_size:
        top = ax.secondary_xaxis("top")
        top.set_xticks(xs)
        top.xaxis.set_minor_locator(NullLocator())
        top.set_xticklabels([_short_tokens(x * segment_size) for x in xs], fontsize=7)
        top.set_xlabel(f"input tokens ({segment_size} per segment)")
    if axm is not None:
        mx = sorted(int(k) for k in memory)
        axm.plot(mx, [float(memory[str(x)] if str(x) in memory else memory[x]) for x in mx], marker="s",
                 color="tab:red")
        axm.set_ylabel(memory_label, fontsize=8)
        axm.set_xlabel("input length (segments)")
        top_val = max(float(v) for v in memory.values()) if memory else 1.0
        axm.set_ylim(0, top_val * 1.3 + 1e-6)
        ax.tick_params(labelbottom=False)
    else:
        ax.set_xlabel("input length (segments)")
    ax.set_title(title or "RMT accuracy vs input length")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _short_tokens(t: int) -> str:
    if t >= 10 ** 6:
        return f"{t / 1e6:.1f}M"
    if t >= 10 ** 3:
        return f"{t / 1e3:.0f}k" if t >= 10 ** 4 else f"{t / 1e3:.1f}k"
    return str(t)


def plot_heatmap(path: str, heatmap: dict, title: str | None = None) -> str:
    """Accuracy of the model trained on ``train_segments`` (rows) evaluated on ``eval_segments`` (columns),
    as Fig. 5 of the paper."""
    import numpy as np

    acc = np.asarray(heatmap["accuracy"], dtype=float) * 100.0
    tr, ev = heatmap["train_segments"], heatmap["eval_segments"]
    fig = _figure((1.0 + 0.75 * len(ev), 1.2 + 0.55 * len(tr)))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(acc, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto", origin="lower")
    ax.set_xticks(range(len(ev)))
    ax.set_xticklabels([str(x) for x in ev])
    ax.set_yticks(range(len(tr)))
    ax.set_yticklabels([str(x) for x in tr])
    ax.set_xlabel("evaluated on (segments)")
    ax.set_ylabel("trained on (segments)")
    for i in range(acc.shape[0]):
        for j in range(acc.shape[1]):
            ax.text(j, i, f"{acc[i, j]:.0f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    ax.set_title(title or "generalisation: train length x eval length")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def format_table(doc: dict) -> str:
    """A short text table of a results dict (segments, tokens, accuracy, peak memory)."""
    lines = [f"{'segments':>8} {'tokens':>11} {'accuracy':>9} {'samples':>8} {'peak GB':>8} {'sec':>7}",
             "-" * 56]
    for k in sorted(doc["accuracy"], key=int):
        lines.append(f"{int(k):>8} {doc['tokens'][k]:>11,} {100 * doc['accuracy'][k]:>8.1f}% "
                     f"{doc['samples'][k]:>8} {doc['peak_memory_gb'][k]:>8.2f} {doc['seconds'][k]:>7.1f}")
    return "\n".join(lines)
