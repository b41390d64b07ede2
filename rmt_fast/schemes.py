"""One class per RMT mode: how a segment is laid out, where memory is read and written, what a segment records.

This is the only module that branches on the mode. The recurrence (:mod:`rmt_fast.recurrence`), the CUDA-graph
runner and the model ask a :class:`Scheme` instead:

- decoder (:class:`DecoderScheme`): ``[memory (read, m) | tokens (L_b) | memory (write, m) | padding]``, causal
  attention; the next memory is the last layer at the write slots, which sit right after each row's last token;
  each segment records its token logits (and the LM loss on them).
- encoder (:class:`EncoderScheme`): ``[CLS] memory [SEP] tokens [SEP] padding``, full attention; the next memory is
  the last layer at positions ``1..m``; each row records the head's output of its last segment.
- seq2seq (:class:`Seq2SeqScheme`): the encoder of an encoder-decoder model runs ``[BOS] memory tokens [EOS]
  padding`` (BOS only for families that use one) with full attention; the next memory is the encoder's last layer at
  the memory positions; each row records its last segment's encoder states, on which the decoder runs once.

Per segment the recurrence builds one ``[5, B]`` parameter block (:meth:`Scheme.segment_params`): token start,
token count, write offset, gather offset (-1: the row has no tokens in this segment and keeps its memory) and 1
where the segment is the row's last. Everything here is index arithmetic without host synchronisation, so it can
run inside a CUDA graph.
"""
from __future__ import annotations

import abc
import torch
import torch.nn.functional as F

from .ops import SegmentLayout
from .ops.linear_cross_entropy import cross_entropy_sum, linear_cross_entropy

IGNORE_INDEX = -100

# rows of the [5, B] per-segment parameter block
P_START, P_LEN, P_WRITE, P_GATHER, P_LAST = range(5)


def gather_span(src: torch.Tensor, starts: torch.Tensor, lens: torch.Tensor, width: int, fill) -> torch.Tensor:
    """``out[b, j] = src[b, starts[b] + j]`` for ``j < lens[b]``, else ``fill``. src: ``[B, T]`` -> ``[B, width]``."""
    j = torch.arange(width, device=src.device).view(1, -1)
    idx = (starts.view(-1, 1) + j).clamp(max=src.shape[1] - 1)
    out = src.gather(1, idx)
    return torch.where(j < lens.view(-1, 1), out, torch.full_like(out, fill))


