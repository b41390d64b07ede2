"""RecurrentMemoryModel: a HuggingFace backbone plus a learned memory, run segment by segment."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import ModelOutput

from .adapters import Adapter, make_adapter
from .config import RMTConfig
from .recurrence import SegmentRunner, compact_rows, plan_segments

CONFIG_NAME = "rmt_config.json"
MEMORY_NAME = "rmt_memory.safetensors"
BACKBONE_DIR = "backbone"


@dataclass
class RMTOutput(ModelOutput):
    """Output of :class:`RecurrentMemoryModel`.

    loss: scalar (decoders: shifted LM cross-entropy over the whole sequence; classifiers: the head's loss on
        each row's last segment). logits: decoders ``[B, T, V]`` at token positions (None when not kept);
        classifiers ``[B, C]`` from each row's last segment. memory: final memory ``[B, m, d]``.
    last_hidden_state: encoders: last-layer states of each row's last segment ``[B, N, d]``.
    hidden_states: on request; decoders: per layer ``[B, T, d]`` at token positions; encoders: per layer, the
        last segment's states.
    num_segments: segments processed.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    memory: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple | None = None
    num_segments: int | None = None


class RecurrentMemoryModel(nn.Module):
    """An RMT over ``model``. Build it with :func:`rmt_fast.wrap`; see its docstring for the arguments."""

    def __init__(self, model, config: RMTConfig, adapter: Adapter | None = None, memory: torch.Tensor | None = None):
        super().__init__()
        self.model = model
        self.rmt_config = config
        self.adapter = adapter or make_adapter(model, config.mode)
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
        if not bool(keep.any(1).all()):
            bad = (~keep.any(1)).nonzero().flatten().tolist()
            raise ValueError(f"attention_mask/input_ids: rows {bad} have no tokens (all padding or special tokens)")
        return input_ids, keep

    def initial_memory(self, batch_size: int) -> torch.Tensor:
        return self.memory.unsqueeze(0).expand(batch_size, -1, -1)

    # ---- forward --------------------------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, labels=None, memory=None, output_hidden_states=False,
                return_logits=None, progress=None, **kwargs) -> RMTOutput:
        """Run the recurrence over ``input_ids`` ``[B, T]``.

        attention_mask: ``[B, T]`` 1 for tokens (left or right padding). labels: decoders ``[B, T]`` (-100 =
        ignore; the shift is done here), classifiers ``[B]``. memory: ``[B, m, d]`` to continue from instead of
        the learned initial memory. return_logits: override ``keep_logits`` of the config. progress: a callable
        wrapping the segment range (e.g. ``tqdm``).
        """
        if kwargs:
            raise TypeError(f"unexpected arguments: {sorted(kwargs)}")
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
        scheme = self.runner.scheme
        if labels is not None:
            labels = labels.to(self.device)
            scheme.check_labels(labels, input_ids)
        targets = scheme.targets(plan, labels)
        res = self.runner.run(memory, plan, targets, keep_logits, output_hidden_states, input_ids.shape[1], progress)
        return RMTOutput(memory=res["memory"], num_segments=plan.num_segments,
                         **scheme.finish(self.adapter, res, labels))

    # ---- generation -----------------------------------------------------------------------------------
    def generate(self, input_ids, max_new_tokens: int = 20, attention_mask=None, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 eos_token_id: int | None = None, pad_token_id: int | None = None, generator=None,
                 progress=None) -> torch.Tensor:
        """Decode ``max_new_tokens`` after ``input_ids`` (see :mod:`rmt_fast.generation`). Returns prompt + new."""
        from .generation import generate

        return generate(self, input_ids, max_new_tokens, attention_mask=attention_mask, do_sample=do_sample,
                        temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
                        pad_token_id=pad_token_id, generator=generator, progress=progress)

    # ---- persistence ----------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str, safe_serialization: bool = True, **kwargs) -> None:
        """Write the backbone (HF format, safetensors), the memory and the RMT config to ``save_directory``."""
        from safetensors.torch import save_file

        os.makedirs(save_directory, exist_ok=True)
        self.model.save_pretrained(os.path.join(save_directory, BACKBONE_DIR), safe_serialization=True, **kwargs)
        save_file({"memory": self.memory.detach().contiguous().cpu()}, os.path.join(save_directory, MEMORY_NAME))
        with open(os.path.join(save_directory, CONFIG_NAME), "w") as f:
            f.write(self.rmt_config.to_json_string())


def from_pretrained(directory: str, model_class=None, **backbone_kwargs) -> RecurrentMemoryModel:
    """Load a model written by :meth:`RecurrentMemoryModel.save_pretrained`.

    model_class: the transformers class of the backbone (default: the Auto class matching the saved mode and
    head). backbone_kwargs go to its ``from_pretrained`` (e.g. ``torch_dtype``, ``device_map``).
    """
    from safetensors.torch import load_file

    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"directory: {directory!r} holds no {CONFIG_NAME}; was it written by save_pretrained?")
    with open(path) as f:
        config = RMTConfig.from_dict(json.load(f))
    bdir = os.path.join(directory, BACKBONE_DIR)
    if model_class is None:
        model_class = _auto_class(bdir)
    model = model_class.from_pretrained(bdir, **backbone_kwargs)
    memory = load_file(os.path.join(directory, MEMORY_NAME))["memory"]
    emb = model.get_input_embeddings().weight
    return RecurrentMemoryModel(model, config, memory=memory.to(device=emb.device, dtype=emb.dtype))


def _auto_class(backbone_dir: str):
    import transformers

    with open(os.path.join(backbone_dir, "config.json")) as f:
        archs = json.load(f).get("architectures") or []
    for name in archs:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModel
