"""Tokenizers and tokenizer helpers for the synthetic memory tasks.

The tasks only need two things from a tokenizer:

* ``encode_batch(tokenizer, texts)`` -- token ids of each text **without** special tokens;
* the *piece separator*: when pieces of text (sentences, facts, the question, the answer) are
  tokenized separately and their ids concatenated, do we have to put a space in front of each piece
  so that the concatenation reads like ordinary running text?  That depends on the tokenizer:
  WordPiece (BERT) ignores the space, byte-level BPE (GPT-2, SmolLM2) encodes it into the next token
  ("Ġkitchen"), a character tokenizer encodes it as its own token, and SentencePiece with a dummy
  prefix already starts every piece with "▁".  :func:`piece_prefix` probes the tokenizer once.

Any HuggingFace tokenizer works, as does any object with ``encode(text, add_special_tokens=False)``.
Two download-free tokenizers live here: :class:`WordTokenizer` (one token per word of a closed vocabulary:
the tasks' words plus the common words of the default noise; the tiny backbones' tokenizer) and
:class:`CharTokenizer` (one token per character). Both save to and load from a directory
(:meth:`save_pretrained`, :func:`load_saved_tokenizer`), as HuggingFace tokenizers do.
"""
from __future__ import annotations

import abc

import json
import os
import re
import string
import unicodedata
from typing import Dict, Iterable, List, Sequence

__all__ = ["WordTokenizer", "CharTokenizer", "encode_batch", "piece_prefix", "tokenizer_key",
           "load_saved_tokenizer", "SAVED_TOKENIZER_FILE"]

#: the file :meth:`VocabTokenizer.save_pretrained` writes (HF tokenizers write their own files)
SAVED_TOKENIZER_FILE = "rmt_tokenizer.json"


class VocabTokenizer(abc.ABC):
    """A tokenizer over a fixed list of tokens with BERT-like special tokens first; needs no download.

    ``[PAD]=0, [CLS]=1, [SEP]=2, [UNK]=3, [MASK]=4``, then ``tokens``. Text is mapped to ASCII (curly quotes,
    dashes, ellipsis; accents stripped), split by :meth:`split`, and pieces outside the vocabulary map to
    ``[UNK]``. ``eos_token_id`` is ``[SEP]`` and ``bos_token_id`` is ``[CLS]`` so that the same object can stand in
    for a decoder's tokenizer. The interface mirrors the parts of HuggingFace tokenizers the library uses::

        tok.encode("Hi.", add_special_tokens=False)
        tok(["a", "bc"], add_special_tokens=False)["input_ids"]
        tok.decode(ids, skip_special_tokens=True)
        tok.save_pretrained(directory); load_saved_tokenizer(directory)
    """

    SPECIAL_TOKENS = ("[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]")
    #: joins decoded tokens
    separator = ""

    def __init__(self, tokens: Sequence[str], lowercase: bool = False):
        self.lowercase = bool(lowercase)
        self._id_to_token: List[str] = list(self.SPECIAL_TOKENS) + [t for t in dict.fromkeys(tokens)
                                                                     if t not in self.SPECIAL_TOKENS]
        self._token_to_id: Dict[str, int] = {t: i for i, t in enumerate(self._id_to_token)}
        self.pad_token_id, self.cls_token_id, self.sep_token_id, self.unk_token_id, self.mask_token_id = range(5)
        self.pad_token, self.cls_token, self.sep_token, self.unk_token, self.mask_token = self.SPECIAL_TOKENS
        self.bos_token_id, self.eos_token_id = self.cls_token_id, self.sep_token_id
        self.bos_token, self.eos_token = self.cls_token, self.sep_token
        self.all_special_ids = list(range(len(self.SPECIAL_TOKENS)))
        self.model_max_length = 10 ** 30

    @abc.abstractmethod
    def split(self, text: str) -> List[str]:
        """The text's pieces, each a vocabulary entry or unknown."""

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_token)

    def __len__(self) -> int:
        return self.vocab_size

    def get_vocab(self) -> Dict[str, int]:
        return dict(self._token_to_id)

    def encode(self, text: str, add_special_tokens: bool = True, **_: object) -> List[int]:
        """Ids of the pieces of ``text`` (wrapped in ``[CLS] ... [SEP]`` if asked)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if not text.isascii():
            text = _to_ascii(text)
        if self.lowercase:
            text = text.lower()
        get, unk = self._token_to_id.get, self.unk_token_id
        ids = [get(c, unk) for c in self.split(text)]
        if add_special_tokens:
            ids = [self.cls_token_id] + ids + [self.sep_token_id]
        return ids

    def __call__(self, texts, add_special_tokens: bool = True, **_: object) -> Dict[str, list]:
        """HF-style call: a str gives ``{"input_ids": [ids]}``, a list of str a list of id lists."""
        if isinstance(texts, str):
            return {"input_ids": self.encode(texts, add_special_tokens)}
        return {"input_ids": [self.encode(t, add_special_tokens) for t in texts]}

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self._id_to_token[ids]
        return [self._id_to_token[int(i)] for i in ids]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False, **_: object) -> str:
        n_special = len(self.SPECIAL_TOKENS)
        return self.separator.join(self._id_to_token[int(i)] for i in ids
                                   if not (skip_special_tokens and int(i) < n_special))

    def save_pretrained(self, directory: str) -> str:
        """Write the vocabulary to ``directory/rmt_tokenizer.json``; :func:`load_saved_tokenizer` reads it back."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, SAVED_TOKENIZER_FILE)
        with open(path, "w") as f:
            json.dump({"class": type(self).__name__, "lowercase": self.lowercase,
                       "tokens": self._id_to_token[len(self.SPECIAL_TOKENS):]}, f, indent=0)
        return path

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, lowercase={self.lowercase})"


