"""Streaming generation for decoder RMTs, unbounded in length, with transformers' conventions.

Full segments of the prompt run through the recurrence; the current (partial) segment is prefilled as
``[memory | tokens]`` into a KV cache and decoding continues token by token. When the segment is full, the
memory is updated by running ``[memory | segment | memory]`` (exactly what the forward pass does) and decoding
goes on in a fresh segment. Greedy output equals re-running ``rmt(seq).logits[:, -1].argmax()`` every step.

As transformers' ``generate``: the result is ``[input_ids | new tokens]``: the prompt block comes back as given
(padding stays where it was, left or right) and ``out[:, T:]`` are the new tokens of every row. A row that has
produced an eos token gets ``pad_token_id`` afterwards; decoding stops when every row has. Rows are decoded from
their own tokens (``attention_mask``), so each row's result equals decoding that row alone; rows with the same
number of tokens are decoded together.

Seq2seq models (T5, BART) decode with transformers' own ``generate`` from the last segment's encoder states
(:func:`generate_seq2seq`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .ops import SegmentLayout

DEFAULT_MAX_NEW_TOKENS = 20


@dataclass(frozen=True)
class DecodingSettings:
    """Validated decoding arguments. top_k/top_p None: no filtering. eos_token_ids: empty = never stop early."""

    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    @classmethod
    def resolve(cls, prompt_width: int, model_generation_config=None, generation_config=None, *,
                max_new_tokens=None, max_length=None, do_sample=None, temperature=None, top_k=None, top_p=None,
                repetition_penalty=None, eos_token_id=None, pad_token_id=None) -> DecodingSettings:
        """Each setting as transformers picks it: the explicit argument, else ``generation_config``'s (a
        transformers GenerationConfig), else the backbone's own ``generation_config``'s, else transformers'
        default (sampling: ``top_k=50``). ``max_length`` counts the prompt width ``T``; without any length,
        ``DEFAULT_MAX_NEW_TOKENS`` new tokens. ``eos_token_id=[]`` turns early stopping off."""
        from transformers import GenerationConfig

        if generation_config is not None and not isinstance(generation_config, GenerationConfig):
            raise TypeError(f"generation_config must be a transformers GenerationConfig, got "
                            f"{type(generation_config).__name__}")
        if max_new_tokens is not None and max_length is not None:
            raise ValueError(f"pass max_new_tokens or max_length, not both (got {max_new_tokens} and {max_length})")
        layers = [c for c in (generation_config, model_generation_config) if c is not None]

        def pick(name, given=None, default=None):
            if given is not None:
                return given
            return next((getattr(c, name) for c in layers if getattr(c, name, None) is not None), default)

        for name in ("num_beams", "num_return_sequences"):
            if pick(name, default=1) != 1:
                raise ValueError(f"generation_config.{name} must be 1 (greedy or sampling, one sequence per row), "
                                 f"got {pick(name)}; pass generation_config=GenerationConfig({name}=1)")
        if max_new_tokens is None and max_length is None:
            for c in layers:
                if c.max_new_tokens is not None or c.max_length is not None:
                    max_new_tokens, max_length = c.max_new_tokens, (c.max_length if c.max_new_tokens is None else None)
                    break
        if max_length is not None:
            _check_int("max_length", max_length, prompt_width,
                       f"the prompt width {prompt_width} (max_length counts the prompt)")
            max_new_tokens = max_length - prompt_width
        elif max_new_tokens is None:
            max_new_tokens = DEFAULT_MAX_NEW_TOKENS
        _check_int("max_new_tokens", max_new_tokens, 0)

        do_sample = pick("do_sample", do_sample, False)
        if not isinstance(do_sample, bool):
            raise ValueError(f"do_sample must be a bool, got {do_sample!r}")
        temperature = _check_positive("temperature", pick("temperature", temperature, 1.0))
        top_k = pick("top_k", top_k, 50)
        _check_int("top_k", top_k, 0)
        top_p = pick("top_p", top_p, 1.0)
        if not (_is_number(top_p) and 0 < top_p <= 1):
            raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
        repetition_penalty = pick("repetition_penalty", repetition_penalty, 1.0)
        repetition_penalty = _check_positive("repetition_penalty", repetition_penalty)
        eos_ids = _token_ids("eos_token_id", pick("eos_token_id", eos_token_id))
        pad = pick("pad_token_id", pad_token_id)
        if pad is not None:
            _check_int("pad_token_id", pad, 0)
        elif eos_ids:
            pad = eos_ids[0]  # as transformers: finished rows are filled with the (first) eos token
        return cls(int(max_new_tokens), do_sample, temperature, top_k or None, None if top_p == 1 else float(top_p),
                   repetition_penalty, eos_ids, pad)

    def next_token(self, logits: torch.Tensor, seen: torch.Tensor | None, generator=None) -> torch.Tensor:
        """logits ``[B, V]``, seen ``[B, V]`` bool (tokens in the row so far, for the repetition penalty) ->
        token ids ``[B]``. Order as transformers: repetition penalty, temperature, top-k, top-p."""
        logits = logits.float()
        if seen is not None:
            p = self.repetition_penalty
            logits = torch.where(seen, torch.where(logits < 0, logits * p, logits / p), logits)
        if not self.do_sample:
            return logits.argmax(-1)
        logits = logits / self.temperature
        if self.top_k is not None:
            kth = torch.topk(logits, min(self.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p is not None:
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            probs = sorted_logits.softmax(-1)
            drop = probs.cumsum(-1) - probs >= self.top_p  # keep the smallest prefix whose mass reaches top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
        return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_int(name: str, v, low: int, what: str | None = None) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"{name} must be an int >= {what or low}, got {v!r}")


def _check_positive(name: str, v) -> float:
    if not (_is_number(v) and v > 0):
        raise ValueError(f"{name} must be a number > 0, got {v!r}")
    return float(v)


def _token_ids(name: str, v) -> tuple[int, ...]:
    """None, an int, or a list/tuple/tensor of ints -> a tuple of token ids."""
    if v is None:
        return ()
    ids = v.flatten().tolist() if isinstance(v, torch.Tensor) else v
    ids = tuple(ids) if isinstance(ids, (list, tuple)) else (ids,)
    if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
        raise ValueError(f"{name} must be an int >= 0 or a list of them, got {v!r}")
    return ids


class _SegmentDecoder:
    """Decodes inside one segment with a KV cache; rolls the memory (and the short-term cache) over when the
    segment is full."""

    def __init__(self, rmt, memory: torch.Tensor, short_term=None):
        self.rmt, self.memory = rmt, memory
        self.short_term = short_term  # the short-term cache the previous segment left (num_cache_tokens), or None
        self.cfg = rmt.rmt_config
        self.tokens: torch.Tensor | None = None  # [B, n] tokens of the current segment
        self.cache = None

    def _base(self, inputs_embeds, layout, **extra):
        from transformers import DynamicCache

        a = self.rmt.adapter
        if self.cache is None:
            self.cache = DynamicCache(config=a.model.config)
        h, _ = self.rmt.runner.scheme.run_backbone(a, inputs_embeds, layout, self.cfg.backend, use_cache=True,
                                                   **{a.cache_kwarg: self.cache}, **extra)
        return a.lm_logits(h[:, -1])

    def start(self, tokens: torch.Tensor) -> torch.Tensor:
        """Prefill ``[memory | tokens]`` (after the short-term cache); returns next-token logits ``[B, V]``."""
        a, m = self.rmt.adapter, self.cfg.num_mem_tokens
        self.tokens, self.cache = tokens, None
        b, n = tokens.shape
        x = torch.cat([self.memory.to(a.model.dtype), a.embed(tokens)], 1)
        lens = torch.full((b,), n, dtype=torch.long, device=tokens.device)
        layout = SegmentLayout(m, 0, lens, causal=True, memory_bidirectional=self.cfg.memory_bidirectional)
        if self.short_term is not None:
            layout, extra = self.rmt.runner.with_cache(layout, self.short_term)
            return self._base(x, layout, **extra)
        return self._base(x, layout)

    def push(self, token: torch.Tensor) -> torch.Tensor:
        """Append ``token`` ``[B]``; returns the logits after it."""
        if self.tokens.shape[1] == self.cfg.segment_size:
            out = self.rmt(self.tokens, memory=self.memory, return_logits=False, short_term_cache=self.short_term)
            self.memory, self.short_term = out.memory, out.short_term_cache
            return self.start(token[:, None])
        self.tokens = torch.cat([self.tokens, token[:, None]], 1)
        extra = {}
        if self.short_term is not None:
            from .short_term_cache import DecodingPrefix

            extra["rmt_cache"] = DecodingPrefix(self.short_term)
        return self._base(self.rmt.adapter.embed(token[:, None]), None, **extra)


def _decode(rmt, content: torch.Tensor, st: DecodingSettings, generator, progress) -> torch.Tensor:
    """Decode after ``content`` ``[R, n]`` (rows without padding, all n tokens long) -> new tokens ``[R, k]``,
    k <= max_new_tokens (fewer when every row finished)."""
    r, n = content.shape
    s = rmt.rmt_config.segment_size
    done_len = ((n - 1) // s) * s  # tokens in completed segments; the rest is the current segment
    memory, short_term = rmt.initial_memory(r), None
    if done_len:
        out = rmt(content[:, :done_len], return_logits=False)
        memory, short_term = out.memory, out.short_term_cache
    dec = _SegmentDecoder(rmt, memory, short_term)
    logits = dec.start(content[:, done_len:])
    seen = None
    if st.repetition_penalty != 1.0:
        seen = torch.zeros(r, logits.shape[-1], dtype=torch.bool, device=logits.device)
        seen.scatter_(1, content, True)
    eos = torch.tensor(st.eos_token_ids, dtype=content.dtype, device=content.device)
    finished = torch.zeros(r, dtype=torch.bool, device=content.device)
    new = []
    steps = range(st.max_new_tokens) if progress is None else progress(range(st.max_new_tokens))
    for i in steps:
        tok = st.next_token(logits, seen, generator)
        if eos.numel():
            tok = torch.where(finished, torch.full_like(tok, st.pad_token_id), tok)
            finished |= torch.isin(tok, eos)
        new.append(tok)
        if bool(finished.all()) or i == st.max_new_tokens - 1:
            break
        if seen is not None:
            seen.scatter_(1, tok[:, None], True)
        logits = dec.push(tok)
    return torch.stack(new, 1) if new else content.new_empty((r, 0))


@torch.no_grad()
def generate(rmt, input_ids, attention_mask=None, generation_config=None, generator=None, progress=None,
             **settings) -> torch.Tensor:
    """Decode after ``input_ids`` ``[B, T]``; returns ``[B, T + k]``: the prompt block as given, then the new
    tokens (``k <= max_new_tokens``). ``settings``: the keyword arguments of :meth:`DecodingSettings.resolve`."""
    cfg = rmt.rmt_config
    if cfg.mode != "decoder" or rmt.adapter.head != "lm":
        raise ValueError("generate needs a decoder with an LM head (a ...ForCausalLM model)")
    if cfg.segment_alignment != "left":
        raise ValueError("generate needs segment_alignment='left' (right alignment re-segments the whole sequence "
                         "at every new token)")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    input_ids, keep = rmt._content_mask(input_ids, attention_mask)
    input_ids, keep = input_ids.to(rmt.device), keep.to(rmt.device)
    b, t = input_ids.shape
    st = DecodingSettings.resolve(t, getattr(rmt.adapter.model, "generation_config", None), generation_config,
                                  **settings)
    lengths = keep.sum(1)
    fill = st.pad_token_id if st.pad_token_id is not None else 0  # shown only after a row's eos
    new = input_ids.new_full((b, st.max_new_tokens), fill)
    width = 0
    for n in lengths.unique().tolist():
        rows = (lengths == n).nonzero().flatten()
        content = input_ids[rows][keep[rows]].view(len(rows), n)
        tokens = _decode(rmt, content, st, generator, progress)
        new[rows, :tokens.shape[1]] = tokens
        width = max(width, tokens.shape[1])
    return torch.cat([input_ids, new[:, :width]], 1)


@torch.no_grad()
def generate_seq2seq(rmt, input_ids, attention_mask=None, generation_config=None, generator=None, progress=None,
                     **kwargs) -> torch.Tensor:
    """Seq2seq generation, as the official ``RMTEncoderDecoderForConditionalGeneration.generate``: the encoder runs
    over every segment of ``input_ids`` ``[B, T]`` (memory carried as in the forward pass), then transformers' own
    ``generate`` decodes from each row's last segment: ``model.generate(encoder_outputs=..., attention_mask=...,
    **kwargs)``. Returns what that returns: the decoder's sequences ``[B, k]`` (starting with the decoder start token).

    kwargs: transformers' generation arguments (those given as None are left out). progress: wraps the segment range
    of the encoding. generator: not supported (transformers samples from torch's global RNG).
    """
    from transformers.modeling_outputs import BaseModelOutput

    if generator is not None:
        raise ValueError("generator: seq2seq generation runs transformers' generate, which samples from torch's "
                         "global RNG; seed it with torch.manual_seed instead")
    encoded = rmt(input_ids, attention_mask=attention_mask, progress=progress)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if generation_config is not None:
        kwargs["generation_config"] = generation_config
    return rmt.adapter.model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=encoded.last_hidden_state),
                                      attention_mask=encoded.encoder_attention_mask, **kwargs)
