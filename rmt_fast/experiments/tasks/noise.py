"""Noise (distractor text) sources for the synthetic memory tasks.

A :class:`NoiseSource` turns some natural text into a list of clean sentences
(:meth:`NoiseSource.sentences`), and into a :class:`TokenPool` per tokenizer
(:meth:`NoiseSource.pool`): every sentence tokenized once (no special tokens) and stored as one flat
``int64`` array plus offsets, so that a task can assemble millions of noise tokens for one sample by
sampling sentence indices with numpy and gathering, without tokenizing anything per sample.

Sources:

* :class:`PydocNoise` -- the default: the help texts shipped with Python (``pydoc_data.topics``),
  with grammar productions, code blocks, tables and headings dropped;
* :class:`TextFilesNoise` -- the user's own plain-text files;
* :class:`HFDatasetNoise` -- a text column of a local HuggingFace dataset saved with
  ``save_to_disk`` (``datasets`` is imported lazily), or an already loaded dataset;
* :class:`SentencesNoise` -- an explicit list of sentences.

Sentences that could be mistaken for a task fact are removed from every pool: sentences naming one of
the task's people (Mary, John, Daniel, Sandra), places (bathroom, bedroom, garden, hallway, kitchen, office)
or directions (north, south, east, west), and sentences of the form "... is north/south/east/west of ...".
Sentences are kept in source order so pools (and therefore samples) are deterministic.
"""
from __future__ import annotations

import abc
import os
import re
import threading
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .tokenization import encode_batch, piece_prefix, tokenizer_key

__all__ = [
    "NoiseSource", "PydocNoise", "TextFilesNoise", "HFDatasetNoise", "SentencesNoise", "TokenPool",
    "TaskFileNotFoundError", "clean_text", "split_sentences",
]


class TaskFileNotFoundError(FileNotFoundError, ValueError):
    """A path given to a task or noise source does not exist (both a FileNotFoundError and a ValueError)."""


# ----------------------------------------------------------------------------------------------------
# Text cleaning
# ----------------------------------------------------------------------------------------------------
_WS = re.compile(r"\s+")
# a sentence ends with . ! or ? (optionally followed by closing quotes/brackets), then whitespace,
# then something that can start a sentence.
_SENT_END = re.compile(r"(?<=[.!?])([\"')\]]*)\s+(?=[\"'(\[]?[A-Z0-9])")
_ABBREV = re.compile(r"(?<![\w.])(?:e\.g|i\.e|etc|vs|cf|Mr|Mrs|Ms|Dr|St|No|Fig|al|approx|resp|[A-Z])\.$")
_HEADING_RULE = re.compile(r"^\s*([*=\-^~#+])\1{2,}\s*$")
_CODEISH = re.compile(r"::=|>>>|\{\{|\}\}|=>|->|\w\(.*\)\s*$|^\s*[\w.]+\s*=\s")
_LIST_MARKER = re.compile(r"^(?:\d+\.|[*\-\u2022])\s+")
# a sentence naming a task person, place or direction (any form: "north", "Kitchen", "offices" ...) could make
# another answer plausible (or, in decoded text, look like a fact): dropped from every pool
_CONFOUND = re.compile(r"\b(?:Mary|John|Daniel|Sandra|bathroom|bedroom|garden|hallway|kitchen|office"
                       r"|north|south|east|west)s?\b|\bis\s+(?:north|south|east|west)\s+of\b", re.I)


def clean_text(text: str) -> str:
    """Collapse all runs of whitespace (newlines included) into single spaces and strip."""
    return _WS.sub(" ", text).strip()


def split_sentences(text: str) -> List[str]:
    """Split running text into sentences at ``. ! ?`` followed by a capitalised word.

    Whitespace is collapsed first.  Common abbreviations ("e.g.", "Dr.", single initials) do not end a
    sentence.  The splitter is deliberately simple: it only has to produce natural-looking filler.
    """
    text = clean_text(text)
    if not text:
        return []
    out: List[str] = []
    start = 0
    for m in _SENT_END.finditer(text):
        if _ABBREV.search(text, start, m.start()):      # "e.g. Foo", "Dr. Who": not an end
            continue
        out.append(text[start:m.end(1)].strip())        # keep closing quotes with the sentence
        start = m.end()
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return [s for s in out if s]


def _is_good_sentence(s: str, min_words: int, max_chars: int, alpha_ratio: float) -> bool:
    if len(s) > max_chars or len(s.split()) < min_words:
        return False
    letters = sum(c.isalpha() or c == " " for c in s)
    if letters < alpha_ratio * len(s):
        return False
    if _CONFOUND.search(s):
        return False
    return True


