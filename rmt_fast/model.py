"""RecurrentMemoryModel: a HuggingFace backbone plus a learned memory, run segment by segment."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import ModelOutput

from . import fusion, persistence
from .adapters import Adapter, make_adapter
from .config import RMTConfig
from .integrations import hf
from .recurrence import SegmentRunner, compact_rows, plan_segments


@dataclass
class RMTOutput(ModelOutput):
    """Output of :class:`RecurrentMemoryModel`.

    loss: scalar (decoders: shifted LM cross-entropy over the whole sequence; classifiers: the head's loss on
        each row's last segment). logits: decoders ``[B, T, V]`` at token positions (None when not kept);
        classifiers ``[B, C]`` from each row's last segment. memory: final memory ``[B, m, d]``. Seq2seq: loss and
        logits ``[B, L, V]`` of the decoder as transformers computes them (None when it did not run).
    last_hidden_state: encoders: last-layer states of each row's last segment ``[B, N, d]``; seq2seq: the encoder's,
        which the decoder reads under ``encoder_attention_mask`` ``[B, N]`` (seq2seq only).
    hidden_states: on request; decoders: per layer ``[B, T, d]`` at token positions; encoders: per layer, the
        last segment's states.

    ``out.num_segments`` (an int, the number of segments processed) is an attribute, not a field: tools that
    gather every field of an output across batches (``Trainer.evaluate``/``predict``) see tensors only.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    memory: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple | None = None
    encoder_attention_mask: torch.Tensor | None = None


class RecurrentMemoryModel(nn.Module):
    """An RMT over ``model``. Build it with :func:`rmt_fast.wrap`; see its docstring for the arguments."""

    def __init__(self, model, config: RMTConfig, adapter: Adapter | None = None, memory: torch.Tensor | None = None):
        super().__init__()
        self.model = model
        self.rmt_config = config
        self.adapter = adapter or make_adapter(model, config.mode)
        if config.torch_compile:
            self.adapter.compile_backbone()
        if config.fused_kernels:
            self.adapter.fused = bool(fusion.install(model, self.adapter.family.get("fused_blocks", ())))
        emb = model.get_input_embeddings().weight
        if memory is None:
            with torch.no_grad():
                memory = torch.randn(config.num_mem_tokens, emb.shape[1], device=emb.device, dtype=emb.dtype)
                memory = memory * emb.float().std().to(emb.dtype)
        self.memory = nn.Parameter(memory)
        self.runner = SegmentRunner(self.adapter, config)

    @property
    def config(self):
        """The backbone's HF config (so Trainer and friends find what they expect)."""
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.memory.device

    # ---- inputs ---------------------------------------------------------------------------------------
    def _content_mask(self, input_ids, attention_mask):
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a LongTensor [B, T], got {type(input_ids).__name__}")
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
            raise ValueError(f"input_ids must be an integer tensor [B, T], got shape {tuple(input_ids.shape)} "
                             f"{input_ids.dtype}")
        if input_ids.numel() == 0:
            raise ValueError("input_ids is empty: need at least one token per row")
        if attention_mask is None:
            keep = torch.ones_like(input_ids, dtype=torch.bool)
        else:
            if attention_mask.dim() == 1:
                attention_mask = attention_mask.unsqueeze(0)
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape "
                                 f"{tuple(input_ids.shape)}")
            keep = attention_mask.to(input_ids.device).bool()
        keep = self.runner.scheme.content_mask(input_ids, keep)
        vocab = self.adapter.model.get_input_embeddings().num_embeddings
        out_of_vocab = keep & ((input_ids < 0) | (input_ids >= vocab))
        rows_ok, ids_ok = torch.stack([keep.any(1).all(), ~out_of_vocab.any()]).tolist()  # one host sync
        if not rows_ok:
            bad = (~keep.any(1)).nonzero().flatten().tolist()
            raise ValueError(f"attention_mask/input_ids: rows {bad} have no tokens (all padding or special tokens)")
        if not ids_ok:
            bad = input_ids[out_of_vocab].unique()[:8].tolist()
            raise ValueError(f"input_ids: ids {bad} are outside the vocabulary [0, {vocab})")
        return input_ids, keep

    def initial_memory(self, batch_size: int) -> torch.Tensor:
        return self.memory.unsqueeze(0).expand(batch_size, -1, -1)

    # ---- forward --------------------------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, labels=None, memory=None, output_hidden_states=False,
                return_logits=None, progress=None, token_type_ids=None, num_items_in_batch=None,
                short_term_cache=None, **kwargs) -> RMTOutput:
        """Run the recurrence over ``input_ids`` ``[B, T]``.

        attention_mask: ``[B, T]`` 1 for tokens (left or right padding). labels: LM ``[B, T]`` (-100 = ignore; the
        shift is done here), token classifiers ``[B, T]``, sequence classifiers ``[B]``. memory: ``[B, m, d]`` to
        continue from instead of the learned initial memory. return_logits: override ``keep_logits`` of the
        config. progress: a callable wrapping the segment range (e.g. ``tqdm``). token_type_ids: accepted as a
        tokenizer returns them; the segment layout gives every token type 0, so nonzero types (sentence pairs) are
        refused. num_items_in_batch: as transformers' Trainer passes it; per-token (classifiers: per-label;
        seq2seq: per decoder token) losses are then summed and divided by it (exact under gradient accumulation and
        over processes). Seq2seq: labels
        are the decoder's targets ``[B, L]``; kwargs may hold ``decoder_input_ids`` and ``decoder_attention_mask``
        for the decoder. short_term_cache: with ``num_cache_tokens``, the ``out.short_term_cache`` of a previous call
        to continue from (with its ``out.memory`` as ``memory``): the two calls then equal one over the joined input
        when the first ended on a segment boundary.

        The output's ``short_term_cache`` attribute (with ``num_cache_tokens``, else None) is the cache the last
        segment leaves, like ``out.memory``.
        """
        scheme = self.runner.scheme
        finish_kwargs = {k: kwargs.pop(k) for k in scheme.finish_kwargs if k in kwargs}
        if kwargs:
            raise TypeError(f"unexpected arguments: {sorted(kwargs)}")
        if token_type_ids is not None and bool((token_type_ids != 0).any()):
            raise ValueError("token_type_ids: nonzero token types (sentence pairs) are not supported; every segment "
                             "is one sequence [CLS] memory [SEP] tokens [SEP] of type 0")
        input_ids, keep = self._content_mask(input_ids, attention_mask)
        cfg = self.rmt_config
        keep_logits = cfg.keep_logits if return_logits is None else bool(return_logits)
        content, lengths, orig = compact_rows(input_ids.to(self.device), keep.to(self.device),
                                              cfg.pad_token_id if cfg.pad_token_id is not None else 0)
        plan = plan_segments(content, lengths, orig, cfg.segment_size, cfg.segment_alignment)
        b = input_ids.shape[0]
        if memory is None:
            memory = self.initial_memory(b)
        elif memory.shape != (b, cfg.num_mem_tokens, self.memory.shape[1]):
            raise ValueError(f"memory must have shape {(b, cfg.num_mem_tokens, self.memory.shape[1])}, "
                             f"got {tuple(memory.shape)}")
        if labels is not None:
            labels = labels.to(self.device)
            scheme.check_labels(labels, input_ids)
        if short_term_cache is not None:
            self._check_short_term_cache(short_term_cache, b)
        targets = scheme.targets(plan, labels)
        res = self.runner.run(memory, plan, targets, keep_logits, output_hidden_states, input_ids.shape[1], progress,
                              cache=short_term_cache)
        if num_items_in_batch is not None:
            res["num_items"] = torch.as_tensor(num_items_in_batch, device=res["loss_sum"].device)
            if targets is not None:
                res["count"] = res["num_items"]
        out = RMTOutput(memory=res["memory"], **scheme.finish(self.adapter, res, labels, **finish_kwargs))
        out.num_segments = plan.num_segments
        out.short_term_cache = res.get("cache")
        return out

    def _check_short_term_cache(self, cache, batch: int) -> None:
        from .short_term_cache import ShortTermCache

        c = self.rmt_config.num_cache_tokens
        if not c:
            raise ValueError("short_term_cache: this model has no short-term cache (num_cache_tokens=0)")
        if not isinstance(cache, ShortTermCache):
            raise TypeError(f"short_term_cache must be the out.short_term_cache of a previous call (a ShortTermCache), "
                            f"got {type(cache).__name__}")
        if cache.lens.shape != (batch,) or any(k.shape[0] != batch or k.shape[2] != c for k in cache.keys):
            raise ValueError(f"short_term_cache: made for another batch or cache size (lens {tuple(cache.lens.shape)}, "
                             f"keys {tuple(cache.keys[0].shape) if cache.keys else ()}; this call: batch {batch}, "
                             f"num_cache_tokens={c})")

    def executor_counts(self, reset: bool = False) -> dict:
        """How many forward calls each executor ran since the model was built (or the last ``reset=True``):
        ``{"full-BPTT graphed": 950, "full-BPTT eager": 50, ...}`` with the keys "inference graphed", "inference
        eager", "two-sweep graphed", "two-sweep eager", "full-BPTT graphed", "full-BPTT captured" (a new capture,
        then its first replay) and "full-BPTT eager"; only executors that ran appear. Shows whether a training
        loop replays CUDA graphs or falls back to eager calls (a new length, a pending backward, a failed capture)."""
        if not isinstance(reset, bool):
            raise TypeError(f"reset must be a bool, got {type(reset).__name__}")
        counts = dict(self.runner.calls)
        if reset:
            self.runner.calls.clear()
        return counts

    def set_capture_memory(self, max_bytes: int | None) -> None:
        """Bytes that this model's CUDA-graph captures (inference steps, checkpointed training steps and full-BPTT
        training calls, one per call shape) may keep in their memory pools together; ``None``: the default, a
        quarter of the GPU's memory. The least recently used capture makes room for a new one; one capture is
        kept whatever its size, so ``0`` keeps exactly one. Takes effect at the next capture."""
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0):
            raise ValueError(f"max_bytes must be None or an int >= 0, got {max_bytes!r}")
        self.runner.captures.budget_bytes = max_bytes

    def drop_captures(self) -> None:
        """Free every CUDA graph this model captured (inference, both training schedules) and their memory pools,
        then return the cached blocks to the driver (``torch.cuda.empty_cache``). The next calls capture again.
        A capture whose call still waits for its backward stays alive until that backward has run."""
        self.runner.captures.clear()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()

    # ---- generation -----------------------------------------------------------------------------------
    def generate(self, input_ids, generation_config=None, *, attention_mask=None, max_new_tokens: int | None = None,
                 max_length: int | None = None, do_sample: bool | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, repetition_penalty: float | None = None,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None, generator=None,
                 progress=None, **kwargs) -> torch.Tensor:
        """Decode after ``input_ids`` ``[B, T]`` as transformers' ``generate`` does (see :mod:`rmt_fast.generation`).

        Returns ``[B, T + k]``: the prompt block as given (left or right padding kept) and the new tokens
        ``out[:, T:]``; after its eos a row gets ``pad_token_id``; k < max_new_tokens when every row finished.
        generation_config: a transformers GenerationConfig (explicit arguments override it). max_length counts
        the prompt (default: 20 new tokens). eos/pad ids default to the backbone's ``generation_config``.
        repetition_penalty: transformers' (tokens already in the row: positive logits divided, negative ones
        multiplied). generator: a torch.Generator for sampling. progress: wraps the step range (e.g. ``tqdm``).

        Seq2seq models: the input is encoded segment by segment, then transformers' own ``generate`` decodes from
        each row's last segment (:func:`rmt_fast.generation.generate_seq2seq`); returns the decoder's sequences
        ``[B, k]`` and takes transformers' other generation arguments as ``kwargs`` (e.g. ``num_beams``).
        """
        settings = dict(max_new_tokens=max_new_tokens, max_length=max_length, do_sample=do_sample,
                        temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                        eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        if self.runner.scheme.encoder_decoder:
            from .generation import generate_seq2seq

            return generate_seq2seq(self, input_ids, attention_mask, generation_config, generator, progress,
                                    **settings, **kwargs)
        if kwargs:
            raise TypeError(f"unexpected arguments: {sorted(kwargs)}")
        from .generation import generate

        return generate(self, input_ids, attention_mask, generation_config, generator, progress, **settings)

    # ---- persistence ----------------------------------------------------------------------------------
    def save_pretrained(self, save_directory, state_dict: dict | None = None, is_main_process: bool = True,
                        **kwargs) -> None:
        """Write the RMT config, the memory and the backbone (transformers' format; for a PEFT backbone the base
        model, with the adapters beside it in PEFT's format) to ``save_directory``, for
        :func:`rmt_fast.from_pretrained`.

        state_dict: a ``state_dict()`` of this model to save instead of its current weights. is_main_process and
        kwargs (e.g. ``max_shard_size``) go to the backbone's ``save_pretrained``.
        """
        persistence.save_pretrained(self, save_directory, state_dict, is_main_process, **kwargs)

    def state_dict(self, *, destination=None, prefix: str = "", keep_vars: bool = False):
        """nn.Module's, with two differences that make the ``model.safetensors`` transformers.Trainer writes for
        this module (checkpoints, ``save_model``) work: each tied parameter appears once, under its first name
        (``load_state_dict`` fills in the others), and ``_extra_state`` describes the model, so that
        :func:`rmt_fast.from_pretrained` can rebuild it from that file alone."""
        sd = super().state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
        for alias in persistence.tied_aliases(self):
            sd.pop(prefix + alias, None)
        return sd

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        persistence.fill_tied(persistence.tied_aliases(self), state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def get_extra_state(self) -> torch.Tensor:
        return persistence.describe(self)

    def set_extra_state(self, state) -> None:
        persistence.read_description(state, "state_dict")  # a check only: this model is what it describes

    # ---- activation checkpointing inside segments ------------------------------------------------------
    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """Recompute the backbone's layers in backward (transformers' activation checkpointing, inside every
        segment); what ``TrainingArguments(gradient_checkpointing=True)`` turns on. Same loss and gradients.
        ``wrap(checkpoint_segments=True)`` is the coarser alternative (whole segments)."""
        base = self.adapter.model
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(activation_checkpointing_kwargs, every_n_layers=every_n_layers,
                                                 offload=offload)
        elif every_n_layers != 1 or offload:  # transformers before the rename has neither option
            raise ValueError("every_n_layers and offload need a transformers version with "
                             "activation_checkpointing_enable; this one has gradient_checkpointing_enable only")
        else:
            base.gradient_checkpointing_enable(activation_checkpointing_kwargs)
        layers = [m for m in base.modules() if hasattr(m, "_gradient_checkpointing_func")]
        replay = hf.recompute_in_segment(layers[0]._gradient_checkpointing_func, base.config)
        for m in layers:
            m._gradient_checkpointing_func = replay

    def activation_checkpointing_disable(self) -> None:
        base = self.adapter.model  # (older transformers: gradient_checkpointing_disable)
        (getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable)()

    @property
    def is_activation_checkpointing(self) -> bool:
        base = self.adapter.model
        try:
            return base.is_activation_checkpointing
        except AttributeError:  # transformers before the rename
            return base.is_gradient_checkpointing

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """:meth:`activation_checkpointing_enable` under its older transformers name (Trainer and PEFT call it)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.activation_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.is_activation_checkpointing


def from_pretrained(directory, model_class=None, **backbone_kwargs) -> RecurrentMemoryModel:
    """Load a model written by :meth:`RecurrentMemoryModel.save_pretrained`, or the ``model.safetensors`` that
    ``transformers.Trainer`` writes for one (checkpoints, ``trainer.save_model``).

    model_class: the transformers class of the backbone (default: the class it was saved from). backbone_kwargs
    go to its ``from_pretrained`` (e.g. ``dtype``, ``device_map``); for a Trainer directory only ``dtype``.
    The model comes back in eval mode, as transformers' ``from_pretrained`` returns one (``.train()`` before
    training). A PEFT backbone comes back as a PeftModel with trainable adapters. Raises ValueError naming the file
    when a file is missing, corrupt or does not match the config or the backbone.
    """
    return persistence.load(RecurrentMemoryModel, directory, model_class, backbone_kwargs)
