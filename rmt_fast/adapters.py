"""The only place that knows model families: which layout a model uses and how to run it on one segment."""
from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .integrations import hf
from .ops.linear_cross_entropy import lm_logits
from .short_term_cache import KeyShift, shift_rotary_keys

# model_type -> family facts. Every family here routes attention through transformers' AttentionInterface,
# which is how the RMT mask reaches the model's own layers. position_offset: first position id the model uses.
# fused_blocks: the pieces of its blocks that are LlamaRMSNorm / apply_rotary_pos_emb / a SwiGLU MLP exactly, which
# rmt_fast.fusion swaps for one-kernel versions at inference (Phi-3: a partial rotary and a fused gate_up_proj).
# cache_positions: how the short-term cache's keys carry positions into the next segment (docs/short_term_cache.md):
# "absolute" (position embeddings added to the input: the keys keep the positions they had), "rotary" (the keys are
# rotated on to the positions right before the segment's first, ``base_model.rotary_emb``'s frequencies; partial
# rotary as GPT-NeoX and Phi-3 have it rotates the first dims only); families without it have no short-term cache.
_LLAMA_BLOCKS = {"fused_blocks": ("rms_norm", "rotary", "swiglu"), "cache_positions": "rotary"}
DECODER_FAMILIES = {
    "gpt2": {"cache_positions": "absolute"},
    "llama": _LLAMA_BLOCKS, "mistral": _LLAMA_BLOCKS, "qwen2": _LLAMA_BLOCKS, "qwen3": _LLAMA_BLOCKS,
    "opt": {"cache_positions": "absolute"}, "gpt_neox": {"cache_positions": "rotary"},
    "phi3": {"fused_blocks": ("rms_norm",), "cache_positions": "rotary"},
}
ENCODER_FAMILIES = {
    "bert": {}, "distilbert": {}, "electra": {},
    "roberta": {"position_offset": "pad+1"}, "xlm-roberta": {"position_offset": "pad+1"},
}
# Encoder-decoder models (...ForConditionalGeneration). bos: segments start with the config's bos_token_id.
# own_attention: the encoder keeps its own attention (under a padding mask built from the segment layout) instead of
# rmt_fast's: T5 adds a relative position bias to the attention scores, which memory_attention has no input for.
# relative_positions: no position table; max_positions is then the config's n_positions, else DEFAULT_MAX_POSITIONS.
SEQ2SEQ_FAMILIES = {
    "t5": {"bos": False, "own_attention": True, "relative_positions": True},
    "bart": {"bos": True},
}
DEFAULT_MAX_POSITIONS = 512
SUPPORTED = {"decoder": sorted(DECODER_FAMILIES), "encoder": sorted(ENCODER_FAMILIES),
             "seq2seq": sorted(SEQ2SEQ_FAMILIES)}
FAMILIES = {"decoder": DECODER_FAMILIES, "encoder": ENCODER_FAMILIES, "seq2seq": SEQ2SEQ_FAMILIES}


