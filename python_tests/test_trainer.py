"""transformers.Trainer over a RecurrentMemoryModel: training, checkpoints, resume, evaluate, predict,
save_model -> rmt_fast.from_pretrained, gradient checkpointing; the README's Trainer and PEFT examples."""
import inspect
import os

import numpy as np
import pytest
import torch
import transformers
from transformers import Trainer, TrainingArguments

import rmt_fast
from models import CLS, PAD, SEP, bert_cls, gpt2, tokens

NO_DROPOUT_GPT2 = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def _lm_rows(n, t):
    ids = tokens(n, t)
    return [{"input_ids": x, "labels": x} for x in ids]


def _args(out, **kw):
    base = dict(per_device_train_batch_size=4, per_device_eval_batch_size=4, learning_rate=1e-2, report_to=[],
                use_cpu=True, logging_steps=1, save_strategy="no", seed=0, dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(str(out), **base)


def checkpointing_arg(on: bool) -> dict:
    """TrainingArguments' activation checkpointing switch: ``activation_checkpointing`` (transformers >= 5.25), else
    ``gradient_checkpointing``."""
    if "activation_checkpointing" in inspect.signature(TrainingArguments.__init__).parameters:
        return {"activation_checkpointing": on}
    return {"gradient_checkpointing": on}


def _lm_accuracy(eval_pred):
    logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
    pred, labels = logits[:, :-1].argmax(-1), eval_pred.label_ids[:, 1:]
    keep = labels != -100
    return {"acc": float((pred[keep] == labels[keep]).mean())}


def _params(rmt):
    return {n: p.detach().clone() for n, p in rmt.named_parameters()}


def test_trainer_tied_gpt2_checkpoints_resume_evaluate_predict_save(tmp_path):
    train, evalset = _lm_rows(16, 20), _lm_rows(6, 20)

    def fresh():
        torch.manual_seed(0)
        return rmt_fast.wrap(gpt2(**NO_DROPOUT_GPT2), num_mem_tokens=2, segment_size=8)

    rmt = fresh()
    trainer = Trainer(model=rmt, args=_args(tmp_path / "run", max_steps=4, save_strategy="steps", save_steps=2),
                      train_dataset=train, eval_dataset=evalset, compute_metrics=_lm_accuracy)
    trainer.train()
    assert os.path.isfile(tmp_path / "run" / "checkpoint-2" / "model.safetensors")
    assert rmt.model.lm_head.weight is rmt.model.transformer.wte.weight
    done = _params(rmt)
    # resume from the step-2 checkpoint: the same weights as the uninterrupted run
    resumed = fresh()
    trainer2 = Trainer(model=resumed, args=_args(tmp_path / "run", max_steps=4, save_strategy="steps",
                                                 save_steps=2), train_dataset=train)
    trainer2.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert resumed.model.lm_head.weight is resumed.model.transformer.wte.weight
    for n, p in _params(resumed).items():
        torch.testing.assert_close(p, done[n], atol=1e-6, rtol=1e-5, msg=n)
    # evaluate with metrics and predict
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_acc"} <= set(metrics) and np.isfinite(metrics["eval_loss"])
    pred = trainer.predict(evalset)
    logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
    ids = torch.stack([r["input_ids"] for r in evalset])
    rmt.eval()
    with torch.no_grad():
        want = rmt(ids).logits
    torch.testing.assert_close(torch.as_tensor(logits), want, atol=1e-5, rtol=1e-4)
    # save_model and checkpoints load with rmt_fast.from_pretrained
    trainer.save_model(str(tmp_path / "final"))
    for d in (tmp_path / "final", tmp_path / "run" / "checkpoint-4"):
        loaded = rmt_fast.from_pretrained(d).eval()
        assert loaded.model.lm_head.weight is loaded.model.transformer.wte.weight
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, want)


