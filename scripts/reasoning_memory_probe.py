"""What a trained reasoning RMT's memory holds about the facts it has read: linear probes on the memory.

Samples of N segments with both facts before the last segment (``facts_early=1``), so that only the memory entering
the last segment carries them. For each sample the memory after the first N-1 segments (``[m, d]``, flattened) is
the probe's input; a multinomial logistic regression (fp32, L2 penalty chosen on a held-out part of the training
samples) is fitted per target on ``--train`` samples and scored on ``--test`` others. Targets, all independent of
the order of the facts:

* ``place:<p>``: is place p named by a fact (2 classes);
* ``hub``: the place both facts name (6 classes);
* ``<d> of hub``: the place that lies in direction d of the hub (one of the other places, or none: 7 classes).
  A hub question ("What is north of the garden?") needs exactly this.

The same probes on the mean of the last layer's hidden states over the fact-bearing segments' tokens (what the
backbone has read, before the memory tokens compress it) give the reference: what is linearly there to be
written. Chance is the majority class of the test samples. Writes OUT (JSON) and prints the table.

    python scripts/reasoning_memory_probe.py --model runs/repro/reasoning/checkpoint-last --segments 2 \\
        --out probe.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a saved reasoning RMT: a run, its checkpoint-last/ or a stage, "
                   "or a transfer copy (read by rmt_fast.experiments.rundir.load_checkpoint)")
    p.add_argument("--segments", type=int, default=2, help="segments per sample, >= 2 (%(default)s)")
    p.add_argument("--train", type=int, default=1500, help="samples the probes are fitted on (%(default)s)")
    p.add_argument("--test", type=int, default=500, help="samples the probes are scored on (%(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="(%(default)s)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (%(default)s)")
    p.add_argument("--out", required=True, help="JSON file to write")
    a = p.parse_args(argv)
    if a.segments < 2:
        p.error(f"--segments: at least 2 (the memory entering the last segment), got {a.segments}")
    if a.train < 10 or a.test < 1 or a.batch_size < 1:
        p.error("--train must be >= 10, --test and --batch-size >= 1")
    return a


def targets(facts) -> dict:
    """The probe targets of one sample (see the module docstring), as class indices."""
    from rmt_fast.experiments.tasks import facts as F

    parsed = F._parse_qa4_facts(facts)
    named = [p for (a, _, b) in parsed for p in (a, b)]
    hub = max(set(named), key=named.count)
    out = {f"place:{p}": int(p in named) for p in F.PLACES}
    out["hub"] = F.PLACES.index(hub)
    around = {}
    for a, d, b in parsed:  # "a is d of b"
        if b == hub:
            around[d] = a
        elif a == hub:
            around[F.OPPOSITE[d]] = b
    for d in ("north", "south", "east", "west"):
        out[f"{d} of hub"] = F.PLACES.index(around[d]) if d in around else len(F.PLACES)
    return out


def num_classes(target: str) -> int:
    """Classes of a target of :func:`targets`: 2 (a place named or not), 6 (the hub: a place), 7 (a direction of
    the hub: a place or none)."""
    from rmt_fast.experiments.tasks import facts as F

    if target.startswith("place:"):
        return 2
    return len(F.PLACES) + (target != "hub")


def features(rmt, tokenizer, num_segments: int, samples: int, batch_size: int, seed: int, tokens: bool = True,
             fact_placement: str = "anywhere"):
    """(memory features [S, m*d], token-mean features [S, d] (None when not ``tokens``), targets list) for
    ``samples`` training-split samples with every fact before the last segment, placed as ``fact_placement``."""
    import torch

    from rmt_fast.experiments.tasks import collate, make_task

    if rmt.rmt_config.num_mem_tokens < 1:
        raise ValueError("model: num_mem_tokens is 0, so there is no memory to probe")
    seg = rmt.rmt_config.segment_size
    ds = make_task("reasoning", tokenizer, num_segments, seg, split="train", seed=seed + 7919, length=samples,
                   facts_early=1.0, fact_placement=fact_placement)
    mem, tok, tg = [], [], []
    device = rmt.device
    backbone = rmt.model
    for start in range(0, samples, batch_size):
        items = [ds[i] for i in range(start, min(samples, start + batch_size))]
        ids = collate(items)["input_ids"][:, :(num_segments - 1) * seg].to(device)
        with torch.no_grad():
            m = rmt(input_ids=ids, return_logits=False).memory
            # what the backbone itself makes of the fact-bearing text: last-layer states, averaged over tokens
            hs = []
            for s in range(num_segments - 1 if tokens else 0):
                x = ids[:, s * seg:(s + 1) * seg]
                h = backbone(input_ids=x, attention_mask=torch.ones_like(x), output_hidden_states=True)
                hs.append(h.hidden_states[-1].float().mean(1))
        mem.append(m.float().flatten(1).cpu())
        if tokens:
            tok.append(torch.stack(hs, 1).mean(1).cpu())
        tg.extend(targets(it["facts"]) for it in items)
    return torch.cat(mem), (torch.cat(tok) if tokens else None), tg


def fit_probe(xtr, ytr, xte, yte, classes: int, steps: int = 300) -> dict:
    """Multinomial logistic regression on standardised features; the L2 penalty is picked on the last fifth of
    the training samples, then the probe is refitted on all of them; it runs where the features are (a GPU fits in
    seconds what a shared CPU fits in minutes). Returns test accuracy and chance."""
    import torch

    mu, sd = xtr.mean(0), xtr.std(0).clamp_min(1e-6)
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd

    def fit(x, y, lam):
        w = torch.zeros(x.shape[1], classes, device=x.device, requires_grad=True)
        b = torch.zeros(classes, device=x.device, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(x @ w + b, y) + lam * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return w.detach(), b.detach()

    def acc(wb, x, y):
        return float(((x @ wb[0] + wb[1]).argmax(1) == y).float().mean())

    cut = len(ytr) * 4 // 5
    lams = (1e-4, 1e-3, 1e-2, 1e-1)
    scores = [acc(fit(xtr[:cut], ytr[:cut], lam), xtr[cut:], ytr[cut:]) for lam in lams]
    lam = lams[max(range(len(lams)), key=scores.__getitem__)]
    test = acc(fit(xtr, ytr, lam), xte, yte)
    chance = float(torch.bincount(yte.cpu(), minlength=classes).max()) / len(yte)
    return {"test_accuracy": test, "chance": chance, "l2": lam}


def main(argv=None) -> int:
    a = parse_args(argv)
    import torch

    from rmt_fast.experiments.rundir import load_checkpoint

    try:
        rmt, tokenizer, _, tcfg = load_checkpoint(a.model, a.device)
    except (ValueError, OSError) as e:
        print(f"--model {a.model!r}: {e}", file=sys.stderr)
        return 2
    if tcfg.get("task") != "reasoning":
        print(f"--model {a.model!r}: a {tcfg.get('task')!r} model; the probes need a reasoning one", file=sys.stderr)
        return 2
    if rmt.rmt_config.mode != "encoder":
        print(f"--model {a.model!r}: an encoder (classifier) RMT is needed", file=sys.stderr)
        return 2
    rmt = rmt.float().eval()
    t0 = time.time()
    mem, tok, tg = features(rmt, tokenizer, a.segments, a.train + a.test, a.batch_size, tcfg.get("seed", 0),
                            fact_placement=tcfg.get("fact_placement") or "anywhere")
    print(f"features of {a.train + a.test} samples in {time.time() - t0:.0f} s "
          f"(memory {tuple(mem.shape[1:])}, token mean {tuple(tok.shape[1:])})")
    doc = {"model": a.model, "segments": a.segments, "train": a.train, "test": a.test,
           "segment_size": rmt.rmt_config.segment_size, "num_mem_tokens": rmt.rmt_config.num_mem_tokens,
           "probes": {}}
    print(f"{'target':<16} {'classes':>7} {'chance':>7} {'memory':>7} {'tokens':>7}")
    for name in tg[0]:
        y = torch.tensor([t[name] for t in tg])
        classes = num_classes(name)
        row = {}
        for fname, x in (("memory", mem), ("tokens", tok)):
            row[fname] = fit_probe(x[:a.train], y[:a.train], x[a.train:], y[a.train:], classes)
        doc["probes"][name] = row
        print(f"{name:<16} {classes:>7} {100 * row['memory']['chance']:6.1f}% "
              f"{100 * row['memory']['test_accuracy']:6.1f}% {100 * row['tokens']['test_accuracy']:6.1f}%")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
