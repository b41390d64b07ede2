"""RMTConfig: every knob of a recurrent memory model, validated once and saved with the model."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from .ops import BACKENDS
from .schemes import scheme_class
ALIGNMENTS = ("left", "right")


@dataclass
class RMTConfig:
    """Configuration of a :class:`~rmt_fast.RecurrentMemoryModel`.

    Attributes:
        mode: "decoder" (causal LM layout ``[mem | tokens | mem]``), "encoder" (``[CLS] mem [SEP] tokens [SEP]``) or
            "seq2seq" (the encoder of an encoder-decoder model runs ``[BOS] mem tokens [EOS]``, the decoder once).
        num_mem_tokens: memory slots ``m`` (>= 0).
        segment_size: tokens per segment, memory and special tokens excluded (> 0).
        bptt_depth: None for full BPTT; k >= 0: gradients cross at most k memory handoffs.
        checkpoint_segments: recompute each segment in backward (flat peak memory, identical gradients).
        memory_bidirectional: the NeurIPS-2022 mask (memory blocks attend bidirectionally).
        num_cache_tokens: the short-term cache (decoders): every segment also attends the keys and values, in every
            layer, of the previous segment's last ``num_cache_tokens`` tokens (Transformer-XL style, beside the
            memory; gradients cross it where they cross the memory, see ``bptt_depth``); 0 (default): plain RMT.
            At most ``segment_size``; the CUDA graphs carry it (docs/short_term_cache.md).
        segment_alignment: "left" (last segment short) or "right" (first segment short).
        backend: "auto" | "reference" | "sdpa" | "triton" | "cuda" for memory attention and the handoff (speed
            only). "sdpa" needs plain layouts: a decoder without ``memory_bidirectional``, or encoder batches whose
            rows fill every segment (otherwise memory_attention raises); its handoff runs the reference.
        keep_logits: return full logits (decoders: ``[B, T, V]``); False keeps memory flat in the length.
        cls_token_id, sep_token_id, pad_token_id: special tokens (encoders need CLS and SEP).
        bos_token_id, eos_token_id: seq2seq segments start with BOS (None: no BOS, as T5) and end with EOS.
        max_positions: positions the backbone can embed in one segment.
        cuda_graphs: "auto" (default) | True | False. On CUDA, replay the segment step as a CUDA graph under
            ``torch.no_grad`` and, with ``checkpoint_segments``, both training sweeps; with full BPTT a training
            call whose segments are all full replays as one forward and one backward graph (see
            rmt_fast.graphs.CallGraphs and the README's "What is graphed"); False: always eager. A capture failure
            falls back to eager with one warning (True and "auto" alike).
        torch_compile: compile the backbone modules a segment calls with ``torch.compile`` (inductor,
            ``dynamic=False``, in place: ``nn.Module.compile``) at wrap time; runs inside the CUDA graphs. Fuses the
            backbone's small kernels (norms, rotary embeddings, activations): a large gain at small batch, e.g. one
            long sequence. Each new segment shape compiles once (seconds to a minute).
        fused_kernels: True (default): on CUDA under ``torch.no_grad``, a Llama-family backbone's RMSNorm, rotary
            embedding and SwiGLU activation run as single fused kernels during rmt_fast's calls (rmt_fast/fusion.py;
            the model's results to one rounding step); False: the model's own code always.
    """

    mode: str
    num_mem_tokens: int
    segment_size: int
    max_positions: int
    bptt_depth: int | None = None
    checkpoint_segments: bool = False
    memory_bidirectional: bool = False
    num_cache_tokens: int = 0
    segment_alignment: str = "left"
    backend: str = "auto"
    keep_logits: bool = True
    cuda_graphs: bool | str = "auto"
    torch_compile: bool = False
    fused_kernels: bool = True
    cls_token_id: int | None = None
    sep_token_id: int | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self):
        self.validate()

    @property
    def slots_per_segment(self) -> int:
        """Positions a segment uses besides its tokens (memory slots and special tokens)."""
        return scheme_class(self.mode).slots(self.num_mem_tokens, self.bos_token_id)

    def cuts_memory_before(self, g: int, num_segments: int) -> bool:
        """Whether full BPTT detaches the memory entering segment ``g`` of ``num_segments`` (``bptt_depth``: gradients
        cross at most that many handoffs, counted back from the last segment)."""
        return self.bptt_depth is not None and 0 < g < num_segments - self.bptt_depth

    @property
    def graphs_enabled(self) -> bool:
        """Whether CUDA graphs may be used (True or "auto"); they are only ever used on CUDA tensors."""
        return self.cuda_graphs is not False

    def validate(self) -> None:
        scheme_class(self.mode)  # raises for an unknown mode
        if isinstance(self.num_mem_tokens, bool) or not isinstance(self.num_mem_tokens, int):
            raise TypeError(f"num_mem_tokens must be an int, got {type(self.num_mem_tokens).__name__}")
        if self.num_mem_tokens < 0:
            raise ValueError(f"num_mem_tokens must be >= 0, got {self.num_mem_tokens}")
        if isinstance(self.segment_size, bool) or not isinstance(self.segment_size, int):
            raise TypeError(f"segment_size must be an int, got {type(self.segment_size).__name__}")
        if self.segment_size <= 0:
            raise ValueError(f"segment_size must be > 0, got {self.segment_size}")
        need = self.segment_size + self.slots_per_segment
        if need > self.max_positions:
            raise ValueError(
                f"segment_size={self.segment_size} with num_mem_tokens={self.num_mem_tokens} needs {need} positions "
                f"per segment but the model has {self.max_positions}; use segment_size <= "
                f"{self.max_positions - self.slots_per_segment}")
        if self.bptt_depth is not None and (not isinstance(self.bptt_depth, int) or self.bptt_depth < 0):
            raise ValueError(f"bptt_depth must be None or an int >= 0, got {self.bptt_depth!r}")
        if self.segment_alignment not in ALIGNMENTS:
            raise ValueError(f"segment_alignment must be one of {ALIGNMENTS}, got {self.segment_alignment!r}")
        if self.cuda_graphs not in (True, False, "auto"):
            raise ValueError(f"cuda_graphs must be True, False or 'auto', got {self.cuda_graphs!r}")
        if not isinstance(self.torch_compile, bool):
            raise TypeError(f"torch_compile must be a bool, got {type(self.torch_compile).__name__}")
        if not isinstance(self.fused_kernels, bool):
            raise TypeError(f"fused_kernels must be a bool, got {type(self.fused_kernels).__name__}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.backend == "sdpa" and self.memory_bidirectional:
            raise ValueError("backend='sdpa' cannot express memory_bidirectional=True (the mask is not plain causal); "
                             "use backend='auto', 'triton', 'cuda' or 'reference'")
        missing = [name for name in scheme_class(self.mode).special_tokens if getattr(self, name) is None]
        if missing:
            raise ValueError(f"{self.mode} mode needs {' and '.join(missing)}: pass tokenizer= or "
                             f"{'=/'.join(missing)}=")
        self._validate_cache()

    def _validate_cache(self) -> None:
        k = self.num_cache_tokens
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"num_cache_tokens must be an int, got {type(k).__name__}")
        if k < 0:
            raise ValueError(f"num_cache_tokens must be >= 0, got {k}")
        if not k:
            return
        if self.mode != "decoder":
            raise ValueError(f"num_cache_tokens={k} needs mode='decoder' (the short-term cache is a decoder layout; "
                             f"got mode={self.mode!r}); use num_cache_tokens=0")
        if k > self.segment_size:
            raise ValueError(f"num_cache_tokens must be <= segment_size={self.segment_size} (the cache holds tokens "
                             f"of the previous segment), got {k}")
        if self.backend == "sdpa":
            raise ValueError(f"num_cache_tokens={k} runs on backend='auto', 'triton', 'cuda' or 'reference' ('sdpa' "
                             f"takes plain layouts only, and a cache layout is not plain), got backend='sdpa'")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> RMTConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown RMTConfig fields: {sorted(unknown)}")
        return cls(**d)
