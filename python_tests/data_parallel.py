"""Launched by test_distributed.py (``python``, ``torchrun`` or ``accelerate launch``): trains tiny RMTs for
:data:`STEPS` optimizer steps on one batch of :data:`BATCH` rows, split over the ranks, under one data-parallel
engine, and writes what rank 0 ends with (parameters, first-step gradients) to ``OUT/<engine>-<case>.pt``.

    python data_parallel.py OUT ENGINE[,ENGINE...] [CASE,...] [cpu|cuda]

Engines: ``single`` (one process, the whole batch: the reference), ``ddp`` (DistributedDataParallel with its
defaults), ``ddp_static`` (``static_graph=True``), ``fsdp`` (``fully_shard`` on every backbone block and the
model), ``trainer`` (transformers' Trainer; in one process, its own reference), ``trainer_ac`` (the Trainer with
``activation_checkpointing=True``: activation checkpointing inside the segments), ``accelerate`` (an Accelerator
loop). Cases: ``<decoder|encoder>-<full|two_sweep>`` (full BPTT or ``checkpoint_segments=True``); default all.
Every optimizer is plain SGD with a constant learning rate, so the engines agree with one process to rounding.
``cuda`` (single and ddp only): each rank on its own GPU (NCCL), where the segments replay as CUDA graphs.
"""
import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import rmt_fast  # noqa: E402
from models import CLS, PAD, SEP, bert_cls, gpt2  # noqa: E402

STEPS, BATCH, LENGTH, LR = 3, 4, 50, 0.1  # 50 tokens: 5 segments of 10
CASES = [f"{kind}-{schedule}" for kind in ("decoder", "encoder") for schedule in ("full", "two_sweep")]
ENGINES = ("single", "ddp", "ddp_static", "fsdp", "trainer", "trainer_ac", "accelerate")


def build(case: str) -> rmt_fast.RecurrentMemoryModel:
    """The case's RMT (m=3, 10-token segments), the same on every rank; no dropout (the ranks' random streams
    differ from one process's)."""
    kind, schedule = case.split("-")
    torch.manual_seed(0)
    kw = dict(num_mem_tokens=3, segment_size=10, checkpoint_segments=schedule == "two_sweep")
    if kind == "decoder":
        rmt = rmt_fast.wrap(gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), **kw)
    else:
        rmt = rmt_fast.wrap(bert_cls(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), cls_token_id=CLS,
                            sep_token_id=SEP, pad_token_id=PAD, **kw)
    return rmt.train()


