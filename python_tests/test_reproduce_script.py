"""scripts/reproduce_h200.py --smoke on the CPU: the whole pipeline, transfer copy out, resume from it in a fresh
output directory, per-task heatmap PNGs, the time estimate."""
import json
import os
import re
import subprocess
import sys

import pytest

import bench_scripts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "reproduce_h200.py")


def _run(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


@pytest.mark.slow
def test_smoke_transfer_and_resume(tmp_path):
    out, carry = tmp_path / "a", tmp_path / "a" / "carry"
    _run("--out", str(out), "--smoke", "--tasks", "memorize", "--no-progress", "--transfer-out", str(carry),
         "--validate-at-multiple", "2")
    for f in ("results.json", "results.csv", "accuracy.png", "heatmap_memorize.png", "memorize/results.json"):
        assert (out / f).exists(), f
    doc = json.loads((out / "results.json").read_text())["tasks"]["memorize"]
    assert set(doc["ci95"]) == set(doc["accuracy"]) and doc["peak_memory_mib"]
    assert (carry / "memorize" / "transfer.json").exists()
    # the next call: a fresh directory with only the carried copy; training is already done -> goes to evaluation
    out2 = tmp_path / "b"
    stdout = _run("--out", str(out2), "--smoke", "--tasks", "memorize", "--no-progress", "--resume-from", str(carry))
    assert "resuming from the transfer copy" in stdout
    doc2 = json.loads((out2 / "results.json").read_text())["tasks"]["memorize"]
    assert doc2["train"]["trained_segments"] == doc["train"]["trained_segments"] == 2
    # tasks evaluated by separate runs: one table, results.json/.csv and accuracy.png
    out3 = tmp_path / "c"
    stdout = _run("--out", str(out3), "--collect", str(out2 / "memorize"))
    merged = json.loads((out3 / "results.json").read_text())
    assert merged["tasks"]["memorize"]["accuracy"] == doc2["accuracy"] and "paper_fig1" in merged
    assert (out3 / "accuracy.png").exists()
    rows = (out3 / "results.csv").read_text().splitlines()
    assert rows[0].startswith("task,segments") and len(rows) == 1 + len(doc2["accuracy"])


def test_collect_rejects_what_it_cannot_read(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    (tmp_path / "notatask").mkdir()
    (tmp_path / "memorize").mkdir()
    for d, msg in ((tmp_path / "notatask", "must be a task"), (tmp_path / "memorize", "no results.json")):
        r = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path / "o"), "--collect", str(d)],
                           capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 2 and msg in r.stderr, r.stderr


def test_estimate_only():
    stdout = _run("--out", "/nonexistent-not-written", "--estimate-only", "--tasks", "reasoning")
    assert "estimate per task" in stdout and "total" in stdout


RESUMABLE = os.path.join(ROOT, "scripts", "reproduce_resumable.sh")