class Scheme(abc.ABC):
    """What differs between modes. Subclasses set :attr:`mode`, :attr:`read_offset`, :attr:`default_alignment`."""

    mode: str
    read_offset: int  # first read slot of every row
    default_alignment: str
    special_tokens: tuple[str, ...] = ()  # RMTConfig fields the layout needs
    heads: tuple[str, ...]  # the adapter head kinds this scheme drives
    per_token_heads: tuple[str, ...]  # heads whose output is per token (recorded from every segment)
    finish_kwargs: tuple[str, ...] = ()  # keyword arguments of the model's forward that go to finish
    encoder_decoder = False  # the backbone's decoder runs once after the recurrence (generate: transformers' own)

    def __init__(self, num_mem_tokens: int, *, head: str = "none", memory_bidirectional: bool = False,
                 cls_token_id: int | None = None, sep_token_id: int | None = None, pad_token_id: int | None = None,
                 bos_token_id: int | None = None, eos_token_id: int | None = None):
        if head not in self.heads:
            raise ValueError(f"{self.mode} scheme: head must be one of {self.heads}, got {head!r}")
        self.head = head
        # every segment contributes to the output (per-token heads), or only each row's last segment
        self.output_per_segment = head in self.per_token_heads
        self.m = num_mem_tokens
        self.memory_bidirectional = memory_bidirectional
        self.cls_token_id, self.sep_token_id = cls_token_id, sep_token_id
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id
        self.pad_token_id = pad_token_id
        self.pad = pad_token_id if pad_token_id is not None else 0  # what fills memory slots and padding

    @classmethod
    def from_config(cls, config, head: str = "none") -> Scheme:
        return SCHEMES[config.mode](config.num_mem_tokens, head=head, memory_bidirectional=config.memory_bidirectional,
                                    cls_token_id=config.cls_token_id, sep_token_id=config.sep_token_id,
                                    pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id,
                                    eos_token_id=config.eos_token_id)

    def new_record(self, plan, total_len: int):
        """Where the segment outputs of one call are collected (see :class:`TokenRecord`, :class:`LastSegmentRecord`)."""
        return TokenRecord(plan, total_len) if self.output_per_segment else LastSegmentRecord()

    def check_labels(self, labels: torch.Tensor, input_ids: torch.Tensor) -> None:
        """Raise a ValueError naming ``labels`` when they cannot belong to ``input_ids`` and this head."""
        if self.head == "none":
            raise ValueError(f"labels: a bare {self.mode} (no head) has no loss; wrap a model with a head "
                             f"(e.g. ...ForCausalLM, ...ForSequenceClassification) or drop labels=")
        if self.output_per_segment and labels.shape != input_ids.shape:
            raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(labels.shape)}")
        if not self.output_per_segment and labels.shape[0] != input_ids.shape[0]:
            raise ValueError(f"labels must have one entry per row ({input_ids.shape[0]}), got shape "
                             f"{tuple(labels.shape)}")

    def _token_loss(self, logits, targets, params, width):
        """Summed fp32 cross-entropy of per-token ``logits [B, W, C]`` and its target count."""
        tgt = gather_span(targets, params[P_START], params[P_LEN], width, IGNORE_INDEX)
        loss_sum = cross_entropy_sum(logits.flatten(0, 1), tgt.flatten(), IGNORE_INDEX)
        return loss_sum, (tgt != IGNORE_INDEX).sum()

    def _finish_classifier(self, adapter, res, labels) -> dict:
        output = res["output"]
        logits, last_h = output if isinstance(output, tuple) else (output, None)
        loss = adapter.classification_loss(logits, labels, res.get("num_items")) if labels is not None else None
        return {"loss": loss, "logits": logits, "last_hidden_state": last_h, "hidden_states": res["hidden"]}

    @staticmethod
    @abc.abstractmethod
    def slots(num_mem_tokens: int, bos_token_id: int | None = None) -> int:
        """Positions a segment uses besides its tokens (memory slots and special tokens); ``bos_token_id``: the
        BOS a seq2seq segment starts with (None: none)."""

    def content_mask(self, input_ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Which input positions are content tokens (``keep`` comes from the attention mask)."""
        return keep

    @abc.abstractmethod
    def run_backbone(self, adapter, inputs_embeds, layout, backend: str, output_hidden_states: bool = False,
                     **kwargs):
        """Run the backbone on one segment: (last hidden ``[B, N, d]``, the HF output) — see the subclasses."""

    def segment_params(self, plan) -> torch.Tensor:
        """``[G, 5, B]``: token start, token count, write offset, gather offset, is-last (see module doc)."""
        active = plan.lens > 0
        write_off, gather_off = self._offsets(plan.lens, active)
        g = torch.arange(plan.num_segments, device=plan.lens.device).view(-1, 1)
        is_last = (plan.last.view(1, -1) == g).long()
        return torch.stack([plan.starts, plan.lens, write_off, gather_off, is_last], 1)

    @abc.abstractmethod
    def _offsets(self, lens: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(write offsets, gather offsets)`` ``[G, B]`` from the token counts (gather -1 where a row is idle)."""

    @abc.abstractmethod
    def segment_inputs(self, content: torch.Tensor, params: torch.Tensor, width: int, dense: bool = False):
        """Token ids ``[B, N]`` of one segment (memory slots hold a placeholder) and its :class:`SegmentLayout`.

        params: one ``[5, B]`` block; width: token columns (>= the longest row); dense: every row has ``width``
        tokens.
        """

    def write_offsets(self, params: torch.Tensor) -> torch.Tensor | None:
        """``[B]`` first write slot of each row, or None when the layout has no write slots."""
        return None

    def targets(self, plan, labels: torch.Tensor | None) -> torch.Tensor | None:
        """Per-token training targets in content coordinates ``[B, Tc]``, or None (the loss is taken at the end)."""
        return None

    def token_span(self, width: int) -> slice:
        """Positions of the segment's token columns in the backbone's sequence."""
        return slice(self.m, self.m + width)

    @abc.abstractmethod
    def wants_output(self, keep_logits: bool) -> bool:
        """Whether segments record their output (see :meth:`segment_outputs`) for this call."""

    @abc.abstractmethod
    def segment_outputs(self, adapter, h, out, targets, params, width, want_output):
        """``(output, loss_sum, count)`` of one segment from the backbone's last states ``h`` ``[B, N, d]`` and
        output ``out``. loss_sum: fp32 scalar; count: the number of targets it sums over (long scalar)."""

    def segment_hidden(self, hidden_states: tuple, width: int) -> tuple:
        """The per-layer states a segment records when hidden states are requested."""
        return hidden_states

    @abc.abstractmethod
    def finish(self, adapter, res: dict, labels) -> dict:
        """RMTOutput fields (loss, logits, last_hidden_state, hidden_states) from the recurrence's result."""


class DecoderScheme(Scheme):
    mode = "decoder"
    read_offset = 0
    default_alignment = "left"
    heads = ("lm", "classifier", "none")
    per_token_heads = ("lm", "none")

    @staticmethod
    def slots(num_mem_tokens: int, bos_token_id: int | None = None) -> int:
        return 2 * num_mem_tokens

    def run_backbone(self, adapter, inputs_embeds, layout, backend, output_hidden_states=False, **kwargs):
        """The base model (heads are applied in :meth:`segment_outputs`); no KV cache unless asked (generation)."""
        kwargs.setdefault("use_cache", False)
        return adapter.run_base(inputs_embeds, layout, backend, output_hidden_states, **kwargs)

    def _offsets(self, lens, active):
        return lens + self.m, torch.where(active, lens + self.m, -1)

    def segment_inputs(self, content, params, width, dense=False):
        m = self.m
        toks = gather_span(content, params[P_START], params[P_LEN], width, self.pad)
        slots = torch.full((toks.shape[0], m), self.pad, dtype=toks.dtype, device=toks.device)
        ids = torch.cat([slots, toks, slots], 1)
        return ids, SegmentLayout(m, m, params[P_LEN], causal=True, memory_bidirectional=self.memory_bidirectional,
                                  dense=dense)

    def write_offsets(self, params):
        return params[P_WRITE]

    def targets(self, plan, labels):
        """LM head: the target of content token c is token c+1 of the row (-100 at the row's end and where labels
        say so). Other heads: None."""
        if labels is None or self.head != "lm":
            return None
        lab = labels.gather(1, plan.orig_pos)
        c = torch.arange(lab.shape[1], device=lab.device).view(1, -1)
        lab = torch.where(c < plan.lengths.view(-1, 1), lab, torch.full_like(lab, IGNORE_INDEX))
        return torch.cat([lab[:, 1:], torch.full_like(lab[:, :1], IGNORE_INDEX)], 1)

    def wants_output(self, keep_logits):
        return keep_logits or self.head == "classifier"

    def segment_outputs(self, adapter, h, out, targets, params, width, want_output):
        """LM head: token logits ``[B, W, V]`` and the LM loss; classifier: ``score`` of each row's last token
        ``[B, C]``; bare decoder: token states ``[B, W, d]``."""
        tok_h = h[:, self.token_span(width)]
        loss_sum = h.new_zeros((), dtype=torch.float32)
        count = torch.zeros((), dtype=torch.long, device=h.device)
        if self.head == "classifier":
            last = (self.m + params[P_LEN] - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, h.shape[-1])
            return adapter.sequence_head(h.gather(1, last).squeeze(1)), loss_sum, count
        if self.head == "none":
            return (tok_h if want_output else None), loss_sum, count
        head = None if want_output or targets is None else adapter.lm_head_linear()
        logits = adapter.lm_logits(tok_h) if (want_output or (targets is not None and head is None)) else None
        if targets is not None:
            if logits is not None:
                loss_sum, count = self._token_loss(logits, targets, params, width)
            else:  # only the loss is needed: [B, W, V] fp32 logits never exist
                tgt = gather_span(targets, params[P_START], params[P_LEN], width, IGNORE_INDEX)
                loss_sum = linear_cross_entropy(tok_h.flatten(0, 1), *head, tgt.flatten(), IGNORE_INDEX)
                count = (tgt != IGNORE_INDEX).sum()
        return (logits if want_output else None), loss_sum, count

    def segment_hidden(self, hidden_states, width):
        return tuple(x[:, self.token_span(width)] for x in hidden_states)

    def finish(self, adapter, res, labels):
        if self.head == "classifier":
            return self._finish_classifier(adapter, res, labels)
        loss = res["loss_sum"] / res["count"].clamp(min=1) if labels is not None else None
        name = "logits" if self.head == "lm" else "last_hidden_state"
        return {"loss": loss, name: res["output"], "hidden_states": res["hidden"]}


class EncoderScheme(Scheme):
    mode = "encoder"
    read_offset = 1  # after [CLS]
    default_alignment = "right"
    special_tokens = ("cls_token_id", "sep_token_id")
    heads = ("classifier", "token_classifier", "none")
    per_token_heads = ("token_classifier",)

    @staticmethod
    def slots(num_mem_tokens: int, bos_token_id: int | None = None) -> int:
        return num_mem_tokens + 3

    def content_mask(self, input_ids, keep):
        # as the official RMT encoder: special tokens in the input are dropped, the layout adds its own
        for t in (self.cls_token_id, self.sep_token_id, self.pad_token_id):
            if t is not None:
                keep = keep & (input_ids != t)
        return keep

    def run_backbone(self, adapter, inputs_embeds, layout, backend, output_hidden_states=False, **kwargs):
        """Heads run as the whole HF model (the head on every position); a bare encoder as its base model."""
        if self.head == "none":
            return adapter.run_base(inputs_embeds, layout, backend, output_hidden_states, **kwargs)
        return adapter.run_whole(inputs_embeds, layout, backend, **kwargs)

    def _offsets(self, lens, active):
        return torch.zeros_like(lens), torch.where(active, 1, -1)

    def segment_inputs(self, content, params, width, dense=False):
        m, lens = self.m, params[P_LEN]
        toks = gather_span(content, params[P_START], lens, width, self.pad)
        b = toks.shape[0]
        head = torch.full((b, m + 2), self.pad, dtype=toks.dtype, device=toks.device)
        head[:, 0] = self.cls_token_id
        head[:, m + 1] = self.sep_token_id
        tail = torch.full((b, 1), self.pad, dtype=toks.dtype, device=toks.device)
        ids = torch.cat([head, toks, tail], 1)
        ids.scatter_(1, (lens + m + 2).view(-1, 1), self.sep_token_id)  # [SEP] right after each row's tokens
        return ids, SegmentLayout(m + 2, 0, lens + 1, causal=False, dense=dense)

    def token_span(self, width):
        return slice(self.m + 2, self.m + 2 + width)

    def targets(self, plan, labels):
        """Token classifier: each content token's own label in content coordinates ``[B, Tc]``. Others: None."""
        if labels is None or self.head != "token_classifier":
            return None
        lab = labels.gather(1, plan.orig_pos)
        c = torch.arange(lab.shape[1], device=lab.device).view(1, -1)
        return torch.where(c < plan.lengths.view(-1, 1), lab, torch.full_like(lab, IGNORE_INDEX))

    def wants_output(self, keep_logits):
        # the last segment's output is the model's output (small); per-token logits only when kept
        return keep_logits or self.head != "token_classifier"

    def segment_outputs(self, adapter, h, out, targets, params, width, want_output):
        """Classifier: ``(head logits [B, C], last states [B, N, d])``; token classifier: token logits
        ``[B, W, C]`` and their loss; bare encoder: the last states ``[B, N, d]``."""
        loss_sum = h.new_zeros((), dtype=torch.float32)
        count = torch.zeros((), dtype=torch.long, device=h.device)
        if self.head == "token_classifier":
            logits = out.logits[:, self.token_span(width)]
            if targets is not None:
                loss_sum, count = self._token_loss(logits, targets, params, width)
            return (logits if want_output else None), loss_sum, count
        output = (out.logits, h) if self.head == "classifier" else h
        return (output if want_output else None), loss_sum, count

    def finish(self, adapter, res, labels):
        if self.head == "classifier":
            return self._finish_classifier(adapter, res, labels)
        if self.head == "token_classifier":
            loss = res["loss_sum"] / res["count"].clamp(min=1) if labels is not None else None
            return {"loss": loss, "logits": res["output"], "hidden_states": res["hidden"]}
        return {"loss": None, "last_hidden_state": res["output"], "hidden_states": res["hidden"]}


class Seq2SeqScheme(Scheme):
    """Encoder-decoder models (T5, BART ``...ForConditionalGeneration``), as the official
    ``RMTEncoderDecoderForConditionalGeneration``: the recurrence runs the encoder on each segment
    ``[BOS] memory tokens [EOS] padding`` (BOS only when ``bos_token_id`` is set: BART yes, T5 no) with full attention,
    the next memory is the encoder's last layer at the memory positions, and the decoder runs once, on each row's last
    segment's encoder states (:meth:`finish`). Segments are right-aligned by default (the first segment is the short
    one), as for encoders: the question at the end of the input gets a full last segment. BOS, EOS and padding tokens
    in the input are dropped (the layout adds its own), as the official code does.
    """

    mode = "seq2seq"
    default_alignment = "right"
    special_tokens = ("eos_token_id",)
    heads = ("seq2seq",)
    per_token_heads = ()
    finish_kwargs = ("decoder_input_ids", "decoder_attention_mask")
    encoder_decoder = True

    def __init__(self, num_mem_tokens: int, **kwargs):
        super().__init__(num_mem_tokens, **kwargs)
        self.read_offset = int(self.bos_token_id is not None)  # after BOS

    @staticmethod
    def slots(num_mem_tokens: int, bos_token_id: int | None = None) -> int:
        return num_mem_tokens + 1 + int(bos_token_id is not None)

    def content_mask(self, input_ids, keep):
        for t in (self.bos_token_id, self.eos_token_id, self.pad_token_id):
            if t is not None:
                keep = keep & (input_ids != t)
        return keep

    def check_labels(self, labels, input_ids):
        b = input_ids.shape[0]
        if labels.dim() != 2 or labels.shape[0] != b or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"labels must be the target token ids [B, L] of the decoder ({b} rows; -100 = ignore), "
                             f"got shape {tuple(labels.shape)} {labels.dtype}")

    def run_backbone(self, adapter, inputs_embeds, layout, backend, output_hidden_states=False, **kwargs):
        """The encoder alone (the decoder runs once, in :meth:`finish`)."""
        return adapter.run_encoder(inputs_embeds, layout, backend, output_hidden_states)

    def _offsets(self, lens, active):
        return torch.zeros_like(lens), torch.where(active, self.read_offset, -1)

    def segment_inputs(self, content, params, width, dense=False):
        r, m, lens = self.read_offset, self.m, params[P_LEN]
        toks = gather_span(content, params[P_START], lens, width, self.pad)
        b = toks.shape[0]
        head = torch.full((b, r + m), self.pad, dtype=toks.dtype, device=toks.device)
        if r:
            head[:, 0] = self.bos_token_id
        tail = torch.full((b, 1), self.pad, dtype=toks.dtype, device=toks.device)
        ids = torch.cat([head, toks, tail], 1)
        ids.scatter_(1, (lens + r + m).view(-1, 1), self.eos_token_id)  # [EOS] right after each row's tokens
        return ids, SegmentLayout(r + m, 0, lens + 1, causal=False, dense=dense)

    def wants_output(self, keep_logits):
        return True  # the decoder reads the last segment's encoder states

    def segment_outputs(self, adapter, h, out, targets, params, width, want_output):
        """``(encoder states [B, N, d], valid positions [B])``: what the decoder reads if this is the row's last."""
        loss_sum = h.new_zeros((), dtype=torch.float32)
        count = torch.zeros((), dtype=torch.long, device=h.device)
        valid = self.read_offset + self.m + 1 + params[P_LEN]
        return ((h, valid) if want_output else None), loss_sum, count

    def finish(self, adapter, res, labels, decoder_input_ids=None, decoder_attention_mask=None):
        """The decoder on each row's last segment: ``model(encoder_outputs=(states,), attention_mask=mask,
        labels=labels, decoder_input_ids=...)``, loss and logits as transformers computes them (labels ``[B, L]`` are
        shifted into the decoder's inputs there). Without labels and decoder_input_ids the decoder does not run."""
        states, valid = res["output"]
        mask = (torch.arange(states.shape[1], device=states.device).view(1, -1) < valid.view(-1, 1)).long()
        fields = {"loss": None, "logits": None, "last_hidden_state": states, "encoder_attention_mask": mask,
                  "hidden_states": res["hidden"]}
        if decoder_input_ids is not None and (decoder_input_ids.dim() != 2 or decoder_input_ids.shape[0] !=
                                              states.shape[0] or decoder_input_ids.dtype.is_floating_point):
            raise ValueError(f"decoder_input_ids must be token ids [B, L] with B = {states.shape[0]} rows, got shape "
                             f"{tuple(decoder_input_ids.shape)} {decoder_input_ids.dtype}")
        if labels is None and decoder_input_ids is None:
            return fields
        out = adapter.run_decoder(states, mask, labels, decoder_input_ids, decoder_attention_mask)
        loss = out.loss
        if loss is not None and labels is not None and res.get("num_items") is not None:
            # transformers' seq2seq loss is the mean over the label entries that are not -100; Trainer's
            # num_items_in_batch asks for their sum over it (exact under gradient accumulation and over processes)
            loss = loss * (labels != -100).sum() / res["num_items"]
        fields.update(loss=loss, logits=out.logits)
        return fields


