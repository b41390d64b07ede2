"""Checkpointed BPTT as an explicit two-sweep schedule, behind the ordinary ``loss.backward()``.

Full BPTT keeps every segment's activations until the backward pass: memory grows with the number of segments.
Here (``checkpoint_segments=True``):

1. **forward sweep** without autograd: run every segment once, keep only the memory entering each segment
   (``[G, B, m, d]``) and the short-term cache entering it (``num_cache_tokens``), the RNG state before it
   (dropout is replayed exactly) and what the caller asked for (the loss sum, the final memory, the recorded
   outputs);
2. **backward sweep**, from the last segment to the first: recompute segment ``g`` with autograd from its saved
   memory (and cache) and backpropagate its loss, its recorded outputs and its new memory and cache (whose
   gradients came from segment ``g + 1``); ``d memory_g`` (and ``d cache_g``) is handed back to segment ``g - 1``
   (dropped where ``bptt_depth`` cuts the graph, as full BPTT's ``detach`` does).

The backbone's trainable parameters are inputs of the autograd Function, and the backward sweep recomputes on leaf
aliases of them (:class:`rmt_fast.graphs.ParameterAliases`), whose ``.grad`` sums the segments; those sums are the
gradients the Function returns. So each parameter's gradient arrives once per backward, as with full BPTT:
``torch.autograd.grad``, gradient hooks and DistributedDataParallel (one reduction per parameter and step) see an
ordinary backward. Parameters that FSDP2 (``fully_shard``) manages below the model are the exception: FSDP swaps
them for their unsharded versions around every module call, so they are not aliased; the recompute reaches them
directly and FSDP's own hooks reduce-scatter their gradients as each segment's backward produces them.

The gradients equal full BPTT's (up to the order of floating-point summation). Peak memory is one segment's
activations, the saved memories and one set of parameter gradients.
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass

import torch

from .graphs import (ParameterAliases, SegmentTrainingGraphs, autocast_state, flat_outputs, module_modes,
                     trainable_ids)
from .loop import forward_segments
from .schemes import P_LAST
from .short_term_cache import ShortTermCache


@dataclass
class _Sweep:
    """Everything the two sweeps share (non-differentiable inputs and host-side facts about the segments)."""

    runner: object
    plan: object
    named: list  # (name, parameter): the Function's differentiable inputs after the memory (see the module doc)
    targets: torch.Tensor | None
    params: torch.Tensor
    widths: list
    dense: list
    records: list  # per segment: whether its output is recorded (returned)
    want_output: bool
    progress: object = None
    graphs: list | None = None  # per segment, the rmt_fast.graphs.SegmentTrainingGraphs that replays it; None: eager
    structure: list | None = None  # per recorded segment: number of tensors in its output (tuple or single)
    rng: list | None = None
    cache_in: object = None  # the short-term cache entering the first segment (a previous call's, detached; or None)
    caches: list | None = None  # per segment, the short-term cache entering it (None: none)
    cache_out: object = None  # the short-term cache the last segment leaves (detached)
    rng_after: object = None
    autocast: tuple | None = None
    fsdp_states: list = ()  # FSDP2 states of the fully_shard modules inside the backbone


class _TwoSweep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sweep: _Sweep, memory, *parameters):
        r = sweep.runner
        device = memory.device
        sweep.autocast = autocast_state(device.type)
        keep_rng = r.adapter.model.training or sweep.graphs is not None
        sweep.rng = [] if keep_rng else None
        states, outputs, structure = [], [], []
        sweep.caches = []

        def before(g, memory, cache):
            states.append(memory)
            sweep.caches.append(cache)
            if keep_rng:
                sweep.rng.append(_rng_state(device))

        def step(g, memory, cache):
            if sweep.graphs is not None:
                return sweep.graphs[g].forward(memory, sweep.params[g], cache)
            return r.step(memory, sweep.plan.content, sweep.targets, sweep.params[g], sweep.widths[g],
                          sweep.want_output and sweep.records[g], False, sweep.dense[g], cache)

        def collect(g, res):
            if res.output is not None and sweep.records[g]:
                flat = flat_outputs(res.output)
                structure.append(len(flat))
                outputs.extend(flat)

        memory, cache, loss_sum, count = forward_segments(r, memory, sweep.plan.num_segments, step, collect,
                                                          sweep.cache_in, before=before, progress=sweep.progress)
        sweep.structure = structure
        sweep.cache_out = None if cache is None else cache.detach()
        if sweep.rng is not None:
            sweep.rng_after = _rng_state(device)
        ctx.sweep = sweep
        ctx.save_for_backward(*states)
        ctx.mark_non_differentiable(count)
        return (memory, loss_sum, count, *outputs)

    @staticmethod
    def backward(ctx, grad_memory, grad_loss, _grad_count, *grad_outputs):
        sweep = ctx.sweep
        r = sweep.runner
        states = ctx.saved_tensors
        g_total = sweep.plan.num_segments
        # which recorded outputs belong to which segment
        per_segment, k, i = {}, 0, 0
        for g in range(g_total):
            if sweep.records[g] and sweep.want_output:
                n = sweep.structure[i]
                per_segment[g] = grad_outputs[k:k + n]
                k, i = k + n, i + 1
        grad_first = grad_cache = None
        param_grads = [None] * len(sweep.named)
        aliases = None
        if sweep.graphs is None:
            aliases = ParameterAliases(r.adapter.model, sweep.named)
            aliases.make()
        for g in reversed(range(g_total)):
            seg_grads = per_segment.get(g, ())
            has_out_grad = any(t is not None for t in seg_grads)
            if grad_memory is None and grad_loss is None and grad_cache is None and not has_out_grad:
                continue  # nothing downstream of this segment needs a gradient
            cut = r.config.cuts_memory_before(g, g_total)
            if sweep.graphs is not None:
                _set_rng_state(states[g].device, sweep.rng[g])
                grad_in, grad_cache_in = sweep.graphs[g].backward(states[g], sweep.params[g], grad_memory,
                                                                  grad_loss, seg_grads, sweep.caches[g], grad_cache)
                if g == 0:
                    grad_first = grad_in
                else:
                    grad_memory = None if cut else grad_in
                    grad_cache = None if cut else grad_cache_in
                continue
            mem_in = states[g].detach().requires_grad_(not cut and (g > 0 or ctx.needs_input_grad[1]))
            cache_in = sweep.caches[g]
            if cache_in is not None:
                cache_in = ShortTermCache(*(tuple(t.detach().requires_grad_(not cut) for t in kv)
                                            for kv in cache_in[:2]), cache_in.lens)
            with contextlib.ExitStack() as stack:
                if sweep.rng is not None:
                    stack.enter_context(torch.random.fork_rng(devices=_rng_devices(mem_in.device)))
                    _set_rng_state(mem_in.device, sweep.rng[g])
                stack.enter_context(torch.enable_grad())
                # the aliases stand in for the parameters through the backward too: a reentrant activation
                # checkpoint inside the backbone recomputes its layers there
                aliases.run(lambda: _backpropagate_segment(sweep, g, mem_in, grad_memory, grad_loss, seg_grads,
                                                           cache_in, grad_cache))
            if sweep.fsdp_states:
                _fsdp_recompute_as_forward(sweep.fsdp_states)
            if g == 0:
                grad_first = mem_in.grad
            else:
                grad_memory = None if cut else mem_in.grad
                grad_cache = None if cut or cache_in is None else [t.grad for t in (*cache_in.keys, *cache_in.values)]
        if sweep.graphs is None:
            param_grads = [a.grad for a in aliases.aliases]
        else:
            for graphs in {id(x): x for x in sweep.graphs}.values():
                for i, grad in enumerate(graphs.finish()):
                    param_grads[i] = grad if param_grads[i] is None else param_grads[i].add_(grad)
            _set_rng_state(states[0].device, sweep.rng_after)
        return (None, grad_first, *param_grads)


def _backpropagate_segment(sweep: _Sweep, g: int, mem_in, grad_memory, grad_loss, seg_grads, cache_in=None,
                           grad_cache=None) -> None:
    """Recompute segment ``g`` from ``mem_in`` (and the short-term cache ``cache_in``) and backpropagate the
    gradients of its new memory, its loss, its recorded outputs and its new cache (``grad_cache``: keys then values,
    as :class:`ShortTermCache` holds them; None: no gradient) into ``mem_in``, ``cache_in`` and the parameters
    (their aliases)."""
    device_type, autocast_on, autocast_dtype = sweep.autocast
    with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on):
        res = sweep.runner.step(mem_in, sweep.plan.content, sweep.targets, sweep.params[g], sweep.widths[g],
                                bool(seg_grads), False, sweep.dense[g], cache_in)
    outs, grads = [], []
    if grad_cache is not None:
        for out, grad in zip((*res.cache.keys, *res.cache.values), grad_cache):
            if grad is not None and out.requires_grad:
                outs.append(out)
                grads.append(grad)
    if grad_memory is not None and res.memory.requires_grad:
        outs.append(res.memory)
        grads.append(grad_memory)
    if grad_loss is not None and res.loss_sum.requires_grad:
        outs.append(res.loss_sum)
        grads.append(grad_loss)
    for out, grad in zip(flat_outputs(res.output), seg_grads):
        if grad is not None and out.requires_grad:
            outs.append(out)
            grads.append(grad)
    if outs:
        torch.autograd.backward(outs, grads)


def _segment_training_graphs(runner, memory, plan, targets, want_output, dense):
    """The runner's captured training graphs for this call's shape (captured on first use), or None when capture
    is impossible (one warning; the eager sweeps run instead)."""
    b, tc = plan.content.shape
    autocast = autocast_state(memory.device.type)
    key = ("segment training", b, want_output, targets is not None, memory.dtype, memory.device, autocast, dense,
           trainable_ids(runner.adapter.model), module_modes(runner.adapter.model))
    graphs = runner.captures.sized(key, tc, lambda capacity: SegmentTrainingGraphs(
        runner, b, capacity, memory, want_output, targets, plan.content.dtype, autocast, dense), memory.device, b,
        "the training step")
    if graphs is None:
        return None
    graphs.load(plan.content, targets)
    return graphs


def fsdp_modules(model: torch.nn.Module) -> list:
    """The FSDP2 (``fully_shard``) modules inside ``model``."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: no module is sharded
    if fsdp is None:
        return []
    return [m for m in model.modules() if isinstance(m, fsdp.FSDPModule)]


