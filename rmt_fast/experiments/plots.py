"""The experiments' figures (PNG, matplotlib's Agg canvas: no pyplot, no global backend change; matplotlib is
imported inside each function).

* :func:`plot_accuracy`: accuracy vs input length on a log2 axis (Fig. 1 of arXiv 2304.11062), one line per
  curve with its 95% Wilson band, and a peak-memory panel below, labelled with what was measured;
* :func:`plot_heatmap`: train length x eval length (Fig. 5);
* :func:`plot_curves`: training loss and validation accuracy against the step, over a curriculum's stages (one
  figure per run, or several runs side by side);
* :func:`plot_speedup`: FLOPs of full attention / FLOPs of RMT vs input tokens (Fig. 3).
"""
from __future__ import annotations

import os

__all__ = ["plot_accuracy", "plot_heatmap", "plot_curves", "plot_speedup"]


def _figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _get(d: dict, x: int):
    return d[str(x)] if str(x) in d else d[x]


def _short_tokens(t: int) -> str:
    if t >= 10 ** 6:
        return f"{t / 1e6:.1f}M"
    if t >= 10 ** 3:
        return f"{t / 1e3:.0f}k" if t >= 10 ** 4 else f"{t / 1e3:.1f}k"
    return str(t)


def plot_accuracy(path: str, curves: dict, memory: dict | None = None, memory_label: str | None = None,
                  intervals: dict | None = None, segment_size: int | None = None,
                  trained_segments: int | None = None, title: str | None = None) -> str:
    """Accuracy (%) vs input length in segments.

    curves: ``{label: {segments: accuracy in [0, 1]}}``. intervals: ``{label: {segments: (low, high)}}`` drawn as
    bands. memory: ``{segments: MiB}`` for the lower panel, whose y label is ``memory_label`` (say what was
    measured); no panel without ``memory``. segment_size: adds a top axis in tokens.
    """
    from matplotlib.ticker import NullLocator

    fig = _figure((8, 6.5 if memory else 4.8))
    if memory:
        gs = fig.add_gridspec(2, 1, height_ratios=[3, 1], hspace=0.2)
        ax, axm = fig.add_subplot(gs[0]), fig.add_subplot(gs[1])
    else:
        ax, axm = fig.add_subplot(1, 1, 1), None
    all_x = set()
    for label, acc in curves.items():
        xs = sorted(int(k) for k in acc)
        ys = [100.0 * float(_get(acc, x)) for x in xs]
        all_x.update(xs)
        line, = ax.plot(xs, ys, marker="o", lw=2, label=label)
        band = (intervals or {}).get(label)
        if band:
            ax.fill_between(xs, [100.0 * _get(band, x)[0] for x in xs], [100.0 * _get(band, x)[1] for x in xs],
                            color=line.get_color(), alpha=0.15, lw=0)
        for x, y in zip(xs, ys):
            ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
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
    ax.set_ylabel("accuracy (%)" + (", 95% Wilson band" if intervals else ""))
    ax.legend(loc="best")
    if segment_size:
        top = ax.secondary_xaxis("top")
        top.set_xticks(xs)
        top.xaxis.set_minor_locator(NullLocator())
        top.set_xticklabels([_short_tokens(x * segment_size) for x in xs], fontsize=7)
        top.set_xlabel(f"input tokens ({segment_size} per segment)")
    if axm is not None:
        mx = sorted(int(k) for k in memory)
        my = [float(_get(memory, x)) for x in mx]
        axm.plot(mx, my, marker="s", color="tab:red")
        axm.set_ylabel("peak MiB", fontsize=8)
        axm.set_title(memory_label or "peak memory", fontsize=8, loc="left")
        axm.set_xlabel("input length (segments)")
        axm.set_ylim(0, max(my) * 1.3 + 1e-6)
        ax.tick_params(labelbottom=False)
    else:
        ax.set_xlabel("input length (segments)")
    ax.set_title(title or "RMT accuracy vs input length")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def plot_heatmap(path: str, heatmap: dict, title: str | None = None) -> str:
    """Accuracy of the model trained on ``train_segments`` (rows) evaluated on ``eval_segments`` (columns)."""
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


def plot_curves(path: str, runs: dict, title: str | None = None) -> str:
    """Training loss (log scale, upper panel) and validation accuracy (lower panel) against the global step.

    runs: ``{label: history}``, a history being the trainer's list of validation records (``global_step``,
    ``loss``: the mean training loss since the previous record, ``val_accuracy``, ``num_segments``, and optionally
    ``val_accuracy_multiple`` / ``val_segments_multiple``). The accuracy at the longer validation length is dashed.
    With one run, each curriculum stage's first step gets a vertical line labelled with its segments.
    """
    fig = _figure((9, 6.5))
    ax_l = fig.add_subplot(2, 1, 1)
    ax_a = fig.add_subplot(2, 1, 2, sharex=ax_l)
    for label, hist in runs.items():
        if not hist:
            continue
        xs = [h["global_step"] for h in hist]
        line, = ax_l.plot(xs, [max(h["loss"], 1e-12) for h in hist], lw=1.2, label=label)
        ax_a.plot(xs, [100.0 * h["val_accuracy"] for h in hist], lw=1.5, color=line.get_color(), label=label)
        multi = [(h["global_step"], 100.0 * h["val_accuracy_multiple"]) for h in hist if "val_accuracy_multiple" in h]
        if multi:
            ax_a.plot(*zip(*multi), lw=1, ls="--", color=line.get_color(),
                      label=f"{label}: at the longer validation length")
    if len(runs) == 1:
        hist = next(iter(runs.values())) or []
        prev = None
        for h in hist:
            if h["num_segments"] != prev:
                start = h["global_step"] - h["step"]
                for a in (ax_l, ax_a):
                    a.axvline(start, color="gray", lw=0.6, ls=":")
                ax_a.text(start, 2, f" {h['num_segments']}", color="gray", fontsize=7, va="bottom")
                prev = h["num_segments"]
    ax_l.set_yscale("log")
    ax_l.set_ylabel("training loss (mean between validations)")
    ax_l.grid(True, alpha=0.3)
    ax_l.tick_params(labelbottom=False)
    ax_a.set_ylim(0, 102)
    ax_a.set_ylabel("validation accuracy (%)")
    ax_a.set_xlabel("optimizer step" + (" (dotted: a stage starts; its segments below)" if len(runs) == 1 else ""))
    ax_a.grid(True, alpha=0.3)
    ax_a.legend(loc="best", fontsize=7)
    ax_l.set_title(title or "training curves")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def plot_speedup(path, rows: list[dict], title: str) -> str:
    """Log-log plot of the FLOP ratio vs input tokens, one line per model: ``rows`` as
    :func:`rmt_fast.experiments.flops.fig3_table` returns them."""
    if path is None or (isinstance(path, str) and not path):
        raise ValueError("path: expected a file path")
    fig = _figure((7, 5))
    ax = fig.add_subplot(1, 1, 1)
    xs = [r["tokens"] for r in rows]
    for key in [k for k in rows[0] if k != "tokens"]:
        ax.plot(xs, [r[key] for r in rows], marker="o", label=key)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("input tokens")
    ax.set_ylabel("FLOPs full attention / FLOPs RMT")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = os.fspath(path)
    fig.savefig(out, format="png", dpi=100)
    return out
