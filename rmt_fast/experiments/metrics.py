"""What the experiments measure: accuracy with its Wilson interval, and peak memory per input length.

Peak memory means one thing per device, and :data:`MEMORY_MEASURES` says which:

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (weights included, as the
  paper's "GPU memory");
* CPU: the peak of the bytes held by tensors created inside the measured block (the memory state, the current
  segment's activations, logits), counted per storage with a dispatch mode. Weights and inputs made before the
  block are not counted. Unlike the process's high-water RSS, this goes down when a shorter input needs less.
"""
from __future__ import annotations

import math

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["accuracy", "wilson_interval", "PeakMemory", "MEMORY_MEASURES", "memory_measure"]

#: device type -> what :class:`PeakMemory` reports there (results.json "memory_measure", figure labels)
MEMORY_MEASURES = {
    "cuda": "peak GPU memory allocated (torch.cuda.max_memory_allocated; weights included)",
    "cpu": "peak CPU memory of tensors created during the forward (weights and input excluded)",
}


def accuracy(correct: int, total: int) -> float:
    """``correct / total``; 0.0 for no samples."""
    return correct / total if total else 0.0


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (95% for z=1.96): sensible at 0% and 100% accuracy, where the
    normal approximation collapses to a point (256 of 256 correct: [0.985, 1.0])."""
    if total <= 0:
        return 0.0, 1.0
    p = correct / total
    denom = 1.0 + z * z / total
    center = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def memory_measure(device) -> str:
    return MEMORY_MEASURES["cuda" if torch.device(device).type == "cuda" else "cpu"]


class PeakMemory:
    """``with PeakMemory(device) as pm: ...`` then ``pm.mib``: the peak of the block (see the module docstring)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.bytes = 0
        self._mode = None

    @property
    def mib(self) -> float:
        return self.bytes / 2 ** 20

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._mode = _LiveTensorBytes()
            self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._mode.__exit__(*exc)
            self.bytes = self._mode.peak
            self._mode = None


class _LiveTensorBytes(TorchDispatchMode):
    """Counts the storages of CPU tensors that ops create while active, until they are freed; keeps the peak.
    Views and in-place results share a counted storage and add nothing."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}  # data_ptr -> (weak ref to the storage, bytes)
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for ptr in [p for p, (ref, _) in self.live.items() if ref.expired()]:
            self.now -= self.live.pop(ptr)[1]
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                st = t.untyped_storage()
                ptr = st.data_ptr()
                if ptr and ptr not in self.live and ptr not in inputs:  # not a view of / in place on an input
                    self.live[ptr] = (StorageWeakRef(st), st.nbytes())
                    self.now += st.nbytes()
        self.peak = max(self.peak, self.now)
        return out
