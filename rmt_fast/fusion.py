"""Fused kernels for Llama-family backbones during rmt_fast's own inference calls (``RMTConfig.fused_kernels``).

:func:`install` swaps the pieces a family lists (``fused_blocks`` in rmt_fast/adapters.py: Llama, Mistral,
Qwen2/3 all three, Phi-3 the norms) for the one-kernel versions in :mod:`rmt_fast.ops.block_kernels`:

- "rms_norm": every ``*RMSNorm`` module (instance ``forward``);
- "swiglu": every MLP computing ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` with a SiLU ``act_fn``
  (instance ``forward``);
- "rotary": the ``apply_rotary_pos_emb`` of the module that defines the attention layers (a module global, which
  they call), replaced by a dispatcher that calls the original outside rmt_fast.

Each replacement runs its kernel only when all of these hold, and the model's own code otherwise: inside a segment
call of an RMT built with ``fused_kernels=True`` (:func:`segment_active`, entered by
``integrations.hf.segment_call``), gradients off (``torch.no_grad``/``inference_mode``: the kernels have no
backward), a CUDA tensor of fp16, bf16 or fp32, not while ``torch.compile`` traces (inductor fuses these itself),
and shapes the kernels take. So the bare model, training, an RMT with ``fused_kernels=False`` over the same
backbone, and other models of the same family in the process run exactly as before.

The kernels round where the HuggingFace code rounds; outputs equal the model's own code's to one rounding step
(the GPU contracts multiply-adds, and RMSNorm's mean is summed in another order). Tests compare them: fp32 and fp16
on the CPU interpreter, bf16 too on the GPU.
"""
from __future__ import annotations

import contextlib
import contextvars
import sys
import types
import warnings

import torch

ALLOW_CPU = False  # tests set True to run the kernels on CPU tensors under TRITON_INTERPRET=1

# Inside a segment call that may use the kernels: per thread and per asyncio task, so that concurrent calls (of
# RMTs with and without fused_kernels) and nested ones each see their own.
_active: contextvars.ContextVar[bool] = contextvars.ContextVar("rmt_fast_fusion_active", default=False)


@contextlib.contextmanager
def segment_active(fused: bool):
    """Let the installed kernels run (``fused``) or not for the duration of one segment call, in this thread (or
    asyncio task) only; nested calls restore the outer one's setting on exit."""
    token = _active.set(bool(fused))
    try:
        yield
    finally:
        _active.reset(token)


_block_kernels = None


def _kernels():
    """rmt_fast.ops.block_kernels, imported on first use (it imports Triton); called on every fused forward."""
    global _block_kernels
    if _block_kernels is None:
        from .ops import block_kernels

        _block_kernels = block_kernels
    return _block_kernels


_failed = False  # a kernel raised (e.g. Triton cannot compile for this GPU): the model's code from then on


def _usable(x: torch.Tensor) -> bool:
    # is_compiling() first: under torch.compile it is a constant and nothing after it is traced (no guards)
    return (not torch.compiler.is_compiling() and _active.get() and not _failed and not torch.is_grad_enabled()
            and (x.is_cuda or ALLOW_CPU) and _kernels().supported(x))


def _give_up(error: Exception) -> None:
    global _failed
    _failed = True
    warnings.warn(f"rmt_fast: the fused block kernels failed ({type(error).__name__}: {error}); running the model's "
                  "own code from now on", RuntimeWarning, stacklevel=3)


def _norm_forward(self, hidden_states):
    if _usable(hidden_states) and hidden_states.shape[-1] <= _kernels().MAX_NORM_DIM:
        try:
            return _kernels().rms_norm(hidden_states, self.weight, self.variance_epsilon)
        except Exception as e:  # noqa: BLE001 -- fall back to the model's code, once warned
            _give_up(e)
    return type(self).forward(self, hidden_states)


def _mlp_forward(self, x):
    if _usable(x):
        gate, up = self.gate_proj(x), self.up_proj(x)
        try:
            return self.down_proj(_kernels().silu_mul(gate, up))
        except Exception as e:  # noqa: BLE001
            _give_up(e)
            return self.down_proj(self.act_fn(gate) * up)
    return type(self).forward(self, x)


def _fused_rotary(original):
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        unsqueeze_dim = args[0] if args else kwargs.get("unsqueeze_dim", 1)
        if (len(args) + len(kwargs) <= 1 and unsqueeze_dim == 1 and _usable(q) and q.dim() == 4 and k.dim() == 4
                and cos.dim() == 3 and q.shape[-1] % 2 == 0 and cos.shape[-1] == q.shape[-1] == k.shape[-1]
                and cos.shape == sin.shape and cos.shape[0] in (1, q.shape[0]) and cos.shape[1] == q.shape[2]
                and k.dtype == q.dtype == cos.dtype == sin.dtype and k.shape[2] == q.shape[2]):
            bk = _kernels()
            try:
                return bk.rotary(q, cos, sin), bk.rotary(k, cos, sin)
            except Exception as e:  # noqa: BLE001
                _give_up(e)
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb.rmt_fast_original = original
    return apply_rotary_pos_emb


def _is_silu(act) -> bool:
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"


def install(model: torch.nn.Module, pieces=("rms_norm", "rotary", "swiglu")) -> list[str]:
    """Install the fused forwards of ``pieces`` (a family's ``fused_blocks``) in ``model`` (idempotent); returns
    those it found ("rms_norm", "rotary", "swiglu"), empty without Triton. They run only where
    :func:`segment_active` allows."""
    from .ops import triton_available

    unknown = set(pieces) - {"rms_norm", "rotary", "swiglu"}
    if unknown:
        raise ValueError(f"pieces: unknown {sorted(unknown)}; allowed: rms_norm, rotary, swiglu")
    if not pieces or not triton_available():
        return []
    done = set()
    for m in model.modules():
        name = type(m).__name__
        if ("rms_norm" in pieces and name.endswith("RMSNorm") and hasattr(m, "variance_epsilon")
                and getattr(m, "weight", None) is not None):
            if "forward" not in m.__dict__:
                m.forward = types.MethodType(_norm_forward, m)
            done.add("rms_norm")
        elif ("swiglu" in pieces and _is_silu(getattr(m, "act_fn", None))
              and all(isinstance(getattr(m, p, None), torch.nn.Module) for p in ("gate_proj", "up_proj", "down_proj"))):
            if "forward" not in m.__dict__:
                m.forward = types.MethodType(_mlp_forward, m)
            done.add("swiglu")
        elif "rotary" in pieces and name.endswith("Attention"):
            module = sys.modules.get(type(m).__module__)
            if callable(getattr(module, "apply_rotary_pos_emb", None)):
                if not hasattr(module.apply_rotary_pos_emb, "rmt_fast_original"):
                    module.apply_rotary_pos_emb = _fused_rotary(module.apply_rotary_pos_emb)
                done.add("rotary")
    return sorted(done)


def uninstall(model: torch.nn.Module) -> None:
    """Restore ``model``'s modules' own forwards (the family's rotary dispatcher stays: outside segment calls
    that allow the kernels it calls the original)."""
    for m in model.modules():
        fwd = m.__dict__.get("forward")
        if isinstance(fwd, types.MethodType) and fwd.__func__ in (_norm_forward, _mlp_forward):
            del m.forward