def rows(case: str) -> list:
    """The :data:`BATCH` training rows, ``{"input_ids": [LENGTH], "labels": ...}``."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 97, (BATCH, LENGTH), generator=g)
    labels = ids if case.startswith("decoder") else torch.randint(0, 6, (BATCH,), generator=g)
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(BATCH)]


def rank_world() -> tuple:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def result(rmt, first_grads) -> dict:
    return {"params": {n: p.detach().cpu() for n, p in rmt.named_parameters()},
            "grads": {n: g.cpu() for n, g in first_grads.items()},
            "world": rank_world()[1]}


def grads_of(rmt) -> dict:
    return {n: p.grad.detach().clone() for n, p in rmt.named_parameters() if p.grad is not None}


def train_loop(case: str, engine: str, device: str = "cpu") -> dict:
    """single / ddp / ddp_static / fsdp: rank r trains on rows [r * BATCH / world, (r + 1) * BATCH / world)."""
    rank, world = rank_world()
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if device == "cuda" else torch.device("cpu")
    rmt = build(case).to(dev)
    model = rmt
    reductions = []
    if engine in ("ddp", "ddp_static"):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(rmt, static_graph=engine == "ddp_static", device_ids=[dev.index] if dev.type == "cuda" else None)

        def counting_allreduce(state, bucket):
            reductions.append(bucket.index())
            return allreduce_hook(state, bucket)

        model.register_comm_hook(None, counting_allreduce)
    elif engine == "fsdp":
        from torch.distributed.fsdp import fully_shard

        blocks = next(m for m in rmt.model.modules() if isinstance(m, torch.nn.ModuleList))  # the layers
        for block in blocks:
            fully_shard(block)
        fully_shard(rmt)
    data = rows(case)
    share = BATCH // world
    batch = {k: v.to(dev) for k, v in torch.utils.data.default_collate(data[rank * share:(rank + 1) * share]).items()}
    opt = torch.optim.SGD(rmt.parameters(), lr=LR)
    first, per_step = None, []
    for _ in range(STEPS):
        before = len(reductions)
        model(**batch).loss.backward()
        per_step.append(len(reductions) - before)
        if first is None:
            first = grads_of(rmt)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if engine == "fsdp":  # gather the shards
        first = {n: g.full_tensor() for n, g in first.items()}
        params = {n: p.full_tensor() for n, p in rmt.named_parameters()}
        return {"params": params, "grads": first, "world": world}
    out = result(rmt, first)
    out["reductions_per_step"] = per_step
    return out


def train_trainer(case: str, out_dir: str, activation_checkpointing: bool = False) -> dict:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    _, world = rank_world()
    rmt = build(case)
    first = {}

    class KeepFirstGrads(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if state.global_step == 0:
                first.update(grads_of(rmt))

    import inspect

    # the switch's name: activation_checkpointing from transformers 5.25, gradient_checkpointing before
    name = ("activation_checkpointing" if "activation_checkpointing" in inspect.signature(TrainingArguments).parameters
            else "gradient_checkpointing")
    ckpt = {name: activation_checkpointing}
    args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=BATCH // world, max_steps=STEPS,
                             optim="sgd", learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0,
                             max_grad_norm=0.0, use_cpu=True, ddp_backend="gloo" if world > 1 else None,
                             save_strategy="no", report_to="none", disable_tqdm=True, logging_strategy="no",
                             dataloader_drop_last=True, seed=0, **ckpt)
    Trainer(model=rmt, args=args, train_dataset=rows(case), callbacks=[KeepFirstGrads()]).train()
    return result(rmt, dict(first))


def train_accelerate(case: str) -> dict:
    from accelerate import Accelerator

    _, world = rank_world()
    accelerator = Accelerator(cpu=True)
    rmt = build(case)
    loader = torch.utils.data.DataLoader(rows(case), batch_size=BATCH // world)
    opt = torch.optim.SGD(rmt.parameters(), lr=LR)
    model, opt, loader = accelerator.prepare(rmt, opt, loader)
    first = None
    for _ in range(STEPS):
        for batch in loader:  # this rank's share of the batch
            accelerator.backward(model(**batch).loss)
            if first is None:
                first = grads_of(rmt)
            opt.step()
            opt.zero_grad(set_to_none=True)
    return result(rmt, first)


def main(out_dir: str, engines: str, cases: str = "", device: str = "cpu") -> None:
    checks = [("engine", engines.split(","), ENGINES), ("case", cases.split(",") if cases else [], CASES),
              ("device", [device], ("cpu", "cuda"))]
    for name, given, allowed in checks:
        bad = [x for x in given if x not in allowed]
        if bad:
            raise ValueError(f"unknown {name} {bad}; allowed: {', '.join(allowed)}")
    rank, world = rank_world()
    torch.set_num_threads(1)
    if world > 1 and any(e in ("ddp", "ddp_static", "fsdp") for e in engines.split(",")):
        if device == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        torch.distributed.init_process_group("nccl" if device == "cuda" else "gloo")
    for engine in engines.split(","):
        for case in (cases.split(",") if cases else CASES):
            if engine in ("trainer", "trainer_ac"):
                res = train_trainer(case, os.path.join(out_dir, "trainer"), engine == "trainer_ac")
            elif engine == "accelerate":
                res = train_accelerate(case)
            else:
                res = train_loop(case, engine, device)
            if rank == 0:
                torch.save(res, os.path.join(out_dir, f"{engine}-{case}.pt"))
    if torch.distributed.is_initialized():
        # the engines' objects (DDP reducers, FSDP states) hold the gloo group: free them while the interpreter is
        # alive, and let every rank reach the teardown before the group goes
        res = None
        gc.collect()
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