class TokenRecord:
    """Collects per-token outputs ``[B, W, ...]`` of every segment into ``[B, T, ...]`` at the input's columns.

    Index arithmetic only (no boolean masks, no host synchronisation): positions of a segment that hold no token
    of the row are sent to a discard column ``T`` that is cut off at the end.
    """

    def __init__(self, plan, total_len: int):
        self.plan, self.total_len = plan, total_len
        self.out: torch.Tensor | None = None

    def _columns(self, params: torch.Tensor, width: int, device) -> torch.Tensor:
        plan = self.plan
        j = torch.arange(width, device=device).view(1, -1)
        c = (params[P_START].view(-1, 1) + j).clamp(max=plan.orig_pos.shape[1] - 1)
        cols = plan.orig_pos.gather(1, c)
        return torch.where(j < params[P_LEN].view(-1, 1), cols, self.total_len)

    def add(self, params: torch.Tensor, piece: torch.Tensor) -> None:
        """piece: ``[B, W, ...]`` outputs at the segment's token columns."""
        b, w = piece.shape[:2]
        if self.out is None:
            self.out = piece.new_zeros((b, self.total_len + 1) + tuple(piece.shape[2:]))
        cols = self._columns(params, w, piece.device)
        idx = cols.view(b, w, *([1] * (piece.dim() - 2))).expand_as(piece)
        self.out.scatter_(1, idx, piece)

    def result(self) -> torch.Tensor | None:
        return None if self.out is None else self.out[:, :self.total_len]


