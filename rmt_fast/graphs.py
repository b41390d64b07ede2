"""CUDA graphs: captured segment steps and training calls, replayed instead of eager Python.

At small batch the eager recurrence waits on Python and kernel launches (measured on an H200: ~14.5 ms per GPT-2
segment eager vs ~4.2 ms graphed). Here the work of a segment (segment ids, embedding, memory placement, backbone,
memory read, decoder loss or classifier record), or of a whole training call, is captured once into CUDA graphs
over static buffers and replayed; per segment the host copies one ``[5, B]`` parameter block. Every segment runs
at the full width (the ragged last segment is padded into the same bucket), so one segment capture serves every
length. If a capture fails: one warning, and the eager path runs instead (same results).

Three kinds of capture, named by what one capture holds:

- :class:`SegmentInferenceGraphs`: one segment's step without autograd, replayed once per segment (inference,
  :func:`run_inference_graphs`);
- :class:`SegmentTrainingGraphs`: one segment's forward and its backward, replayed segment by segment by both sweeps
  of the checkpointed schedule (:mod:`rmt_fast.bptt`);
- :class:`CallGraphs`: a whole full-BPTT training call, every segment, as one forward and one backward graph
  (:func:`run_call_graphs`).

All captures of one model live in one :class:`CaptureCache` (``SegmentRunner.captures``) under one policy: keyed by
what changes a capture, least recently used first, bounded by the bytes their private memory pools hold together.
"""
from __future__ import annotations

import contextlib
import gc
import warnings
import weakref
from typing import NamedTuple

import torch

from .loop import forward_segments
from .schemes import P_GATHER
from .short_term_cache import ShortTermCache


def autocast_state(device_type: str) -> tuple:
    """What a capture must reproduce of the caller's autocast: (device type, enabled, dtype)."""
    return (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))


def captured_autocast(state: tuple):
    """The autocast a captured body runs under. No cast cache: a cached bf16 copy of a weight made during the
    warm-up would be baked into the graph and outlive the optimizer step that changes the weight."""
    device_type, enabled, dtype = state
    return torch.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=False)


CAPTURE_ERROR_MODE = "global"  # torch.cuda.graph's capture_error_mode at every capture site


def recover_from_failed_capture(device: torch.device) -> None:
    """Leave CUDA as it was before a capture that raised: wait for the device, and end the capture state the
    random generator kept (a capture that failed before its end leaves the generator "capturing", and the next
    dropout outside a graph then raises "Offset increment outside graph capture") by capturing one empty graph."""
    torch.cuda.synchronize(device)
    try:
        probe = torch.cuda.CUDAGraph()
        with torch.cuda.graph(probe):
            torch.empty(1, device=device).zero_()
        del probe
    except Exception:  # noqa: BLE001 -- best effort: the caller has already warned and runs eagerly
        pass
    torch.cuda.synchronize(device)


def warn_eager_once(runner, reason: str, message: str) -> None:
    """One RuntimeWarning per model and reason when CUDA-graph training falls back to eager calls (same results,
    slower): the message names the reason and what changes it."""
    if reason not in runner.warned:
        runner.warned.add(reason)
        warnings.warn(f"rmt_fast: {message}", RuntimeWarning, stacklevel=5)


def weak_runner(runner):
    """The runner as the captures hold it: a weak proxy. The runner keeps its captures; a strong reference back would
    make a cycle, and the graphs' memory pools would then outlive the model until Python's cyclic collector ran."""
    return runner if isinstance(runner, weakref.ProxyTypes) else weakref.proxy(runner)


@contextlib.contextmanager
def capture(graph: torch.cuda.CUDAGraph, pool=None):
    """``torch.cuda.graph(graph, pool)`` with Python's cyclic garbage collector paused while it captures: a
    collection that frees an object owning CUDA resources (an earlier graph, an event) calls the CUDA API from inside
    the capture and invalidates it (seen on an H200 as a sporadic failed capture of the training step graphs).
    ``torch.cuda.graph`` collects once before it starts."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        with torch.cuda.graph(graph, pool=pool, capture_error_mode=CAPTURE_ERROR_MODE):
            yield
    finally:
        if enabled:
            gc.enable()


def record(body, pool=None) -> tuple:
    """Capture ``body()`` into a new CUDA graph (under :func:`capture`, in ``pool`` if given); returns ``(graph,
    what body returned)``: the static tensors that every replay of the graph rewrites."""
    graph = torch.cuda.CUDAGraph()
    with capture(graph, pool):
        result = body()
    return graph, result


def warm_up(device: torch.device, body, iterations: int = 2) -> None:
    """Run ``body`` before a capture on a side stream (lazy inits, Triton compiles, allocator), then join it."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(iterations):
            body()
    torch.cuda.current_stream(device).wait_stream(side)


