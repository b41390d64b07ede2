"""The memory reconstruction loss (rmt_fast.experiments.reconstruction): one call per segment equals one call over all
of them, the masked-token loss reaches the memory's write side, the trainer's option, its head saved for resume."""
import os

import pytest
import torch

import rmt_fast.experiments.trainer as tr
from rmt_fast.experiments.reconstruction import ReconstructionHead, mask_tokens, reconstruction_step_loss
from rmt_fast.experiments.tasks import collate
from rmt_fast.experiments.trainer import TrainConfig, train

SEG = 32


def tiny(tmp_path=None, **kw):
    base = dict(task="reasoning", backbone="tiny-bert", tokenizer="word", hidden_size=32, num_mem_tokens=3, segment_size=SEG,
                schedule=[2], max_steps_per_stage=4, eval_every=2, eval_samples=8, eval_batch_size=8, batch_size=4,
                lr=1e-3, device="cpu", progress=False, save_stages=False, reconstruction_coef=0.5,
                out_dir=str(tmp_path) if tmp_path is not None else None)
    base.update(kw)
    return TrainConfig(**base)


def _batch(trainer, n):
    data = trainer.dataset(n, "train")
    b = collate([data[i] for i in range(4)])
    return b["input_ids"], b["labels"]


def test_mask_tokens():
    ids = torch.arange(1000, 1000 + 6 * 50).view(6, 50)
    g = torch.Generator().manual_seed(0)
    masked, targets = mask_tokens(ids, 4, 0.2, g)
    chosen = masked == 4
    assert torch.equal(chosen, targets != -100)
    assert torch.equal(targets[chosen], ids[chosen]) and torch.equal(masked[~chosen], ids[~chosen])
    assert 0.1 < chosen.float().mean() < 0.3
    masked, _ = mask_tokens(ids, 4, 1e-6, torch.Generator().manual_seed(1))
    assert ((masked == 4).sum(1) == 1).all()  # at least one per row
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="prob"):
            mask_tokens(ids, 4, bad)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_answer_loss_and_gradients_equal_one_call_over_all_segments(n, device):
    """reconstruction_step_loss runs one call per segment; its answer loss and the gradients it gives (coef 0) must
    be those of one call over the whole input (full BPTT through the memory handoffs). On a GPU the calls take the
    library's default executors for the whole call (CUDA graphs where they apply) and eager ones for the chained
    per-segment calls, fp32."""
    torch.manual_seed(0)
    trainer = tr.Trainer(tiny(schedule=[n], device=device, torch_compile="off", bf16=False)).build()
    rmt, head = trainer.rmt, trainer.rec_head
    ids, labels = (x.to(trainer.device) for x in _batch(trainer, n))
    assert rmt.rmt_config.cuda_graphs == "auto"  # the per-segment calls switch graphs off for their duration only
    whole = rmt(input_ids=ids, labels=labels, return_logits=False).loss
    whole.backward()
    want = {k: p.grad.clone() for k, p in rmt.named_parameters() if p.grad is not None}
    for _ in range(3 if device == "cuda" else 1):  # on a GPU: eager, then captured, then replayed calls
        rmt.zero_grad(set_to_none=True)
        total, answer, rec = reconstruction_step_loss(rmt, head, ids, labels, SEG,
                                                      trainer.tokenizer.mask_token_id, 0.15, 0.0,
                                                      torch.Generator().manual_seed(0))
        torch.testing.assert_close(answer, whole, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(total, whole, rtol=1e-5, atol=1e-6)
        assert rec.item() > 0 and rmt.rmt_config.cuda_graphs == "auto"
        total.backward()
        got = {k: p.grad for k, p in rmt.named_parameters() if p.grad is not None}
        assert set(got) == set(want) and "memory" in got
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)


def _reference_losses(rmt, head, ids, labels, n, mask_id, prob, seed, last):
    """The definition, one call per pass: segment k from memory M_(k-1), then its masked copy from M_k."""
    import torch.nn.functional as F
    from rmt_fast.experiments.reconstruction import mask_tokens

    gen = torch.Generator().manual_seed(seed)
    segs = [ids[:, k * SEG:(k + 1) * SEG] for k in range(n)]
    masks = [mask_tokens(s, mask_id, prob, gen) for s in segs]
    memory, rec = None, []
    for k in range(n):
        out = rmt(input_ids=segs[k], memory=memory, labels=labels if k == n - 1 else None, return_logits=False)
        memory = out.memory
        if k < n - 1 or last:
            h = rmt(input_ids=masks[k][0], memory=memory).last_hidden_state
            logits = head(h[:, rmt.runner.scheme.token_span(SEG)])
            rec.append(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), masks[k][1].reshape(-1)))
    return out.loss, (torch.stack(rec).mean() if rec else out.loss.new_zeros(()))