def _fsdp_states(modules: list) -> list:
    """The FSDP2 states of ``modules``, whose training state the backward sweep resets after every segment."""
    if not modules:
        return []
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState

        states = [m._get_fsdp_state() for m in modules]
        if not all(isinstance(getattr(s, "_training_state", None), TrainingState) for s in states):
            raise AttributeError("an FSDP state without a TrainingState _training_state")
    except (ImportError, AttributeError) as e:
        raise RuntimeError("rmt_fast: checkpoint_segments=True with fully_shard modules inside the backbone relies "
                           f"on FSDP2's training states as torch 2.13 has them ({type(e).__name__}: {e}); use "
                           "checkpoint_segments=False, or fully_shard the RMT model only") from e
    return states


def _fsdp_recompute_as_forward(states: list) -> None:
    """After a segment's backward, put the FSDP2 states back to idle. FSDP keeps a module "in backward" from its
    first gradient to the end of the whole backward and takes any forward it sees then for the recompute of
    activation checkpointing, whose hooks the original forward registered: the next segment's recompute would run
    without the hooks that reduce-scatter its gradients. Idle, each recompute runs FSDP's forward hooks (unshard,
    the gradient hooks) as the first did."""
    from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState

    for state in states:
        state._training_state = TrainingState.IDLE