class _Body(torch.nn.Module):
    """Holds the backbone as a submodule so that torch.func.functional_call can swap its parameters around fn."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn):
        return fn()


class ParameterAliases:
    """The trainable parameters of a backbone, and fresh leaf aliases of them (same storage) for a capture.

    A captured backward must not reach a parameter's gradient node (AccumulateGrad) that an earlier eager graph
    still holds: that node belongs to the stream it was made on, and the engine's synchronisation with it
    invalidated captures on an H200 ("operation would make the legacy stream depend on a capturing blocking
    stream"). Inside :meth:`run`, the backbone's parameters are the aliases (``torch.func.functional_call``),
    whose gradient nodes are made by the capture itself. They share storage with the parameters, so optimizer
    steps reach the replays; gradients are taken with respect to the aliases.

    Used by :class:`CallGraphs` and by the eager backward sweep of :mod:`rmt_fast.bptt` (there, so that the
    parameters' own gradient nodes and hooks see one gradient per backward, not one per segment).
    :class:`SegmentTrainingGraphs` (forward and backward in one capture) keeps the parameters: with aliases there, its
    16-segment GPT-2 run fell back to eager speed on the H200 (cause not found; without them it captures in every
    test and benchmark).
    """

    def __init__(self, model: torch.nn.Module, named: list | None = None):
        """named: the ``(name, parameter)`` pairs to alias (default: every trainable parameter of ``model``)."""
        if named is None:
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.parameters = [p for _, p in named]
        self.aliases = None
        self.body = _Body(model)

    def make(self) -> None:
        """New aliases (before the warm-ups, and again right before a capture: no earlier graph holds them)."""
        self.aliases = [p.detach().requires_grad_(True) for p in self.parameters]

    @property
    def leaves(self) -> list:
        """What gradients are taken against: the aliases once made, else the parameters."""
        return self.parameters if self.aliases is None else self.aliases

    def run(self, fn):
        if self.aliases is None:
            return fn()
        from torch.func import functional_call

        return functional_call(self.body, {f"model.{n}": a for n, a in zip(self.names, self.aliases)}, (fn,),
                               tie_weights=True, strict=False)


# All captures of one model together keep at most this share of the GPU's memory in their pools
# (RecurrentMemoryModel.set_capture_memory / wrap(capture_memory=) change it per model); the least recently used
# capture that is not waiting for its backward makes room first.
CAPTURE_MEMORY_FRACTION = 0.25
MAX_RECAPTURES = 3  # a call shape captured this often (evicted by others in between) runs eagerly from then on
CAPTURE_ATTEMPTS = 2  # a failed capture is tried once more before the shape runs eagerly for good


class CaptureCache:
    """Every CUDA-graph capture of one model (all three kinds), under one policy.

    - **Keys** say what changes a capture: its kind (``"inference"``, ``"segment training"``, ``"call"``), the
      batch, the segments of a whole call, what is recorded, the dtypes, device, autocast state and trainable
      parameters.
    - **Bounded by bytes**, not a count: the private memory pools of all captures together stay within
      :meth:`budget` (``budget_bytes``, else :data:`CAPTURE_MEMORY_FRACTION` of the device's memory). A new capture
      makes room by dropping the least recently used captures that are not waiting for their backward; an empty
      cache always takes one capture, whatever its size.
    - **Failures**: a key whose capture failed :data:`CAPTURE_ATTEMPTS` times runs eagerly for good (one warning).
    - Dropping a capture (eviction, :meth:`clear`, the model going away) frees its graphs and pool as soon as no
      pending call holds it; no cyclic garbage collection is needed (the captures hold the runner weakly).

    Each capture has ``pool_bytes`` (what its pool keeps from the rest of the program, measured around the capture)
    and ``available()`` (False while it holds a call's activations waiting for the backward).
    """

    def __init__(self, budget_bytes: int | None = None):
        self.entries: dict = {}  # key -> capture, least recently used first
        self.seen: dict = {}  # key -> calls of a not-captured call shape (CallGraphs capture from the second)
        self.failed: set = set()  # keys that run eagerly for good
        self.budget_bytes = budget_bytes
        self.unit_bytes: dict = {}  # kind -> largest pool bytes per (row x segment) seen: a new capture's estimate

    def __len__(self) -> int:
        return len(self.entries)

    def of_kind(self, kind: str) -> list:
        """The captures of one kind, least recently used first."""
        return [c for k, c in self.entries.items() if k[0] == kind]

    def held(self) -> int:
        """Bytes the pools of every kept capture hold."""
        return sum(c.pool_bytes for c in self.entries.values())

    def budget(self, device: torch.device) -> int:
        if self.budget_bytes is not None:
            return self.budget_bytes
        return int(CAPTURE_MEMORY_FRACTION * torch.cuda.get_device_properties(device).total_memory)

    def get(self, key):
        """The capture kept under ``key`` (now the most recently used), or None."""
        c = self.entries.pop(key, None)
        if c is not None:
            self.entries[key] = c
        return c

    def make_room(self, need: int, budget: int) -> bool:
        """Drop least recently used captures that are not waiting for their backward until ``need`` more bytes
        fit ``budget`` beside the rest; True when they fit (always for an empty cache)."""
        for k in list(self.entries):
            if self.held() + need <= budget:
                break
            if self.entries[k].available():
                del self.entries[k]
        return not self.entries or self.held() + need <= budget

    def estimate(self, kind: str, units: int) -> int:
        """Pool bytes a new capture of ``kind`` over ``units`` (rows x segments) is expected to hold."""
        return int(self.unit_bytes.get(kind, 0) * units)

    def build(self, key, make, device: torch.device, units: int, what: str):
        """Capture with ``make()`` after making room for it; keep and return it, or None when it cannot be kept (the
        captures that would make room wait for their backward) or failed ``CAPTURE_ATTEMPTS`` times (``key`` is
        then never tried again; one RuntimeWarning naming ``what`` and the error)."""
        if key in self.failed:
            return None
        if not self.make_room(self.estimate(key[0], units), self.budget(device)):
            return None
        for attempt in range(CAPTURE_ATTEMPTS):
            try:
                c = make()
                break
            except Exception as e:  # capture is impossible for this model/shape: eager
                recover_from_failed_capture(device)
                if attempt + 1 == CAPTURE_ATTEMPTS:
                    self.failed.add(key)
                    warnings.warn(f"rmt_fast: CUDA graph capture of {what} failed ({type(e).__name__}: {e}); running "
                                  "it eagerly", RuntimeWarning, stacklevel=5)
                    return None
        self.entries.pop(key, None)
        self.entries[key] = c
        self.unit_bytes[key[0]] = max(self.unit_bytes.get(key[0], 0), c.pool_bytes / max(units, 1))
        return c

    def sized(self, key, columns: int, make, device: torch.device, units: int, what: str):
        """The capture kept under ``key`` if its static buffers hold ``columns`` token columns; else a new one from
        ``make(capacity)`` at ``max(columns, 2 x the old capacity)`` (see :meth:`build`), or None. For the segment
        captures, which serve every call length of their shape."""
        c = self.get(key)
        if c is not None and c.capacity >= columns:
            return c
        capacity = max(columns, 2 * c.capacity if c is not None else columns)
        self.discard(key)
        return self.build(key, lambda: make(capacity), device, units, what)

    def discard(self, key) -> None:
        self.entries.pop(key, None)

    def clear(self) -> None:
        """Drop every capture (a call still waiting for its backward keeps its own until then) and what was learnt
        of call shapes; failed keys stay eager, the budget stays."""
        self.entries.clear()
        self.seen.clear()
        self.unit_bytes.clear()


def trainable_ids(model: torch.nn.Module) -> tuple:
    """Part of a training capture's key: which parameters are trainable (a capture differentiates against them)."""
    return tuple(id(p) for p in model.parameters() if p.requires_grad)


def module_modes(model: torch.nn.Module) -> int:
    """Part of every capture's key: which modules are in training mode, one bit per module. A capture bakes in what
    the mode decides (dropout, batch-norm statistics), so ``train()``/``eval()`` switched between calls selects
    another capture instead of replaying the other mode's."""
    bits = 0
    for i, m in enumerate(model.modules()):
        if m.training:
            bits |= 1 << i
    return bits


class _PoolMeter:
    """Measures what a capture's private pool keeps from the rest of the program: the growth of the device's
    reserved memory from the start of the capture (after the warm-up) to its end."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start = torch.cuda.memory_reserved(device)

    def bytes(self) -> int:
        return max(0, torch.cuda.memory_reserved(self.device) - self.start)


class SegmentInferenceGraphs:
    """One segment's step without autograd, captured once for a (batch, recorded output, targets, dtype, device,
    autocast, full segments) shape and replayed once per segment of every call of that shape
    (:func:`run_inference_graphs`). ``capacity``: the token columns its static buffers hold (calls with more tokens
    re-capture at twice the size)."""

    def __init__(self, runner, b: int, capacity: int, memory: torch.Tensor, want_output: bool, has_targets: bool,
                 content_dtype, dense: bool):
        self.runner = weak_runner(runner)
        dev = memory.device
        self.capacity, self.dense = capacity, dense
        self.autocast = autocast_state(dev.type)
        self.content = torch.zeros(b, capacity, dtype=content_dtype, device=dev)
        self.targets = torch.full((b, capacity), -100, dtype=torch.long, device=dev) if has_targets else None
        self.params = torch.zeros(5, b, dtype=torch.long, device=dev)
        self.params[P_GATHER] = -1  # warm-up and capture run with every row idle: memory stays as it is
        self.memory = memory.detach().clone()
        self.cache = None  # the short-term cache in and out (num_cache_tokens): made by the first warm-up step
        self.loss_sum = torch.zeros((), dtype=torch.float32, device=dev)
        self.count = torch.zeros((), dtype=torch.long, device=dev)
        warm_up(dev, lambda: self._body(want_output))
        meter = _PoolMeter(dev)
        # output: static tensors written by every replay, or None
        self.graph, self.output = record(lambda: self._body(want_output))
        self.pool_bytes = meter.bytes()

    def _body(self, want_output: bool):
        r = self.runner
        with captured_autocast(self.autocast):
            res = r.step(self.memory, self.content, self.targets, self.params, r.config.segment_size, want_output,
                         False, self.dense, self.cache)
        self.memory.copy_(res.memory)
        if res.cache is not None:
            if self.cache is None:
                self.cache = static_cache(res.cache)
            copy_cache(self.cache, res.cache)
        self.loss_sum.add_(res.loss_sum)
        self.count.add_(res.count)
        return res.output

    def available(self) -> bool:
        return True  # a replay's results are copied out before the call returns


def _inference_capture(runner, memory, plan, want_output: bool, has_targets: bool, dense: bool):
    """The capture for this call's shape (captured on first use), or None when it cannot be captured or kept."""
    b, tc = plan.content.shape
    key = ("inference", b, want_output, has_targets, memory.dtype, memory.device, autocast_state(memory.device.type),
           dense, module_modes(runner.adapter.model))
    return runner.captures.sized(key, tc, lambda capacity: SegmentInferenceGraphs(
        runner, b, capacity, memory, want_output, has_targets, plan.content.dtype, dense), memory.device, b,
        "the inference step")


def static_cache(like: ShortTermCache) -> ShortTermCache:
    """Static buffers shaped as the short-term cache ``like``, holding an empty cache (no real entries)."""
    return ShortTermCache(tuple(torch.zeros_like(k) for k in like.keys),
                          tuple(torch.zeros_like(v) for v in like.values), torch.zeros_like(like.lens))


def copy_cache(dst: ShortTermCache, src: ShortTermCache | None) -> None:
    """Write the short-term cache ``src`` into the static buffers ``dst`` (None: an empty cache, as a first segment
    sees it: zero keys and values, no real entries)."""
    with torch.no_grad():
        if src is None:
            for t in (*dst.keys, *dst.values, dst.lens):
                t.zero_()
            return
        for d, t in zip((*dst.keys, *dst.values, dst.lens), (*src.keys, *src.values, src.lens)):
            d.copy_(t)


def run_inference_graphs(runner, memory, plan, targets, params, want_output: bool, total_len: int, progress=None,
                         cache: ShortTermCache | None = None):
    """Replay the captured step over every segment; returns the eager runner's result dict, or None when this shape
    cannot be captured (the caller then runs eagerly). Segments whose rows are all full replay a capture with the
    plain-layout kernels (one host read of the segment lengths per call). ``cache``: the short-term cache entering
    the first segment (None: none); the captures carry it from segment to segment in static buffers."""
    full = (plan.lens == runner.config.segment_size).all(1).tolist()
    variants = {}
    for dense in set(full):
        variants[dense] = _inference_capture(runner, memory, plan, want_output, targets is not None, dense)
        if variants[dense] is None:
            return None
    tc = plan.content.shape[1]
    for c in variants.values():
        c.content[:, :tc].copy_(plan.content)
        if targets is not None:
            c.targets[:, :tc].copy_(targets)
        c.loss_sum.zero_()
        c.count.zero_()
    record = runner.scheme.new_record(plan, total_len)
    g_total = plan.num_segments
    rng = range(g_total) if progress is None else progress(range(g_total))
    current = memory
    current_cache = cache  # the short-term cache the next segment reads (None: empty)
    for g in rng:
        c = variants[full[g]]
        if c.memory is not current:
            c.memory.copy_(current)
        if c.cache is not current_cache:
            copy_cache(c.cache, current_cache)
            current_cache = c.cache
        c.params.copy_(params[g])
        c.graph.replay()
        current = c.memory
        if c.output is not None:
            record.add(params[g], c.output)  # copies out of the static buffers before the next replay
    cs = list(variants.values())
    return dict(memory=current.clone(), loss_sum=sum(c.loss_sum for c in cs), count=sum(c.count for c in cs),
                output=record.result(), hidden=None, cache=None if current_cache is None else current_cache.clone())


class SegmentOutputs(NamedTuple):
    """What a replayed training segment gives back, with the fields of ``rmt_fast.recurrence.StepResult`` that the
    segment loop reads."""

    memory: torch.Tensor
    loss_sum: torch.Tensor
    count: torch.Tensor
    output: object
    cache: ShortTermCache | None = None  # the short-term cache the segment leaves (num_cache_tokens)


class SegmentTrainingGraphs:
    """Captured segment steps for checkpointed training (:mod:`rmt_fast.bptt`) on CUDA.

    Two graphs over shared static buffers, every segment at the full width:

    - ``forward``: the no-grad step (memory in -> memory out, loss, count, recorded output);
    - ``backward``: the step recomputed with autograd and differentiated, ``torch.autograd.grad`` of (new memory,
      loss, recorded output) against (memory in, every trainable backbone parameter) with the incoming gradients
      from static buffers; parameter gradients are added into static accumulators, the memory gradient is written
      to a static output. :meth:`finish` hands the accumulated gradients over, which the two-sweep Function
      returns as the gradients of its parameter inputs (once per backward, as in the eager sweeps).

    Dropout draws the same numbers in both graphs of a segment: the generator state saved before the forward
    replay is restored before the backward replay.
    """

    def __init__(self, runner, b: int, capacity: int, memory: torch.Tensor, want_output: bool,
                 targets: torch.Tensor | None, content_dtype, autocast: tuple, dense: bool = False):
        self.runner, self.want_output, self.autocast, self.dense = weak_runner(runner), want_output, autocast, dense
        dev = memory.device
        self.width, self.capacity = runner.config.segment_size, capacity
        self.content = torch.zeros(b, capacity, dtype=content_dtype, device=dev)
        self.targets = None if targets is None else torch.full((b, capacity), -100, dtype=torch.long, device=dev)
        self.params = torch.zeros(5, b, dtype=torch.long, device=dev)
        self.params[P_GATHER] = -1
        self.memory = memory.detach().clone()  # forward: memory in (and out, written in place)
        self.mem_in = memory.detach().clone().requires_grad_(True)  # backward: the leaf differentiated against
        self.grad_memory = torch.zeros_like(self.memory)  # backward: d(new memory), in
        self.grad_mem_in = torch.zeros_like(self.memory)  # backward: d(memory in), out
        self.grad_loss = torch.zeros((), dtype=torch.float32, device=dev)
        # the short-term cache (num_cache_tokens), made by the first warm-up forward: in and out of the forward
        # (written in place), the backward's leaves, d(new cache) in and d(cache in) out, keys then values
        self.cache = self.cache_leaf = self.grad_cache = self.grad_cache_in = None
        self.parameters = [p for p in runner.adapter.model.parameters() if p.requires_grad]
        self.accum = [torch.zeros_like(p) for p in self.parameters]
        warm_up(dev, lambda: (self._forward_body(), self._backward_body()))
        meter = _PoolMeter(dev)
        self.fwd, (self.loss, self.count, self.output) = record(self._forward_body)
        self.grad_outputs = [torch.zeros_like(t) for t in flat_outputs(self.output)]
        self.bwd, _ = record(self._backward_body)
        self.pool_bytes = meter.bytes()
        for t in self.accum:
            t.zero_()
        self.memory.copy_(memory)

    def available(self) -> bool:
        return True  # a two-sweep call holds the captures it uses; dropping one from the cache does not free it

    def _autocast(self):
        return captured_autocast(self.autocast)

    def _forward_body(self):
        with torch.no_grad(), self._autocast():
            res = self.runner.step(self.memory, self.content, self.targets, self.params, self.width,
                                   self.want_output, False, self.dense, self.cache)
            self.memory.copy_(res.memory)
            if res.cache is not None:
                if self.cache is None:
                    self._make_cache_buffers(res.cache)
                copy_cache(self.cache, res.cache)
        return res.loss_sum, res.count, res.output

    def _make_cache_buffers(self, like: ShortTermCache) -> None:
        self.cache = static_cache(like)
        leaf = static_cache(like)
        self.cache_leaf = ShortTermCache(tuple(t.requires_grad_(True) for t in leaf.keys),
                                         tuple(t.requires_grad_(True) for t in leaf.values), leaf.lens)
        self.grad_cache = [torch.zeros_like(t) for t in (*like.keys, *like.values)]
        self.grad_cache_in = [torch.zeros_like(t) for t in (*like.keys, *like.values)]

    def _backward_body(self):
        with torch.enable_grad(), self._autocast():
            res = self.runner.step(self.mem_in, self.content, self.targets, self.params, self.width,
                                   self.want_output, False, self.dense, self.cache_leaf)
        outs, grads = [], []
        if res.cache is not None:
            for out, grad in zip((*res.cache.keys, *res.cache.values), self.grad_cache):
                if out.requires_grad:
                    outs.append(out)
                    grads.append(grad)
        if res.memory.requires_grad:
            outs.append(res.memory)
            grads.append(self.grad_memory)
        if res.loss_sum.requires_grad:
            outs.append(res.loss_sum)
            grads.append(self.grad_loss)
        grad_outputs = getattr(self, "grad_outputs", None) or [torch.zeros_like(t) for t in flat_outputs(res.output)]
        for out, grad in zip(flat_outputs(res.output), grad_outputs):
            if out.requires_grad:
                outs.append(out)
                grads.append(grad)
        cache_leaves = [] if self.cache_leaf is None else [*self.cache_leaf.keys, *self.cache_leaf.values]
        got = torch.autograd.grad(outs, [self.mem_in] + cache_leaves + self.parameters, grads, allow_unused=True)
        _copy_or_zero(self.grad_mem_in, got[0])
        for buf, g in zip(self.grad_cache_in or (), got[1:1 + len(cache_leaves)]):
            _copy_or_zero(buf, g)
        for acc, g in zip(self.accum, got[1 + len(cache_leaves):]):
            if g is not None:
                acc.add_(g)

    def load(self, content: torch.Tensor, targets: torch.Tensor | None) -> None:
        """Copy one call's token ids (and targets) into the static buffers."""
        tc = content.shape[1]
        self.content[:, :tc].copy_(content)
        if targets is not None:
            self.targets.fill_(-100)
            self.targets[:, :tc].copy_(targets)

    def forward(self, memory: torch.Tensor, params: torch.Tensor, cache: ShortTermCache | None = None) -> SegmentOutputs:
        """One segment without autograd (fresh tensors); ``cache``: the short-term cache entering it (None: empty)."""
        self.memory.copy_(memory)
        self.params.copy_(params)
        if self.cache is not None:
            copy_cache(self.cache, cache)
        self.fwd.replay()
        output = None if self.output is None else tuple(t.clone() for t in flat_outputs(self.output))
        if output is not None and not isinstance(self.output, tuple):
            output = output[0]
        return SegmentOutputs(self.memory.clone(), self.loss.clone(), self.count.clone(), output,
                              None if self.cache is None else self.cache.clone())

    def backward(self, memory_in: torch.Tensor, params: torch.Tensor, grad_memory, grad_loss, grad_outputs,
                 cache_in: ShortTermCache | None = None, grad_cache=None) -> tuple:
        """Backpropagate one segment that read ``cache_in`` (None: an empty short-term cache) and whose new cache
        gets ``grad_cache`` (keys then values; None: zeros); returns (d(memory in), d(cache in) as a list of keys
        then values, or None without a cache), fresh tensors. None gradients count as zeros."""
        with torch.no_grad():
            self.mem_in.copy_(memory_in)
        if self.cache_leaf is not None:
            copy_cache(self.cache_leaf, cache_in)
            for buf, g in zip(self.grad_cache, grad_cache or [None] * len(self.grad_cache)):
                _copy_or_zero(buf, g)
        self.params.copy_(params)
        _copy_or_zero(self.grad_memory, grad_memory)
        _copy_or_zero(self.grad_loss, grad_loss)
        for buf, g in zip(self.grad_outputs, grad_outputs or ()):
            _copy_or_zero(buf, g)
        if not grad_outputs:
            for buf in self.grad_outputs:
                buf.zero_()
        self.bwd.replay()
        grad_cache_in = None if self.grad_cache_in is None else [t.clone() for t in self.grad_cache_in]
        return self.grad_mem_in.clone(), grad_cache_in

    def finish(self) -> list:
        """The parameter gradients accumulated since the last call (fresh tensors, in the order of
        ``self.parameters``); resets the accumulators."""
        grads = [acc.clone() for acc in self.accum]
        for acc in self.accum:
            acc.zero_()
        return grads


def flat_outputs(output) -> tuple:
    """A segment's recorded output as a tuple of tensors (it is None, one tensor, or a tuple of them)."""
    if output is None:
        return ()
    return output if isinstance(output, tuple) else (output,)


class ConcatRecord:
    """Per-token outputs ``[B, W, ...]`` of every segment side by side, ``[B, G * W, ...]``: what the scheme's
    TokenRecord gives for a call whose every row fills every segment and keeps every input column (its columns
    are then the identity), without TokenRecord's index arithmetic over the call's plan (which a captured graph
    does not have). What :class:`CallGraphs` records for such calls (see ``SegmentRunner.run``)."""

    def __init__(self):
        self.pieces: list = []

    def add(self, params: torch.Tensor, piece: torch.Tensor) -> None:
        self.pieces.append(piece)

    def result(self) -> torch.Tensor | None:
        return torch.cat(self.pieces, 1) if self.pieces else None


def _copy_or_zero(buf: torch.Tensor, value) -> None:
    if value is None:
        buf.zero_()
    else:
        buf.copy_(value)


class _Owner:
    """Marks the call whose activations a :class:`CallGraphs` holds (weakly referenced: dies with its graph)."""


class CallGraphs:
    """A whole training call with full BPTT (``checkpoint_segments=False``), captured on CUDA as two graphs:

    - ``forward``: every segment with autograd, from the memory in to (memory out, loss sum, count, recorded
      output); the activations autograd saves live in the graph's private memory pool;
    - ``backward``: ``torch.autograd.grad`` of those outputs against (memory in, every trainable backbone
      parameter) with incoming gradients from static buffers.

    This is :func:`torch.cuda.make_graphed_callables`'s construction applied to the segment loop: the step's
    peak memory is full BPTT's (the official loop's), but it stays allocated in the pool between calls. The
    parameter gradients are returned through autograd (hooks, ``torch.autograd.grad`` and DDP see them).

    Only calls whose segments are all full (every row holds segment_size tokens in every segment) are captured,
    with the plain-layout kernels; the others run eagerly. A replay overwrites the saved activations, so one capture
    serves one pending call: a second call made while the first still waits for its backward runs eagerly (same
    results), and a backward through an older call than the capture's last raises.
    """

    def __init__(self, runner, b: int, g_total: int, memory: torch.Tensor, want_output: bool,
                 targets: torch.Tensor | None, content_dtype, autocast: tuple):
        self.runner, self.want_output, self.autocast = weak_runner(runner), want_output, autocast
        dev = memory.device
        self.width = runner.config.segment_size
        self.g_total = g_total
        capacity = g_total * self.width
        self.content = torch.zeros(b, capacity, dtype=content_dtype, device=dev)
        self.targets = None if targets is None else torch.full((b, capacity), -100, dtype=torch.long, device=dev)
        self.params = torch.zeros(g_total, 5, b, dtype=torch.long, device=dev)
        self.params[:, P_GATHER] = -1
        self.mem_in = memory.detach().clone().requires_grad_(True)
        self.cache_in = None  # the short-term cache entering the call (num_cache_tokens): made by the warm-up
        self.params_of = ParameterAliases(runner.adapter.model)
        self.parameters = self.params_of.parameters
        self.owner = None

        def forward_backward():
            outs = self.params_of.run(self._forward_body)
            self.grad_outs = [torch.zeros_like(t) for t in outs if t.requires_grad]
            self._backward_body(outs)

        # The warm-up runs the capture's own code path, parameters swapped for aliases: a torch.compile'd backbone
        # recompiles for plain-tensor parameters here rather than inside the capture (which that invalidated).
        self.params_of.make()
        warm_up(dev, forward_backward)
        self.params_of.make()
        meter = _PoolMeter(dev)
        self.fwd, self.outs = record(lambda: self.params_of.run(self._forward_body))
        self.bwd, self.grads = record(lambda: self._backward_body(self.outs), pool=self.fwd.pool())
        self.pool_bytes = meter.bytes()  # the private pool the two graphs share

    def _forward_body(self) -> list:
        """[memory out, loss sum, count, *recorded output tensors, *short-term cache (keys, values, lens)]: with
        ``num_cache_tokens`` the call reads the cache in ``cache_in`` (no gradient flows into it) and returns the one
        its last segment leaves."""
        r = self.runner
        record = ConcatRecord() if r.scheme.output_per_segment else r.scheme.new_record(None, 0)

        def step(g, memory, cache):
            return r.step(memory, self.content, self.targets, self.params[g], self.width, self.want_output, False, True,
                          cache)

        def collect(g, res):
            if res.output is not None:
                record.add(self.params[g], res.output)

        with torch.enable_grad(), captured_autocast(self.autocast):
            memory, cache, loss_sum, count = forward_segments(r, self.mem_in, self.g_total, step, collect,
                                                              self.cache_in)
            self.structure = None if record.result() is None else isinstance(record.result(), tuple)
        if cache is not None and self.cache_in is None:  # the first warm-up run: the cache's shapes are known now
            self.cache_in = static_cache(cache)
        output = flat_outputs(record.result())
        self.num_outputs = len(output)
        self.cache_layers = 0 if cache is None else len(cache.keys)
        tail = () if cache is None else (*cache.keys, *cache.values, cache.lens)
        return [memory, loss_sum, count, *output, *tail]

    def _backward_body(self, outs):
        diff = [t for t in outs if t.requires_grad]
        return torch.autograd.grad(diff, [self.mem_in] + self.params_of.leaves, self.grad_outs, allow_unused=True)

    def available(self) -> bool:
        """False while the last replayed call still waits for its backward (its activations are in the pool)."""
        return self.owner is None or self.owner() is None

    def load(self, memory, plan, targets, params, cache: ShortTermCache | None = None) -> None:
        tc = plan.content.shape[1]
        if self.cache_in is not None:
            copy_cache(self.cache_in, cache)
        self.content.zero_()
        self.content[:, :tc].copy_(plan.content)
        if targets is not None:
            self.targets.fill_(-100)
            self.targets[:, :tc].copy_(targets)
        self.params.copy_(params)
        with torch.no_grad():
            self.mem_in.copy_(memory)


class _GraphedCall(torch.autograd.Function):
    @staticmethod
    def forward(ctx, graphs: CallGraphs, memory, *parameters):
        graphs.fwd.replay()
        ctx.graphs = graphs
        ctx.owner = _Owner()
        graphs.owner = weakref.ref(ctx.owner)
        outs = [t.clone() for t in graphs.outs]
        ctx.mark_non_differentiable(*(t for t in outs if not t.is_floating_point()))  # the count, the cache's lens
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        graphs = ctx.graphs
        if graphs.owner is None or graphs.owner() is not ctx.owner:
            raise RuntimeError("rmt_fast: backward through a graphed training call whose activations were "
                               "overwritten by a later call; use cuda_graphs=False for this pattern")
        diff = [i for i, t in enumerate(graphs.outs) if t.requires_grad]
        for buf, i in zip(graphs.grad_outs, diff):
            _copy_or_zero(buf, grads[i])
        graphs.bwd.replay()
        graphs.owner = None
        grad_mem = None if graphs.grads[0] is None else graphs.grads[0].clone()
        return (None, grad_mem, *graphs.grads[1:])


_PENDING = ("a full-BPTT training call was made while an earlier call still waits for its backward: it runs eagerly "
            "(the earlier call's capture holds its activations, and a capture waiting for its backward is never "
            "evicted to make room); call backward() before the next forward to keep replaying CUDA graphs")


def run_call_graphs(runner, memory, plan, targets, params, want_output: bool, lens_host: list,
                    cache: ShortTermCache | None = None) -> dict | None:
    """Full-BPTT training of one call through :class:`CallGraphs`; returns the eager runner's result dict, or
    None when this call runs eagerly (first sight of its shape, a ragged segment, a pending earlier call, a failed
    capture). ``lens_host``: ``plan.lens`` as lists (read once by the caller); ``cache``: the short-term cache
    entering the call (None: empty; its gradient is not taken)."""
    if any(min(row) != runner.config.segment_size for row in lens_host):
        # A ragged segment (padding, or a length that is not a multiple of segment_size): eager. Such captures
        # failed on an H200 before ParameterAliases fixed the failure seen with full segments; not re-tried since.
        return None
    b, g_total = plan.content.shape[0], plan.num_segments
    autocast = autocast_state(memory.device.type)
    key = ("call", b, g_total, want_output, targets is not None, memory.dtype, memory.device, autocast,
           runner.config.bptt_depth, trainable_ids(runner.adapter.model), module_modes(runner.adapter.model))
    captures = runner.captures
    graphs = captures.get(key)
    captured = graphs is None
    if graphs is None:
        # capture a shape from its second call on (one-off shapes don't pay for a capture), at most
        # 1 + MAX_RECAPTURES times (each time evicted by other shapes)
        seen = captures.seen
        seen[key] = seen.get(key, 0) + 1
        while len(seen) > 64:
            seen.pop(next(iter(seen)))
        if seen[key] == 2 + MAX_RECAPTURES:
            warn_eager_once(runner, "recaptures", f"full-BPTT training calls of batch {b} x {g_total} segments were "
                            f"captured {MAX_RECAPTURES} times, each time evicted by other call shapes: they run "
                            "eagerly from now on (the captures of all shapes do not fit the capture memory; raise it "
                            "with rmt.set_capture_memory(bytes), see rmt.executor_counts())")
        if seen[key] < 2 or seen[key] > 1 + MAX_RECAPTURES or key in captures.failed:
            return None
        graphs = captures.build(key, lambda: CallGraphs(runner, b, g_total, memory, want_output, targets,
                                                     plan.content.dtype, autocast),
                             memory.device, b * g_total, "the training call")
        if graphs is None:
            if key not in captures.failed:
                warn_eager_once(runner, "pending", _PENDING)  # the captures that would make room wait for backward
            return None
    if not graphs.available():
        warn_eager_once(runner, "pending", _PENDING)
        return None
    graphs.load(memory, plan, targets, params, cache)
    runner.calls["full-BPTT captured" if captured else "full-BPTT graphed"] += 1
    outs = _GraphedCall.apply(graphs, memory, *graphs.parameters)
    n, layers = graphs.num_outputs, graphs.cache_layers
    flat = outs[3:3 + n]
    output = None
    if graphs.structure is not None:
        output = tuple(flat) if graphs.structure else flat[0]
    cache = None
    if layers:
        kv = outs[3 + n:]
        cache = ShortTermCache(tuple(kv[:layers]), tuple(kv[layers:2 * layers]), kv[2 * layers])
    return dict(memory=outs[0], loss_sum=outs[1], count=outs[2], output=output, hidden=None, cache=cache)
