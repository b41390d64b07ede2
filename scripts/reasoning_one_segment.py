"""Reasoning (bAbI QA4 facts in noise) on ONE segment: which training setting learns it, and what the errors are.

The curriculum of the reasoning task starts on one 499-token segment; the RMT memory plays no part there (one
segment reads its facts and its question itself), so this is the upper bound of every later stage. Each
``--config NAME:key=value,...`` (keys: fields of rmt_fast.experiments.trainer.TrainConfig, e.g. lr, num_mem_tokens,
warmup_steps, weight_decay, grad_clip, batch_size) trains one model for ``--steps`` steps on one segment, with a
validation every ``--eval-every`` steps, then answers ``--test-samples`` test samples whose errors are split by what
the question asks (facts.qa4_question_kind):

* role "leaf": the question names a place of one fact only -- the answer is the other place of that fact;
* role "hub": both facts name it -- only the direction (and the fact's orientation) tells which other place;
* relation "stated" / "converse": the fact says the relation in the question's direction, or only its converse;
* axes "same" / "different": both facts on one axis (the three places on a line) or not.

A model that only learned "the place that shares a fact with the question's place" is right on every leaf and on
half of the hub questions: about 67% overall. ``num_mem_tokens=0`` is the plain classifier (no memory tokens).

``--segments N`` (N >= 2) asks the same of one memory stage: every config trains on N segments (a config may start
from a saved model, ``init_from=DIR``, and mix in samples with every fact before the question's segment,
``train_facts_early=P``); the test is split also by where the facts lie (``facts both/one/none in last``, as
scripts/reasoning_breakdown.py), and linear probes of the memory entering the last segment
(scripts/reasoning_memory_probe.py: the place in each direction of the hub) say what the memory holds.

Writes OUT/diagnosis.json (config, validation history, test accuracy by kind, seconds per config), OUT/curves.png
(training loss and validation accuracy of every config) and prints a table. On CUDA the configs run as concurrent
processes (``--jobs``, default: all at once); each process also writes OUT/<NAME>/diagnosis.json.

    python scripts/reasoning_one_segment.py --out runs/r1 --steps 6000 \\
        --config base:lr=1e-4 --config plain:lr=1e-4,num_mem_tokens=0 --config slow:lr=5e-5
    python scripts/reasoning_one_segment.py --out /tmp/r1 --smoke      # tiny CPU run of the same pipeline
    python scripts/reasoning_one_segment.py --out runs/r2 --segments 2 --segment-size 48 --steps 4000 \\
        --config m10:init_from=COPY,train_facts_early=1.0,train_same_axis=0.67   # the memory, 2 short segments
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

DEFAULT_CONFIGS = ("lr1e-4:lr=1e-4", "lr5e-5:lr=5e-5", "lr2e-4:lr=2e-4", "plain:lr=1e-4,num_mem_tokens=0")


def parse_config(spec: str) -> tuple[str, dict]:
    """"NAME:key=value,key=value" -> (NAME, {key: value}) with values read as JSON where they parse (numbers,
    true/false), else as strings; the keys must be TrainConfig fields."""
    from rmt_fast.experiments.trainer import TrainConfig
    import dataclasses

    name, _, rest = spec.partition(":")
    if not name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ValueError(f"--config {spec!r}: expected NAME:key=value,... with NAME of letters, digits, '-', '_', '.'")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    out = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in fields:
            raise ValueError(f"--config {spec!r}: {item!r} is not key=value with a TrainConfig field as key")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return name, out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--config", action="append", default=None,
                   help=f"NAME:key=value,... (repeatable; default: {' '.join(DEFAULT_CONFIGS)})")
    p.add_argument("--steps", type=int, default=6000, help="training steps per config (%(default)s)")
    p.add_argument("--eval-every", type=int, default=250, help="(%(default)s)")
    p.add_argument("--eval-samples", type=int, default=512, help="validation samples (%(default)s)")
    p.add_argument("--test-samples", type=int, default=1024, help="(%(default)s)")
    p.add_argument("--backbone", default="minilm", help="(%(default)s)")
    p.add_argument("--segment-size", type=int, default=499, help="(%(default)s)")
    p.add_argument("--segments", type=int, default=1,
                   help="segments per training and test sample (%(default)s); >= 2: a memory stage, with the test "
                        "split by where the facts lie and probes of the memory")
    p.add_argument("--probe-samples", type=int, default=1500,
                   help="--segments >= 2: samples the memory probes are fitted on (and a third as many scored) "
                        "(%(default)s; 0: no probes)")
    p.add_argument("--warmup-lengths", default="",
                   help="comma list of shorter segment sizes each config trains on first, in order, each phase "
                        "starting from the last one's weights (a length curriculum inside the one segment), e.g. "
                        "48,128,256; then --steps at --segment-size")
    p.add_argument("--warmup-steps", type=int, default=1500, help="steps at most per warm-up length (%(default)s)")
    p.add_argument("--warmup-threshold", type=float, default=0.95,
                   help="validation accuracy that ends a warm-up length early (%(default)s)")
    p.add_argument("--max-train-time", type=float, default=None,
                   help="seconds of training per config at most (checked at validations)")
    p.add_argument("--jobs", type=int, default=None, help="concurrent configs (default: all on CUDA, 1 on the CPU)")
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)  # a worker process: run this one config
    p.add_argument("--smoke", action="store_true", help="tiny-bert on the CPU, a few steps: checks the pipeline")
    a = p.parse_args(argv)
    try:
        a.warmup_lengths = [int(x) for x in a.warmup_lengths.split(",") if x.strip()]
    except ValueError:
        p.error(f"--warmup-lengths: a comma list of segment sizes, got {a.warmup_lengths!r}")
    if any(n < 1 or n >= a.segment_size for n in a.warmup_lengths):
        p.error(f"--warmup-lengths: each in [1, --segment-size), got {a.warmup_lengths}")
    if a.warmup_steps < 1:
        p.error("--warmup-steps must be >= 1")
    if a.segments < 1:
        p.error(f"--segments must be >= 1, got {a.segments}")
    if a.probe_samples < 0 or 0 < a.probe_samples < 30:
        p.error(f"--probe-samples: 0 (no probes) or >= 30, got {a.probe_samples}")
    return a


def _script(name: str):
    """A module of this folder's scripts (reasoning_breakdown, reasoning_memory_probe)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                     f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_breakdown(rmt, tokenizer, cfg, samples: int, batch_size: int = 256, num_segments: int = 1) -> dict:
    """Test accuracy overall and by question kind (role, relation, form), and how often the prediction is a place
    of the facts / the question's own place. On several segments also by where the facts lie.

    Encoder: the class logits. Decoder: the answers' first tokens scored at the answer's position (the next-token
    logits there, restricted to those tokens), so the prediction is always one of the answers."""
    import torch
    from rmt_fast.experiments.runtime import autocast_ctx
    from rmt_fast.experiments.tasks import collate, make_task
    from rmt_fast.experiments.tasks import facts as F

    decoder = rmt.rmt_config.mode == "decoder"  # the model says what it is
    ds = make_task("reasoning", tokenizer, num_segments, cfg.segment_size, split="test", seed=cfg.seed,
                   length=samples, fact_placement=cfg.fact_placement, for_decoder=decoder)
    if decoder:
        first = [int(ids[0]) for ids in ds.answer_token_ids]
        if len(set(first)) != len(first):
            raise ValueError(f"backbone: the answers' first tokens are not distinct with this tokenizer ({first})")
        first = torch.tensor(first)
        batch_size = min(batch_size, 64)  # the logits are [B, length, vocabulary]
    placement = _script("reasoning_breakdown").placement if num_segments > 1 else None
    counts = collections.defaultdict(lambda: [0, 0])
    in_facts = own_place = 0
    wrong, top_probability = [], []
    rmt.eval()
    for start in range(0, samples, batch_size):
        items = [ds[i] for i in range(start, min(samples, start + batch_size))]
        batch = collate(items)
        with torch.no_grad(), autocast_ctx(rmt.device, cfg.bf16):
            logits = rmt(input_ids=batch["input_ids"].to(rmt.device), return_logits=True).logits.float()
        if decoder:  # the next-token logits before each row's answer, over the answers' first tokens
            at = torch.tensor([len(it["input_ids"]) - len(it["answer_ids"]) - 1 for it in items],
                              device=logits.device)
            logits = logits[torch.arange(len(items), device=logits.device), at][:, first.to(logits.device)]
        prob = logits.softmax(-1).cpu()
        pred = prob.argmax(-1)
        for item, p, pr in zip(items, pred.tolist(), prob):
            label = ds.answers.index(item["answer"])
            kind = F.qa4_question_kind(item["facts"], item["question"])
            ok = p == label
            top_probability.append(float(pr.max()))
            if not ok and len(wrong) < 100:
                wrong.append({"facts": item["facts"], "question": item["question"], "answer": item["answer"],
                              "prediction": ds.answers[p], "probability": round(float(pr[p]), 4),
                              "answer_probability": round(float(pr[label]), 4), **kind})
            guess = ds.answers[p]
            in_facts += any(f" {guess} " in f" {f[:-1]} " for f in item["facts"])
            own_place += f" {guess} " in f" {item['question'][:-1]} "
            keys = ["all", f"role={kind['role']}", f"relation={kind['relation']}", f"form={kind['form']}",
                    f"{kind['role']}+{kind['relation']}", f"axes={kind['axes']}", f"{kind['role']}+axes={kind['axes']}"]
            if placement is not None:
                where = placement(item["fact_positions"].tolist(), [len(ds._tok[f]) for f in item["facts"]],
                                  num_segments, cfg.segment_size)
                keys += [f"facts {where}", f"{kind['role']}+facts {where}"]
            for key in keys:
                counts[key][0] += ok
                counts[key][1] += 1
    out = {k: {"accuracy": c / n, "samples": n} for k, (c, n) in sorted(counts.items())}
    out["prediction_in_facts"] = in_facts / samples
    out["prediction_is_question_place"] = own_place / samples
    top = sorted(top_probability)
    out["top_probability_quantiles"] = {q: round(top[int(q * (len(top) - 1))], 4) for q in (0.1, 0.25, 0.5, 0.75)}
    out["wrong_samples"] = wrong
    return out