@dataclass
class Adapter:
    """How to drive one backbone: mode, head kind, usable positions and the per-segment call."""

    model: torch.nn.Module
    mode: str  # "decoder" | "encoder" | "seq2seq"
    head: str  # "lm" | "classifier" | "token_classifier" | "seq2seq" | "none"
    max_positions: int
    fused: bool = False  # run the block kernels rmt_fast.fusion installed in the model (RMTConfig.fused_kernels)

    @property
    def family(self) -> dict:
        return FAMILIES[self.mode].get(getattr(self.model.config, "model_type", None), {})

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]

    @property
    def cache_kwarg(self) -> str:
        """Name of the KV-cache argument (transformers renamed ``past_key_values`` to ``cache``)."""
        import inspect

        base = self.model.base_model if self.head == "lm" else self.model
        return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"

    def cache_key_shift(self) -> KeyShift | None:
        """How the short-term cache moves keys into the next segment: None (absolute positions: keys keep theirs)
        or a rotation (rotary families). Raises ValueError naming num_cache_tokens for families without a rule."""
        rule = self.family.get("cache_positions")
        if rule is None:
            have = sorted(t for t, f in DECODER_FAMILIES.items() if "cache_positions" in f)
            raise ValueError(f"num_cache_tokens > 0: model_type={getattr(self.model.config, 'model_type', None)!r} "
                             f"({self.mode}) has no short-term cache yet; supported: {have}")
        if rule == "absolute":
            return None
        return functools.partial(shift_rotary_keys, self.model.base_model.rotary_emb)

    def compile_backbone(self) -> None:
        """``torch.compile`` (inductor, ``dynamic=False``, in place) the modules a segment calls: the model, its base
        model and, for seq2seq, its encoder (whichever :class:`~rmt_fast.schemes.Scheme.run_backbone` runs)."""
        modules = [self.model, getattr(self.model, "base_model", self.model)]
        if self.mode == "seq2seq":
            modules.append(self.model.get_encoder())
        for m in {id(m): m for m in modules}.values():
            m.compile(dynamic=False)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def run_whole(self, inputs_embeds: torch.Tensor, layout, backend: str = "auto", **kwargs):
        """The whole HF model (its head on every position) on one segment under ``layout``; returns (last hidden
        ``[B, N, d]``, the model's output, which holds the head's logits and every layer's states)."""
        kwargs.update(hf.attention_kwargs(layout, backend))
        with hf.segment_call(self.model, self.fused):
            out = self.model(inputs_embeds=inputs_embeds, output_hidden_states=True, return_dict=True, **kwargs)
        return out.hidden_states[-1], out

    def run_base(self, inputs_embeds: torch.Tensor, layout, backend: str = "auto",
                 output_hidden_states: bool = False, **kwargs):
        """The base model (no head) on one segment under ``layout`` (a SegmentLayout, or None for a decoding step
        against a KV cache); returns (last hidden ``[B, N, d]``, the model's output)."""
        kwargs.update(hf.attention_kwargs(layout, backend))
        with hf.segment_call(self.model, self.fused):
            out = self.model.base_model(inputs_embeds=inputs_embeds, output_hidden_states=output_hidden_states,
                                        return_dict=True, **kwargs)
        return out.last_hidden_state, out

    def run_encoder(self, inputs_embeds, layout, backend: str = "auto", output_hidden_states: bool = False):
        """A seq2seq model's encoder on one segment. Families with their own attention get the layout as a padding
        mask (an encoder layout lets every valid query see every valid key; what padding queries see is free)."""
        encoder = self.model.get_encoder()
        if self.family.get("own_attention"):
            n = inputs_embeds.shape[1]
            mask = torch.arange(n, device=inputs_embeds.device).view(1, -1) < layout.valid_lens.view(-1, 1)
            out = encoder(inputs_embeds=inputs_embeds, attention_mask=mask.long(),
                          output_hidden_states=output_hidden_states, return_dict=True)
        else:
            with hf.segment_call(encoder, self.fused):
                out = encoder(inputs_embeds=inputs_embeds, output_hidden_states=output_hidden_states, return_dict=True,
                              **hf.attention_kwargs(layout, backend))
        return out.last_hidden_state, out

    def run_decoder(self, encoder_states: torch.Tensor, encoder_mask: torch.Tensor, labels=None,
                    decoder_input_ids=None, decoder_attention_mask=None):
        """A seq2seq model's decoder (its own attention) on encoder states ``[B, N, d]`` under ``encoder_mask``
        ``[B, N]``; labels ``[B, L]`` (shifted into the decoder's inputs by transformers). The model's output."""
        from transformers.modeling_outputs import BaseModelOutput

        dev = encoder_states.device
        return self.model(encoder_outputs=BaseModelOutput(last_hidden_state=encoder_states),
                          attention_mask=encoder_mask, labels=labels,
                          decoder_input_ids=None if decoder_input_ids is None else decoder_input_ids.to(dev),
                          decoder_attention_mask=None if decoder_attention_mask is None else
                          decoder_attention_mask.to(dev), use_cache=False, return_dict=True)

    def seq2seq_special_tokens(self, tokenizer=None, bos_token_id=None, eos_token_id=None) -> tuple:
        """(bos, eos) of a seq2seq segment: explicit ids, else the tokenizer's, else the model config's; the BOS only
        for families that start segments with one (BART yes, T5 no)."""
        cfg = self.model.config
        if bos_token_id is None and self.family.get("bos"):
            bos_token_id = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
            bos_token_id = getattr(cfg, "bos_token_id", None) if bos_token_id is None else bos_token_id
        if eos_token_id is None:
            eos_token_id = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
            eos_token_id = getattr(cfg, "eos_token_id", None) if eos_token_id is None else eos_token_id
        return bos_token_id, eos_token_id

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on ``hidden``; a plain linear head runs through :func:`rmt_fast.ops.linear_cross_entropy.
        lm_logits` (an aligned matmul for odd vocabularies on CUDA; the logits may then be a row-strided view)."""
        linear = self.lm_head_linear()
        if linear is None:
            return self.model.get_output_embeddings()(hidden)
        return lm_logits(hidden, *linear)

    def sequence_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """A decoder classifier's ``score`` head on each row's last-token state ``[B, d]`` -> ``[B, C]``."""
        return self.model.score(hidden)

    def lm_head_linear(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(weight ``[V, d]``, bias) when the LM head is a plain linear map (so a fused linear + cross-entropy
        computes the same loss), else None."""
        head = self.model.get_output_embeddings()
        if type(head) is not torch.nn.Linear or head._forward_hooks or head._forward_pre_hooks:
            return None  # (a hooked head, e.g. offloaded by accelerate, runs as a module)
        cfg = self.model.config
        if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
            return None
        return head.weight, head.bias

    def classification_loss(self, logits: torch.Tensor, labels: torch.Tensor, num_items=None) -> torch.Tensor:
        """The loss HF's ...ForSequenceClassification heads compute (problem_type rules): the mean over the label
        entries, or, given ``num_items`` (transformers' Trainer's ``num_items_in_batch``: the label entries of the
        whole batch over processes and accumulation steps), their sum divided by it."""
        cfg = self.model.config
        problem = cfg.problem_type
        if problem is None:
            if cfg.num_labels == 1:
                problem = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem = "single_label_classification"
            else:
                problem = "multi_label_classification"
        reduction = "mean" if num_items is None else "sum"
        if problem == "regression":
            if cfg.num_labels == 1:
                loss = F.mse_loss(logits.squeeze().float(), labels.squeeze().float(), reduction=reduction)
            else:
                loss = F.mse_loss(logits.float(), labels.float(), reduction=reduction)
        elif problem == "single_label_classification":
            loss = F.cross_entropy(logits.view(-1, cfg.num_labels).float(), labels.view(-1), reduction=reduction)
        else:
            loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction=reduction)
        return loss if num_items is None else loss / num_items


