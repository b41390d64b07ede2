"""Stage ends: --min-steps-per-stage and --validate-at-multiple (tiny models, fake validation metric)."""
import pytest

import rmt_fast.experiments.trainer as tr
from rmt_fast.experiments.cli import build_parser  # noqa: F401  (the flags exist)
from rmt_fast.experiments.trainer import TrainConfig, train

from test_train import tiny


def _fake(calls, solved_up_to):
    """A validation that solves lengths <= solved_up_to(step) (a function of how many validations ran)."""
    def fake(rmt, dataset, kind, indices, batch_size, device=None, rank=0, world=1, progress=None):
        calls.append(dataset.num_segments)
        good = dataset.num_segments <= solved_up_to(len(calls))
        return (8 if good else 1), 8
    return fake


def test_validate_at_multiple_keeps_training_until_longer_length_is_solved(monkeypatch):
    calls = []
    # the stage's own length (1) is solved at once; 2x (2 segments) only from the 7th validation call on
    monkeypatch.setattr(tr, "dataset_accuracy", _fake(calls, lambda k: 2 if k >= 7 else 1))
    res = train(tiny(None, threshold=0.9, eval_every=1, max_steps_per_stage=10, schedule=[1],
                     validate_at_multiple=2))
    # validations: (1, 2) per step; the 4th step's pair is calls 7, 8 -> both solved
    assert res.stages[0]["reason"] == "threshold" and res.stages[0]["steps"] == 4
    assert calls[:8] == [1, 2] * 4
    h = res.history[0]
    assert h["val_segments_multiple"] == 2 and h["val_accuracy"] == 1.0 and h["stage_metric"] == 0.125
    # without the multiple, the stage ends at its first validation
    calls.clear()
    res = train(tiny(None, threshold=0.9, eval_every=1, max_steps_per_stage=10, schedule=[1]))
    assert res.stages[0]["steps"] == 1 and "val_segments_multiple" not in res.history[0]


def test_validate_at_multiple_is_capped(monkeypatch):
    calls = []
    monkeypatch.setattr(tr, "dataset_accuracy", _fake(calls, lambda k: 100))
    res = train(tiny(None, threshold=0.9, eval_every=1, max_steps_per_stage=3, schedule=[1, 2],
                     validate_at_multiple=4, validate_max_segments=6))
    assert [h.get("val_segments_multiple") for h in res.history] == [4, 6]
    assert [s["steps"] for s in res.stages] == [1, 1]


def test_min_steps_per_stage_delays_the_threshold(monkeypatch):
    monkeypatch.setattr(tr, "dataset_accuracy", _fake([], lambda k: 100))
    res = train(tiny(None, threshold=0.9, eval_every=1, max_steps_per_stage=10, min_steps_per_stage=4,
                     validate_at_multiple=2))
    assert [s["steps"] for s in res.stages] == [4, 4]
    assert [s["reason"] for s in res.stages] == ["threshold", "threshold"]


def test_flags_and_validation():
    a = build_parser().parse_args(["train", "--out", "x", "--validate-at-multiple", "4", "--validate-max-segments", "16",
                                   "--min-steps-per-stage", "100"])
    assert (a.validate_at_multiple, a.validate_max_segments, a.min_steps_per_stage) == (4, 16, 100)
    with pytest.raises(ValueError, match="validate_at_multiple"):
        TrainConfig(validate_at_multiple=0).validate()
    with pytest.raises(ValueError, match="validate_max_segments"):
        TrainConfig(validate_max_segments=0).validate()


def test_real_tiny_training_with_multiple():
    res = train(tiny(None, max_steps_per_stage=2, eval_every=2, validate_at_multiple=2, schedule=[1, 2]))
    assert [h["val_segments_multiple"] for h in res.history] == [2, 4]
    assert all(0.0 <= h["val_accuracy_multiple"] <= 1.0 for h in res.history)