def _prose_paragraphs(doc: str) -> Iterable[str]:
    """Paragraphs of a reStructuredText-like help text that are prose (no code, grammar, tables).

    A paragraph is dropped when it is a heading, when a line looks like code (``::=``, ``>>>``,
    assignments, a call at the end of a line) or when its continuation lines are ragged (code blocks).
    Definition-list terms ("Byte Arrays" above an indented body) and list markers are removed.
    """
    for para in re.split(r"\n\s*\n", doc):
        lines = [ln.rstrip() for ln in para.split("\n") if ln.strip()]
        if not lines:
            continue
        if any(_HEADING_RULE.match(ln) for ln in lines):       # "Title\n*****" headings, rules
            continue
        if any(_CODEISH.search(ln) for ln in lines):
            continue
        indents = [len(ln) - len(ln.lstrip()) for ln in lines]
        if (len(lines) > 1 and indents[1] > indents[0] and len(lines[0].split()) <= 6
                and not lines[0].endswith((".", "!", "?", ":", ",", ";"))):
            lines, indents = lines[1:], indents[1:]             # definition-list term
        if len(set(indents[1:])) > 1:                           # ragged indentation: code
            continue
        if len(lines) == 1 and not lines[0].endswith((".", "!", "?")):
            continue                                            # one-line labels and code
        text = " ".join(ln.strip() for ln in lines)
        text = re.sub(r"(?<=[a-z])- (?=[a-z])", "-", text)      # "comma-\nseparated" wrapped lines
        yield _LIST_MARKER.sub("", text)


# ----------------------------------------------------------------------------------------------------
# Token pools
# ----------------------------------------------------------------------------------------------------
class TokenPool:
    """Pre-tokenized sentences of a noise source for one tokenizer.

    Attributes:
        ids:      ``int64 [total_tokens]`` -- the token ids of all sentences, concatenated.
        offsets:  ``int64 [num_sentences]`` -- where sentence ``k`` starts in ``ids``.
        lengths:  ``int64 [num_sentences]`` -- its number of tokens (all > 0).
        prefix:   the string put in front of each sentence before tokenizing (see ``piece_prefix``).
    """

    def __init__(self, token_lists: Sequence[Sequence[int]], prefix: str = " "):
        token_lists = [t for t in token_lists if len(t) > 0]
        if not token_lists:
            raise ValueError("noise: the noise source yields no non-empty sentences")
        self.lengths = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=len(token_lists))
        self.offsets = np.zeros(len(token_lists), dtype=np.int64)
        np.cumsum(self.lengths[:-1], out=self.offsets[1:])
        self.ids = np.fromiter((i for t in token_lists for i in t), dtype=np.int64,
                               count=int(self.lengths.sum()))
        self.prefix = prefix
        self.mean_length = float(self.lengths.mean())

    def __len__(self) -> int:
        return len(self.lengths)

    def sentence(self, k: int) -> np.ndarray:
        return self.ids[self.offsets[k]:self.offsets[k] + self.lengths[k]]

    def sample(self, rng: np.random.Generator, budget: int) -> Tuple[np.ndarray, np.ndarray]:
        """Draw i.i.d. sentences until the next one would overflow ``budget`` tokens, then a prefix of it.

        Returns ``(tokens, starts)``: ``tokens`` is ``int64 [budget]`` exactly, ``starts`` is
        ``int64 [k + 1]``: the token offsets of the sentence boundaries where something may be inserted:
        the start of each of the ``k`` whole sentences, plus the end of the last whole sentence (which is
        where the truncated tail begins, or ``budget`` when the fit was exact).
        """
        if budget <= 0:
            return np.zeros(0, dtype=np.int64), np.zeros(1, dtype=np.int64)
        idx_parts, total = [], 0
        while total <= budget:                   # draw until the cumulative length passes the budget
            m = int(max(16, 1.1 * (budget - total) / self.mean_length + 16))
            part = rng.integers(0, len(self.lengths), size=m)
            idx_parts.append(part)
            total += int(self.lengths[part].sum())
        idx = np.concatenate(idx_parts) if len(idx_parts) > 1 else idx_parts[0]
        lens = self.lengths[idx]
        ends = np.cumsum(lens)
        k = int(np.searchsorted(ends, budget, side="right"))   # whole sentences that fit
        # take sentences 0..k (k included, to be truncated) and cut the result at `budget`
        idx, lens = idx[:k + 1], lens[:k + 1]
        out_starts = ends[:k + 1] - lens
        n_tail = budget - (int(ends[k - 1]) if k > 0 else 0)
        lens = lens.copy()
        lens[k] = n_tail
        src = np.repeat(self.offsets[idx] - out_starts, lens)
        src += np.arange(budget, dtype=np.int64)
        tokens = self.ids[src]
        boundaries = out_starts[:k + 1].copy()   # starts of whole sentences + start of the tail
        return tokens, boundaries