def _max_positions(model, mode: str, model_type: str) -> int:
    cfg = model.config
    fam = FAMILIES[mode].get(model_type, {})
    if fam.get("relative_positions"):
        return int(getattr(cfg, "n_positions", None) or DEFAULT_MAX_POSITIONS)
    n = None
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        n = getattr(cfg, name, None)
        if n:
            break
    if not n:
        raise ValueError(f"cannot tell how many positions {type(model).__name__} embeds (no max_position_embeddings)")
    if fam.get("position_offset") == "pad+1":
        n -= (cfg.pad_token_id or 0) + 1
    return int(n)


def detect_mode(model) -> str:
    name = type(model).__name__
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "decoder"
    mt = getattr(model.config, "model_type", None)
    if mt in DECODER_FAMILIES:
        return "decoder"
    if mt in ENCODER_FAMILIES:
        return "encoder"
    if mt in SEQ2SEQ_FAMILIES:
        return "seq2seq"
    raise ValueError(f"model: cannot detect encoder, decoder or seq2seq for {name} (model_type={mt!r}); supported "
                     f"families: decoders {SUPPORTED['decoder']}, encoders {SUPPORTED['encoder']}, seq2seq "
                     f"{SUPPORTED['seq2seq']}")


def backbone_of(model):
    """The transformers model that runs: ``model``, or the base model of a PEFT ``PeftModel`` (whose layers hold
    the adapters; the PeftModel stays the module that owns them). A PeftModel exists only once peft is imported."""
    peft = sys.modules.get("peft")
    return model.get_base_model() if peft is not None and isinstance(model, peft.PeftModel) else model


def make_adapter(model, mode: str = "auto") -> Adapter:
    from transformers import PreTrainedModel

    model = backbone_of(model)
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    if mode not in ("auto", *FAMILIES):
        raise ValueError(f"mode must be 'auto', 'decoder', 'encoder' or 'seq2seq', got {mode!r}")
    if mode == "auto":
        mode = detect_mode(model)
    mt = getattr(model.config, "model_type", None)
    if mt not in FAMILIES[mode]:
        raise ValueError(f"model: {type(model).__name__} (model_type={mt!r}) is not a supported {mode}; "
                         f"supported: {SUPPORTED[mode]}")
    name = type(model).__name__
    if mode == "seq2seq":
        if not name.endswith("ForConditionalGeneration"):
            raise ValueError(f"model: seq2seq head {name} is not supported; use ...ForConditionalGeneration "
                             f"(e.g. T5ForConditionalGeneration, BartForConditionalGeneration)")
        head = "seq2seq"
    elif model.base_model is model:
        head = "none"
    elif name.endswith("ForSequenceClassification"):
        head = "classifier"
    elif mode == "decoder" and model.get_output_embeddings() is not None:
        head = "lm"
    elif mode == "encoder" and name.endswith("ForTokenClassification"):
        head = "token_classifier"
    else:
        allowed = ("...ForCausalLM, ...ForSequenceClassification or the bare model" if mode == "decoder" else
                   "...ForSequenceClassification, ...ForTokenClassification or the bare encoder (e.g. BertModel)")
        raise ValueError(f"model: {mode} head {name} is not supported; use {allowed}")
    if mode == "decoder" and head == "classifier" and not isinstance(getattr(model, "score", None), torch.nn.Module):
        raise ValueError(f"model: {name} has no `score` head to read the last token with")
    return Adapter(model=model, mode=mode, head=head, max_positions=_max_positions(model, mode, mt))
