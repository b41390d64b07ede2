"""The synthetic memory tasks of "Scaling Transformer to 1M tokens and beyond with RMT" (2304.11062).

Each sample is a token sequence of **exactly** ``num_segments * segment_size`` content tokens (no special
tokens; the RMT wrapper adds ``[CLS]``/memory/``[SEP]`` per segment) made of fact(s), noise sentences
and a question at the very end:

* ``"memorize"``        -- the fact first, then noise, then the question;
* ``"detect_memorize"`` -- the fact at a uniformly random sentence boundary inside the noise;
* ``"reasoning"``       -- two QA4 facts at random boundaries (in random order).

Encoders (``for_decoder=False``) get a 6-way class label (``ANSWERS.index(answer)``).  Decoders
(``for_decoder=True``) get the answer's tokens appended right after the question, inside the same budget,
and ``labels`` that are ``-100`` except at the answer positions, where ``labels[t] == input_ids[t]``
(the HuggingFace causal-LM convention: the model shifts labels by one internally).

Pieces (sentences, facts, the question, the answer) are tokenized separately, each with the tokenizer's
piece prefix (a space for WordPiece/BPE/character tokenizers, see ``tokenization.piece_prefix``) and
their ids concatenated.  Noise comes from a pre-tokenized :class:`~rmt_fast.experiments.tasks.noise.TokenPool`:
sentences are drawn i.i.d. until the next one would overflow the budget, and that one is cut to fill it
exactly -- noise truncation never cuts a fact, the question or the answer.

Sample ``i`` is a pure function of ``(task, num_segments, segment_size, split, seed, i)`` (and of the
tokenizer and noise source): its numpy Generator is seeded with that tuple through ``SeedSequence``,
so the train / valid / test streams are disjoint and any sample can be regenerated in isolation.
"""
from __future__ import annotations

import os
import glob
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from . import facts as F
from .noise import (HFDatasetNoise, NoiseSource, PydocNoise, TaskFileNotFoundError,
                    TextFilesNoise, TokenPool)
from .tokenization import encode_batch, piece_prefix

__all__ = ["TASKS", "SPLITS", "PLACEMENTS", "MemoryTaskDataset", "make_task", "collate", "default_noise"]

TASKS = ("memorize", "detect_memorize", "reasoning")
SPLITS = ("train", "valid", "test")
#: where detect_memorize and reasoning put their facts: "anywhere" (at noise-sentence boundaries, uniformly: the
#: paper's text) or "segment_start" (each fact at the start of a randomly chosen segment: the official reasoning
#: script); memorize always puts its fact first
PLACEMENTS = ("anywhere", "segment_start")
_DEFAULT_LENGTH = {"train": 10 ** 6, "valid": 1000, "test": 1000}
_IGNORE = -100

_default_noise: Optional[PydocNoise] = None


def default_noise() -> PydocNoise:
    """The shared :class:`PydocNoise` instance (its token pools are cached per tokenizer)."""
    global _default_noise
    if _default_noise is None:
        _default_noise = PydocNoise()
    return _default_noise


_path_noise_cache: Dict[tuple, NoiseSource] = {}


def _path_noise(paths: List[str]) -> NoiseSource:
    """A NoiseSource for paths given directly, cached by (path, mtime, size) so that the token pool
    is built once even when several datasets (splits, lengths) use the same files."""
    key = []
    for p in paths:
        if not os.path.exists(p):
            raise TaskFileNotFoundError(f"noise: paths: noise file not found: {p!r}")
        st = os.stat(p)
        key.append((os.path.abspath(p), st.st_mtime_ns, st.st_size))
    key = tuple(key)
    if key not in _path_noise_cache:
        if len(paths) == 1 and os.path.isdir(paths[0]):
            _path_noise_cache[key] = HFDatasetNoise(paths[0])
        else:
            _path_noise_cache[key] = TextFilesNoise(paths)
    return _path_noise_cache[key]


