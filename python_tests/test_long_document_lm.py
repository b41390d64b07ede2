"""scripts/long_document_lm.py --smoke on the CPU: the corpus split, every variant trained and evaluated, the files."""
import csv
import json
import math
import os

import pytest

import bench_scripts


@pytest.fixture(scope="module")
def script():
    return bench_scripts.load_script("long_document_lm")


def test_smoke_every_variant(script, tmp_path):
    assert script.main(["--out", str(tmp_path), "--smoke"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["variants"]) == list(script.VARIANTS)
    for name, info in summary["variants"].items():
        assert math.isfinite(info["ppl_0_8192"]) and info["ppl_0_8192"] > 1, name
    assert {k for k in summary["variants"]["rmt_cache"]} >= {"train_seconds", "stage_losses", "num_cache_tokens"}
    assert summary["variants"]["rmt"]["stage_steps"] == [3, 3]
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
    assert 0.05 < len(held) / (len(held) + len(train)) < 0.15


def _tree(root, files):
    for rel, size in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x = 1\n" * (size // 6))


def test_documents_join_small_packages(script, tmp_path):
    _tree(tmp_path, {"a.py": 600, "small/__init__.py": 60, "small/m.py": 600, "small/sub/n.py": 600,
                     "big/__init__.py": 60, "big/p.py": 3000, "big/q.py": 600, "big/inner/__init__.py": 60,
                     "big/inner/r.py": 600, "plain/s.py": 600, "notes.txt": 600,
                     "site-packages/t.py": 600, "small/__pycache__/m.py": 600})
    docs = dict(script.documents(str(tmp_path), 2000))
    assert list(docs) == ["a.py", "big/__init__.py", "big/inner/", "big/p.py", "big/q.py", "plain/s.py", "small/"]
    assert [os.path.relpath(f, tmp_path) for f in docs["small/"]] == ["small/__init__.py", "small/m.py",
                                                                       "small/sub/n.py"]


def test_corpus_joins_files_and_holds_out_by_length(script, tmp_path):
    from rmt_fast.experiments.backbones import load_tokenizer

    sizes = {f"m{i:02d}.py": 300 + 60 * i for i in range(20)}
    _tree(tmp_path, {**sizes, "pkg/__init__.py": 60, "pkg/b.py": 600})
    train, held = script.corpus(load_tokenizer("tiny-gpt2"), 50, 10_000, 5, root=str(tmp_path))
    docs = dict(train + held)
    assert len(docs) == 21 and len(held) == 4  # 1 in 5 by length: the 3rd, 8th, 13th and 18th longest
    order = sorted(docs, key=lambda p: (-len(docs[p]), p))
    assert [p for p, _ in held] == [order[i] for i in (2, 7, 12, 17)]
    text = load_tokenizer("tiny-gpt2").decode(docs["pkg/"])  # a word tokenizer: "# file : [UNK] / b . py"
    assert text.startswith("# file :") and text.count("# file :") == 2 and "/ b . py x = 1" in text


@pytest.mark.parametrize("args,msg", [(["--variants", "rmt,nope"], "unknown"), (["--cache", "600"], "--cache"),
                                      (["--stages", "0"], "--stages"), (["--train-seconds", "-1"], "--train-seconds")])
def test_bad_arguments(script, args, msg, capsys):
    with pytest.raises(SystemExit):
        script.parse_args(["--out", "x", *args])
    assert msg in capsys.readouterr().err


def test_variants_of_separate_runs_are_collected(script, tmp_path, capsys):
    assert script.main(["--out", str(tmp_path), "--smoke", "--variants", "cache_alone,segment_alone"]) == 0
    assert script.main(["--out", str(tmp_path), "--smoke", "--variants", "rmt"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["variants"]) == ["segment_alone", "rmt", "cache_alone"]
    env = summary["variants"]["rmt"]["environment"]
    assert env["device"] == "cpu"
    assert env["command"].endswith(f"long_document_lm.py --out {tmp_path} --smoke --variants rmt")
    with open(tmp_path / "ppl_by_position.csv", newline="") as f:
        assert {r["variant"] for r in csv.DictReader(f)} == {"segment_alone", "rmt", "cache_alone"}
    # another block size: the earlier variants are not comparable and are left out, with a word on stderr
    assert script.main(["--out", str(tmp_path), "--smoke", "--variants", "rmt", "--block", "64"]) == 0
    assert list(json.loads((tmp_path / "summary.json").read_text())["variants"]) == ["rmt"]
    assert "left out" in capsys.readouterr().err


def test_scratch_backbone_is_pretrained_once_and_read_back(script, tmp_path, capsys):
    args = ["--out", str(tmp_path), "--smoke", "--backbone", "gpt2-scratch", "--tokenizer", "word", "--shape", "1x64",
            "--pretrain-steps", "4", "--pretrain-context", "64", "--pretrain-batch", "2"]
    assert script.main(args + ["--variants", "full_context,rmt_cache"]) == 0
    bases = [p for p in tmp_path.iterdir() if p.name.startswith("base-1x64-ctx64-steps4")]
    assert len(bases) == 1
    record = json.loads((bases[0] / "pretraining.json").read_text())
    assert record["steps"] == 4 and math.isfinite(record["final_loss"])
    capsys.readouterr()
    assert script.main(args + ["--variants", "segment_alone"]) == 0
    assert "read from" in capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["variants"]) == ["segment_alone", "full_context", "rmt_cache"]
    with open(tmp_path / "ppl_by_position.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["variant"] == "full_context"]
    assert len(rows) == 2  # 64 positions: the first two 32-token blocks


@pytest.mark.parametrize("args,msg", [(["--shape", "12"], "--shape"), (["--shape", "2x100"], "--shape"),
                                      (["--pretrain-steps", "0"], "--pretrain-steps")])
def test_bad_scratch_arguments(script, args, msg, capsys):
    with pytest.raises(SystemExit):
        script.parse_args(["--out", "x", *args])
    assert msg in capsys.readouterr().err


def test_train_seconds_cut_the_stages(script, tmp_path):
    assert script.main(["--out", str(tmp_path), "--smoke", "--variants", "rmt", "--steps-per-stage", "1000",
                        "--train-seconds", "1e-9"]) == 0
    info = json.loads((tmp_path / "summary.json").read_text())["variants"]["rmt"]
    assert info["stage_steps"] == [1, 1] and len(info["stage_losses"]) == 2