class WordTokenizer(VocabTokenizer):
    """One token per word (a run of letters), digit or punctuation mark, over a closed, lower-cased vocabulary.

    Default vocabulary (:meth:`for_tasks`): every word of the tasks' facts and questions (names, verbs, places,
    directions, "where is ... ?"), the 1,000 most common words of the default noise
    (:data:`~rmt_fast.experiments.tasks.vocabulary.NOISE_WORDS`), the digits and ASCII punctuation; anything
    else is ``[UNK]``. So every task word is one token (a fact + question of memorize is 11-12 tokens) and the
    same text gives the same ids on every machine, with no package to install.
    """

    separator = " "
    rmt_piece_prefix = " "
    _PIECE = re.compile(r"[A-Za-z]+|\d|[^\sA-Za-z\d]")

    def __init__(self, words: Sequence[str] | None = None, lowercase: bool = True):
        if words is None:
            words = self.task_vocabulary()
        super().__init__(list(words), lowercase=lowercase)
        self.name_or_path = "rmt_fast.WordTokenizer"

    @classmethod
    def task_vocabulary(cls) -> List[str]:
        """Digits, punctuation, the tasks' words and :data:`NOISE_WORDS`, sorted."""
        from . import facts as F
        from .vocabulary import NOISE_WORDS

        texts = F.all_qa1_facts() + F.all_qa1_questions() + F.all_qa4_facts() + F.all_qa4_questions()
        words = {w for t in texts for w in cls._PIECE.findall(t.lower())}
        return sorted(words | set(NOISE_WORDS) | set(string.digits) | set(string.punctuation))

    def split(self, text: str) -> List[str]:
        return self._PIECE.findall(text)


class CharTokenizer(VocabTokenizer):
    """A character-level tokenizer: the printable ASCII characters (letters, digits, punctuation, space), so
    ``vocab_size == len(tokenizer) == 100``; characters outside map to ``[UNK]``."""

    CHARS = string.ascii_letters + string.digits + string.punctuation + " "

    def __init__(self, lowercase: bool = False, tokens: Sequence[str] | None = None):
        if tokens is None:
            tokens = list(self.CHARS if not lowercase else "".join(dict.fromkeys(self.CHARS.lower())))
        super().__init__(tokens, lowercase=lowercase)
        self.name_or_path = "rmt_fast.CharTokenizer" + ("-lower" if lowercase else "")

    def split(self, text: str) -> List[str]:
        return list(text)


