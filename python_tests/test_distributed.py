"""The two-sweep (checkpointed) schedule under data parallelism: 2 CPU processes (gloo), gradients reduced once
per step with rmt_fast.distributed, equal to one process running the whole batch."""
import os
import socket

import pytest
import torch

import rmt_fast
from rmt_fast.distributed import all_reduce_gradients, broadcast_parameters


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup(kind):
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from models import CLS, PAD, SEP, bert_cls, gpt2

    torch.manual_seed(0)
    if kind == "decoder":
        model = gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        rmt = rmt_fast.wrap(model, num_mem_tokens=2, segment_size=8, checkpoint_segments=True, keep_logits=False)
    else:
        model = bert_cls(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        rmt = rmt_fast.wrap(model, num_mem_tokens=2, segment_size=9, checkpoint_segments=True, cls_token_id=CLS,
                            sep_token_id=SEP, pad_token_id=PAD)
    ids = torch.randint(4, 97, (4, 36))
    labels = ids if kind == "decoder" else torch.tensor([0, 3, 1, 5])
    return rmt.train(), ids, labels


def _worker(rank, world, port, out, kind):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        rmt, ids, labels = _setup(kind)
        if rank == 1:  # a different start on rank 1: broadcast_parameters must fix it
            with torch.no_grad():
                rmt.memory.add_(1.0)
        broadcast_parameters(rmt)
        part = slice(rank * 2, rank * 2 + 2)
        rmt(ids[part], labels=labels[part]).loss.backward()
        all_reduce_gradients(rmt)
        torch.save({n: p.grad for n, p in rmt.named_parameters() if p.grad is not None}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_two_sweep_under_data_parallel_equals_one_process(tmp_path, kind):
    import torch.multiprocessing as mp

    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path), kind), nprocs=2, join=True,
                       start_method="spawn")
    g0 = torch.load(tmp_path / "rank0.pt")
    g1 = torch.load(tmp_path / "rank1.pt")
    rmt, ids, labels = _setup(kind)
    rmt(ids, labels=labels).loss.backward()
    whole = {n: p.grad for n, p in rmt.named_parameters() if p.grad is not None}
    assert g0.keys() == g1.keys() == whole.keys()
    for n in whole:
        assert torch.equal(g0[n], g1[n]), n
        torch.testing.assert_close(g0[n], whole[n], atol=1e-6, rtol=1e-4, msg=lambda m: f"{n}: {m}")
