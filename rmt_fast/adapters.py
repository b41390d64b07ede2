"""The only place that knows model families: which layout a model uses and how to run it on one segment."""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .integrations import hf

# model_type -> family facts. Every family here routes attention through transformers' AttentionInterface,
# which is how the RMT mask reaches the model's own layers. position_offset: first position id the model uses.
DECODER_FAMILIES = {
    "gpt2": {}, "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {}, "opt": {}, "gpt_neox": {}, "phi3": {},
}
ENCODER_FAMILIES = {
    "bert": {}, "distilbert": {}, "electra": {},
    "roberta": {"position_offset": "pad+1"}, "xlm-roberta": {"position_offset": "pad+1"},
}
SUPPORTED = {"decoder": sorted(DECODER_FAMILIES), "encoder": sorted(ENCODER_FAMILIES)}


@dataclass
class Adapter:
    """How to drive one backbone: mode, head kind, usable positions and the per-segment call."""

    model: torch.nn.Module
    mode: str  # "decoder" | "encoder"
    head: str  # "lm" | "classifier" | "token_classifier" | "none"
    max_positions: int

    @property
    def runs_whole_model(self) -> bool:
        """Encoder heads run as the HF model (its head on every position); decoders run the base model and
        apply their head where the scheme says (LM head on tokens, ``score`` on each row's last token)."""
        return self.mode == "encoder" and self.head != "none"

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]

    @property
    def cache_kwarg(self) -> str:
        """Name of the KV-cache argument (transformers renamed ``past_key_values`` to ``cache``)."""
        import inspect

        base = self.model.base_model if self.head == "lm" else self.model
        return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def run_segment(self, inputs_embeds: torch.Tensor, layout, backend: str = "auto",
                    output_hidden_states: bool = False, **kwargs):
        """Run the backbone on one segment under ``layout`` (a SegmentLayout, or None for a decoding step against
        a KV cache). Returns (last hidden ``[B, N, d]``, the model's output)."""
        kwargs.update(hf.attention_kwargs(layout, backend))
        with hf.segment_call(self.model):
            if self.runs_whole_model:
                out = self.model(inputs_embeds=inputs_embeds, output_hidden_states=True, return_dict=True, **kwargs)
                return out.hidden_states[-1], out
            base = self.model.base_model
            if self.mode == "decoder":
                kwargs.setdefault("use_cache", False)
            out = base(inputs_embeds=inputs_embeds, output_hidden_states=output_hidden_states, return_dict=True,
                       **kwargs)
        return out.last_hidden_state, out

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.get_output_embeddings()(hidden)

    def sequence_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """A decoder classifier's ``score`` head on each row's last-token state ``[B, d]`` -> ``[B, C]``."""
        return self.model.score(hidden)

    def lm_head_linear(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(weight ``[V, d]``, bias) when the LM head is a plain linear map (so a fused linear + cross-entropy
        computes the same loss), else None."""
        head = self.model.get_output_embeddings()
        if type(head) is not torch.nn.Linear:
            return None
        cfg = self.model.config
        if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
            return None
        return head.weight, head.bias

    def classification_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss HF's ...ForSequenceClassification heads compute (problem_type rules)."""
        cfg = self.model.config
        problem = cfg.problem_type
        if problem is None:
            if cfg.num_labels == 1:
                problem = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem = "single_label_classification"
            else:
                problem = "multi_label_classification"
        if problem == "regression":
            if cfg.num_labels == 1:
                return F.mse_loss(logits.squeeze().float(), labels.squeeze().float())
            return F.mse_loss(logits.float(), labels.float())
        if problem == "single_label_classification":
            return F.cross_entropy(logits.view(-1, cfg.num_labels).float(), labels.view(-1))
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


def _max_positions(model, mode: str, model_type: str) -> int:
    cfg = model.config
    n = None
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        n = getattr(cfg, name, None)
        if n:
            break
    if not n:
        raise ValueError(f"cannot tell how many positions {type(model).__name__} embeds (no max_position_embeddings)")
    fam = ENCODER_FAMILIES.get(model_type, {}) if mode == "encoder" else DECODER_FAMILIES.get(model_type, {})
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
    raise ValueError(f"model: cannot detect encoder or decoder for {name} (model_type={mt!r}); supported families: "
                     f"decoders {SUPPORTED['decoder']}, encoders {SUPPORTED['encoder']}")


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
    if mode not in ("auto", "decoder", "encoder"):
        raise ValueError(f"mode must be 'auto', 'decoder' or 'encoder', got {mode!r}")
    if mode == "auto":
        mode = detect_mode(model)
    mt = getattr(model.config, "model_type", None)
    families = DECODER_FAMILIES if mode == "decoder" else ENCODER_FAMILIES
    if mt not in families:
        raise ValueError(f"model: {type(model).__name__} (model_type={mt!r}) is not a supported {mode}; "
                         f"supported: {SUPPORTED[mode]}")
    name = type(model).__name__
    if model.base_model is model:
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
