"""Shared helpers of the benchmark scripts: timing, environment line, CSV / PNG / RESULTS.md output."""
from __future__ import annotations

import csv
import datetime
import os
import platform
import statistics
import sys
import time

import torch


def env_line() -> str:
    import transformers

    try:
        import triton

        tv = triton.__version__
    except Exception:
        tv = "absent"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'x86'})"
    return (f"{datetime.date.today().isoformat()}, {gpu}, torch {torch.__version__}, triton {tv}, "
            f"transformers {transformers.__version__}")


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timeit(fn, warmup: int = 1, reps: int = 3) -> float:
    """Median wall seconds of ``fn()`` (synchronised)."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_gib(fn) -> float:
    """Peak CUDA memory (GiB) allocated while ``fn()`` runs (0 on CPU)."""
    if not torch.cuda.is_available():
        fn()
        return 0.0
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2 ** 30


def write_csv(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def markdown_table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def append_results(path: str, title: str, body: str) -> None:
    cmd = "python " + " ".join(sys.argv)
    with open(path, "a") as f:
        f.write(f"\n## {title}\n\n{env_line()}\n\nCommand: `{cmd}`\n\n{body}\n")