def _resolve_noise(noise) -> NoiseSource:
    if noise is None:
        return default_noise()
    if isinstance(noise, NoiseSource):
        return noise
    if isinstance(noise, (str, os.PathLike)):
        return _path_noise([os.fspath(noise)])
    if isinstance(noise, (list, tuple)) and noise and all(isinstance(p, (str, os.PathLike)) for p in noise):
        return _path_noise([os.fspath(p) for p in noise])
    raise TypeError("noise must be None (Python's pydoc texts), a NoiseSource, a text file path, "
                    "a list of text file paths, or a saved HF dataset directory; "
                    f"got {type(noise).__name__}")


def _babi_file(babi_path, task: str, split: str) -> str:
    """A bAbI file path, or the task's file for ``split`` inside an ``en``/``en-10k`` directory."""
    if not isinstance(babi_path, (str, os.PathLike)):
        raise TypeError(f"babi_path must be a path (str or os.PathLike), got {type(babi_path).__name__}")
    p = os.fspath(babi_path)
    if os.path.isfile(p):
        return p
    if os.path.isdir(p):
        qa = "qa4" if task == "reasoning" else "qa1"
        names = {"train": ["train"], "valid": ["valid", "val"], "test": ["test"]}[split]
        hits = sorted(h for n in names for h in glob.glob(os.path.join(p, f"{qa}_*_{n}.txt")))
        if not hits:
            raise TaskFileNotFoundError(
                f"babi_path: no {qa}_*_{names[0]}.txt in directory {p!r} "
                f"(task {task!r} uses bAbI {qa.upper()}; or pass the file itself)")
        return hits[0]
    raise TaskFileNotFoundError(f"babi_path: bAbI file or directory not found: {p!r}")