def _piece(task, run_dir, pack, transfer_in, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHON": sys.executable}
    r = subprocess.run(["bash", RESUMABLE, task, str(run_dir), str(pack), str(transfer_in), "--smoke", "--no-progress",
                        *args], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


@pytest.mark.slow
def test_resumable_pieces_on_fresh_machines(tmp_path):
    """Every piece pauses at its first chance; each next piece runs on a "fresh machine" (a new run directory) with
    only the packed transfer copy of the last one, until the task is trained (2 stages) and evaluated."""
    import tarfile

    transfer_in = "-"
    for piece in range(6):
        run, pack = tmp_path / f"run{piece}", tmp_path / f"pack{piece}"
        stdout = _piece("memorize", run, pack, transfer_in, "--pause-after", "1e-9", "--stage-eval")
        assert ("a new run" in stdout) == (piece == 0)
        parts = sorted(pack.glob("memorize.tar.part*"))
        assert parts and all(p.stat().st_size <= 15 * 2 ** 20 for p in parts)
        with tarfile.open(pack / "memorize_files.tar") as t:
            names = t.getnames()
        assert "memorize/curves.png" in names and "memorize.log" in names
        if "memorize/results.json" in names:
            break
        unpacked = tmp_path / f"in{piece}"
        unpacked.mkdir()
        with open(tmp_path / "joined.tar", "wb") as f:
            for p in parts:
                f.write(p.read_bytes())
        with tarfile.open(tmp_path / "joined.tar") as t:
            t.extractall(unpacked)
        transfer_in = unpacked
    else:
        raise AssertionError("not done after 6 pieces")
    # the smoke curriculum has 2 stages of 3 steps, one validation each: piece 0 trains stage 1 and does not start
    # stage 2 (its forecast runs past the pause), piece 1 trains stage 2 and evaluates
    assert piece == 1
    doc = json.loads((run / "memorize" / "results.json").read_text())
    assert doc["train"]["trained_segments"] == 2
    assert doc["heatmap"]["train_segments"] == [1, 2]  # from the stage records: no stage checkpoint travelled


@pytest.mark.slow
def test_resumable_piece_on_the_same_machine(tmp_path):
    """A warm machine keeps the run directory: the next piece resumes from it (with the AdamW state)."""
    _piece("memorize", tmp_path / "run", tmp_path / "pack", "-", "--pause-after", "1e-9")
    stdout = _piece("memorize", tmp_path / "run", tmp_path / "pack", "-")
    assert "resuming from " + str(tmp_path / "run" / "memorize" / "checkpoint-last") in stdout
    assert (tmp_path / "run" / "memorize" / "results.json").exists()


@pytest.mark.slow
def test_reasoning_one_segment_smoke(tmp_path):
    script = os.path.join(ROOT, "scripts", "reasoning_one_segment.py")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, script, "--out", str(tmp_path), "--smoke", "--steps", "4", "--eval-every", "2",
                        "--test-samples", "16", "--config", "a:lr=1e-3", "--config", "plain:lr=1e-3,num_mem_tokens=0"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads((tmp_path / "diagnosis.json").read_text())["configs"]
    assert doc["plain"]["config"]["num_mem_tokens"] == 0 and doc["a"]["config"]["num_mem_tokens"] == 2
    for d in doc.values():
        assert [h["step"] for h in d["history"]] == [2, 4]
        test = d["test"]
        assert test["all"]["samples"] == 16
        assert test["role=leaf"]["samples"] + test["role=hub"]["samples"] == 16
        assert 0.0 <= test["prediction_in_facts"] <= 1.0
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "role=hub" in r.stdout


@pytest.mark.slow
def test_reasoning_one_segment_as_a_memory_stage(tmp_path):
    """--segments 2: every config trains on two segments (facts-early mix and init_from as config keys), the test
    is split by where the facts lie, and the memory entering the last segment is probed."""
    script = os.path.join(ROOT, "scripts", "reasoning_one_segment.py")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, script, "--out", str(tmp_path / "one"), "--smoke", "--steps", "2",
                        "--eval-every", "2", "--test-samples", "16", "--config", "a:lr=1e-3"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    start = str(tmp_path / "one" / "a" / "checkpoint-last")
    r = subprocess.run([sys.executable, script, "--out", str(tmp_path / "two"), "--smoke", "--steps", "2",
                        "--eval-every", "2", "--test-samples", "16", "--segments", "2", "--probe-samples", "30",
                        "--config", f"early:lr=1e-3,train_facts_early=1.0,init_from={start}",
                        "--config", "ss:lr=1e-3,fact_placement=segment_start,train_hub_share=1.0"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    d = json.loads((tmp_path / "two" / "diagnosis.json").read_text())["configs"]["early"]
    assert d["config"]["schedule"] == [2] and d["config"]["train_facts_early"] == 1.0
    assert d["config"]["init_from"] == start
    test = d["test"]
    assert sum(v["samples"] for k, v in test.items() if k.startswith("facts ")) == test["all"]["samples"] == 16
    assert set(d["probe"]) == {"hub", "north of hub", "south of hub", "east of hub", "west of hub"}
    assert all(0 <= p["test_accuracy"] <= 1 for p in d["probe"].values())
    assert "dir probe" in r.stdout and "hub+facts none in last" in r.stdout
    # the official placement and a hub-only mix run through training, the test split and the probes
    ss = json.loads((tmp_path / "two" / "diagnosis.json").read_text())["configs"]["ss"]
    assert ss["config"]["fact_placement"] == "segment_start" and ss["config"]["train_hub_share"] == 1.0
    assert ss["test"]["all"]["samples"] == 16 and set(ss["probe"]) == set(d["probe"])


@pytest.mark.parametrize("option", ["train_same_axis", "train_hub_share"])
def test_reasoning_mix_options_reach_the_reasoning_config_only(option):
    mod = _reproduce_module()
    a = mod.parse_args(["--out", "/tmp/x", "--" + option.replace("_", "-"), "0.67"])
    assert getattr(mod.task_config(a, "reasoning"), option) == 0.67
    assert getattr(mod.task_config(a, "memorize"), option) is None
    assert getattr(mod.task_config(a, "detect_memorize"), option) is None
    assert getattr(mod.task_config(mod.parse_args(["--out", "/tmp/x"]), "reasoning"), option) is None


@pytest.mark.slow
def test_reasoning_one_segment_length_warmup(tmp_path):
    """--warmup-lengths: each config trains on shorter segments first, each phase from the last one's weights, and
    the history keeps every phase with its segment size."""
    script = os.path.join(ROOT, "scripts", "reasoning_one_segment.py")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, script, "--out", str(tmp_path), "--smoke", "--steps", "4", "--eval-every", "2",
                        "--test-samples", "16", "--config", "a:lr=1e-3", "--warmup-lengths", "24,28",
                        "--warmup-steps", "2", "--warmup-threshold", "1.01"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    d = json.loads((tmp_path / "diagnosis.json").read_text())["configs"]["a"]
    assert [(h["segment_size"], h["step"]) for h in d["history"]] == [(24, 2), (28, 4), (32, 6), (32, 8)]
    assert [w["segment_size"] for w in d["warmup"]] == [24, 28]
    assert d["config"]["init_from"] == str(tmp_path / "a" / "warmup-28" / "checkpoint-last")
    with open(tmp_path / "a" / "warmup-28" / "train_config.json") as f:
        assert json.load(f)["init_from"] == str(tmp_path / "a" / "warmup-24" / "checkpoint-last")
    assert d["test"]["all"]["samples"] == 16


@pytest.mark.parametrize("lengths", ["48,abc", "600", "0"])
def test_reasoning_one_segment_bad_warmup_lengths(lengths, capsys):
    mod = bench_scripts.load_script("reasoning_one_segment")
    with pytest.raises(SystemExit):
        mod.parse_args(["--out", "/tmp/x", "--warmup-lengths", lengths])
    assert "--warmup-lengths" in capsys.readouterr().err


def test_init_from_reaches_the_task_configs():
    mod = _reproduce_module()
    a = mod.parse_args(["--out", "/tmp/x", "--init-from", "/tmp/r1/a/checkpoint-last"])
    assert mod.task_config(a, "reasoning").init_from == "/tmp/r1/a/checkpoint-last"
    assert mod.task_config(mod.parse_args(["--out", "/tmp/x"]), "reasoning").init_from is None


def _reproduce_module():
    return bench_scripts.load_script("reproduce_h200")


def test_schedule_reaches_the_task_configs_and_the_estimate():
    mod = _reproduce_module()
    a = mod.parse_args(["--out", "/tmp/x", "--schedule", "6,8", "--max-steps-per-stage", "100", "--train-time", "0"])
    cfg = mod.task_config(a, "reasoning")
    assert cfg.stages() == [6, 8] and cfg.max_segments == 8
    one = mod.estimate(mod.parse_args(["--out", "/tmp/x", "--schedule", "6", "--max-steps-per-stage", "100",
                                       "--train-time", "0"]))
    assert 0 < one["train_s"] < mod.estimate(a)["train_s"]
    default = mod.task_config(mod.parse_args(["--out", "/tmp/x", "--max-segments", "4"]), "reasoning")
    assert default.stages() == [1, 2, 3, 4] and default.schedule is None


@pytest.mark.parametrize("schedule", ["6,4", "0", "6,x", ","])
def test_bad_schedule_is_refused_naming_the_flag(schedule, capsys):
    mod = _reproduce_module()
    with pytest.raises(SystemExit):
        mod.parse_args(["--out", "/tmp/x", "--schedule", schedule])
    assert "--schedule" in capsys.readouterr().err


def test_train_facts_early_reaches_detect_and_reasoning_configs():
    mod = _reproduce_module()
    a = mod.parse_args(["--out", "/tmp/x", "--train-facts-early", "0.5"])
    assert mod.task_config(a, "reasoning").train_facts_early == 0.5
    assert mod.task_config(a, "detect_memorize").train_facts_early == 0.5
    assert mod.task_config(a, "memorize").train_facts_early is None
    assert mod.task_config(mod.parse_args(["--out", "/tmp/x"]), "reasoning").train_facts_early is None


def test_fact_placement_reaches_detect_and_reasoning_configs():
    mod = _reproduce_module()
    a = mod.parse_args(["--out", "/tmp/x", "--fact-placement", "segment_start"])
    assert mod.task_config(a, "reasoning").fact_placement == "segment_start"
    assert mod.task_config(a, "detect_memorize").fact_placement == "segment_start"
    assert mod.task_config(a, "memorize").fact_placement == "anywhere"
    assert mod.task_config(mod.parse_args(["--out", "/tmp/x"]), "reasoning").fact_placement == "anywhere"


@pytest.mark.parametrize("flag", ["--train-facts-early", "--train-same-axis", "--train-hub-share"])
def test_training_mix_probabilities_are_checked_naming_the_flag(flag, capsys):
    mod = _reproduce_module()
    with pytest.raises(SystemExit):
        mod.parse_args(["--out", "/tmp/x", flag, "1.5"])
    assert flag in capsys.readouterr().err


def test_reconstruction_options_reach_the_task_configs():
    mod = _reproduce_module()
    a = mod.parse_args(["--out", "/tmp/x", "--reconstruction-coef", "0.5", "--reconstruction-mask-prob", "0.3",
                        "--no-reconstruction-last"])
    cfg = mod.task_config(a, "reasoning")
    assert (cfg.reconstruction_coef, cfg.reconstruction_mask_prob, cfg.reconstruction_last) == (0.5, 0.3, False)
    cfg.validate()
    off = mod.task_config(mod.parse_args(["--out", "/tmp/x"]), "reasoning")
    assert (off.reconstruction_coef, off.reconstruction_mask_prob, off.reconstruction_last) == (0.0, 0.15, True)
    assert off.distill_coef == 0.0


def test_distillation_option_reaches_the_task_configs():
    mod = _reproduce_module()
    cfg = mod.task_config(mod.parse_args(["--out", "/tmp/x", "--distill-coef", "2", "--distill-layers", "last",
                                          "--distill-order", "natural"]), "reasoning")
    assert (cfg.distill_coef, cfg.distill_layers, cfg.distill_order) == (2.0, "last", "natural")
    cfg.validate()
    off = mod.task_config(mod.parse_args(["--out", "/tmp/x"]), "reasoning")
    assert (off.distill_layers, off.distill_order) == ("all", "last_first")


def test_distillation_choices_are_the_librarys(capsys):
    """The script restates the choices (its --help imports no torch): they must be the library's, no more, no less
    (argparse's refusal lists them)."""
    from rmt_fast.experiments.distillation import LAYERS, ORDERS
    from rmt_fast.experiments.tasks import PLACEMENTS

    mod = _reproduce_module()
    for flag, allowed in (("--distill-layers", LAYERS), ("--distill-order", ORDERS), ("--fact-placement", PLACEMENTS)):
        for value in allowed:
            mod.parse_args(["--out", "/tmp/x", flag, value])
        with pytest.raises(SystemExit):
            mod.parse_args(["--out", "/tmp/x", flag, "nothing"])
        listed = capsys.readouterr().err.rsplit("choose from", 1)[1]
        assert sorted(re.findall(r"'([a-z_]+)'", listed)) == sorted(allowed), listed


@pytest.mark.parametrize("segments", [1, 2])
def test_reasoning_breakdown_of_a_decoder(segments):
    """A decoder's test: each row's prediction is the answer whose first token scores highest at the position
    before the row's answer, as a single-row call gives it."""
    import torch

    from rmt_fast.experiments.tasks import make_task
    from rmt_fast.experiments.trainer import TrainConfig, build_model

    mod = bench_scripts.load_script("reasoning_one_segment")
    cfg = TrainConfig(task="reasoning", backbone="tiny-gpt2", num_mem_tokens=2, segment_size=40, device="cpu",
                      schedule=[segments], hidden_size=32)
    torch.manual_seed(0)
    rmt, tok, kind = build_model(cfg, torch.device("cpu"))
    assert kind == "decoder"
    out = mod.test_breakdown(rmt, tok, cfg, 12, batch_size=5, num_segments=segments)
    ds = make_task("reasoning", tok, segments, 40, split="test", seed=cfg.seed, length=12, for_decoder=True)
    first = [ids[0] for ids in ds.answer_token_ids]
    right = 0
    for i in range(12):
        item = ds[i]
        with torch.no_grad():
            logits = rmt(input_ids=item["input_ids"][None], return_logits=True).logits[0]
        at = len(item["input_ids"]) - len(item["answer_ids"]) - 1
        right += int(logits[at, first].argmax()) == ds.answers.index(item["answer"])
    assert out["all"]["samples"] == 12 and 0 < right < 12, right  # some right, some wrong: the rows are told apart
    assert out["all"]["accuracy"] == pytest.approx(right / 12)
    assert len(out["wrong_samples"]) == 12 - right
    assert all(w["prediction"] in ds.answers for w in out["wrong_samples"])