def _rng_devices(device: torch.device) -> list:
    return [device] if device.type == "cuda" else []


def _rng_state(device: torch.device) -> torch.Tensor:
    """The generator state dropout draws from on ``device`` (CUDA: 16 bytes; CPU: about 5 KB)."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def run_two_sweep(runner, memory, plan, targets, params, want_output: bool, total_len: int, progress=None,
                  cache: ShortTermCache | None = None) -> dict:
    """The recurrence with the two-sweep schedule; returns what :meth:`SegmentRunner.run_eager` returns. ``cache``:
    the short-term cache entering the first segment (a previous call's; no gradient flows back into it)."""
    lens_host = plan.lens.tolist()  # one host sync for all segments
    widths = [max(row) for row in lens_host]
    dense = [min(row) == w for row, w in zip(lens_host, widths)]
    ends = params[:, P_LAST].any(1).tolist()
    records = [bool(want_output and (e or runner.scheme.output_per_segment)) for e in ends]
    model = runner.adapter.model
    fsdp = fsdp_modules(model)
    sharded = {id(p) for m in fsdp for p in m.parameters()}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in sharded]
    sweep = _Sweep(runner, plan, named, targets, params, widths, dense, records, want_output, progress,
                   fsdp_states=_fsdp_states(fsdp), cache_in=None if cache is None else cache.detach())
    if runner.config.graphs_enabled and memory.is_cuda and not fsdp:
        # Segments whose rows are all full replay captures with the plain-layout kernels. A capture records its
        # per-token outputs (a decoder's logits with keep_logits=True) at the full segment width; the record places
        # the columns that hold tokens and discards the rest, as it does for an eager segment's narrower output.
        full = [min(row) == runner.config.segment_size for row in lens_host]
        variants = {f: _segment_training_graphs(runner, memory, plan, targets, want_output, f) for f in set(full)}
        if all(v is not None for v in variants.values()):
            sweep.graphs = [variants[f] for f in full]
    runner.calls["two-sweep eager" if sweep.graphs is None else "two-sweep graphed"] += 1
    memory, loss_sum, count, *outputs = _TwoSweep.apply(sweep, memory, *(p for _, p in named))
    record = runner.scheme.new_record(plan, total_len)
    it = iter(outputs)
    j = 0
    for g in range(plan.num_segments):
        if records[g]:
            n = sweep.structure[j]
            j += 1
            flat = tuple(next(it) for _ in range(n))
            record.add(params[g], flat if n > 1 else flat[0])
    # the short-term cache the last segment leaves, for a following call (no gradient flows back through it)
    return dict(memory=memory, loss_sum=loss_sum, count=count, output=record.result(), hidden=None,
                cache=sweep.cache_out)