def load_saved_tokenizer(directory: str):
    """The tokenizer saved in ``directory``: a :class:`WordTokenizer`/:class:`CharTokenizer`
    (``rmt_tokenizer.json``) or a HuggingFace tokenizer (``save_pretrained`` files)."""
    path = os.path.join(directory, SAVED_TOKENIZER_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            d = json.load(f)
        if d.get("class") == "WordTokenizer":
            return WordTokenizer(d["tokens"], lowercase=d["lowercase"])
        if d.get("class") == "CharTokenizer":
            return CharTokenizer(lowercase=d["lowercase"], tokens=d["tokens"])
        raise ValueError(f"tokenizer: {path} names an unknown class {d.get('class')!r}; "
                         "expected WordTokenizer or CharTokenizer")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"tokenizer: no saved tokenizer at {directory!r}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


_ASCII_MAP = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-",
                            "\u2014": "-", "\u2026": "...", "\u00a0": " ", "\u2212": "-"})


def _to_ascii(text: str) -> str:
    text = unicodedata.normalize("NFKD", text.translate(_ASCII_MAP))
    return "".join(c for c in text if not unicodedata.combining(c))


def _check_tokenizer(tokenizer) -> None:
    if tokenizer is None or not (callable(getattr(tokenizer, "encode", None)) or callable(tokenizer)):
        raise TypeError(
            "tokenizer must be a HuggingFace tokenizer or an object with "
            f"encode(text, add_special_tokens=False); got {type(tokenizer).__name__}")


def encode_batch(tokenizer, texts: Sequence[str], batch_size: int = 4096) -> List[List[int]]:
    """Token ids (no special tokens) of each text; uses the fast batched call when available."""
    _check_tokenizer(tokenizer)
    texts = list(texts)
    if not texts:
        return []
    out: List[List[int]] = []
    if callable(tokenizer):
        try:
            for s in range(0, len(texts), batch_size):
                chunk = texts[s:s + batch_size]
                try:
                    res = tokenizer(chunk, add_special_tokens=False, verbose=False)
                except TypeError:
                    res = tokenizer(chunk, add_special_tokens=False)
                out.extend(list(map(list, res["input_ids"])))
            return out
        except (TypeError, KeyError, AttributeError, ValueError):
            out = []  # fall back to one encode() per text
    for t in texts:
        out.append(list(tokenizer.encode(t, add_special_tokens=False)))
    return out


def piece_prefix(tokenizer) -> str:
    """The string to put in front of each separately tokenized piece: ``" "`` or ``""``.

    ``" "`` when ``enc("Hello world") == enc("Hello") + enc(" world")`` (WordPiece, byte-level BPE,
    character tokenizers); ``""`` when instead ``enc("Hello") + enc("world")`` reproduces it
    (SentencePiece with a dummy prefix, where an explicit space would add a stray "▁" token).
    Defaults to ``" "``.  A tokenizer may override the probe with a ``rmt_piece_prefix`` attribute.
    """
    override = getattr(tokenizer, "rmt_piece_prefix", None)
    if isinstance(override, str):
        return override
    whole, a, b_space, b_plain = encode_batch(tokenizer, ["Hello world", "Hello", " world", "world"])
    if whole == a + b_space:
        return " "
    if whole == a + b_plain:
        return ""
    return " "


def tokenizer_key(tokenizer) -> tuple:
    """A cache key identifying a tokenizer object (identity + name + vocabulary size)."""
    try:
        n = len(tokenizer)
    except TypeError:
        n = -1
    return (id(tokenizer), type(tokenizer).__name__, str(getattr(tokenizer, "name_or_path", "")), n)