def test_trainer_bert_classifier_evaluate_predict_save(tmp_path):
    torch.manual_seed(0)
    rmt = rmt_fast.wrap(bert_cls(), num_mem_tokens=2, cls_token_id=CLS, sep_token_id=SEP, pad_token_id=PAD,
                        segment_size=9)
    ids = tokens(12, 30)
    mask = torch.ones_like(ids)
    mask[::3, 20:] = 0
    rows = [{"input_ids": x, "attention_mask": m, "labels": torch.tensor(i % 6)}
            for i, (x, m) in enumerate(zip(ids, mask))]

    def accuracy(eval_pred):
        logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        return {"acc": float((logits.argmax(-1) == eval_pred.label_ids).mean())}

    trainer = Trainer(model=rmt, args=_args(tmp_path / "run", max_steps=2, save_strategy="steps", save_steps=1),
                      train_dataset=rows, eval_dataset=rows[:8], compute_metrics=accuracy)
    trainer.train()
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_acc"} <= set(metrics)
    pred = trainer.predict(rows[:8])
    logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
    rmt.eval()
    with torch.no_grad():
        want = rmt(ids[:8], attention_mask=mask[:8]).logits
    torch.testing.assert_close(torch.as_tensor(logits), want, atol=1e-5, rtol=1e-4)
    trainer.save_model(str(tmp_path / "final"))
    loaded = rmt_fast.from_pretrained(tmp_path / "final").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids[:8], attention_mask=mask[:8]).logits, want)


def test_trainer_peft_trains_adapters_and_memory_and_saves(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    pm = peft.get_peft_model(gpt2(**NO_DROPOUT_GPT2), peft.LoraConfig(r=4, target_modules=["c_attn"],
                                                                       fan_in_fan_out=True, task_type="CAUSAL_LM"))
    rmt = rmt_fast.wrap(pm, num_mem_tokens=2, segment_size=8)
    before = _params(rmt)
    trainer = Trainer(model=rmt, args=_args(tmp_path / "run", max_steps=2), train_dataset=_lm_rows(8, 20))
    trainer.train()
    changed = {n for n, p in _params(rmt).items() if not torch.equal(p, before[n])}
    assert "memory" in changed and any("lora_B" in n for n in changed)
    assert all(n == "memory" or "lora_" in n for n in changed)
    trainer.save_model(str(tmp_path / "final"))
    loaded = rmt_fast.from_pretrained(tmp_path / "final").eval()
    assert isinstance(loaded.model, peft.PeftModel)
    ids = tokens(2, 20)
    rmt.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, rmt(ids).logits)


@pytest.mark.parametrize("make,kw,labels", [
    (lambda: gpt2(**NO_DROPOUT_GPT2), dict(num_mem_tokens=2, segment_size=6, memory_bidirectional=True), "lm"),
    (lambda: bert_cls(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
     dict(num_mem_tokens=2, segment_size=7, cls_token_id=CLS, sep_token_id=SEP, pad_token_id=PAD), "cls"),
])
def test_gradient_checkpointing_same_loss_and_gradients(make, kw, labels):
    ids = tokens(3, 23)
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    mask[2, :5] = 0
    y = ids.masked_fill(mask == 0, -100) if labels == "lm" else torch.tensor([1, 2, 3])
    results = []
    for on in (False, True):
        torch.manual_seed(0)
        rmt = rmt_fast.wrap(make(), **kw)
        rmt.train()
        if on:
            rmt.gradient_checkpointing_enable()
        assert rmt.is_gradient_checkpointing == on
        out = rmt(ids, attention_mask=mask, labels=y)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in rmt.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l0, l1)
    assert g0.keys() == g1.keys() and "memory" in g0
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], atol=1e-6, rtol=1e-5, msg=n)
    rmt.gradient_checkpointing_disable()
    assert not rmt.is_gradient_checkpointing


