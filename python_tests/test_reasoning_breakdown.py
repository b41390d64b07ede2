"""scripts/reasoning_breakdown.py: test accuracy of a trained reasoning RMT by question kind and fact placement."""
import json

import pytest

from rmt_fast.experiments.trainer import train

import bench_scripts
from test_train import tiny


def _module():
    return bench_scripts.load_script("reasoning_breakdown")


def test_placement_counts_the_facts_that_end_in_the_last_segment():
    mod = _module()
    assert mod.placement([0, 10], [5, 5], 2, 32) == "none in last"
    assert mod.placement([0, 30], [5, 5], 2, 32) == "one in last"  # ends at 35 > 32
    assert mod.placement([40, 50], [5, 5], 2, 32) == "both in last"
    assert mod.placement([0, 5], [5, 5], 1, 32) == "both in last"  # one segment: everything is in it


def test_breakdown_of_a_saved_run(tmp_path, capsys):
    mod = _module()
    train(tiny(tmp_path / "run", task="reasoning", segment_size=32, schedule=[1], max_steps_per_stage=1,
               eval_every=1))
    out = tmp_path / "b.json"
    assert mod.main(["--model", str(tmp_path / "run" / "checkpoint-last"), "--lengths", "1,2", "--samples", "12",
                     "--batch-size", "5", "--device", "cpu", "--out", str(out)]) == 0
    doc = json.load(open(out))
    for n in ("1", "2"):
        res = doc["lengths"][n]
        assert res["all"]["samples"] == 12
        for prefix in ("facts ", "role=", "axes="):
            assert sum(r["samples"] for k, r in res.items() if k.startswith(prefix)) == 12, (n, prefix)
        assert all(0 <= r["accuracy"] <= 1 for r in res.values())
    assert set(doc["lengths"]["1"]) >= {"facts both in last"}
    assert "segments" in capsys.readouterr().out


@pytest.mark.parametrize("bad", [["--lengths", "2,x"], ["--lengths", "0"], ["--samples", "0"]])
def test_bad_arguments_name_the_option(bad, capsys):
    with pytest.raises(SystemExit):
        _module().parse_args(["--model", "m", "--out", "o", *bad])
    assert bad[0] in capsys.readouterr().err