def _eager():
    """A context in which torch.compile'd modules run eagerly (torch.compiler.set_stance "force_eager")."""
    import contextlib

    import torch

    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def run_one(a, name: str, overrides: dict) -> dict:
    from rmt_fast.experiments.trainer import TrainConfig, train

    base = dict(task="reasoning", backbone=a.backbone, num_mem_tokens=10, segment_size=a.segment_size,
                schedule=[a.segments], max_steps_per_stage=a.steps, min_steps_per_stage=a.steps,
                eval_every=a.eval_every, eval_samples=a.eval_samples, eval_batch_size=256, batch_size=32, lr=1e-4,
                warmup_steps=max(1, a.steps // 10), threshold=1.01, out_dir=os.path.join(a.out, name),
                progress=False, save_stages=False, max_time_s=a.max_train_time)
    if a.smoke:
        base.update(backbone="tiny-bert", num_mem_tokens=2, segment_size=32, eval_samples=16, eval_batch_size=16,
                    batch_size=8, lr=1e-3, device="cpu")
    base.update(overrides)
    t0 = time.time()
    history, warmup, offset = [], [], 0
    for length in a.warmup_lengths:  # the length curriculum: each phase starts from the last one's weights
        left = None if a.max_train_time is None else max(1.0, a.max_train_time - (time.time() - t0))
        cfg = TrainConfig(**{**base, "segment_size": length, "max_steps_per_stage": a.warmup_steps,
                             "min_steps_per_stage": 0, "threshold": a.warmup_threshold,
                             "warmup_steps": max(1, a.warmup_steps // 10), "max_time_s": left,
                             "out_dir": os.path.join(a.out, name, f"warmup-{length}")})
        res = train(cfg)
        history += [{**h, "step": h["step"] + offset, "segment_size": length} for h in res.history]
        last = res.history[-1] if res.history else {"step": 0, "val_accuracy": None}
        offset += last["step"]
        warmup.append({"segment_size": length, "steps": last["step"], "val_accuracy": last["val_accuracy"]})
        base["init_from"] = os.path.join(cfg.out_dir, "checkpoint-last")
    if a.max_train_time is not None:
        base["max_time_s"] = max(1.0, a.max_train_time - (time.time() - t0))
    cfg = TrainConfig(**base)
    res = train(cfg)
    history += [{**h, "step": h["step"] + offset, "segment_size": cfg.segment_size} for h in res.history]
    seconds = time.time() - t0
    # The test and the probes run the compiled backbone eagerly: their batch shapes and the probes' fp32 model would
    # each be a new inductor compile (minutes with several processes compiling at once).
    path = os.path.join(a.out, name, "diagnosis.json")

    def write(doc):  # after the test and again after the probes: a run cut short keeps what it finished
        doc["test_seconds"] = round(time.time() - t0 - seconds, 1)
        with open(path, "w") as f:
            json.dump(doc, f, indent=2, default=str)
        print(f"{name}: {path} written ({doc['test_seconds']:.0f}s after training)", flush=True)

    with _eager():
        doc = {"name": name, "overrides": overrides, "config": cfg.to_dict(), "train_seconds": round(seconds, 1),
               "warmup": warmup, "history": history,
               "test": test_breakdown(res.model, res.tokenizer, cfg, a.test_samples if not a.smoke else 16,
                                      num_segments=a.segments)}
        write(doc)
        if a.segments > 1 and a.probe_samples and cfg.num_mem_tokens > 0:  # with m=0 there is no memory to probe
            doc["probe"] = memory_probes(res.model, res.tokenizer, cfg, a.segments, a.probe_samples)
            write(doc)
    return doc


def memory_probes(rmt, tokenizer, cfg, num_segments: int, samples: int) -> dict:
    """Test accuracy of linear probes of the memory entering the last segment (scripts/reasoning_memory_probe.py):
    the place in each direction of the hub (what a hub question needs) and the hub itself."""
    import torch

    probe = _script("reasoning_memory_probe")
    rmt = rmt.float().eval()
    test = max(10, samples // 3)
    mem, _, tg = probe.features(rmt, tokenizer, num_segments, samples + test, 64, cfg.seed, tokens=False,
                                fact_placement=cfg.fact_placement)
    out = {}
    mem = mem.to(rmt.device)  # the probes are fitted on the model's device
    for name in ("hub", "north of hub", "south of hub", "east of hub", "west of hub"):
        y = torch.tensor([t[name] for t in tg], device=rmt.device)
        out[name] = probe.fit_probe(mem[:samples], y[:samples], mem[samples:], y[samples:], probe.num_classes(name))
    return out


def table(docs: list[dict]) -> str:
    keys = ["all", "role=leaf", "role=hub", "hub+axes=same", "hub+axes=different", "hub+stated", "hub+converse"]
    if any("probe" in d or "facts none in last" in d["test"] for d in docs):  # memory stages
        keys = ["all", "role=leaf", "role=hub", "hub+axes=same", "hub+facts none in last", "hub+facts one in last"]
    probed = any("probe" in d for d in docs)
    head = (f"{'config':<14}" + "".join(f"{k:>24}" for k in keys) + (f"{'dir probe':>10}" if probed else "")
            + f"{'best val':>10}{'in facts':>10}{'sec':>7}")
    lines = [head, "-" * len(head)]
    for d in docs:
        t = d["test"]
        size = d["config"]["segment_size"]  # the warm-up lengths' validations are not this length's
        best = max((h["val_accuracy"] for h in d["history"] if h.get("segment_size", size) == size),
                   default=float("nan"))
        probe = ""
        if probed:  # the direction probes' mean test accuracy (what a hub question needs from the memory)
            dirs = [d["probe"][f"{x} of hub"]["test_accuracy"] for x in ("north", "south", "east", "west")
                    if "probe" in d]
            probe = f"{100 * sum(dirs) / len(dirs):>9.1f}%" if dirs else f"{'-':>10}"
        lines.append(f"{d['name']:<14}" + "".join(f"{100 * t[k]['accuracy']:>23.1f}%" if k in t else f"{'-':>24}"
                                                  for k in keys)
                     + probe + f"{100 * best:>9.1f}%{100 * t['prediction_in_facts']:>9.1f}%{d['train_seconds']:>7.0f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    a = parse_args(argv)
    configs = [parse_config(c) for c in (a.config or DEFAULT_CONFIGS)]
    names = [n for n, _ in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"--config: names must differ, got {names}")
    os.makedirs(a.out, exist_ok=True)
    if a.only is not None:
        run_one(a, a.only, dict(configs)[a.only])
        return 0
    import torch

    jobs = a.jobs or (len(configs) if torch.cuda.is_available() and not a.smoke else 1)
    docs = {}
    if jobs <= 1:
        for name, over in configs:
            docs[name] = run_one(a, name, over)
    else:  # one process per config, `jobs` at a time (they share the GPU)
        argv_base = [sys.executable, os.path.abspath(__file__)] + [x for x in (argv or sys.argv[1:])]
        pending, running = list(names), {}
        while pending or running:
            while pending and len(running) < jobs:
                name = pending.pop(0)
                os.makedirs(os.path.join(a.out, name), exist_ok=True)
                log = open(os.path.join(a.out, name, "log.txt"), "w")
                env = {**os.environ, "PYTHONUNBUFFERED": "1"}
                env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))  # the CPU is shared too
                running[name] = (subprocess.Popen(argv_base + ["--only", name], stdout=log, stderr=subprocess.STDOUT,
                                                  env=env), log)
            time.sleep(2)
            for name, (proc, log) in list(running.items()):
                if proc.poll() is not None:
                    log.close()
                    del running[name]
                    if proc.returncode:
                        print(f"{name}: exit status {proc.returncode}; see {a.out}/{name}/log.txt", flush=True)
                    else:
                        print(f"{name}: done", flush=True)
        for name in names:
            path = os.path.join(a.out, name, "diagnosis.json")
            if os.path.isfile(path):
                with open(path) as f:
                    docs[name] = json.load(f)
    from rmt_fast.experiments.plots import plot_curves

    plot_curves(os.path.join(a.out, "curves.png"), {n: d["history"] for n, d in docs.items()},
                title=f"reasoning on {a.segments} segment{'s' if a.segments > 1 else ''} of "
                      f"{docs[next(iter(docs))]['config']['segment_size']} tokens, "
                      f"{docs[next(iter(docs))]['config']['backbone']}, {a.steps} steps per config")
    with open(os.path.join(a.out, "diagnosis.json"), "w") as f:
        json.dump({"steps": a.steps, "configs": docs}, f, indent=2, default=str)
    print(table(list(docs.values())))
    return 0 if len(docs) == len(configs) else 1


if __name__ == "__main__":
    sys.exit(main())
