"""Saving and loading a :class:`~rmt_fast.RecurrentMemoryModel`.

:func:`rmt_fast.from_pretrained` (:func:`load` here) reads two layouts:

- the directory :func:`save_pretrained` writes::

      rmt_config.json            the RMTConfig
      rmt_memory.safetensors     the learned memory [m, d]
      backbone/                  the transformers model, as its own save_pretrained writes it
      adapter_config.json        a PEFT backbone only: its adapters in PEFT's own format (other adapters than
      adapter_model.safetensors  "default" in a sub-directory named after them); backbone/ holds the base model

- a flat ``model.safetensors``: what ``transformers.Trainer`` writes (checkpoints, ``save_model``) for a module
  that is not a PreTrainedModel: the RMT's ``state_dict()``. That dict describes the model itself: its
  ``_extra_state`` entry (:func:`describe`) holds the RMT config, the backbone's class and config and any PEFT
  adapter configs, and each tied parameter appears once (safetensors refuses shared tensors).
"""
from __future__ import annotations

import json
import os
import sys
from itertools import chain

import torch

from .adapters import backbone_of, make_adapter
from .config import RMTConfig

CONFIG_NAME = "rmt_config.json"
MEMORY_NAME = "rmt_memory.safetensors"
BACKBONE_DIR = "backbone"
FLAT_WEIGHTS_NAME = "model.safetensors"  # transformers' SAFE_WEIGHTS_NAME
ADAPTER_CONFIG_NAME = "adapter_config.json"  # PEFT's
EXTRA_STATE_KEY = "_extra_state"  # where nn.Module.state_dict() puts get_extra_state()
FORMAT = "rmt_fast"


# ---- PEFT -------------------------------------------------------------------------------------------------
def peft_model_of(model):
    """``model`` when it is a PEFT ``PeftModel``, else None. (A PeftModel exists only once peft is imported.)"""
    peft = sys.modules.get("peft")
    return model if peft is not None and isinstance(model, peft.PeftModel) else None


