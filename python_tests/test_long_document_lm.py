"""scripts/long_document_lm.py --smoke on the CPU: the corpus split, every variant trained and evaluated, the files."""
import csv
import importlib.util
import json
import math
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("long_document_lm", os.path.join(ROOT, "scripts",
                                                                                   "long_document_lm.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_smoke_every_variant(script, tmp_path):
    assert script.main(["--out", str(tmp_path), "--smoke"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["variants"]) == list(script.VARIANTS)
    for name, info in summary["variants"].items():
        assert math.isfinite(info["ppl_0_8192"]) and info["ppl_0_8192"] > 1, name
    assert {k for k in summary["variants"]["rmt_cache"]} >= {"train_seconds", "stage_losses", "num_cache_tokens"}
    with open(tmp_path / "ppl_by_position.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # 256-token documents in 32-token blocks: 8 blocks per variant (full_context: within its 64 positions)
    assert sum(r["variant"] == "rmt" for r in rows) == 8 and sum(r["variant"] == "full_context" for r in rows) == 2
    assert (tmp_path / "ppl_by_position.png").stat().st_size > 0
    assert summary["documents"]["train"] > 0 and len(summary["documents"]["held_out"]) == 2


def test_held_out_split_is_by_document(script):
    from rmt_fast.experiments.backbones import load_tokenizer

    train, held = script.corpus(load_tokenizer("tiny-gpt2"), 200, 256, 10)
    paths = {p for p, _ in train}
    assert held and not paths & {p for p, _ in held}
    assert all(200 <= len(ids) <= 256 for _, ids in train + held)


@pytest.mark.parametrize("args,msg", [(["--variants", "rmt,nope"], "unknown"), (["--cache", "600"], "--cache"),
                                      (["--stages", "0"], "--stages")])
def test_bad_arguments(script, args, msg, capsys):
    with pytest.raises(SystemExit):
        script.parse_args(["--out", "x", *args])
    assert msg in capsys.readouterr().err