def test_trainer_gradient_checkpointing_trains_the_same(tmp_path):
    train = _lm_rows(8, 20)
    losses, weights = [], []
    for on in (False, True):
        torch.manual_seed(0)
        rmt = rmt_fast.wrap(gpt2(**NO_DROPOUT_GPT2), num_mem_tokens=2, segment_size=8)
        trainer = Trainer(model=rmt, args=_args(tmp_path / str(on), max_steps=3, **checkpointing_arg(on)),
                          train_dataset=train)
        trainer.train()
        assert rmt.is_gradient_checkpointing == on
        losses.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
        weights.append(_params(rmt))
    assert len(losses[0]) == 3
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    for n in weights[0]:
        torch.testing.assert_close(weights[0][n], weights[1][n], atol=1e-6, rtol=1e-5, msg=n)


# ---- the README examples, run as written (the hub download replaced by a tiny GPT-2) -------------------------
README_TRAINER = '''
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
import rmt_fast

model = AutoModelForCausalLM.from_pretrained("gpt2")
rmt = rmt_fast.wrap(model, num_mem_tokens=10, segment_size=256)

rows = torch.randint(0, model.config.vocab_size, (16, 768))  # your token ids: 3 segments per row
data = [{"input_ids": x, "labels": x} for x in rows]            # labels are shifted inside
args = TrainingArguments("rmt-gpt2", per_device_train_batch_size=4, max_steps=8, save_steps=4,
                         activation_checkpointing=True, report_to="none")  # before 5.25: gradient_checkpointing
trainer = Trainer(model=rmt, args=args, train_dataset=data, eval_dataset=data[:4])
trainer.train()                       # rmt-gpt2/checkpoint-4, -8; train(resume_from_checkpoint=True) resumes
print(trainer.evaluate())
trainer.save_model("rmt-gpt2/final")
rmt = rmt_fast.from_pretrained("rmt-gpt2/final")
'''

README_PEFT = '''
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
import rmt_fast

model = AutoModelForCausalLM.from_pretrained("gpt2")
lora = get_peft_model(model, LoraConfig(r=8, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM"))
rmt = rmt_fast.wrap(lora, num_mem_tokens=10, segment_size=256)  # trains the LoRA adapters and the memory

opt = torch.optim.AdamW([p for p in rmt.parameters() if p.requires_grad], lr=1e-3)
for x in torch.randint(0, model.config.vocab_size, (4, 2, 768)):  # your batches of token ids
    rmt(x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad()

rmt.save_pretrained("rmt-gpt2-lora")  # backbone/ (GPT-2), adapter_config.json + adapter_model.safetensors, memory
rmt = rmt_fast.from_pretrained("rmt-gpt2-lora")
'''


def _readme_blocks() -> list:
    readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
    text = open(readme, encoding="utf-8").read()
    return [b.split("\n", 1)[1] for b in text.split("```")[1::2] if b.startswith("python\n")]


def test_readme_holds_the_examples_tested_here():
    blocks = [b.strip() for b in _readme_blocks()]
    assert README_TRAINER.strip() in blocks and README_PEFT.strip() in blocks


@pytest.mark.parametrize("example", ["trainer", "peft"])
def test_readme_examples_run(tmp_path, monkeypatch, example):
    if example == "peft":
        pytest.importorskip("peft")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: gpt2(positions=512).train())
    namespace = {}
    code = README_TRAINER if example == "trainer" else README_PEFT
    if "activation_checkpointing" not in inspect.signature(TrainingArguments.__init__).parameters:
        code = code.replace("activation_checkpointing=True", "gradient_checkpointing=True")  # before 5.25
    exec(code, namespace)
    rmt = namespace["rmt"]
    assert isinstance(rmt, rmt_fast.RecurrentMemoryModel)
    if example == "trainer":
        assert os.path.isdir("rmt-gpt2/checkpoint-8")
    else:
        import peft

        assert isinstance(rmt.model, peft.PeftModel)
        assert os.path.isfile("rmt-gpt2-lora/adapter_model.safetensors")
