"""Facts, questions and answers of the synthetic memory tasks (bAbI QA1 and QA4 style).

* QA1 ("single supporting fact"), used by Memorize and Detect & Memorize::

      fact:     "{name} {verb} to the {place}."     4 names x 5 verbs x 6 places
      question: "Where is {name}?"                 answer: the place

* QA4 ("two argument relations"), used by Reasoning::

      facts:    "The hallway is east of the bathroom."  "The bedroom is west of the bathroom."
      question: "What is the bathroom east of?"  -> bedroom     (or "What is west of the bathroom?")

  Two facts relate two different places to a shared one, in two different directions.  All relations
  stated or implied by a fact (its converse: "A north of B" <=> "B south of A") are candidate
  questions; a candidate is kept only if its answer is unique even when collinear facts are chained
  ("A north of B", "B north of C" would make "What is north of C?" ambiguous: B and A).

* :func:`read_babi` reads bAbI task files in the standard ``en``/``en-10k`` format.

Every answer is one of :data:`ANSWERS` (a fixed, exported order: the 6-way class index).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import numpy as np

__all__ = [
    "NAMES", "VERBS", "PLACES", "ANSWERS", "DIRECTIONS", "OPPOSITE", "Example",
    "qa1_example", "qa4_example", "qa4_candidates", "qa4_question_kind", "read_babi", "answer_qa4",
    "all_qa1_facts", "all_qa1_questions", "all_qa4_facts", "all_qa4_questions",
]

NAMES: Tuple[str, ...] = ("Mary", "John", "Daniel", "Sandra")
VERBS: Tuple[str, ...] = ("went", "moved", "journeyed", "travelled", "went back")
PLACES: Tuple[str, ...] = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")
#: the class labels: ``labels == ANSWERS.index(answer)`` for encoder samples
ANSWERS: Tuple[str, ...] = PLACES
DIRECTIONS: Tuple[str, ...] = ("north", "south", "east", "west")
OPPOSITE: Dict[str, str] = {"north": "south", "south": "north", "east": "west", "west": "east"}


@dataclass(frozen=True)
class Example:
    """One question with the facts needed to answer it (facts in story order)."""
    facts: Tuple[str, ...]
    question: str
    answer: str
    supporting: Tuple[int, ...] = field(default=())   # indices into ``facts`` (bAbI files only)


# ---------------------------------------------------------------------------------------------------
# QA1
# ---------------------------------------------------------------------------------------------------
def qa1_fact(name: str, verb: str, place: str) -> str:
    return f"{name} {verb} to the {place}."


def qa1_question(name: str) -> str:
    return f"Where is {name}?"


def qa1_example(rng: np.random.Generator) -> Example:
    """A uniformly random (name, verb, place) fact, its question and answer."""
    name = NAMES[int(rng.integers(len(NAMES)))]
    verb = VERBS[int(rng.integers(len(VERBS)))]
    place = PLACES[int(rng.integers(len(PLACES)))]
    return Example((qa1_fact(name, verb, place),), qa1_question(name), place)


def all_qa1_facts() -> List[str]:
    return [qa1_fact(n, v, p) for n in NAMES for v in VERBS for p in PLACES]


def all_qa1_questions() -> List[str]:
    return [qa1_question(n) for n in NAMES]


# ---------------------------------------------------------------------------------------------------
# QA4
# ---------------------------------------------------------------------------------------------------
def qa4_fact(a: str, direction: str, b: str) -> str:
    """ "The {a} is {direction} of the {b}." """
    return f"The {a} is {direction} of the {b}."


def qa4_question_what_is_dir_of(x: str, direction: str) -> str:
    """ "What is {direction} of the {x}?" -- answer y with "y is {direction} of x"."""
    return f"What is {direction} of the {x}?"


def qa4_question_what_is_x_dir_of(x: str, direction: str) -> str:
    """ "What is the {x} {direction} of?" -- answer y with "x is {direction} of y"."""
    return f"What is the {x} {direction} of?"


_FACT4 = re.compile(r"^The (\w+) is (north|south|east|west) of the (\w+)\.$")
_Q_DIR_OF = re.compile(r"^What is (north|south|east|west) of the (\w+)\?$")
_Q_X_DIR_OF = re.compile(r"^What is the (\w+) (north|south|east|west) of\?$")


def _relations(facts: Sequence[Tuple[str, str, str]]) -> set:
    """Stated relations and their converses: set of (a, direction, b) meaning "a is direction of b"."""
    rel = set()
    for a, d, b in facts:
        rel.add((a, d, b))
        rel.add((b, OPPOSITE[d], a))
    return rel


def _closure(rel: set) -> set:
    """Transitive closure along a single direction (collinear chains)."""
    rel = set(rel)
    changed = True
    while changed:
        changed = False
        for (a, d, b) in list(rel):
            for (b2, d2, c) in list(rel):
                if b2 == b and d2 == d and c != a and (a, d, c) not in rel:
                    rel.add((a, d, c))
                    changed = True
    return rel


def _parse_qa4_facts(facts: Sequence[str]) -> List[Tuple[str, str, str]]:
    """(a, direction, b) of each "The {a} is {direction} of the {b}." sentence."""
    parsed = []
    for f in facts:
        m = _FACT4.match(f)
        if not m:
            raise ValueError(f"not a QA4 fact: {f!r}")
        parsed.append(m.groups())
    return parsed


def answer_qa4(facts: Sequence[str], question: str, transitive: bool = True) -> List[str]:
    """All answers to a QA4 question given the fact sentences (sorted; unique iff ``len == 1``)."""
    parsed = _parse_qa4_facts(facts)
    rel = _relations(parsed)
    if transitive:
        rel = _closure(rel)
    m = _Q_DIR_OF.match(question)
    if m:
        d, x = m.groups()
        return sorted({a for (a, dd, b) in rel if dd == d and b == x})
    m = _Q_X_DIR_OF.match(question)
    if m:
        x, d = m.groups()
        return sorted({b for (a, dd, b) in rel if a == x and dd == d})
    raise ValueError(f"not a QA4 question: {question!r}")


def qa4_candidates(facts: Sequence[Tuple[str, str, str]]) -> List[Tuple[str, str]]:
    """(question, answer) pairs answerable from one stated fact whose answer is unique."""
    stated = _relations(facts)
    full = _closure(stated)
    out = []
    for (a, d, b) in sorted(stated):
        # "What is d of the b?" -> a ;  "What is the a d of?" -> b
        if len({x for (x, dd, y) in full if dd == d and y == b}) == 1:
            out.append((qa4_question_what_is_dir_of(b, d), a))
        if len({y for (x, dd, y) in full if x == a and dd == d}) == 1:
            out.append((qa4_question_what_is_x_dir_of(a, d), b))
    return out


def _question_place(question: str) -> str:
    """The place a QA4 question asks about ("What is north of the X?", "What is the X north of?" -> X)."""
    m = _Q_DIR_OF.match(question)
    if m:
        return m.group(2)
    m = _Q_X_DIR_OF.match(question)
    if m:
        return m.group(1)
    raise ValueError(f"not a QA4 question: {question!r}")


def qa4_question_kind(facts: Sequence[str], question: str) -> Dict[str, str]:
    """What a QA4 question asks of its facts, for error analysis:

    * ``role``: "leaf" when the place in the question is named by one fact only (the answer is the other place of
      that fact), "hub" when both facts name it (the direction decides between the two other places);
    * ``form``: "what_is_dir_of" ("What is north of the X?") or "what_is_x_dir_of" ("What is the X north of?");
    * ``relation``: "stated" when a fact says the asked relation in the question's direction, "converse" when only
      its converse is stated ("A north of B" answers "What is the B south of?");
    * ``axes``: "same" when both facts lie on one axis (north/south, or east/west: the three places on a line, the
      two facts' direction words equal or opposite), "different" otherwise. On one axis a hub question needs the
      direction word, the fact's orientation (which place is its subject) and the question's form together;
      on two axes the axis of the question's direction alone picks the fact.
    """
    parsed = _parse_qa4_facts(facts)
    m = _Q_DIR_OF.match(question)
    if m:
        d, x = m.groups()
        form = "what_is_dir_of"
        stated = any(dd == d and b == x for (_, dd, b) in parsed)
    else:
        m = _Q_X_DIR_OF.match(question)
        if not m:
            raise ValueError(f"not a QA4 question: {question!r}")
        x, d = m.groups()
        form = "what_is_x_dir_of"
        stated = any(a == x and dd == d for (a, dd, _) in parsed)
    named = sum(x in (a, b) for (a, _, b) in parsed)
    axes = {"north": 0, "south": 0, "east": 1, "west": 1}
    same = len({axes[dd] for (_, dd, _) in parsed}) == 1
    return {"role": "hub" if named > 1 else "leaf", "form": form, "relation": "stated" if stated else "converse",
            "axes": "same" if same else "different"}


def qa4_example(rng: np.random.Generator, same_axis: float | None = None, hub_share: float | None = None) -> Example:
    """Two facts relating two places to a shared third one (in different directions) + a question.

    The fact order and the orientation of each fact ("A north of B" vs "B south of A") are random; the
    question is uniform over the unambiguous candidates of :func:`qa4_candidates`.

    same_axis: None draws the two directions uniformly (distinct), which puts both facts on one axis (see
    :func:`qa4_question_kind`) in 1/3 of the examples; a probability draws that case with this probability instead
    (for training mixes; other random draws follow, so the examples differ from the default stream).
    hub_share: None draws the question uniformly over the candidates (about half ask about the hub, see
    :func:`qa4_question_kind`); a probability asks about the hub with this probability instead, uniformly over
    the hub (or, otherwise, the leaf) candidates (for training mixes; one more random draw). Facts on one axis have
    no unambiguous leaf question, so those examples ask about the hub whatever ``hub_share`` is.
    """
    hub, a, c = (PLACES[int(k)] for k in rng.choice(len(PLACES), size=3, replace=False))
    if hub_share is not None and not 0.0 <= hub_share <= 1.0:
        raise ValueError(f"hub_share must be None or a probability in [0, 1], got {hub_share}")
    if same_axis is None:
        d1, d2 = (DIRECTIONS[int(k)] for k in rng.choice(len(DIRECTIONS), size=2, replace=False))
    else:
        if not 0.0 <= same_axis <= 1.0:
            raise ValueError(f"same_axis must be None or a probability in [0, 1], got {same_axis}")
        d1 = DIRECTIONS[int(rng.integers(len(DIRECTIONS)))]
        if rng.random() < same_axis:
            d2 = OPPOSITE[d1]
        else:
            others = [d for d in DIRECTIONS if d not in (d1, OPPOSITE[d1])]
            d2 = others[int(rng.integers(len(others)))]
    rels = [(a, d1, hub), (c, d2, hub)]
    triples = []
    for (x, d, y) in rels:
        if rng.integers(2):
            triples.append((y, OPPOSITE[d], x))
        else:
            triples.append((x, d, y))
    if rng.integers(2):
        triples.reverse()
    cands = qa4_candidates(triples)
    if hub_share is not None:  # the hub is the place both facts name
        on_hub = [qa for qa in cands if _question_place(qa[0]) == hub]
        on_leaf = [qa for qa in cands if qa not in on_hub]
        cands = on_hub if rng.random() < hub_share or not on_leaf else on_leaf
    q, ans = cands[int(rng.integers(len(cands)))]
    return Example(tuple(qa4_fact(*t) for t in triples), q, ans)


def all_qa4_facts() -> List[str]:
    return [qa4_fact(a, d, b) for a in PLACES for d in DIRECTIONS for b in PLACES if a != b]


def all_qa4_questions() -> List[str]:
    return ([qa4_question_what_is_dir_of(x, d) for x in PLACES for d in DIRECTIONS]
            + [qa4_question_what_is_x_dir_of(x, d) for x in PLACES for d in DIRECTIONS])


# ---------------------------------------------------------------------------------------------------
# bAbI files
# ---------------------------------------------------------------------------------------------------
def read_babi(path: str) -> List[Example]:
    """Parse a bAbI task file (``en`` / ``en-10k`` format) into one :class:`Example` per question.

    Lines are ``"ID text"``; IDs restart at 1 with each story; question lines are
    ``"ID question<TAB>answer<TAB>supporting IDs"``.  An example's facts are all the story's statements
    before its question (story order); ``supporting`` indexes into them.
    """
    examples: List[Example] = []
    facts: List[str] = []
    id_to_fact: Dict[int, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.rstrip("\n").rstrip("\r")
            if not line.strip():
                continue
            head, _, rest = line.partition(" ")
            if not head.isdigit():
                raise ValueError(f"babi_path: {path}:{lineno}: expected 'ID text', got {line!r}")
            lid = int(head)
            if lid == 1:
                facts, id_to_fact = [], {}
            if "\t" in rest:
                parts = rest.split("\t")
                if len(parts) < 2:
                    raise ValueError(f"babi_path: {path}:{lineno}: question without an answer")
                question, answer = parts[0].strip(), parts[1].strip()
                sup = tuple(id_to_fact[int(s)] for s in (parts[2].split() if len(parts) > 2 else [])
                            if s.isdigit() and int(s) in id_to_fact)
                examples.append(Example(tuple(facts), question, answer, sup))
            else:
                id_to_fact[lid] = len(facts)
                facts.append(rest.strip())
    if not examples:
        raise ValueError(f"babi_path: no questions found in {path!r} (is it a bAbI task file?)")
    return examples
