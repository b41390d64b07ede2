"""Where a trained reasoning RMT goes wrong on inputs of several segments: test accuracy by question kind and by
where the two facts lie relative to the question's (last) segment.

The question always sits at the end of the last segment. A fact in that segment is read directly; a fact in an
earlier segment reaches the question only through the memory. The table splits the test samples by

* facts: "both in last" / "one in last" / "none in last" (the memory carries one fact, or both);
* role and axes (facts.qa4_question_kind): leaf questions need only which place shares a fact with the question's
  place; hub questions also need the facts' directions.

Writes OUT (JSON: accuracy and sample count per split and length) and prints the table.

    python scripts/reasoning_breakdown.py --model runs/repro/reasoning/checkpoint-last --lengths 2,4 \\
        --samples 256 --out reasoning_breakdown.json
"""
from __future__ import annotations

import argparse
import collections
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
    p.add_argument("--lengths", default="2,4", help="segments per input, comma list (%(default)s)")
    p.add_argument("--samples", type=int, default=256, help="test samples per length (%(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="(%(default)s)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (%(default)s)")
    p.add_argument("--out", required=True, help="JSON file to write")
    a = p.parse_args(argv)
    try:
        a.lengths = [int(x) for x in a.lengths.split(",") if x]
    except ValueError:
        p.error(f"--lengths: a comma list of segment counts, got {a.lengths!r}")
    if not a.lengths or min(a.lengths) < 1:
        p.error(f"--lengths: segment counts >= 1, got {a.lengths}")
    if a.samples < 1 or a.batch_size < 1:
        p.error("--samples and --batch-size must be >= 1")
    return a


def placement(fact_positions, fact_lengths, num_segments: int, segment_size: int) -> str:
    """"both in last" / "one in last" / "none in last": how many facts end inside the question's segment."""
    last = (num_segments - 1) * segment_size
    inside = sum(int(p) + n > last for p, n in zip(fact_positions, fact_lengths))
    return ("none", "one", "both")[min(inside, 2)] + " in last"


def breakdown(rmt, tokenizer, num_segments: int, samples: int, batch_size: int, seed: int = 0,
              fact_placement: str = "anywhere") -> dict:
    import torch

    from rmt_fast.experiments.evaluate import predict_correct
    from rmt_fast.experiments.tasks import collate, make_task
    from rmt_fast.experiments.tasks import facts as F

    seg = rmt.rmt_config.segment_size
    ds = make_task("reasoning", tokenizer, num_segments, seg, split="test", seed=seed, length=samples,
                   fact_placement=fact_placement)
    counts = collections.defaultdict(lambda: [0, 0])
    rmt.eval()
    for start in range(0, samples, batch_size):
        items = [ds[i] for i in range(start, min(samples, start + batch_size))]
        batch = collate(items)
        with torch.no_grad():
            right = predict_correct(rmt, batch["input_ids"], batch["labels"], rmt.rmt_config.mode).tolist()
        for item, ok in zip(items, right):
            kind = F.qa4_question_kind(item["facts"], item["question"])
            where = placement(item["fact_positions"].tolist(), [len(ds._tok[f]) for f in item["facts"]],
                              num_segments, seg)
            for key in ("all", f"facts {where}", f"role={kind['role']}", f"axes={kind['axes']}",
                        f"{kind['role']}+axes={kind['axes']}, facts {where}"):
                counts[key][0] += ok
                counts[key][1] += 1
    return {k: {"accuracy": c / n, "samples": n} for k, (c, n) in sorted(counts.items())}


def main(argv=None) -> int:
    a = parse_args(argv)
    from rmt_fast.experiments.rundir import load_checkpoint

    try:
        rmt, tokenizer, _, tcfg = load_checkpoint(a.model, a.device)
    except (ValueError, OSError) as e:
        print(f"--model {a.model!r}: {e}", file=sys.stderr)
        return 2
    rmt = rmt.float()  # fp32 (a transfer copy's backbone is bf16)
    device = rmt.device
    doc = {"model": a.model, "device": str(device), "samples": a.samples, "lengths": {}}
    for n in a.lengths:
        t0 = time.time()
        res = breakdown(rmt, tokenizer, n, a.samples, a.batch_size, seed=tcfg.get("seed", 0),
                        fact_placement=tcfg.get("fact_placement") or "anywhere")
        doc["lengths"][str(n)] = res
        print(f"{n} segments ({time.time() - t0:.0f} s)")
        for key, r in res.items():
            print(f"  {key:<45} {100 * r['accuracy']:6.1f}%  ({r['samples']})")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