@pytest.mark.parametrize("last", [True, False])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_paired_calls_equal_one_call_per_pass(n, last):
    """The masked pass of segment k shares a call with segment k+1 (both read M_k): losses and gradients (coef 1)
    equal one call per pass; ``last=False`` leaves the last segment's memory out (none at all for one segment)."""
    torch.manual_seed(0)
    trainer = tr.Trainer(tiny(schedule=[n], torch_compile="off", bf16=False)).build()
    rmt, head = trainer.rmt.eval(), trainer.rec_head  # no dropout: the two orders must see the same network
    ids, labels = _batch(trainer, n)
    mask_id = trainer.tokenizer.mask_token_id
    params = [p for p in (*rmt.parameters(), *head.parameters()) if p.requires_grad]
    answer_ref, rec_ref = _reference_losses(rmt, head, ids, labels, n, mask_id, 0.3, 5, last)
    want = torch.autograd.grad(answer_ref + 0.7 * rec_ref, params, allow_unused=True)
    total, answer, rec = reconstruction_step_loss(rmt, head, ids, labels, SEG, mask_id, 0.3, 0.7,
                                                  torch.Generator().manual_seed(5), last=last)
    torch.testing.assert_close(answer, answer_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rec, rec_ref, rtol=1e-5, atol=1e-6)
    assert (rec.item() == 0) == (n == 1 and not last)
    got = torch.autograd.grad(total, params, allow_unused=True)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_reconstruction_loss_reaches_the_write_side():
    """The masked-token loss alone gives gradients to the head, to the initial memory (through the first segment's
    write) and to the backbone; the head's decoder is the backbone's own embedding matrix (tied)."""
    torch.manual_seed(0)
    trainer = tr.Trainer(tiny()).build()
    rmt, head = trainer.rmt, trainer.rec_head
    assert head._embeddings[0].weight is rmt.model.get_input_embeddings().weight
    assert not any(p is rmt.model.get_input_embeddings().weight for p in head.parameters())
    ids, labels = _batch(trainer, 2)
    _, _, rec = reconstruction_step_loss(rmt, head, ids, labels, SEG, trainer.tokenizer.mask_token_id, 0.3,
                                         1.0, torch.Generator().manual_seed(0))
    rec.backward()
    assert rmt.memory.grad is not None and rmt.memory.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    with pytest.raises(ValueError, match="whole segments"):
        reconstruction_step_loss(rmt, head, ids[:, :SEG + 3], labels, SEG, 4, 0.3, 1.0)
    with pytest.raises(ValueError, match="labels"):
        reconstruction_step_loss(rmt, head, ids, labels[:2], SEG, 4, 0.3, 1.0)


def test_head_shapes():
    emb = torch.nn.Embedding(50, 8)
    head = ReconstructionHead(emb)
    assert head(torch.randn(2, 5, 8)).shape == (2, 5, 50)
    assert {n for n, _ in head.named_parameters()} == {"transform.0.weight", "transform.0.bias", "transform.2.weight",
                                                         "transform.2.bias", "bias"}


def test_trainer_records_the_reconstruction_loss_and_resumes_its_head(tmp_path):
    res = train(tiny(tmp_path, schedule=[1, 2], eval_every=2, max_steps_per_stage=4))
    one, two = [h for h in res.history if h["num_segments"] == 1], [h for h in res.history if h["num_segments"] == 2]
    assert one and two
    assert all(h["reconstruction_loss"] > 0 for h in one + two)  # one segment's memory rebuilds it too
    path = os.path.join(tmp_path, "checkpoint-last", tr.RECONSTRUCTION_FILE)
    saved = torch.load(path, weights_only=True)
    trainer = tr.Trainer(tiny(tmp_path, schedule=[1, 2], eval_every=2, max_steps_per_stage=4, resume=True)).build()
    for k, v in trainer.rec_head.state_dict().items():
        torch.testing.assert_close(v, saved[k], msg=k)
    assert any(p is trainer.rec_head.bias for g in trainer.optimizer.param_groups for p in g["params"])
    # reconstruction_last=False: only memories a later segment reads are rebuilt (none on one segment)
    res = train(tiny(None, schedule=[1, 2], eval_every=2, max_steps_per_stage=2, reconstruction_last=False))
    assert [h["reconstruction_loss"] > 0 for h in res.history] == [False, True]


def test_reconstruction_options_are_checked():
    for bad in (-0.1, True):
        with pytest.raises(ValueError, match="reconstruction_coef"):
            tiny(reconstruction_coef=bad).validate()
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="reconstruction_mask_prob"):
            tiny(reconstruction_mask_prob=bad).validate()
    with pytest.raises(ValueError, match="reconstruction_coef: .*encoder"):
        tr.Trainer(tiny(backbone="tiny-gpt2")).build()
    assert tr.Trainer(tiny(reconstruction_coef=0.0)).build().rec_head is None


@CUDA
@pytest.mark.parametrize("extra_call", [False, True])
def test_chained_graded_calls_with_cuda_graphs_equal_one_call(extra_call):
    """The library's default executors (CUDA graphs) on chained training calls, one backward for all: segment 1,
    then segment 2 from its memory with the labels (and, with ``extra_call``, one more call from the memory segment
    2 wrote, its output in the loss times 0) equal one call over both segments, loss and gradients, fp32. Run three
    times: eager, captured, replayed."""
    torch.manual_seed(0)
    trainer = tr.Trainer(tiny(schedule=[2], device="cuda", torch_compile="off", bf16=False)).build()
    rmt = trainer.rmt
    ids, labels = (x.to(trainer.device) for x in _batch(trainer, 2))
    whole = rmt(input_ids=ids, labels=labels, return_logits=False).loss
    whole.backward()
    want = {k: p.grad.clone() for k, p in rmt.named_parameters() if p.grad is not None}
    for _ in range(3):
        rmt.zero_grad(set_to_none=True)
        first = rmt(input_ids=ids[:, :SEG], return_logits=False)
        out = rmt(input_ids=ids[:, SEG:], memory=first.memory, labels=labels, return_logits=False)
        loss = out.loss
        if extra_call:
            loss = loss + 0.0 * rmt(input_ids=ids[:, SEG:], memory=out.memory).last_hidden_state.float().sum()
        torch.testing.assert_close(out.loss, whole, rtol=1e-5, atol=1e-6)
        loss.backward()
        got = {k: p.grad for k, p in rmt.named_parameters() if p.grad is not None}
        assert set(got) == set(want)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)
