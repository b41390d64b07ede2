"""Long-document language modelling on real text: does the memory (and the short-term cache) help a pretrained LM?

Corpus: the source files of the Python standard library installed on the machine (text nobody here wrote,
available offline). A package of at most ``--package-bytes`` bytes of source is one document (its files joined in
path order, so a document refers to itself across files); any other file is a document of its own. Documents are
tokenized by the backbone's tokenizer; those with at least ``--min-doc-tokens`` tokens are kept and cut to
``--doc-tokens``. One in ``--heldout-every`` documents in order of length is held out (the split is by document,
every length is in both parts, and it is the same on every machine with the same Python and tokenizer); the
``--eval-docs`` longest held-out documents are evaluated, so each position block averages over the same documents
as long as they reach it (the CSV counts the tokens of every block).

Variants, each evaluated on the held-out documents as the mean negative log-likelihood of every token by
``--block``-token block of position (up to ``--doc-tokens``), reported as perplexity:

  segment_alone   the pretrained backbone on each ``--segment``-token segment alone (no memory, no cache)
  full_context    the pretrained backbone with full attention over the document's first tokens, up to its own
                  context limit (its positions; blocks past it are not reported)
  rmt             rmt_fast.wrap(backbone, num_mem_tokens=--mem), fine-tuned with the curriculum
  rmt_cache       the same with num_cache_tokens=--cache (the previous segment's last tokens in every layer)
  cache_alone     num_mem_tokens=0, num_cache_tokens=--cache, fine-tuned the same way

Backbones: SmolLM2-135M (rotary positions; the default), or ``gpt2-scratch``: GPT-2's architecture (absolute
positions) at ``--shape``, with SmolLM2's tokenizer, pretrained here on the training documents for
``--pretrain-steps`` steps of ``--pretrain-context``-token windows (no pretrained GPT-2 is available offline); that
model is then the base of every variant, and its context is ``--pretrain-context``.

Fine-tuning: the curriculum ``--stages`` (segments per training window), ``--steps-per-stage`` AdamW steps each (or
fewer: ``--train-seconds`` per variant, split evenly over the stages), on windows drawn at random from the training
documents, batch ``--batch``, bf16 autocast on CUDA. Evaluation runs each
held-out document through the model in calls of ``--eval-chunk`` segments, each continuing from the last call's
memory and short-term cache (``forward(memory=..., short_term_cache=...)``), so 64k-token documents run with flat
memory.

Each variant writes OUT/variants/<variant>.json (its blocks, training and evaluation seconds, date, GPU, versions,
command); then OUT/ppl_by_position.csv (variant, block, first token, tokens, nll, ppl), OUT/ppl_by_position.png and
OUT/summary.json (mean perplexity per variant over position ranges) are made from every variant in OUT/variants run
on the same backbone, segment, blocks and documents, so variants may be run in separate calls (``--variants``)
into one OUT.

    python scripts/long_document_lm.py --out runs/lm                       # SmolLM2-135M, 64k-token documents
    python scripts/long_document_lm.py --out runs/lm-gpt2 --backbone gpt2-scratch   # GPT-2 small's shape
    python scripts/long_document_lm.py --out /tmp/lm --smoke                # tiny random GPT-2 on the CPU, < 1 min
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

VARIANTS = ("segment_alone", "full_context", "rmt", "rmt_cache", "cache_alone")
SCRATCH = "gpt2-scratch"  # GPT-2's architecture (absolute positions), pretrained here on the training documents
RANGES = ((0, 8192), (8192, 65536))  # summary.json: mean perplexity over these token positions


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--backbone", default="smollm2",
                   help=f"a decoder of rmt_fast.experiments.backbones, or {SCRATCH!r} (%(default)s)")
    p.add_argument("--shape", default="12x768", help=f"{SCRATCH}: layers x width (heads of 64) (%(default)s)")
    p.add_argument("--pretrain-steps", type=int, default=3000, help=f"{SCRATCH}: pretraining steps (%(default)s)")
    p.add_argument("--pretrain-context", type=int, default=1024,
                   help=f"{SCRATCH}: positions of the model and tokens per pretraining window (%(default)s)")
    p.add_argument("--pretrain-batch", type=int, default=16, help=f"{SCRATCH}: windows per step (%(default)s)")
    p.add_argument("--pretrain-lr", type=float, default=6e-4, help=f"{SCRATCH}: peak lr, cosine decay (%(default)s)")
    p.add_argument("--tokenizer", default="smollm2", choices=("smollm2", "word"),
                   help=f"{SCRATCH}: SmolLM2's byte-level BPE or the tiny models' word tokenizer (%(default)s)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of %(default)s")
    p.add_argument("--segment", type=int, default=512, help="tokens per segment (%(default)s)")
    p.add_argument("--mem", type=int, default=16, help="memory tokens of rmt and rmt_cache (%(default)s)")
    p.add_argument("--cache", type=int, default=512, help="short-term cache tokens of rmt_cache, cache_alone")
    p.add_argument("--doc-tokens", type=int, default=65536, help="documents cut to this many tokens (%(default)s)")
    p.add_argument("--min-doc-tokens", type=int, default=16384, help="shorter documents are dropped (%(default)s)")
    p.add_argument("--package-bytes", type=int, default=2 ** 20,
                   help="a package of at most this many bytes of source is one document (%(default)s)")
    p.add_argument("--heldout-every", type=int, default=5, help="1 in N documents is held out (%(default)s)")
    p.add_argument("--eval-docs", type=int, default=16,
                   help="the longest N held-out documents are evaluated (%(default)s)")
    p.add_argument("--block", type=int, default=512, help="tokens per reported position block (%(default)s)")
    p.add_argument("--stages", default="1,2,4,8", help="curriculum: segments per training window (%(default)s)")
    p.add_argument("--steps-per-stage", type=int, default=250, help="(%(default)s)")
    p.add_argument("--batch", type=int, default=8, help="training windows per step (%(default)s)")
    p.add_argument("--train-seconds", type=float, default=0,
                   help="fine-tuning time per variant, split evenly over the stages (0: no limit) (%(default)s)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW peak lr (%(default)s)")
    p.add_argument("--eval-chunk", type=int, default=16, help="segments per evaluation call (%(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true",
                   help="tiny random GPT-2 and short documents: checks the pipeline (options given still apply)")
    a = p.parse_args(argv)
    if a.smoke:
        p.set_defaults(backbone="tiny-gpt2", segment=16, mem=2, cache=8, doc_tokens=256, min_doc_tokens=200,
                       eval_docs=2, block=32, stages="1,2", steps_per_stage=3, batch=2, eval_chunk=4)
        a = p.parse_args(argv)
    a.command = "python scripts/long_document_lm.py " + " ".join(sys.argv[1:] if argv is None else argv)
    a.variants = [v for v in a.variants.split(",") if v]
    bad = [v for v in a.variants if v not in VARIANTS]
    if bad:
        p.error(f"--variants: unknown {bad}; choose from {', '.join(VARIANTS)}")
    a.stages = [int(s) for s in a.stages.split(",") if s]
    if not a.stages or min(a.stages) < 1:
        p.error("--stages: a comma list of segment counts >= 1")
    for name in ("segment", "doc_tokens", "min_doc_tokens", "package_bytes", "heldout_every", "eval_docs", "block",
                 "batch", "eval_chunk", "pretrain_steps", "pretrain_context", "pretrain_batch", "steps_per_stage"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        a.layers, a.width = (int(x) for x in a.shape.lower().split("x"))
    except ValueError:
        p.error(f"--shape: LAYERSxWIDTH, e.g. 12x768, got {a.shape!r}")
    if a.layers < 1 or a.width < 64 or a.width % 64:
        p.error("--shape: at least 1 layer and a width that is a multiple of 64")
    if a.train_seconds < 0:
        p.error("--train-seconds must be >= 0")
    if a.mem < 0 or a.cache < 0 or a.cache > a.segment:
        p.error("--mem must be >= 0 and --cache in [0, --segment]")
    return a


# ---- corpus -----------------------------------------------------------------------------------------------
def documents(root: str, max_package_bytes: int) -> list:
    """``[(relative path, [files])]``: the documents of the source tree ``root``, in a fixed order.

    A package (a directory with ``__init__.py``) whose .py files hold at most ``max_package_bytes`` bytes in all is
    one document: its files in sorted path order, so that a document holds code that refers to itself across
    files. Any other .py file is a document of its own; larger packages are split the same way one level down.
    ``site-packages``, ``__pycache__`` and linked directories are skipped.
    """
    def py_files(d):
        out = []
        for dirpath, dirnames, filenames in os.walk(d):
            dirnames[:] = sorted(x for x in dirnames if x not in ("site-packages", "__pycache__"))
            out += [os.path.join(dirpath, n) for n in sorted(filenames) if n.endswith(".py")]
        return out

    docs = []

    def visit(d):
        names = sorted(os.listdir(d))
        if d != root and "__init__.py" in names:
            files = py_files(d)
            if sum(os.path.getsize(f) for f in files) <= max_package_bytes:
                docs.append((os.path.relpath(d, root) + "/", files))
                return
        for n in names:
            path = os.path.join(d, n)
            if n.endswith(".py") and os.path.isfile(path):
                docs.append((os.path.relpath(path, root), [path]))
            elif os.path.isdir(path) and not os.path.islink(path) and n not in ("site-packages", "__pycache__"):
                visit(path)

    visit(root)
    return docs


def corpus(tok, min_tokens: int, max_tokens: int, heldout_every: int, max_package_bytes: int = 2 ** 20,
           root: str | None = None) -> tuple[list, list]:
    """(train, held-out) lists of ``(relative path, token ids)`` from the .py sources under ``root`` (default: the
    installed standard library), one per :func:`documents` entry; a package's files are joined, each after a
    ``# file: <path>`` line. Documents of fewer than ``min_tokens`` tokens are dropped, longer ones keep their first
    ``max_tokens``. Held out is one in ``heldout_every`` documents in order of length (longest first, then path):
    every length is represented in both parts, and the split is by document."""
    import sysconfig

    root = root or sysconfig.get_paths()["stdlib"]
    kept = []
    for rel, files in documents(root, max_package_bytes):
        if sum(os.path.getsize(f) for f in files) < min_tokens:  # fewer bytes than the tokens wanted: too short
            continue
        parts = []
        for f in files:
            with open(f, encoding="utf-8", errors="replace") as fh:
                parts.append(f"# file: {os.path.relpath(f, root)}\n" + fh.read() if len(files) > 1 else fh.read())
        ids = _encode(tok, "\n".join(parts)[:32 * max_tokens])  # no token spans 32 characters
        if len(ids) < min_tokens:
            continue
        kept.append((rel, ids[:max_tokens]))
    kept.sort(key=lambda d: (-len(d[1]), d[0]))
    held = [d for i, d in enumerate(kept) if i % heldout_every == heldout_every // 2]
    train = [d for i, d in enumerate(kept) if i % heldout_every != heldout_every // 2]
    return train, held


def _encode(tok, text: str) -> list:
    try:
        return tok.encode(text, add_special_tokens=False)
    except TypeError:
        return tok.encode(text)


# ---- models -----------------------------------------------------------------------------------------------
def random_windows(rng, docs: list, width: int, batch: int, device):
    """``[batch, width]`` token ids: windows at random places of random documents of ``docs`` (id lists of at least
    ``width`` tokens)."""
    import torch

    rows = []
    for _ in range(batch):
        ids = docs[int(rng.integers(len(docs)))]
        start = int(rng.integers(0, len(ids) - width + 1))
        rows.append(ids[start:start + width])
    return torch.tensor(rows, device=device)


def train_step(model, opt, lr: float, x, device):
    """One AdamW step of ``model`` on the language-modelling loss of ``x`` (bf16 autocast on CUDA, gradients clipped
    to norm 1); returns the loss, detached (no host read)."""
    import torch

    from rmt_fast.experiments.runtime import autocast_ctx

    for group in opt.param_groups:
        group["lr"] = lr
    with autocast_ctx(device, bf16=True):
        loss = model(input_ids=x, labels=x).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def scratch_backbone(a, tok, train_docs, device):
    """The ``gpt2-scratch`` backbone: GPT-2's architecture at ``--shape`` with ``--pretrain-context`` absolute
    positions, pretrained on random windows of the training documents (AdamW, warm-up then cosine decay, bf16
    autocast on CUDA). Kept in OUT/base-<settings>/ and read back from there by later runs with the same
    settings. Returns (model, the pretraining record)."""
    import numpy as np
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    key = (f"{a.layers}x{a.width}-ctx{a.pretrain_context}-steps{a.pretrain_steps}-b{a.pretrain_batch}"
           f"-lr{a.pretrain_lr:g}-{a.tokenizer}-seed{a.seed}")
    folder = os.path.join(a.out, f"base-{key}")
    record_path = os.path.join(folder, "pretraining.json")
    if os.path.exists(record_path):
        with open(record_path) as f:
            record = json.load(f)
        print(f"pretrained {SCRATCH} read from {folder} ({record['seconds']:.0f}s of pretraining, final loss "
              f"{record['final_loss']:.3f})", flush=True)
        return GPT2LMHeadModel.from_pretrained(folder), record
    eos = tok.eos_token_id if getattr(tok, "eos_token_id", None) is not None else tok.sep_token_id
    cfg = GPT2Config(n_layer=a.layers, n_embd=a.width, n_head=a.width // 64, vocab_size=len(tok),
                     n_positions=a.pretrain_context, bos_token_id=eos, eos_token_id=eos, pad_token_id=tok.pad_token_id,
                     attn_pdrop=0.0)  # memory_attention has no attention-probability dropout: none in pretraining
    model = GPT2LMHeadModel(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=a.pretrain_lr, weight_decay=0.1, betas=(0.9, 0.95))
    rng = np.random.default_rng(a.seed + 1)
    usable = [ids for _, ids in train_docs if len(ids) >= a.pretrain_context]
    warmup = max(1, a.pretrain_steps // 20)
    losses, t0 = [], time.time()
    for step in range(a.pretrain_steps):
        lr = a.pretrain_lr * (step + 1) / warmup if step < warmup else \
            a.pretrain_lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, a.pretrain_steps - warmup))))
        x = random_windows(rng, usable, a.pretrain_context, a.pretrain_batch, device)
        losses.append(train_step(model, opt, lr, x, device))
        if (step + 1) % max(1, a.pretrain_steps // 10) == 0:
            print(f"  pretraining {step + 1}/{a.pretrain_steps}: loss {float(torch.stack(losses[-50:]).mean()):.3f}, "
                  f"{time.time() - t0:.0f}s", flush=True)
    losses = torch.stack(losses).float().cpu().numpy()
    record = {"shape": a.shape, "context": a.pretrain_context, "steps": a.pretrain_steps, "batch": a.pretrain_batch,
              "lr": a.pretrain_lr, "tokenizer": a.tokenizer, "seconds": round(time.time() - t0, 1),
              "final_loss": round(float(np.mean(losses[-50:])), 4),
              "loss_every_50": [round(float(np.mean(losses[i:i + 50])), 4) for i in range(0, len(losses), 50)]}
    model.eval().save_pretrained(folder)
    with open(record_path, "w") as f:
        json.dump(record, f, indent=1)
    return model, record


def fine_tune(a, base, train_docs, device, mem: int, cache: int):
    """rmt_fast.wrap(a copy of ``base``) trained with the curriculum; returns (rmt, seconds, per-stage losses (mean of
    the stage's last 20 steps), per-stage steps). ``--train-seconds`` splits a time budget evenly over the stages: a
    stage ends at its steps or its share, whichever comes first."""
    import numpy as np
    import torch

    import rmt_fast

    rmt = rmt_fast.wrap(copy.deepcopy(base), num_mem_tokens=mem, segment_size=a.segment, num_cache_tokens=cache,
                        keep_logits=False).to(device).train()
    opt = torch.optim.AdamW(rmt.parameters(), lr=a.lr, weight_decay=0.0)
    rng = np.random.default_rng(a.seed)
    share = a.train_seconds / len(a.stages) if a.train_seconds else None
    losses, steps_done = [], []
    t0 = time.time()
    for n in a.stages:
        width = n * a.segment
        usable = [ids for _, ids in train_docs if len(ids) >= width]
        if not usable:
            raise ValueError(f"no training document has {width} tokens (stage of {n} segments)")
        t_stage, recent, step = time.time(), [], 0
        for step in range(1, a.steps_per_stage + 1):
            lr = a.lr * min(1.0, step / max(1, a.steps_per_stage // 10))
            x = random_windows(rng, usable, width, a.batch, device)
            recent = (recent + [train_step(rmt, opt, lr, x, device)])[-20:]
            if share is not None and time.time() - t_stage > share:
                break
        losses.append(round(float(torch.stack(recent).float().mean()), 4))
        steps_done.append(step)
        print(f"  stage of {n} segments: loss {losses[-1]:.3f} (last 20 steps) after {step} steps, "
              f"{time.time() - t0:.0f}s", flush=True)
    return rmt.eval(), time.time() - t0, losses, steps_done


def token_nll(a, variant: str, model, ids, device):
    """Negative log-likelihood of every token of one document ``ids`` (list) under ``variant``: a float tensor
    ``[L]`` with NaN where the variant predicts nothing (the document's first token; a segment's first token when
    segments are alone; positions past the backbone's context for full_context)."""
    import torch
    import torch.nn.functional as F

    from rmt_fast.experiments.runtime import autocast_ctx

    x = torch.tensor([ids], device=device)
    L = x.shape[1]
    nll = torch.full((L,), float("nan"))
    with torch.no_grad(), autocast_ctx(device, bf16=True):
        if variant == "segment_alone":
            for s in range(0, L, a.segment):
                seg = x[:, s:s + a.segment]
                logits = model(input_ids=seg).logits.float()
                nll[s + 1:s + seg.shape[1]] = F.cross_entropy(logits[0, :-1], seg[0, 1:], reduction="none").cpu()
        elif variant == "full_context":
            ctx = min(L, model.config.max_position_embeddings)
            logits = model(input_ids=x[:, :ctx]).logits.float()
            nll[1:ctx] = F.cross_entropy(logits[0, :-1], x[0, 1:ctx], reduction="none").cpu()
        else:  # an RMT: calls of eval_chunk segments, each continuing from the last one's memory and cache
            memory = cache = prev_last = None
            step = a.eval_chunk * a.segment
            for s in range(0, L, step):
                chunk = x[:, s:s + step]
                out = model(chunk, memory=memory, short_term_cache=cache, return_logits=True)
                logits = out.logits.float()
                if prev_last is not None:
                    nll[s] = F.cross_entropy(prev_last, chunk[0, :1]).cpu()
                nll[s + 1:s + chunk.shape[1]] = F.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="none").cpu()
                memory, cache, prev_last = out.memory, out.short_term_cache, logits[0, -1:]
    return nll


def by_block(nll, block: int) -> list:
    """[(block index, first token, tokens counted, mean nll)] over blocks of ``block`` positions."""
    import torch

    rows = []
    for b, s in enumerate(range(0, nll.numel(), block)):
        part = nll[s:s + block]
        ok = ~torch.isnan(part)
        if ok.any():
            rows.append((b, s, int(ok.sum()), float(part[ok].mean())))
    return rows


# ---- main -------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    a = parse_args(argv)
    import torch

    from rmt_fast.experiments.backbones import backbone_kind, load_backbone, load_tokenizer

    if a.backbone != SCRATCH and backbone_kind(a.backbone) != "decoder":
        print(f"--backbone {a.backbone!r} is not a decoder", file=sys.stderr)
        return 2
    torch.manual_seed(a.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if a.backbone == SCRATCH:
        base, tok = None, load_tokenizer("smollm2" if a.tokenizer == "smollm2" else "tiny-gpt2")
    else:
        base, tok, _ = load_backbone(a.backbone, seed=a.seed,
                                     max_positions=max(4 * a.segment, 2 * a.mem + a.segment))
    t0 = time.time()
    train_docs, held = corpus(tok, a.min_doc_tokens, a.doc_tokens, a.heldout_every, a.package_bytes)
    held = held[:a.eval_docs]
    print(f"corpus: {len(train_docs)} training and {len(held)} held-out documents of {a.min_doc_tokens}-"
          f"{a.doc_tokens} tokens ({time.time() - t0:.0f}s); backbone {a.backbone} on {device}", flush=True)
    if not train_docs or not held:
        print("no documents long enough: lower --min-doc-tokens", file=sys.stderr)
        return 2
    same = {"backbone": a.backbone, "segment": a.segment, "doc_tokens": a.doc_tokens, "block": a.block,
            "held_out": [p for p, _ in held]}  # what makes variants of separate runs comparable
    if base is None:
        base, same["pretraining"] = scratch_backbone(a, tok, train_docs, device)
    base = base.to(device).eval()
    os.makedirs(os.path.join(a.out, "variants"), exist_ok=True)
    settings = {"rmt": (a.mem, 0), "rmt_cache": (a.mem, a.cache), "cache_alone": (0, a.cache)}
    for variant in a.variants:
        print(f"=== {variant}", flush=True)
        info = {}
        if variant in settings:
            mem, cache = settings[variant]
            model, seconds, losses, steps_done = fine_tune(a, base, train_docs, device, mem, cache)
            info.update(train_seconds=round(seconds, 1), stage_losses=losses, stage_steps=steps_done,
                        num_mem_tokens=mem, num_cache_tokens=cache, stages=a.stages, batch=a.batch, lr=a.lr)
        else:
            model = base
        t1 = time.time()
        per_block: dict = {}
        for _, ids in held:
            for b, s, count, mean in by_block(token_nll(a, variant, model, ids, device), a.block):
                acc = per_block.setdefault((b, s), [0, 0.0])
                acc[0] += count
                acc[1] += mean * count
        info["eval_seconds"] = round(time.time() - t1, 1)
        rows = [dict(variant=variant, block=b, first_token=s, tokens=count, nll=round(total / count, 5),
                     ppl=round(math.exp(total / count), 4)) for (b, s), (count, total) in sorted(per_block.items())]
        for lo, hi in RANGES:
            sel = [(c, t) for (b, s), (c, t) in per_block.items() if lo <= s < hi]
            if sel:
                info[f"ppl_{lo}_{hi}"] = round(math.exp(sum(t for _, t in sel) / sum(c for c, _ in sel)), 4)
        with open(os.path.join(a.out, "variants", f"{variant}.json"), "w") as f:
            json.dump({"same": same, "info": info, "environment": environment(device, a.command), "rows": rows}, f,
                      indent=1)
        print(f"  {info}", flush=True)
        if model is not base:
            del model
    return collect(a.out, same, {"settings": {k: v for k, v in vars(a).items()},
                                 "documents": {"train": len(train_docs), "held_out": same["held_out"]}}, a)


def environment(device, command: str) -> dict:
    """When, where and with what a variant ran (for the results' README)."""
    import torch
    import transformers

    return {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(device)
            if device.type == "cuda" else "cpu", "torch": torch.__version__, "transformers": transformers.__version__,
            "command": command}


def collect(out: str, same: dict, summary: dict, a) -> int:
    """CSV, summary and PNG from every ``OUT/variants/*.json`` run with the same backbone, segment, documents and
    blocks (this run's and earlier ones': variants may be run in separate calls with ``--variants``)."""
    rows, summary["variants"] = [], {}
    for variant in VARIANTS:
        path = os.path.join(out, "variants", f"{variant}.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            rec = json.load(f)
        if rec["same"] != same:
            print(f"  {path}: another backbone, segment, block or document set; left out", file=sys.stderr)
            continue
        rows += rec["rows"]
        summary["variants"][variant] = {**rec["info"], "environment": rec["environment"]}
    with open(os.path.join(out, "ppl_by_position.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    plot(rows, os.path.join(out, "ppl_by_position.png"), a)
    print(f"{'variant':14s} " + " ".join(f"{f'ppl {lo}-{hi}':>16s}" for lo, hi in RANGES) + f" {'train s':>8s}")
    for v, info in summary["variants"].items():
        print(f"{v:14s} " + " ".join(f"{info.get(f'ppl_{lo}_{hi}', float('nan')):16.3f}" for lo, hi in RANGES)
              + f" {info.get('train_seconds', 0):8.0f}")
    print(f"wrote {out}/ppl_by_position.csv, ppl_by_position.png, summary.json")
    return 0


def plot(rows, path: str, a) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for v in dict.fromkeys(r["variant"] for r in rows):
        pts = [(r["first_token"] + a.block / 2, r["ppl"]) for r in rows if r["variant"] == v]
        ax.plot(*zip(*pts), lw=1.3, label=v)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"token position in the document ({a.block}-token blocks)")
    ax.set_ylabel("perplexity (held-out documents)")
    ax.set_title(f"{a.backbone}: perplexity by position, {a.segment}-token segments, m={a.mem}, cache {a.cache}")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
