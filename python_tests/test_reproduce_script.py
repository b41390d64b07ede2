"""scripts/reproduce_h200.py --smoke on the CPU: the whole pipeline, transfer copy out, resume from it in a fresh
output directory, per-task heatmap PNGs, the time estimate."""
import json
import os
import subprocess
import sys

import pytest

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


def test_estimate_only():
    stdout = _run("--out", "/nonexistent-not-written", "--estimate-only", "--tasks", "reasoning")
    assert "estimate per task" in stdout and "total" in stdout
