"""Which layers of a backbone, before any training, tie a fact's direction to its place: linear probes per layer.

The reasoning task's hub questions ("What is north of the garden?") need the memory to keep which place lies in
which direction; the memory is written from the backbone's states. This script reads one-segment reasoning samples
(48 tokens, the task's noise, two facts "The A is D of the B.") with the plain pretrained backbone (no RMT, no
fine-tuning) and fits, for every layer's hidden states, a linear probe (scripts/reasoning_memory_probe.py's
multinomial logistic regression) from the state at one token of a fact to the fact's direction D (4 classes):

* ``leaf``: the last token of the place A. In an encoder it sees the whole fact; in a decoder only "The A", so
  there it is a control that must stay at chance.
* ``end``: the fact's last token (the full stop): both models have read the whole fact there.

and, at the end token, from the state to the fact's (A, D) pair (24 classes: ``pair``), which a memory slot copying
that state would need to answer a hub question: the direction bound to its place, not only present.

Two facts per sample, split by sample into fitting and scoring sets. A layer where the direction is linearly there
at the place's own token is a layer a memory token could copy a bound (place, direction) pair from. Writes OUT
(JSON), a PNG beside it (the probes against relative depth) and prints the table.

    python scripts/direction_layer_probe.py --backbones minilm,smollm2,random-minilm --out probe.json
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

#: backbone names this script knows: those of rmt_fast.experiments.backbones, and MiniLM's shape initialised at random
#: (6 layers x 384, MiniLM's tokenizer): what the layers do before any pretraining
RANDOM_MINILM = "random-minilm"
DIRECTIONS = ("north", "south", "east", "west")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", default="minilm,smollm2,random-minilm",
                   help="comma list of backbones (rmt_fast.experiments.backbones names, a folder, or random-minilm) "
                        "(%(default)s)")
    p.add_argument("--samples", type=int, default=600, help="one-segment samples, two facts each (%(default)s)")
    p.add_argument("--segment-size", type=int, default=48, help="tokens per sample (%(default)s)")
    p.add_argument("--batch-size", type=int, default=50, help="(%(default)s)")
    p.add_argument("--device", default="cpu", help="(%(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="JSON file to write")
    a = p.parse_args(argv)
    a.backbones = [b.strip() for b in a.backbones.split(",") if b.strip()]
    if not a.backbones:
        p.error("--backbones: give at least one backbone")
    if a.samples < 20 or a.batch_size < 1:
        p.error("--samples must be >= 20 and --batch-size >= 1")
    return a


def load(name: str, seed: int):
    """(model, tokenizer, kind) of a backbone name of this script."""
    from rmt_fast.experiments.backbones import load_backbone

    if name == RANDOM_MINILM:
        return load_backbone("tiny-bert", tokenizer="minilm", hidden_size=384, num_layers=6, seed=seed)
    return load_backbone(name, seed=seed)


def place_token(tokenizer, fact_ids, place: str) -> int:
    """Index, within a fact's tokens, of the last token of the first mention of ``place``."""
    for k in range(len(fact_ids)):
        if tokenizer.decode(list(fact_ids[:k + 1])).strip().lower().endswith(place.lower()):
            return k
    raise ValueError(f"place {place!r} not found in the fact's tokens {list(fact_ids)}")


def features(model, tokenizer, kind: str, samples: int, segment_size: int, batch_size: int, seed: int, device):
    """Per-layer states ``[layers + 1, facts, d]`` at the leaf token and at the end token, the facts' directions and
    (place, direction) pairs ``[facts]`` and their sample index ``[facts]``."""
    import torch

    from rmt_fast.experiments.tasks import make_task
    from rmt_fast.experiments.tasks import facts as F

    ds = make_task("reasoning", tokenizer, 1, segment_size, split="test", seed=seed, length=samples)
    prefix = [tokenizer.cls_token_id] if kind == "encoder" and tokenizer.cls_token_id is not None else []
    suffix = [tokenizer.sep_token_id] if kind == "encoder" and tokenizer.sep_token_id is not None else []
    leaf, end, label, pair, owner = [], [], [], [], []
    model = model.to(device).float().eval()
    for start in range(0, samples, batch_size):
        items = [ds[i] for i in range(start, min(samples, start + batch_size))]
        ids = torch.stack([torch.tensor(prefix + it["input_ids"].tolist() + suffix) for it in items]).to(device)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
        hs = torch.stack(out.hidden_states).float()  # [L + 1, B, T, d]
        for row, it in enumerate(items):
            for fact, pos in zip(it["facts"], it["fact_positions"].tolist()):
                (a, d, _), = F._parse_qa4_facts([fact])
                toks = ds._tok[fact]
                base = len(prefix) + pos
                leaf.append(hs[:, row, base + place_token(tokenizer, toks, a)].cpu())
                end.append(hs[:, row, base + len(toks) - 1].cpu())
                label.append(DIRECTIONS.index(d))
                pair.append(F.PLACES.index(a) * len(DIRECTIONS) + DIRECTIONS.index(d))
                owner.append(start + row)
    return torch.stack(leaf, 1), torch.stack(end, 1), torch.tensor(label), torch.tensor(pair), torch.tensor(owner)