class MemoryTaskDataset(Dataset):
    """A map-style dataset of one memory task; see the module docstring and :func:`make_task`.

    ``ds[i]`` is a dict:

    =================  =======================================  =========================================
    key                encoder (``for_decoder=False``)           decoder (``for_decoder=True``)
    =================  =======================================  =========================================
    ``input_ids``      ``int64 [n * segment_size]``              same (question, then the answer, last)
    ``labels``         ``int64 []`` class index in ``answers``  ``int64 [n * segment_size]``: -100 except
                                                                 the answer tokens (= ``input_ids`` there)
    ``answer``         ``str``                                   ``str``
    ``answer_ids``     --                                        ``int64 [k]`` the answer's tokens
    ``fact_positions`` ``int64 [num_facts]`` token index where each fact starts (story order)
    ``question_position`` ``int`` token index where the question starts
    ``facts``          ``list[str]``; ``question``: ``str``
    =================  =======================================  =========================================

    Attributes: ``task, num_segments, segment_size, total_length (= n * segment_size), split, seed,
    for_decoder, answers (tuple of class names; ANSWERS unless a bAbI file has other answers),
    num_classes, answer_token_ids (list of token-id lists, one per class), noise, pool``.
    """

    def __init__(self, task: str, tokenizer, num_segments: int, segment_size: int, split: str = "train",
                 seed: int = 0, noise=None, babi_path=None, for_decoder: bool = False,
                 length: Optional[int] = None, same_axis: Optional[float] = None,
                 facts_early: Optional[float] = None, hub_share: Optional[float] = None,
                 fact_placement: str = "anywhere"):
        # ---- argument validation -------------------------------------------------------------
        if not isinstance(task, str) or task not in TASKS:
            raise ValueError(f"task (name): unknown task {task!r}; choose one of {list(TASKS)}")
        for arg, v in (("num_segments", num_segments), ("segment_size", segment_size), ("seed", seed)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"{arg} must be an int, got {type(v).__name__}")
        if num_segments <= 0:
            raise ValueError(f"num_segments must be >= 1, got {num_segments}")
        if segment_size <= 0:
            raise ValueError(f"segment_size must be >= 1, got {segment_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if split not in SPLITS:
            raise ValueError(f"split: unknown split {split!r}; choose one of {list(SPLITS)}")
        if length is None:
            length = _DEFAULT_LENGTH[split]
        if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length <= 0:
            raise ValueError(f"length must be a positive int, got {length!r}")
        if not isinstance(for_decoder, bool):
            raise TypeError(f"for_decoder must be a bool, got {type(for_decoder).__name__}")
        for name, p in (("same_axis", same_axis), ("hub_share", hub_share)):  # the generated QA4 mix's options
            if p is None:
                continue
            if task != "reasoning" or babi_path is not None:
                raise ValueError(f"{name}: only for the generated reasoning task (task='reasoning', no babi_path)")
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
                raise ValueError(f"{name} must be None or a probability in [0, 1], got {p!r}")
        self.same_axis = None if same_axis is None else float(same_axis)
        self.hub_share = None if hub_share is None else float(hub_share)
        if not isinstance(fact_placement, str) or fact_placement not in PLACEMENTS:
            raise ValueError(f"fact_placement: one of {list(PLACEMENTS)}, got {fact_placement!r}")
        if fact_placement != "anywhere" and task == "memorize":
            raise ValueError("fact_placement: memorize puts its fact first; only detect_memorize and reasoning take "
                             f"{fact_placement!r}")
        self.fact_placement = fact_placement
        if facts_early is not None:
            if task == "memorize":
                raise ValueError("facts_early: memorize puts its facts first; only detect_memorize and reasoning "
                                 "place them at random")
            if isinstance(facts_early, bool) or not isinstance(facts_early, (int, float)) or not 0 <= facts_early <= 1:
                raise ValueError(f"facts_early must be None or a probability in [0, 1], got {facts_early!r}")
        self.facts_early = None if facts_early is None else float(facts_early)

        self.task, self.split, self.seed = task, split, int(seed)
        self.num_segments, self.segment_size = int(num_segments), int(segment_size)
        self.total_length = self.num_segments * self.segment_size
        self.for_decoder, self.length = for_decoder, int(length)
        self.tokenizer = tokenizer
        self.noise = _resolve_noise(noise)
        self.prefix = piece_prefix(tokenizer)

        # ---- facts / questions -------------------------------------------------------------------
        self.babi_file: Optional[str] = None
        self.examples: Optional[List[F.Example]] = None
        if babi_path is not None:
            self.babi_file = _babi_file(babi_path, task, split)
            self.examples = F.read_babi(self.babi_file)
            extra = sorted({e.answer for e in self.examples} - set(F.ANSWERS))
            self.answers = tuple(F.ANSWERS) + tuple(extra)
            texts = sorted({t for e in self.examples for t in e.facts + (e.question,)})
        else:
            self.answers = tuple(F.ANSWERS)
            if task == "reasoning":
                texts = F.all_qa4_facts() + F.all_qa4_questions()
            else:
                texts = F.all_qa1_facts() + F.all_qa1_questions()
        self.num_classes = len(self.answers)
        # every fact/question/answer string is tokenized once, here
        self._tok: Dict[str, np.ndarray] = {
            t: np.asarray(ids, dtype=np.int64)
            for t, ids in zip(texts, encode_batch(tokenizer, [self.prefix + t for t in texts]))}
        self.answer_token_ids: List[List[int]] = encode_batch(tokenizer, [self.prefix + a for a in self.answers])
        self._answer_tok = {a: np.asarray(ids, dtype=np.int64) for a, ids in zip(self.answers, self.answer_token_ids)}
        if any(len(ids) == 0 for ids in self.answer_token_ids):
            raise ValueError("tokenizer: some answers tokenize to nothing")

        # ---- budget check: the largest fact(s)+question(+answer) must fit ---------------------------
        ans_len = max(len(v) for v in self._answer_tok.values()) if for_decoder else 0
        if self.examples is not None:
            need = max(sum(len(self._tok[f]) for f in e.facts) + len(self._tok[e.question])
                       + (len(self._answer_tok[e.answer]) if for_decoder else 0) for e in self.examples)
        else:
            n_facts = 2 if task == "reasoning" else 1
            fact_texts = F.all_qa4_facts() if task == "reasoning" else F.all_qa1_facts()
            q_texts = F.all_qa4_questions() if task == "reasoning" else F.all_qa1_questions()
            need = (n_facts * max(len(self._tok[t]) for t in fact_texts)
                    + max(len(self._tok[t]) for t in q_texts) + ans_len)
        self.min_total_length = need
        if need > self.total_length:
            raise ValueError(
                f"segment_size: num_segments * segment_size = {num_segments} * {segment_size} = "
                f"{self.total_length} tokens cannot hold the {task} facts + question"
                f"{' + answer' if for_decoder else ''} (up to {need} tokens with this tokenizer)")

        self.pool: TokenPool = self.noise.pool(tokenizer)
        self._task_code = TASKS.index(task)
        self._split_code = SPLITS.index(split)
        # bAbI examples are visited in a seeded order (a test set of len(examples) covers each once)
        self._order = None
        if self.examples is not None:
            ss = np.random.SeedSequence([0x624142, self.seed, self._split_code, self._task_code])
            self._order = np.random.Generator(np.random.PCG64(ss)).permutation(len(self.examples))

    # -----------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.length

    def rng(self, i: int) -> np.random.Generator:
        """The numpy Generator of sample ``i`` (seeded by task, n, segment_size, split, seed, i)."""
        ss = np.random.SeedSequence([0x524D54, self.seed, self._split_code, self._task_code,
                                     self.num_segments, self.segment_size, int(i)])
        return np.random.Generator(np.random.PCG64(ss))

    def example(self, i: int, rng: Optional[np.random.Generator] = None) -> F.Example:
        """The facts/question/answer of sample ``i`` (without noise)."""
        rng = self.rng(i) if rng is None else rng
        if self.examples is not None:
            return self.examples[int(self._order[int(i) % len(self.examples)])]
        return F.qa4_example(rng, self.same_axis, self.hub_share) if self.task == "reasoning" else F.qa1_example(rng)

    def _unsplit(self, where: np.ndarray, bounds: np.ndarray, lens: Sequence[int]) -> np.ndarray:
        """Move facts that a segment boundary would cut to the nearest sentence boundary (in story order) where
        they fit inside one segment. No random draws: samples without a cut fact are unchanged. A fact that
        fits nowhere (sentences longer than a segment) stays where it was."""
        seg, where, off, lo = self.segment_size, where.copy(), 0, 0
        for j, n in enumerate(lens):
            start = int(where[j]) + off
            if n <= seg and start // seg != (start + n - 1) // seg:
                starts = bounds + off
                ok = (bounds >= lo) & (starts // seg == (starts + n - 1) // seg)
                if ok.any():
                    cand = bounds[ok]
                    where[j] = cand[int(np.argmin(np.abs(cand - where[j])))]
            where[j] = max(int(where[j]), lo)
            lo, off = int(where[j]), off + n
        return where

    def _segment_starts(self, rng: np.random.Generator, lens: Sequence[int], tail: int, budget: int) -> np.ndarray:
        """Noise offsets that put each fact at the start of a randomly chosen segment (uniform, with replacement;
        sorted, so the story order is kept; facts drawn into one segment follow each other from its start). With
        ``facts_early`` drawn, the segments are chosen among those before the last one (the question's)."""
        n, seg = self.num_segments, self.segment_size
        pool = n
        if self.facts_early is not None and n > 1 and rng.random() < self.facts_early:
            pool = n - 1
        segs = np.sort(rng.integers(0, pool, size=len(lens)))
        where = np.zeros(len(lens), dtype=np.int64)
        for j, s in enumerate(segs):  # a noise offset: the segment's start less the fact tokens before it
            where[j] = where[j - 1] if j and segs[j - 1] == s else s * seg - sum(lens[:j])
        for s in np.unique(segs):  # what one segment has to hold: its facts, and the question in the last one
            need = sum(lens[j] for j in range(len(lens)) if segs[j] == s) + (tail if s == n - 1 else 0)
            if need > seg:
                raise ValueError(f"fact_placement='segment_start': a segment of segment_size={seg} tokens cannot "
                                 f"hold its facts{' and the question' if s == n - 1 else ''} ({need} tokens)")
        assert int(where[-1]) <= budget, (where, budget)
        return where

    def __getitem__(self, i: int) -> Dict[str, object]:
        if isinstance(i, (torch.Tensor, np.integer)):
            i = int(i)
        if not isinstance(i, int):
            raise TypeError(f"index must be an int, got {type(i).__name__}")
        if i < 0:
            i += self.length
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for a dataset of length {self.length}")
        rng = self.rng(i)
        ex = self.example(i, rng)
        fact_ids = [self._tok[f] for f in ex.facts]
        q_ids = self._tok[ex.question]
        a_ids = self._answer_tok[ex.answer] if self.for_decoder else np.zeros(0, dtype=np.int64)
        budget = self.total_length - sum(len(f) for f in fact_ids) - len(q_ids) - len(a_ids)

        noise, bounds = self.pool.sample(rng, budget)          # [budget], [k + 1]
        if self.task == "memorize":
            where = np.zeros(len(fact_ids), dtype=np.int64)    # all facts first, in order
        elif self.fact_placement == "segment_start":
            where = self._segment_starts(rng, [len(f) for f in fact_ids], len(q_ids) + len(a_ids), budget)
        else:                                                  # uniform boundaries, story order kept
            choices = bounds
            if self.facts_early is not None and self.num_segments > 1 and rng.random() < self.facts_early:
                # every fact ends before the last segment (the question's): at noise offsets up to this limit
                limit = (self.num_segments - 1) * self.segment_size - sum(len(f) for f in fact_ids)
                early = bounds[bounds <= limit]
                if len(early):
                    choices = early
            where = np.sort(choices[rng.integers(0, len(choices), size=len(fact_ids))])
            if self.num_segments > 1:
                where = self._unsplit(where, choices, [len(f) for f in fact_ids])

        pieces, fact_pos, cur, out_len = [], [], 0, 0
        for f, w in zip(fact_ids, where):
            pieces.append(noise[cur:w])
            out_len += int(w) - cur
            fact_pos.append(out_len)
            pieces.append(f)
            out_len += len(f)
            cur = int(w)
        pieces.append(noise[cur:])
        q_pos = out_len + (len(noise) - cur)
        pieces.append(q_ids)
        pieces.append(a_ids)
        ids = np.concatenate(pieces)
        assert len(ids) == self.total_length, (len(ids), self.total_length)
        input_ids = torch.from_numpy(ids)

        out: Dict[str, object] = {"input_ids": input_ids}
        if self.for_decoder:
            labels = torch.full((self.total_length,), _IGNORE, dtype=torch.long)
            labels[-len(a_ids):] = input_ids[-len(a_ids):]
            out["labels"] = labels
            out["answer_ids"] = torch.from_numpy(a_ids.copy())
        else:
            out["labels"] = torch.tensor(self.answers.index(ex.answer), dtype=torch.long)
        out["answer"] = ex.answer
        out["fact_positions"] = torch.tensor(fact_pos, dtype=torch.long)
        out["question_position"] = int(q_pos)
        out["facts"] = list(ex.facts)
        out["question"] = ex.question
        return out

    def __repr__(self) -> str:
        return (f"MemoryTaskDataset(task={self.task!r}, num_segments={self.num_segments}, "
                f"segment_size={self.segment_size}, split={self.split!r}, seed={self.seed}, "
                f"for_decoder={self.for_decoder}, length={self.length}, noise={self.noise!r}"
                f"{', babi_file=' + repr(self.babi_file) if self.babi_file else ''})")


def make_task(name: str, tokenizer, num_segments: int, segment_size: int, split: str = "train",
              seed: int = 0, noise=None, babi_path=None, for_decoder: bool = False,
              length: Optional[int] = None, same_axis: Optional[float] = None,
              facts_early: Optional[float] = None, hub_share: Optional[float] = None,
              fact_placement: str = "anywhere") -> MemoryTaskDataset:
    """Build one of the RMT paper's synthetic memory tasks as a map-style torch Dataset.

    Args:
        name: one of :data:`TASKS`: ``"memorize"``, ``"detect_memorize"``, ``"reasoning"``.
        tokenizer: a HuggingFace tokenizer (or any object with ``encode(text, add_special_tokens=False)``,
            e.g. :class:`~rmt_fast.experiments.tasks.WordTokenizer`).
        num_segments: n >= 1; every sample has exactly ``n * segment_size`` content tokens.
        segment_size: content tokens per segment, e.g. 499 for a 512-position BERT with 10 memory tokens.
        split: ``"train"``, ``"valid"`` or ``"test"`` (disjoint random streams).
        seed: base seed; sample ``i`` depends only on (name, n, segment_size, split, seed, i).
        noise: ``None`` (Python's pydoc help texts), a :class:`~rmt_fast.experiments.tasks.NoiseSource`, a text-file
            path or list of paths, or a directory saved with ``datasets``' ``save_to_disk``.
        babi_path: take facts/questions/answers from a bAbI file (``qa1_*`` for memorize/detect,
            ``qa4_*`` for reasoning), or from an ``en``/``en-10k`` directory (the file for ``split``).
            All story statements before a question become its facts.
        for_decoder: append the answer tokens after the question and return token-level labels.
        length: ``len(dataset)``; default 10**6 for train, 1000 for valid/test.
        same_axis: reasoning only: the probability that both facts lie on one axis (None: the task's own 1/3; see
            :func:`~rmt_fast.experiments.tasks.facts.qa4_question_kind`), for training mixes.
        facts_early: detect_memorize and reasoning: the probability that every fact of a sample lies before its
            last segment (the one holding the question), so that only the memory can carry them (None: facts
            anywhere, the task's own placement); for training mixes. One-segment samples ignore it.
        hub_share: reasoning only: the probability that the question asks about the hub, the place both facts
            name, whose answer needs a fact's direction, not only its places (None: the task's own, about half;
            see :func:`~rmt_fast.experiments.tasks.facts.qa4_question_kind`), for training mixes. Facts on one axis
            have hub questions only.
        fact_placement: detect_memorize and reasoning, every split: ``"anywhere"`` (default; at noise-sentence
            boundaries, uniformly, as the paper describes) or ``"segment_start"`` (each fact at the start of a
            randomly chosen segment, facts drawn into one segment one after the other: the official reasoning
            script's placement). See :data:`PLACEMENTS`.

    Returns:
        :class:`MemoryTaskDataset`; ``ds[i]["input_ids"]`` is ``LongTensor [n * segment_size]`` and
        ``ds[i]["labels"]`` is ``LongTensor []`` (class index into ``ds.answers``) or, for decoders,
        ``LongTensor [n * segment_size]`` (-100 except the answer tokens).
    """
    return MemoryTaskDataset(name, tokenizer, num_segments, segment_size, split=split, seed=seed,
                             noise=noise, babi_path=babi_path, for_decoder=for_decoder, length=length,
                             same_axis=same_axis, facts_early=facts_early, hub_share=hub_share,
                             fact_placement=fact_placement)


def collate(batch: Sequence[Dict[str, object]]) -> Dict[str, object]:
    """Batch samples: tensors of equal shape are stacked (``input_ids [B, L]``, ``labels [B]`` or
    ``[B, L]``, ``fact_positions [B, num_facts]``, ``question_position [B]``); everything else (strings,
    ragged ``answer_ids``) becomes a list."""
    if not batch:
        raise ValueError("collate: empty batch")
    out: Dict[str, object] = {}
    for key in batch[0]:
        vals = [b[key] for b in batch]
        if all(isinstance(v, torch.Tensor) for v in vals) and len({tuple(v.shape) for v in vals}) == 1:
            out[key] = torch.stack(vals)
        elif all(isinstance(v, int) for v in vals):
            out[key] = torch.tensor(vals, dtype=torch.long)
        else:
            out[key] = vals
    return out