def _original_module(module):
    """The layer PEFT replaced with ``module`` (``module`` itself when PEFT did not wrap it)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import AuxiliaryTrainingWrapper

    while True:
        if isinstance(module, BaseTunerLayer) and module.get_base_layer() is not module:
            module = module.get_base_layer()
        elif isinstance(module, AuxiliaryTrainingWrapper):  # modules_to_save, trainable tokens
            module = module.original_module if module.original_module is not None else module.token_adapter
        else:
            return module


def _original_names(module, wrapped: str = "", clean: str = "", out: dict | None = None) -> dict[str, str]:
    """{name of a base-model tensor in the PEFT-wrapped model: its name before PEFT wrapped the layers}."""
    out = {} if out is None else out
    original = _original_module(module)
    if original is not module:
        wrapped += next(n for n, m in module.named_modules() if m is original) + "."
        module = original
    for name, _ in chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False)):
        out[wrapped + name] = clean + name
    for name, child in module.named_children():
        _original_names(child, f"{wrapped}{name}.", f"{clean}{name}.", out)
    return out


def _holds_adapter_layers(model) -> bool:
    peft = sys.modules.get("peft")
    if peft is None:
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


# ---- tied parameters and the self-description in state_dict ----------------------------------------------
def tied_aliases(module: torch.nn.Module) -> dict[str, str]:
    """{alias: source}: parameter names that reach a parameter already named earlier (tied embeddings)."""
    first, aliases = {}, {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def fill_tied(aliases: dict[str, str], state_dict: dict, prefix: str = "") -> None:
    """Add the tied aliases ``state_dict`` lacks (a dict from :meth:`RecurrentMemoryModel.state_dict`)."""
    for alias, source in aliases.items():
        if prefix + alias not in state_dict and prefix + source in state_dict:
            state_dict[prefix + alias] = state_dict[prefix + source]


def describe(rmt) -> torch.Tensor:
    """What :func:`from_pretrained` needs to rebuild ``rmt`` from its state_dict alone, as JSON in a uint8 tensor
    (safetensors stores only tensors)."""
    base = backbone_of(rmt.model)
    pm = peft_model_of(rmt.model)
    peft = None
    if pm is not None:
        adapters = {name: cfg.to_dict() for name, cfg in pm.peft_config.items()}
        peft = {"adapters": adapters, "active": pm.active_adapter}
    d = {"format": FORMAT, "rmt_config": rmt.rmt_config.to_dict(), "backbone_class": type(base).__name__,
         "backbone_config": json.loads(base.config.to_json_string(use_diff=False)), "peft": peft}
    text = json.dumps(d, default=lambda o: sorted(o) if isinstance(o, (set, frozenset)) else str(o))
    return torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8)


def read_description(blob, source: str) -> dict:
    """Inverse of :func:`describe`; ``source`` names where the blob came from in errors."""
    try:
        if not (isinstance(blob, torch.Tensor) and blob.dtype == torch.uint8 and blob.dim() == 1):
            raise ValueError(f"expected a 1-d uint8 tensor, got {type(blob).__name__}")
        d = json.loads(bytes(blob.cpu().tolist()).decode())
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError("not an rmt_fast description")
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{source}: {EXTRA_STATE_KEY} is not an rmt_fast description ({e})") from e
    return d


# ---- save -------------------------------------------------------------------------------------------------
def save_pretrained(rmt, save_directory, state_dict: dict | None = None, is_main_process: bool = True,
                    **kwargs) -> None:
    """See :meth:`RecurrentMemoryModel.save_pretrained`."""
    from safetensors.torch import save_file

    save_directory = os.fspath(save_directory)
    pm = peft_model_of(rmt.model)
    base = backbone_of(rmt.model)
    if pm is None and _holds_adapter_layers(base):
        raise ValueError("model: the backbone holds PEFT adapter layers but is not the PeftModel, so its adapters "
                         "cannot be saved in PEFT's format; wrap the PeftModel itself: "
                         "rmt_fast.wrap(get_peft_model(model, config), ...)")
    sd = rmt.state_dict() if state_dict is None else dict(state_dict)
    if "memory" not in sd:
        raise ValueError("state_dict: has no 'memory' entry; pass the RecurrentMemoryModel's state_dict()")
    fill_tied(tied_aliases(rmt), sd)
    model_sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    bdir = os.path.join(save_directory, BACKBONE_DIR)
    if pm is None:
        base.save_pretrained(bdir, state_dict=model_sd, is_main_process=is_main_process, **kwargs)
    else:
        prefix = "base_model.model."  # where a PeftModel keeps its base model
        names = _original_names(base)
        base_sd = {names[k[len(prefix):]]: v for k, v in model_sd.items()
                   if k.startswith(prefix) and k[len(prefix):] in names}
        base.save_pretrained(bdir, state_dict=base_sd, is_main_process=is_main_process, **kwargs)
        pm.save_pretrained(save_directory, state_dict=model_sd, is_main_process=is_main_process)
    if is_main_process:
        save_file({"memory": sd["memory"].detach().contiguous().cpu()}, os.path.join(save_directory, MEMORY_NAME))
        with open(os.path.join(save_directory, CONFIG_NAME), "w") as f:
            f.write(rmt.rmt_config.to_json_string())


# ---- load -------------------------------------------------------------------------------------------------
def load(rmt_class, directory, model_class=None, backbone_kwargs: dict | None = None):
    """What :func:`rmt_fast.from_pretrained` does, building an ``rmt_class`` (RecurrentMemoryModel: passed in, so
    that this module does not import the model's)."""
    backbone_kwargs = backbone_kwargs or {}
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise ValueError(f"directory: {directory!r} is not a directory")
    if os.path.isfile(os.path.join(directory, CONFIG_NAME)):
        return _load_rmt_dir(rmt_class, directory, model_class, backbone_kwargs)
    if os.path.isfile(os.path.join(directory, FLAT_WEIGHTS_NAME)):
        return _load_state_dict_file(rmt_class, os.path.join(directory, FLAT_WEIGHTS_NAME), model_class,
                                     backbone_kwargs)
    raise ValueError(f"directory: {directory!r} holds neither {CONFIG_NAME} (RecurrentMemoryModel.save_pretrained) "
                     f"nor {FLAT_WEIGHTS_NAME} (transformers.Trainer)")


def _load_rmt_dir(rmt_class, directory: str, model_class, backbone_kwargs: dict):
    path = os.path.join(directory, CONFIG_NAME)
    config = _rmt_config(_read_json(path), path)
    bdir = os.path.join(directory, BACKBONE_DIR)
    if model_class is None:
        model_class = _auto_class(bdir)
    for name in sorted(os.listdir(bdir)):
        if name.endswith(".safetensors"):
            _check_safetensors(os.path.join(bdir, name))
    try:
        model = model_class.from_pretrained(bdir, **backbone_kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{bdir}: cannot load the backbone with {model_class.__name__}.from_pretrained ({e})") from e
    adapter_dirs = _adapter_dirs(directory)
    if adapter_dirs:
        model = _load_adapters(model, adapter_dirs)
    mpath = os.path.join(directory, MEMORY_NAME)
    memory = _read_safetensors(mpath).get("memory")
    if memory is None:
        raise ValueError(f"{mpath}: has no 'memory' tensor")
    return _build(rmt_class, model, config, memory, mpath, path)


def _load_state_dict_file(rmt_class, path: str, model_class, backbone_kwargs: dict):
    import transformers

    unknown = set(backbone_kwargs) - {"dtype"}
    if unknown:
        raise TypeError(f"{path}: a Trainer state dict is loaded into a new backbone; only dtype= applies, got "
                        f"{sorted(unknown)}")
    sd = _read_safetensors(path)
    if EXTRA_STATE_KEY not in sd:
        raise ValueError(f"{path}: has no {EXTRA_STATE_KEY} entry, so it is not the state_dict of a "
                         f"RecurrentMemoryModel")
    desc = read_description(sd[EXTRA_STATE_KEY], path)
    config = _rmt_config(desc["rmt_config"], path)
    bcfg = desc["backbone_config"]
    try:
        config_class = transformers.CONFIG_MAPPING[bcfg.get("model_type")]
    except KeyError as e:
        raise ValueError(f"{path}: unknown backbone model_type {bcfg.get('model_type')!r}") from e
    if model_class is None:
        model_class = getattr(transformers, desc["backbone_class"], None)
        if model_class is None:
            raise ValueError(f"{path}: transformers has no {desc['backbone_class']}; pass model_class=")
    model = model_class(config_class.from_dict(bcfg))
    if desc["peft"]:
        from peft import get_peft_config, get_peft_model

        (first, cfg), *more = desc["peft"]["adapters"].items()
        model = get_peft_model(model, get_peft_config(cfg), adapter_name=first)
        for name, cfg in more:
            model.add_adapter(name, get_peft_config(cfg))
        model.set_adapter(desc["peft"]["active"])
    memory = sd.get("memory")
    if memory is None:
        raise ValueError(f"{path}: has no 'memory' tensor")
    rmt = _build(rmt_class, model, config, memory, path, path)
    try:
        rmt.load_state_dict(sd)
    except RuntimeError as e:
        raise ValueError(f"{path}: does not match the model it describes ({e})") from e
    return rmt.to(backbone_kwargs.get("dtype", memory.dtype))


def _build(rmt_class, model, config: RMTConfig, memory: torch.Tensor, memory_source: str, config_source: str):
    """The ``rmt_class`` (RecurrentMemoryModel) over ``model`` (a backbone or PeftModel), after checking the memory
    and the config against the backbone; in eval mode, wrapper and backbone alike (as transformers'
    ``from_pretrained`` returns a model; ``.train()`` before training)."""
    base = backbone_of(model)
    try:
        adapter = make_adapter(base, config.mode)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config_source}: mode {config.mode!r} does not fit the backbone ({e})") from e
    if adapter.max_positions != config.max_positions:
        raise ValueError(f"{config_source}: max_positions={config.max_positions} but the backbone embeds "
                         f"{adapter.max_positions} positions")
    emb = base.get_input_embeddings().weight
    want = (config.num_mem_tokens, emb.shape[1])
    if tuple(memory.shape) != want:
        raise ValueError(f"{memory_source}: memory has shape {tuple(memory.shape)}, expected {want} "
                         f"(num_mem_tokens={config.num_mem_tokens} of the config, hidden size {emb.shape[1]} of "
                         f"the backbone)")
    return rmt_class(model, config, adapter, memory=memory.to(device=emb.device, dtype=emb.dtype)).eval()


def _adapter_dirs(directory: str) -> list[tuple[str, str]]:
    """[(adapter name, directory)] as PeftModel.save_pretrained lays them out: "default" at the top."""
    found = []
    if os.path.isfile(os.path.join(directory, ADAPTER_CONFIG_NAME)):
        found.append(("default", directory))
    for name in sorted(os.listdir(directory)):
        sub = os.path.join(directory, name)
        if name != BACKBONE_DIR and os.path.isfile(os.path.join(sub, ADAPTER_CONFIG_NAME)):
            found.append((name, sub))
    return found


def _load_adapters(model, adapter_dirs: list[tuple[str, str]]):
    from peft import PeftModel

    for name, adir in adapter_dirs:
        _read_json(os.path.join(adir, ADAPTER_CONFIG_NAME))
        for f in sorted(os.listdir(adir)):
            if f.endswith(".safetensors"):
                _check_safetensors(os.path.join(adir, f))
    (first, fdir), *more = adapter_dirs
    try:
        model = PeftModel.from_pretrained(model, fdir, adapter_name=first, is_trainable=True)
        for name, adir in more:
            model.load_adapter(adir, adapter_name=name, is_trainable=True)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise ValueError(f"{fdir}: cannot load the PEFT adapters ({e})") from e
    return model


def _auto_class(backbone_dir: str):
    import transformers

    cfg = _read_json(os.path.join(backbone_dir, "config.json"))
    for name in cfg.get("architectures") or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def _rmt_config(d: dict, source: str) -> RMTConfig:
    try:
        return RMTConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: invalid RMT config ({e})") from e


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def _check_safetensors(path: str) -> None:
    """Read the header only: a truncated or corrupt file fails here, naming itself."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "pt"):
            pass
    except (OSError, SafetensorError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e


def _read_safetensors(path: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (OSError, SafetensorError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
