"""benchmarks/train.py end to end on tiny models (``--smoke``, CPU): the rows it writes and how it times them."""
import csv

import pytest

import bench_scripts


@pytest.fixture(scope="module")
def bench():
    return bench_scripts.load("train")


def test_smoke_bert_rows_and_repetitions(bench, tmp_path, monkeypatch, capsys):
    timed = []
    real_timeit = bench.timeit

    def recording_timeit(fn, warmup=1, reps=3):
        timed.append((warmup, reps))
        return real_timeit(fn, warmup=warmup, reps=reps)

    monkeypatch.setattr(bench, "timeit", recording_timeit)
    bench.main(["--smoke", "--parts", "bert", "--out", str(tmp_path)])

    with open(tmp_path / "train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    paths = ["official", "default", "full_eager", "ckpt_eager", "ckpt_graphed"]
    # --smoke: 1 and 3 segments per path (no long check), every one timed, none out of memory
    assert [(r["path"], int(r["segments"])) for r in rows] == [(p, n) for p in paths for n in (1, 3)]
    for r in rows:
        assert not r.get("error") and float(r["tok_per_s"]) > 0 and float(r["seconds"]) > 0
        assert float(r["speed_vs_official"]) == pytest.approx(float(r["tok_per_s"]) / next(
            float(o["tok_per_s"]) for o in rows if o["path"] == "official" and o["segments"] == r["segments"]))
    # 1-segment steps are short: 3 warm-ups and at least 7 repetitions; longer ones --reps (1 under --smoke)
    assert timed == [(3, 7), (1, 1)] * len(paths)
    assert (tmp_path / "train.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "| bert | ckpt_graphed | 3 |" in out


def test_smoke_curriculum_rows(bench, tmp_path):
    """The curriculum part: every path trains the same mixed lengths; on the CPU nothing is graphed."""
    bench.main(["--smoke", "--parts", "curriculum", "--out", str(tmp_path)])
    with open(tmp_path / "train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows][0].startswith("official") and len(rows) == 6
    for r in rows:
        assert not r.get("error") and float(r["ms_per_segment_step"]) > 0 and float(r["graphed_share"]) == 0
    assert float(rows[0]["speed_vs_official"]) == 1


def test_smoke_loops_rows(bench, tmp_path):
    """The loops part: every loop of LOOPS (PEFT included when installed) beside the official loop, per model."""
    bench.main(["--smoke", "--parts", "loops", "--out", str(tmp_path)])
    with open(tmp_path / "train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for part in ("loops-gpt2", "loops-bert"):
        mine = [r for r in rows if r["part"] == part]
        assert [r["path"] for r in mine] == ["official loop (restated)", *bench.LOOPS]
        for r in mine:
            if r.get("error"):
                assert r["error"] == "peft is not installed"
            else:
                assert float(r["tok_per_s"]) > 0 and float(r["speed_vs_official"]) > 0
