"""Plain restatements of the official RMT loops (booydar/recurrent-memory-transformer), the yardstick that tests
and benchmarks compare rmt_fast with: the backbone's own attention, one HF forward per segment, all activations
kept for the backward pass (full BPTT).

- :func:`official_decoder`: ``MemoryCell`` + ``RecurrentWrapper``: ``[mem | segment | mem]``, the next memory is the
  last layer at the last ``m`` positions, logits are sliced at the token positions and concatenated.
- :func:`official_encoder`: ``RMTEncoderForSequenceClassification``: right-aligned segments,
  ``[CLS] mem [SEP] segment [SEP]``, memory from positions ``1..m``, the head reads the last segment.
- :func:`official_seq2seq`: ``RMTEncoderDecoderForConditionalGeneration``: right-aligned segments,
  ``[BOS] mem segment [EOS]`` (BOS where the tokenizer has one), the whole model runs on every segment, the next
  memory is the encoder's last layer at the memory positions, the output is the last segment's.

Rows must share one length: the official code right-pads rows of different lengths and puts the write slots
after the padding, which rmt_fast deliberately does not copy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def official_decoder(model, memory: torch.Tensor, input_ids: torch.Tensor, segment_size: int, labels=None,
                     keep_logits: bool = True):
    """Returns ``(logits [B, T, V] or None, final memory [B, m, d], loss or None)``; ``memory``: ``[m, d]``.

    The loss is the shifted LM cross-entropy over the whole sequence (mean over targets). As the official
    ``RecurrentWrapper``, every segment's HF output (logits and hidden states) is kept until the end."""
    m = memory.shape[0]
    mem = memory[None].expand(input_ids.shape[0], -1, -1)
    logits, cell_outputs = [], []
    for seg in input_ids.split(segment_size, dim=1):
        x = torch.cat([mem, model.get_input_embeddings()(seg), mem], 1)
        out = model(inputs_embeds=x, output_hidden_states=True)
        cell_outputs.append(out)
        mem = out.hidden_states[-1][:, -m:] if m else mem
        seg_logits = out.logits[:, m:m + seg.shape[1]]
        if keep_logits:
            logits.append(seg_logits)
    if labels is not None and not keep_logits:
        raise ValueError("official_decoder: labels need keep_logits=True (the loss spans segment borders)")
    if not keep_logits:
        return None, mem, None
    logits = torch.cat(logits, 1)
    loss = None
    if labels is not None:
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
    return logits, mem, loss


def official_encoder(model, memory: torch.Tensor, input_ids: torch.Tensor, segment_size: int, cls_token_id: int,
                     sep_token_id: int, pad_token_id: int = 0):
    """Returns ``(the last segment's HF output, final memory [B, m, d])``; ``memory``: ``[m, d]``."""
    m = memory.shape[0]
    b, t = input_ids.shape
    dev = input_ids.device
    bounds = (list(range(t, 0, -segment_size)) + [0])[::-1]
    mem = memory[None].expand(b, -1, -1)
    out = None
    for start, end in zip(bounds, bounds[1:]):
        seg = input_ids[:, start:end]
        ids = torch.cat([torch.full((b, 1), cls_token_id, device=dev), torch.full((b, m), pad_token_id, device=dev),
                         torch.full((b, 1), sep_token_id, device=dev), seg,
                         torch.full((b, 1), sep_token_id, device=dev)], 1)
        emb = model.get_input_embeddings()(ids)
        emb = torch.cat([emb[:, :1], mem.to(emb.dtype), emb[:, 1 + m:]], 1)
        out = model(inputs_embeds=emb, output_hidden_states=True)
        mem = out.hidden_states[-1][:, 1:1 + m]
    return out, mem


def official_seq2seq(model, memory: torch.Tensor, input_ids: torch.Tensor, segment_size: int, eos_token_id: int,
                     bos_token_id: int | None = None, pad_token_id: int = 0, labels=None, decoder_input_ids=None,
                     bptt_depth: int | None = None):
    """Returns ``(the last segment's HF output, final memory [B, m, d])``; ``memory``: ``[m, d]``.

    As the official forward, the whole model (encoder and decoder, with ``labels``/``decoder_input_ids``) runs on
    every segment and the output is the last segment's; without either, only the encoder runs (as the official
    ``generate`` does before its last segment). The official code cuts rows with ``torch.chunk`` into near-equal
    pieces; here the segments are ``segment_size`` long and the first is the short one (rmt_fast's right alignment).
    bptt_depth: the memory entering segment ``g`` is detached for ``0 < g < G - bptt_depth`` (rmt_fast's rule; the
    official code also detaches the initial memory, which would leave it without a gradient).
    """
    m = memory.shape[0]
    b, t = input_ids.shape
    dev = input_ids.device
    bounds = (list(range(t, 0, -segment_size)) + [0])[::-1]
    r = int(bos_token_id is not None)
    mem = memory[None].expand(b, -1, -1)
    out = None
    for g, (start, end) in enumerate(zip(bounds, bounds[1:])):
        if bptt_depth is not None and 0 < g < len(bounds) - 1 - bptt_depth:
            mem = mem.detach()
        head = [torch.full((b, 1), bos_token_id, device=dev)] if r else []
        ids = torch.cat(head + [torch.full((b, m), pad_token_id, device=dev), input_ids[:, start:end],
                                torch.full((b, 1), eos_token_id, device=dev)], 1)
        emb = model.get_input_embeddings()(ids)
        emb = torch.cat([emb[:, :r], mem.to(emb.dtype), emb[:, r + m:]], 1)
        if labels is None and decoder_input_ids is None:
            out = model.get_encoder()(inputs_embeds=emb, output_hidden_states=True)
            states = out.hidden_states[-1]
        else:
            out = model(inputs_embeds=emb, labels=labels, decoder_input_ids=decoder_input_ids,
                        output_hidden_states=True)
            states = out.encoder_hidden_states[-1]
        mem = states[:, r:r + m]
    return out, mem
