"""wrap(): inspect a HuggingFace model, pick its adapter, and return a RecurrentMemoryModel."""
from __future__ import annotations

from .adapters import make_adapter
from .config import RMTConfig
from .model import RecurrentMemoryModel
from .schemes import scheme_class


def wrap(model, num_mem_tokens: int = 10, segment_size: int | None = None, *, tokenizer=None, mode: str = "auto",
         bptt_depth: int | None = None, checkpoint_segments: bool = False, memory_bidirectional: bool = False,
         num_cache_tokens: int = 0, segment_alignment: str | None = None, backend: str = "auto",
         keep_logits: bool = True,
         cuda_graphs: bool | str = "auto", torch_compile: bool = False, fused_kernels: bool = True,
         cls_token_id: int | None = None, sep_token_id: int | None = None,
         pad_token_id: int | None = None, bos_token_id: int | None = None,
         eos_token_id: int | None = None) -> RecurrentMemoryModel:
    """Turn a HuggingFace encoder, decoder or encoder-decoder into a Recurrent Memory Transformer.

    Args:
        model: a transformers PreTrainedModel. Decoders: GPT-2, Llama, Mistral, Qwen2/3, OPT, GPT-NeoX, Phi-3
            (``...ForCausalLM`` or the bare model). Encoders: BERT, RoBERTa, XLM-R, DistilBERT, ELECTRA (bare or
            ``...ForSequenceClassification``). Seq2seq: T5, BART (``...ForConditionalGeneration``).
        num_mem_tokens: memory slots m (>= 0).
        segment_size: tokens per segment, memory and special tokens excluded; default: the largest that fits the
            model's positions (encoders: positions - m - 3, e.g. 499 for 512 and m=10; decoders: positions - 2m;
            seq2seq: positions - m - 1, minus 1 more with a BOS; T5 has relative positions: 512 unless its config
            sets n_positions).
        tokenizer: supplies cls/sep/pad ids, and bos/eos for seq2seq (or pass them explicitly).
        mode: "auto" | "decoder" | "encoder" | "seq2seq".
        bptt_depth: None = full BPTT; k: gradients cross at most k memory handoffs.
        checkpoint_segments: recompute each segment in backward; same gradients, flat peak memory.
        memory_bidirectional: the NeurIPS-2022 mask (memory blocks bidirectional).
        num_cache_tokens: decoders: every segment also attends the keys/values of the previous segment's last
            ``num_cache_tokens`` tokens in every layer (a short-term cache beside the memory); 0: plain RMT. See
            :class:`~rmt_fast.RMTConfig`.
        segment_alignment: "left" (decoder default) or "right" (encoder and seq2seq default).
        backend: "auto" | "reference" | "triton" | "cuda"; changes speed only.
        keep_logits: return full decoder logits; False keeps memory flat in the number of segments.
        cuda_graphs: "auto" (default): on CUDA, inference under ``torch.no_grad`` and training replay captured
            CUDA graphs; False: always eager.
        torch_compile: ``torch.compile`` the backbone (in place) so that its small kernels fuse; see
            :class:`~rmt_fast.RMTConfig`.
        fused_kernels: True (default): on CUDA, inference of Llama-family backbones runs their RMSNorm, rotary
            embedding and SwiGLU as fused kernels (the model's results to one rounding step); False: the model's
            own code.
    """
    adapter = make_adapter(model, mode)
    if tokenizer is not None:
        cls_token_id = tokenizer.cls_token_id if cls_token_id is None else cls_token_id
        sep_token_id = tokenizer.sep_token_id if sep_token_id is None else sep_token_id
        pad_token_id = tokenizer.pad_token_id if pad_token_id is None else pad_token_id
    mc = model.config
    cls_token_id = getattr(mc, "cls_token_id", None) if cls_token_id is None else cls_token_id
    sep_token_id = getattr(mc, "sep_token_id", None) if sep_token_id is None else sep_token_id
    pad_token_id = getattr(mc, "pad_token_id", None) if pad_token_id is None else pad_token_id
    if isinstance(num_mem_tokens, bool) or not isinstance(num_mem_tokens, int):
        raise TypeError(f"num_mem_tokens must be an int, got {type(num_mem_tokens).__name__}")
    if num_mem_tokens < 0:
        raise ValueError(f"num_mem_tokens must be >= 0, got {num_mem_tokens}")
    scheme = scheme_class(adapter.mode)
    if scheme.encoder_decoder:  # the BOS only where the family starts segments with one
        bos_token_id, eos_token_id = adapter.seq2seq_special_tokens(tokenizer, bos_token_id, eos_token_id)
    slots = scheme.slots(num_mem_tokens, bos_token_id)
    if segment_size is None:
        segment_size = adapter.max_positions - slots
        if segment_size <= 0:
            raise ValueError(f"num_mem_tokens={num_mem_tokens} leaves no room for tokens in "
                             f"{adapter.max_positions} positions")
    config = RMTConfig(
        mode=adapter.mode, num_mem_tokens=num_mem_tokens, segment_size=segment_size,
        max_positions=adapter.max_positions, bptt_depth=bptt_depth, checkpoint_segments=checkpoint_segments,
        memory_bidirectional=memory_bidirectional, num_cache_tokens=num_cache_tokens,
        segment_alignment=segment_alignment or scheme.default_alignment,
        backend=backend, keep_logits=keep_logits, cuda_graphs=cuda_graphs, torch_compile=torch_compile,
        fused_kernels=fused_kernels,
        cls_token_id=cls_token_id,
        sep_token_id=sep_token_id, pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
    )
    return RecurrentMemoryModel(model, config, adapter)