# ----------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------
class NoiseSource(abc.ABC):
    """Base class: subclasses implement :meth:`documents` (raw text documents).

    Args (common to all sources):
        min_words: drop sentences with fewer words.
        max_chars: drop sentences longer than this (runaway "sentences" from unsplittable text).
        alpha_ratio: drop sentences where letters+spaces are less than this fraction of characters.
        max_sentences: keep at most this many sentences (in source order); ``None`` keeps all.
    """

    #: set by subclasses: whether paragraphs that look like code/markup are dropped before splitting
    prose_only: bool = False

    def __init__(self, min_words: int = 3, max_chars: int = 2000, alpha_ratio: float = 0.75,
                 max_sentences: Optional[int] = None):
        if not isinstance(min_words, int) or min_words < 1:
            raise ValueError(f"min_words must be a positive int, got {min_words!r}")
        if max_sentences is not None and (not isinstance(max_sentences, int) or max_sentences < 1):
            raise ValueError(f"max_sentences must be None or a positive int, got {max_sentences!r}")
        self.min_words, self.max_chars, self.alpha_ratio = min_words, max_chars, alpha_ratio
        self.max_sentences = max_sentences
        self._sentences: Optional[List[str]] = None
        self._pools: Dict[tuple, Tuple[object, TokenPool]] = {}
        self._lock = threading.Lock()

    # -- to implement ------------------------------------------------------------------------------
    @abc.abstractmethod
    def documents(self) -> Iterable[str]:
        """The raw texts of this source (each subclass says where they come from)."""

    # -- shared ------------------------------------------------------------------------------------
    def sentences(self) -> List[str]:
        """The cleaned, split and filtered sentences (computed once)."""
        if self._sentences is None:
            out: List[str] = []
            for doc in self.documents():
                paras = _prose_paragraphs(doc) if self.prose_only else [doc]
                for para in paras:
                    for s in split_sentences(para):
                        if _is_good_sentence(s, self.min_words, self.max_chars, self.alpha_ratio):
                            out.append(s)
                            if self.max_sentences is not None and len(out) >= self.max_sentences:
                                break
                    if self.max_sentences is not None and len(out) >= self.max_sentences:
                        break
                if self.max_sentences is not None and len(out) >= self.max_sentences:
                    break
            if not out:
                raise ValueError(f"noise: {self!r} yields no usable sentences")
            self._sentences = out
        return self._sentences

    def pool(self, tokenizer) -> TokenPool:
        """The :class:`TokenPool` of this source for ``tokenizer`` (tokenized once, then cached)."""
        key = tokenizer_key(tokenizer)
        with self._lock:
            hit = self._pools.get(key)
            if hit is not None and hit[0] is tokenizer:
                return hit[1]
            prefix = piece_prefix(tokenizer)
            pool = TokenPool(encode_batch(tokenizer, [prefix + s for s in self.sentences()]), prefix)
            self._pools[key] = (tokenizer, pool)   # keeps the tokenizer alive: ids stay unique
            return pool

    def __getstate__(self):            # picklable for DataLoader workers started with "spawn"
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class PydocNoise(NoiseSource):
    """Natural English from Python's own help texts (``pydoc_data.topics.topics``), ~5k sentences.

    Only prose paragraphs are kept (grammar productions, indented code, tables and headings are
    dropped).  Note that the text differs slightly between Python versions.
    """

    prose_only = True

    def documents(self) -> Iterable[str]:
        from pydoc_data.topics import topics
        return [topics[k] for k in topics]