class LastSegmentRecord:
    """Keeps, for every row, the output of the segment that is the row's last (pads the position dim)."""

    def __init__(self):
        self.out: torch.Tensor | None = None

    def add(self, params: torch.Tensor, new) -> None:
        """new: a tensor ``[B, ...]`` or a tuple of them (kept element-wise)."""
        ends = params[P_LAST].bool()
        if isinstance(new, tuple):
            old = self.out if self.out is not None else (None,) * len(new)
            self.out = tuple(_keep_where(ends, n, o) for n, o in zip(new, old))
        else:
            self.out = _keep_where(ends, new, self.out)

    def result(self) -> torch.Tensor | None:
        return self.out


def _keep_where(ends: torch.Tensor, new: torch.Tensor, old: torch.Tensor | None) -> torch.Tensor:
    """``new`` in rows that end here, ``old`` elsewhere; pads the position dim of ``[B, N, d]`` states."""
    if old is None:
        old = torch.zeros_like(new)
    if new.dim() == 3 and new.shape[1] != old.shape[1]:
        width = max(new.shape[1], old.shape[1])
        new = F.pad(new, (0, 0, 0, width - new.shape[1]))
        old = F.pad(old, (0, 0, 0, width - old.shape[1]))
    return torch.where(ends.view(-1, *([1] * (new.dim() - 1))), new, old)


SCHEMES: dict[str, type[Scheme]] = {"decoder": DecoderScheme, "encoder": EncoderScheme, "seq2seq": Seq2SeqScheme}


def scheme_class(mode: str) -> type[Scheme]:
    if mode not in SCHEMES:
        raise ValueError(f"mode must be one of {tuple(SCHEMES)}, got {mode!r}")
    return SCHEMES[mode]
