"""Streaming generation for decoder RMTs, unbounded in length.

Full segments of the prompt run through the recurrence; the current (partial) segment is prefilled as
``[memory | tokens]`` into a KV cache and decoding continues token by token. When the segment is full, the
memory is updated by running ``[memory | segment | memory]`` (exactly what the forward pass does) and decoding
goes on in a fresh segment. Greedy output equals re-running ``rmt(seq).logits[:, -1].argmax()`` every step.
"""
from __future__ import annotations

import torch

from .ops import SegmentLayout


def _sample(logits: torch.Tensor, do_sample: bool, temperature: float, top_k, top_p, generator) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class _SegmentDecoder:
    """Decodes inside one segment with a KV cache; rolls the memory over when the segment is full."""

    def __init__(self, rmt, memory: torch.Tensor):
        self.rmt, self.memory = rmt, memory
        self.cfg = rmt.rmt_config
        self.tokens: torch.Tensor | None = None  # [B, n] tokens of the current segment
        self.cache = None

    def _base(self, inputs_embeds, layout):
        from transformers import DynamicCache

        a = self.rmt.adapter
        if self.cache is None:
            self.cache = DynamicCache(config=a.model.config)
        h, _ = a.run_segment(inputs_embeds, layout, self.cfg.backend, use_cache=True, **{a.cache_kwarg: self.cache})
        return a.lm_logits(h[:, -1])

    def start(self, tokens: torch.Tensor) -> torch.Tensor:
        """Prefill ``[memory | tokens]``; returns next-token logits ``[B, V]``."""
        a, m = self.rmt.adapter, self.cfg.num_mem_tokens
        self.tokens, self.cache = tokens, None
        b, n = tokens.shape
        x = torch.cat([self.memory.to(a.model.dtype), a.embed(tokens)], 1)
        lens = torch.full((b,), n, dtype=torch.long, device=tokens.device)
        layout = SegmentLayout(m, 0, lens, causal=True, memory_bidirectional=self.cfg.memory_bidirectional)
        return self._base(x, layout)

    def push(self, token: torch.Tensor) -> torch.Tensor:
        """Append ``token`` ``[B]``; returns the logits after it."""
        if self.tokens.shape[1] == self.cfg.segment_size:
            out = self.rmt(self.tokens, memory=self.memory, return_logits=False)
            self.memory = out.memory
            return self.start(token[:, None])
        self.tokens = torch.cat([self.tokens, token[:, None]], 1)
        return self._base(self.rmt.adapter.embed(token[:, None]), None)


@torch.no_grad()
def generate(rmt, input_ids, max_new_tokens: int, attention_mask=None, do_sample=False, temperature=1.0, top_k=None,
             top_p=None, eos_token_id=None, pad_token_id=None, generator=None, progress=None) -> torch.Tensor:
    cfg = rmt.rmt_config
    if cfg.mode != "decoder" or rmt.adapter.head != "lm":
        raise ValueError("generate needs a decoder with an LM head (a ...ForCausalLM model)")
    if cfg.segment_alignment != "left":
        raise ValueError("generate needs segment_alignment='left' (right alignment re-segments the whole sequence "
                         "at every new token)")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    input_ids, keep = rmt._content_mask(input_ids, attention_mask)
    input_ids = input_ids.to(rmt.device)
    if not bool(keep.all()):
        # rows of different lengths decode at different segment offsets: run them one at a time
        pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
        rows = [generate(rmt, input_ids[i][keep[i]][None], max_new_tokens, None, do_sample, temperature, top_k,
                         top_p, eos_token_id, pad_token_id, generator)[0] for i in range(input_ids.shape[0])]
        width = max(r.shape[0] for r in rows)
        return torch.stack([torch.cat([r, r.new_full((width - r.shape[0],), pad)]) for r in rows])
    b, t = input_ids.shape
    s = cfg.segment_size
    done_len = ((t - 1) // s) * s  # tokens in completed segments; the rest is the current segment
    memory = rmt.initial_memory(b)
    if done_len:
        memory = rmt(input_ids[:, :done_len], return_logits=False).memory
    dec = _SegmentDecoder(rmt, memory)
    logits = dec.start(input_ids[:, done_len:])
    finished = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
    pad = pad_token_id if pad_token_id is not None else eos_token_id
    new = []
    steps = range(max_new_tokens) if progress is None else progress(range(max_new_tokens))
    for i in steps:
        tok = _sample(logits, do_sample, temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            if pad is not None:
                tok = torch.where(finished, torch.full_like(tok, pad), tok)
            finished |= tok == eos_token_id
        new.append(tok)
        if (eos_token_id is not None and bool(finished.all())) or i == max_new_tokens - 1:
            break
        logits = dec.push(tok)
    if not new:
        return input_ids
    return torch.cat([input_ids, torch.stack(new, 1)], 1)
