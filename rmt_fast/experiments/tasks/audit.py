"""A symbolic checker of the synthetic memory tasks: is every sample answerable, uniquely, from its tokens?

:func:`check_sample` reads a sample the way the model gets it -- the token ids, decoded back to text, cut into
the segments the RMT wrapper sees -- finds every fact-like statement and the question by pattern matching, and
answers the question by symbolic reasoning over the facts found (QA1: the last location of the person asked
about; QA4: the stated relations, their converses and collinear chains, as :func:`facts.answer_qa4`). It
reports a list of problems (empty: the sample is fine):

* ``"no_question"``       -- no question at the end of the input (cut, split, or not recognised);
* ``"unanswerable"``      -- the facts present do not determine any answer;
* ``"ambiguous"``         -- they allow more than one answer;
* ``"wrong_label"``       -- the unique answer is not the sample's label;
* ``"split_fact"``        -- a fact is cut by a segment boundary (only part of it in each segment);
* ``"unk"``               -- a fact or the question contains an unknown token;
* ``"task_words_in_noise"`` -- a place, direction or person word appears outside the facts and the question
  (noise that makes another answer plausible).

:func:`audit` runs it over many samples of one (task, segments, segment size) and counts the problems::

    from rmt_fast.experiments.tasks.audit import audit
    audit("reasoning", tokenizer, num_segments=1, segment_size=499, samples=2000)
    # {'samples': 2000, 'bad': 0, 'problems': {}, ...}

Command line: ``python -m rmt_fast.experiments.tasks.audit --tokenizer minilm --segments 1,2,4 --samples 2000``.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Dict, List, Optional, Sequence

from . import facts as F

__all__ = ["normalize", "check_sample", "audit", "TASK_WORDS"]

_DIR = "north|south|east|west"
_PLACE = r"\w+"
_QA4_FACT = re.compile(rf"\bthe ({_PLACE}) is ({_DIR}) of the ({_PLACE}) ?\.")
_QA4_Q = re.compile(rf"\bwhat is (?:({_DIR}) of the ({_PLACE})|the ({_PLACE}) ({_DIR}) of) ?\?$")
_NAMES = "|".join(n.lower() for n in F.NAMES)
_VERBS = "|".join(sorted((v.lower() for v in F.VERBS), key=len, reverse=True))
_QA1_FACT = re.compile(rf"\b({_NAMES}) (?:{_VERBS}) to the ({_PLACE}) ?\.")
_QA1_Q = re.compile(rf"\bwhere is ({_NAMES}) ?\?$")
#: words that name a person, place or direction of the tasks
TASK_WORDS = frozenset([n.lower() for n in F.NAMES] + [p.lower() for p in F.PLACES] + list(F.DIRECTIONS))
_WORD = re.compile(r"[a-z]+")


def normalize(text: str) -> str:
    """Lower-case, one space between words, no space before . , ? ! (decoders of WordPiece/word tokenizers
    differ there); WordPiece continuation marks are joined."""
    text = text.lower().replace(" ##", "")
    text = re.sub(r"\s+", " ", text).strip()
    return re.sub(r" ([.,?!])", r"\1", text).replace(".", " .").replace("?", " ?").replace("  ", " ")


def _decode(tokenizer, ids) -> str:
    return normalize(tokenizer.decode([int(i) for i in ids], skip_special_tokens=False))


def _answers(task: str, text: str):
    """(answers, question found, fact spans) from the normalized text of a whole sample."""
    if task == "reasoning":
        q = _QA4_Q.search(text)
        facts = list(_QA4_FACT.finditer(text))
        if not q:
            return None, False, [m.span() for m in facts]
        d, x, x2, d2 = q.groups()
        question = (F.qa4_question_what_is_dir_of(x, d) if d else F.qa4_question_what_is_x_dir_of(x2, d2))
        sents = [F.qa4_fact(*m.groups()) for m in facts if m.end() <= q.start()]
        ans = F.answer_qa4(sents, question) if sents else []
        return ans, True, [m.span() for m in facts]
    q = _QA1_Q.search(text)
    facts = list(_QA1_FACT.finditer(text))
    if not q:
        return None, False, [m.span() for m in facts]
    name = q.group(1)
    places = [m.group(2) for m in facts if m.group(1) == name and m.end() <= q.start()]
    return ([places[-1]] if places else []), True, [m.span() for m in facts]


def check_sample(task: str, tokenizer, sample: Dict[str, object], segment_size: int,
                 answers: Sequence[str] = F.ANSWERS, right_aligned: bool = True) -> List[str]:
    """Problems of one encoder sample of ``make_task`` (see the module docstring); ``[]`` if it is fine.

    Only the token ids and the label are used (plus ``facts``/``question`` to look for ``[UNK]``). Segments are
    the wrapper's: ``segment_size`` content tokens each, right-aligned (the first one short) for encoders.
    """
    ids = [int(i) for i in sample["input_ids"]]
    text = _decode(tokenizer, ids)
    problems = []
    ans, has_q, spans = _answers(task, text)
    if not has_q:
        problems.append("no_question")
    elif not ans:
        problems.append("unanswerable")
    elif len(ans) > 1:
        problems.append("ambiguous")
    else:
        label = sample["labels"]
        label = answers[int(label)] if not isinstance(label, str) and getattr(label, "ndim", 0) == 0 else None
        if label is not None and ans[0] != label.lower():
            problems.append("wrong_label")
    # facts cut by a segment boundary: count the facts found segment by segment
    n = len(ids)
    first = n % segment_size if right_aligned else segment_size
    cuts = ([0] + list(range(first or segment_size, n, segment_size)) + [n]) if n > segment_size else [0, n]
    cuts = sorted(set(cuts))
    pat = _QA4_FACT if task == "reasoning" else _QA1_FACT
    per_segment = sum(len(pat.findall(_decode(tokenizer, ids[a:b]))) for a, b in zip(cuts[:-1], cuts[1:]))
    if per_segment < len(spans):
        problems.append("split_fact")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None:
        enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
        if any(unk in enc(s) for s in list(sample.get("facts", [])) + [sample.get("question", "")]):
            problems.append("unk")
    # task words outside the facts and the question
    q = (_QA4_Q if task == "reasoning" else _QA1_Q).search(text)
    keep, last = [], 0
    for a, b in sorted(spans) + ([q.span()] if q else []):
        keep.append(text[last:a])
        last = b
    keep.append(text[last:])
    if any(w in TASK_WORDS for w in _WORD.findall(" ".join(keep))):
        problems.append("task_words_in_noise")
    return problems


def audit(task: str, tokenizer, num_segments: int, segment_size: int, samples: int = 1000, split: str = "valid",
          seed: int = 0, noise=None, dataset=None) -> dict:
    """Run :func:`check_sample` over ``samples`` samples; returns counts and a few bad examples."""
    from .dataset import make_task

    ds = dataset if dataset is not None else make_task(task, tokenizer, num_segments, segment_size, split=split,
                                                       seed=seed, noise=noise, length=samples)
    counts: Counter = Counter()
    bad, examples = 0, []
    for i in range(min(samples, len(ds))):
        s = ds[i]
        p = check_sample(task, tokenizer, s, segment_size, answers=ds.answers)
        counts.update(p)
        if p:
            bad += 1
            if len(examples) < 3:
                examples.append({"i": i, "problems": p, "facts": s["facts"], "question": s["question"],
                                 "answer": s["answer"]})
    return {"task": task, "num_segments": num_segments, "segment_size": segment_size, "samples": samples,
            "bad": bad, "bad_fraction": bad / max(samples, 1), "problems": dict(counts), "examples": examples}


def main(argv: Optional[Sequence[str]] = None) -> None:
    import argparse
    import json

    from ..backbones import load_tokenizer

    p = argparse.ArgumentParser(description="symbolic audit of the memory tasks' samples")
    p.add_argument("--tokenizer", default="word", help="word | minilm | char (%(default)s)")
    p.add_argument("--tasks", default="memorize,detect_memorize,reasoning")
    p.add_argument("--segments", default="1,2,4")
    p.add_argument("--segment-size", type=int, default=499)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--split", default="valid")
    p.add_argument("--noise", default=None)
    a = p.parse_args(argv)
    tok = load_tokenizer("tiny-bert", a.tokenizer)
    for task in a.tasks.split(","):
        for n in (int(x) for x in a.segments.split(",")):
            r = audit(task, tok, n, a.segment_size, a.samples, split=a.split, noise=a.noise)
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