def plot(path: str, doc: dict) -> str:
    """Probe accuracy against relative depth (layer / layers), one colour per backbone: the direction at the place
    token (dashed) and the (place, direction) pair at the full stop (solid), chance dotted."""
    from rmt_fast.experiments.plots import _figure

    fig = _figure((8, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    for i, (name, b) in enumerate(doc["backbones"].items()):
        rows = b["layers"]
        depth = [r["layer"] / (len(rows) - 1) for r in rows]
        c = f"C{i}"
        ax.plot(depth, [100 * r["end_pair"]["test_accuracy"] for r in rows], color=c, marker=".",
                label=f"{name}: (place, direction) at the full stop")
        if b["kind"] == "encoder":  # a decoder's place token has not seen its direction
            ax.plot(depth, [100 * r["leaf"]["test_accuracy"] for r in rows], color=c, ls="--",
                    label=f"{name}: direction at the place")
    chance = next(iter(doc["backbones"].values()))["layers"][0]
    ax.axhline(100 * chance["leaf"]["chance"], color="grey", ls=":", lw=1, label="chance (direction)")
    ax.axhline(100 * chance["end_pair"]["chance"], color="black", ls=":", lw=1, label="chance (pair)")
    ax.set_xlabel("relative depth (layer / layers; 0 = embeddings, 1 = the last layer, the memory's)")
    ax.set_ylabel("probe test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("A fact's direction bound to its place, per layer, before training")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main(argv=None) -> int:
    a = parse_args(argv)
    import importlib.util

    import torch

    from rmt_fast.experiments.tasks import facts as F

    spec = importlib.util.spec_from_file_location(
        "reasoning_memory_probe", os.path.join(os.path.dirname(os.path.abspath(__file__)), "reasoning_memory_probe.py"))
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    doc = {"samples": a.samples, "segment_size": a.segment_size, "seed": a.seed, "backbones": {}}
    for name in a.backbones:
        t0 = time.time()
        model, tok, kind = load(name, a.seed)
        leaf, end, y, pair, owner = features(model, tok, kind, a.samples, a.segment_size, a.batch_size, a.seed,
                                       torch.device(a.device))
        fit = owner < int(a.samples * 0.75)  # split by sample: both facts of a story on one side
        rows = []
        for layer in range(leaf.shape[0]):
            row = {"layer": layer}
            for key, x, t, classes in (("leaf", leaf, y, len(DIRECTIONS)), ("end", end, y, len(DIRECTIONS)),
                                       ("end_pair", end, pair, len(F.PLACES) * len(DIRECTIONS))):
                row[key] = probe.fit_probe(x[layer][fit], t[fit], x[layer][~fit], t[~fit], classes)
            rows.append(row)
        doc["backbones"][name] = {"kind": kind, "layers": rows, "facts_fitted": int(fit.sum()),
                                  "facts_scored": int((~fit).sum()), "seconds": round(time.time() - t0, 1)}
        print(f"{name} ({kind}, {time.time() - t0:.0f} s): direction probe test accuracy per layer "
              f"(fitted on {int(fit.sum())} facts, scored on {int((~fit).sum())})")
        print(f"{'layer':>6}{'D at leaf':>11}{'D at end':>10}{'chance':>8}{'(A, D) at end':>15}{'chance':>8}")
        for r in rows:
            print(f"{r['layer']:>6}{100 * r['leaf']['test_accuracy']:>10.1f}%{100 * r['end']['test_accuracy']:>9.1f}%"
                  f"{100 * r['leaf']['chance']:>7.1f}%{100 * r['end_pair']['test_accuracy']:>14.1f}%"
                  f"{100 * r['end_pair']['chance']:>7.1f}%")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(doc, f, indent=2)
    png = plot(os.path.splitext(a.out)[0] + ".png", doc)
    print(f"written: {a.out}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