class TextFilesNoise(NoiseSource):
    """Sentences from the user's plain-text files (read in the order given).

    Args:
        paths: a path or a list of paths to text files.
        encoding: their encoding (undecodable bytes are replaced).
        prose_only: also drop indented/code-like paragraphs (as for the pydoc texts).
    """

    def __init__(self, paths: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
                 encoding: str = "utf-8", prose_only: bool = False, **kwargs):
        super().__init__(**kwargs)
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        if not isinstance(paths, (list, tuple)) or not paths:
            raise TypeError("paths must be a path or a non-empty list of paths to text files, "
                            f"got {type(paths).__name__}")
        for p in paths:
            if not isinstance(p, (str, os.PathLike)):
                raise TypeError(f"paths must contain str or os.PathLike, got {type(p).__name__}")
            if not os.path.isfile(p):
                raise TaskFileNotFoundError(f"paths: noise text file not found: {os.fspath(p)!r}")
        self.paths = [os.fspath(p) for p in paths]
        self.encoding = encoding
        self.prose_only = bool(prose_only)

    def documents(self) -> Iterable[str]:
        for p in self.paths:
            with open(p, encoding=self.encoding, errors="replace") as f:
                yield f.read()

    def __repr__(self) -> str:
        return f"TextFilesNoise({self.paths!r})"


class HFDatasetNoise(NoiseSource):
    """Sentences from a text column of a HuggingFace dataset.

    Args:
        path_or_dataset: a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``
            (loaded with ``datasets.load_from_disk``; nothing is downloaded), or an already loaded
            dataset / any sequence of row dicts / dict of columns.
        column: the text column (default ``"text"``).
        split: for a ``DatasetDict``: which split (default ``"train"`` when there is one).
        max_rows: read at most this many rows.
        max_sentences: keep at most this many sentences (default 200,000 to bound tokenization time).
    """

    def __init__(self, path_or_dataset, column: str = "text", split: Optional[str] = None,
                 max_rows: Optional[int] = None, max_sentences: Optional[int] = 200_000, **kwargs):
        super().__init__(max_sentences=max_sentences, **kwargs)
        if not isinstance(column, str) or not column:
            raise TypeError(f"column must be a non-empty str, got {column!r}")
        self.column, self.split, self.max_rows = column, split, max_rows
        if isinstance(path_or_dataset, (str, os.PathLike)):
            path = os.fspath(path_or_dataset)
            if not os.path.isdir(path):
                raise TaskFileNotFoundError(
                    f"path_or_dataset: HF dataset directory not found: {path!r} "
                    "(expected a folder written by Dataset.save_to_disk)")
            try:
                import datasets  # noqa: F401  (lazy: optional dependency)
            except ImportError as e:
                raise ImportError("HFDatasetNoise needs the optional 'datasets' package to read "
                                  f"{path!r}: pip install datasets") from e
            self._data = datasets.load_from_disk(path)
            self.name = path
        else:
            self._data = path_or_dataset
            self.name = type(path_or_dataset).__name__
        self._data = self._select_split(self._data)

    def _select_split(self, data):
        # a DatasetDict (a dict subclass) or any mapping of splits -> one split
        if isinstance(data, Mapping) and self.column not in data:
            splits = list(data.keys())
            split = self.split or ("train" if "train" in splits else None)
            if split is None or split not in splits:
                raise ValueError(f"split: choose one of the dataset's splits {splits}, got {self.split!r}")
            return data[split]
        return data

    def documents(self) -> Iterable[str]:
        data = self._data
        cols = getattr(data, "column_names", None)
        if cols is not None and self.column not in cols:
            raise ValueError(f"column: {self.column!r} is not a column of the dataset; columns: {cols}")
        if isinstance(data, dict):
            if self.column not in data:
                raise ValueError(f"column: {self.column!r} not found; columns: {list(data)}")
            rows: Iterable = data[self.column]
        elif cols is not None and hasattr(data, "__len__"):     # datasets.Dataset: read in slices
            n = len(data) if self.max_rows is None else min(len(data), self.max_rows)
            rows = (t for s in range(0, n, 1000) for t in data[s:min(n, s + 1000)][self.column])
        else:
            rows = (r[self.column] if isinstance(r, dict) else r for r in data)
        for k, text in enumerate(rows):
            if self.max_rows is not None and k >= self.max_rows:
                break
            if isinstance(text, str):
                yield text

    def __repr__(self) -> str:
        return f"HFDatasetNoise({self.name!r}, column={self.column!r})"


class SentencesNoise(NoiseSource):
    """Noise from an explicit list of strings (each is cleaned and sentence-split)."""

    def __init__(self, sentences: Sequence[str], **kwargs):
        super().__init__(**kwargs)
        if isinstance(sentences, str) or not all(isinstance(s, str) for s in sentences):
            raise TypeError("sentences must be a list of str")
        self._texts = list(sentences)

    def documents(self) -> Iterable[str]:
        return self._texts

    def __repr__(self) -> str:
        return f"SentencesNoise({len(self._texts)} texts)"
