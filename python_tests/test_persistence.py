"""save_pretrained / from_pretrained: tied weights in state_dict, PEFT adapters in PEFT's format, checks of
every file against the config and the backbone."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import rmt_fast
from models import CLS, PAD, SEP, bert_cls, gpt2, llama, tokens

peft = pytest.importorskip("peft")


def _lora(model, **kw):
    """A PeftModel whose LoRA weights are not the identity init (so that losing them shows)."""
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, **kw))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.3)
    return pm


def _trainable(rmt):
    return sorted(n for n, p in rmt.named_parameters() if p.requires_grad)


# ---- tied weights and the state dict ----------------------------------------------------------------------
@pytest.mark.parametrize("make", [gpt2, lambda: llama(tie_word_embeddings=True)])
def test_state_dict_of_tied_model_saves_with_safetensors_and_loads_strictly(tmp_path, make):
    rmt = rmt_fast.wrap(make(), num_mem_tokens=2, segment_size=6)
    head, emb = rmt.model.get_output_embeddings().weight, rmt.model.get_input_embeddings().weight
    assert head is emb
    sd = rmt.state_dict()
    assert "_extra_state" in sd and "memory" in sd
    save_file(sd, tmp_path / "model.safetensors")  # refused before: "Some tensors share memory"
    other = rmt_fast.wrap(make(), num_mem_tokens=2, segment_size=6)
    other.load_state_dict(load_file(tmp_path / "model.safetensors"))  # strict: the tied alias is filled in
    assert other.model.get_output_embeddings().weight is other.model.get_input_embeddings().weight
    ids = tokens(2, 20)
    torch.testing.assert_close(other(ids).logits, rmt(ids).logits)


@pytest.mark.parametrize("flat", [False, True], ids=["save_pretrained", "trainer_file"])
def test_loaded_model_is_in_eval_mode_throughout(tmp_path, flat):
    """from_pretrained returns the wrapper and every module in eval mode (as transformers does), whichever mode the
    saved model was in; train() turns them all back."""
    rmt = rmt_fast.wrap(gpt2(), num_mem_tokens=2, segment_size=6).train()
    if flat:
        save_file(rmt.state_dict(), tmp_path / "model.safetensors")
    else:
        rmt.save_pretrained(tmp_path)
    loaded = rmt_fast.from_pretrained(tmp_path)
    assert not loaded.training and not any(m.training for m in loaded.modules())
    loaded.train()
    assert all(m.training for m in loaded.modules())


def test_untied_model_keeps_both_matrices():
    rmt = rmt_fast.wrap(gpt2(tie_word_embeddings=False), num_mem_tokens=2, segment_size=6)
    sd = rmt.state_dict()
    assert "model.lm_head.weight" in sd and "model.transformer.wte.weight" in sd


def test_flat_state_dict_file_loads_with_from_pretrained(tmp_path):
    """What transformers.Trainer writes for a module that is not a PreTrainedModel: model.safetensors only."""
    rmt = rmt_fast.wrap(gpt2(), num_mem_tokens=3, segment_size=6)
    with torch.no_grad():
        rmt.memory.add_(0.5)
    save_file(rmt.state_dict(), tmp_path / "model.safetensors")
    loaded = rmt_fast.from_pretrained(tmp_path).eval()
    assert loaded.rmt_config == rmt.rmt_config and type(loaded.model) is type(rmt.model)
    assert loaded.model.lm_head.weight is loaded.model.transformer.wte.weight
    ids = tokens(2, 20)
    torch.testing.assert_close(loaded(ids).logits, rmt(ids).logits)
    torch.testing.assert_close(loaded(ids).memory, rmt(ids).memory)


# ---- PEFT ---------------------------------------------------------------------------------------------------
PEFT_CASES = [
    (gpt2, dict(target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM"),
     dict(num_mem_tokens=2, segment_size=6)),
    (llama, dict(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"), dict(num_mem_tokens=2, segment_size=6)),
    (bert_cls, dict(target_modules=["query", "value"], task_type="SEQ_CLS"),
     dict(num_mem_tokens=2, cls_token_id=CLS, sep_token_id=SEP, pad_token_id=PAD)),
]


@pytest.mark.parametrize("make,lora,kw", PEFT_CASES)
def test_peft_wrap_trains_adapters_and_memory_and_round_trips(tmp_path, make, lora, kw):
    rmt = rmt_fast.wrap(_lora(make(), **lora), **kw)
    trainable = _trainable(rmt)
    assert "memory" in trainable and all(n == "memory" or "lora_" in n or "modules_to_save" in n
                                         for n in trainable)
    assert any("lora_" in n for n in trainable)
    with torch.no_grad():
        rmt.memory.add_(0.5)
    ids = tokens(2, 30)
    before = rmt(ids)
    rmt.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"adapter_config.json", "adapter_model.safetensors", "rmt_config.json", "rmt_memory.safetensors",
            "backbone"} <= files
    base_keys = load_file(tmp_path / "backbone" / "model.safetensors").keys()
    assert not any("lora_" in k or "base_layer" in k or "original_module" in k for k in base_keys)
    # backbone/ is the plain base model, PEFT's own loader takes the adapters from the top directory
    base = type(rmt.adapter.model).from_pretrained(tmp_path / "backbone")
    plain = peft.PeftModel.from_pretrained(base, tmp_path)
    assert any("lora_" in n for n, _ in plain.named_parameters())
    loaded = rmt_fast.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.model, peft.PeftModel)
    assert _trainable(loaded) == trainable
    after = loaded(ids)
    torch.testing.assert_close(after.logits, before.logits)
    torch.testing.assert_close(after.memory, before.memory)
    # the adapters matter: the base model alone gives other outputs
    with loaded.model.disable_adapter():
        assert not torch.allclose(loaded(ids).logits, before.logits)


def test_peft_flat_state_dict_round_trips(tmp_path):
    pm = _lora(gpt2(), target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM")
    rmt = rmt_fast.wrap(pm, num_mem_tokens=2, segment_size=6)
    save_file(rmt.state_dict(), tmp_path / "model.safetensors")
    loaded = rmt_fast.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.model, peft.PeftModel) and _trainable(loaded) == _trainable(rmt)
    ids = tokens(2, 20)
    torch.testing.assert_close(loaded(ids).logits, rmt(ids).logits)


def test_adapter_layers_outside_a_peft_model_are_not_dropped_silently(tmp_path):
    pm = _lora(gpt2(), target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM")
    rmt = rmt_fast.wrap(pm.base_model.model, num_mem_tokens=2, segment_size=6)
    with pytest.raises(ValueError, match="PeftModel"):
        rmt.save_pretrained(tmp_path)


# ---- checks when loading -------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    rmt = rmt_fast.wrap(gpt2(), num_mem_tokens=3, segment_size=6)
    rmt.save_pretrained(tmp_path / "rmt")
    save_file(rmt.state_dict(), tmp_path / "model.safetensors")
    return tmp_path / "rmt", tmp_path


def _rewrite_memory(path, memory):
    save_file({"memory": memory}, path)


@pytest.mark.parametrize("shape", [(3, 33), (4, 32), (32,)])
def test_memory_of_the_wrong_shape_is_named(saved, shape):
    d, _ = saved
    _rewrite_memory(d / "rmt_memory.safetensors", torch.zeros(shape))
    with pytest.raises(ValueError, match=r"rmt_memory\.safetensors.*shape"):
        rmt_fast.from_pretrained(d)


def test_flat_memory_of_the_wrong_shape_is_named(saved):
    _, flat = saved
    sd = load_file(flat / "model.safetensors")
    sd["memory"] = torch.zeros(3, 31)
    save_file(sd, flat / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors.*shape"):
        rmt_fast.from_pretrained(flat)


@pytest.mark.parametrize("name,content", [
    ("rmt_config.json", "{not json"), ("rmt_config.json", "[1, 2]"),
    ("rmt_config.json", None), ("rmt_memory.safetensors", "garbage"), ("backbone/config.json", "{"),
    ("backbone/model.safetensors", "truncate"),
])
def test_corrupt_files_are_named(saved, name, content):
    d, _ = saved
    path = d / name
    if content is None:  # a config that does not fit the model
        cfg = json.loads(path.read_text())
        cfg["unknown_field"] = 1
        path.write_text(json.dumps(cfg))
    elif content == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    else:
        path.write_text(content)
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        rmt_fast.from_pretrained(d)


def test_config_that_does_not_fit_the_backbone_is_named(saved):
    d, _ = saved
    cfg = json.loads((d / "rmt_config.json").read_text())
    cfg["max_positions"] = 32
    cfg["segment_size"] = 4
    (d / "rmt_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"rmt_config\.json.*max_positions"):
        rmt_fast.from_pretrained(d)


def test_corrupt_or_foreign_flat_files_are_named(saved, tmp_path):
    _, flat = saved
    (flat / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        rmt_fast.from_pretrained(flat)
    save_file({"weight": torch.zeros(2)}, flat / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors.*_extra_state"):
        rmt_fast.from_pretrained(flat)
    with pytest.raises(ValueError, match="directory"):
        rmt_fast.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="rmt_config.json"):
        rmt_fast.from_pretrained(tmp_path / "empty")
