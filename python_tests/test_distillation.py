"""Context distillation (rmt_fast.experiments.distillation): the teacher is the model on the whole row as one segment,
the student's answer loss and gradients are a plain training call's, the distillation loss reaches the memory's write
side, the trainer's option and its checks."""
import pytest
import torch

import rmt_fast
import rmt_fast.experiments.trainer as tr
from rmt_fast.experiments.distillation import distillation_step_loss, teacher_states
from rmt_fast.experiments.tasks import collate
from rmt_fast.experiments.trainer import TrainConfig, train

SEG = 32


def tiny(tmp_path=None, **kw):
    base = dict(task="reasoning", backbone="tiny-bert", tokenizer="word", hidden_size=32, num_mem_tokens=3,
                segment_size=SEG, schedule=[2], max_steps_per_stage=4, eval_every=2, eval_samples=8, eval_batch_size=8,
                batch_size=4, lr=1e-3, device="cpu", progress=False, save_stages=False, distill_coef=0.5,
                torch_compile="off", bf16=False, out_dir=str(tmp_path) if tmp_path is not None else None)
    base.update(kw)
    return TrainConfig(**base)


def _batch(trainer, n, rows=4):
    data = trainer.dataset(n, "train")
    b = collate([data[i] for i in range(rows)])
    return b["input_ids"], b["labels"]


@pytest.mark.parametrize("order", ["last_first", "natural"])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_teacher_is_the_model_on_one_segment(n, order):
    """The teacher's states are those of an RMT of the same weights whose segment is the whole row (built apart with
    rmt_fast.wrap), at the row's last SEG tokens, every layer: "natural" reads the row as it is, "last_first" with its
    last SEG tokens moved to the front (where they sit in the student's segment). The call leaves the model as it
    found it (segment size, CUDA-graph setting, training mode), also when it fails."""
    torch.manual_seed(0)
    trainer = tr.Trainer(tiny(schedule=[n])).build()
    rmt = trainer.rmt
    ids, _ = _batch(trainer, n)
    t = ids.shape[1]
    got = teacher_states(rmt, ids, SEG, order=order)
    assert rmt.rmt_config.segment_size == SEG and rmt.rmt_config.cuda_graphs == "auto" and rmt.training
    one = rmt_fast.wrap(rmt.model, num_mem_tokens=3, segment_size=t, tokenizer=trainer.tokenizer,
                        keep_logits=False).eval()
    with torch.no_grad():
        one.memory.copy_(rmt.memory)
        row = ids if order == "natural" else torch.cat([ids[:, t - SEG:], ids[:, :t - SEG]], 1)
        want = one(input_ids=row, output_hidden_states=True).hidden_states
    span = one.runner.scheme.token_span(t)
    at = slice(span.stop - SEG, span.stop) if order == "natural" else slice(span.start, span.start + SEG)
    assert len(got) == len(want) == rmt.model.config.num_hidden_layers + 1
    for g, w in zip(got, want):
        assert g.shape == (ids.shape[0], SEG, 32) and not g.requires_grad
        torch.testing.assert_close(g, w[:, at], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="input_ids"):  # a call that fails inside restores the model too
        teacher_states(rmt, ids.float(), SEG)
    assert rmt.rmt_config.segment_size == SEG and rmt.rmt_config.cuda_graphs == "auto" and rmt.training


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@pytest.mark.parametrize("layers", ["all", "last"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_answer_loss_and_gradients_are_a_plain_calls(n, device, layers):
    """With coef 0 the total is the answer loss of one plain training call over all segments, with its gradients;
    on one segment (no dropout) the student sees what the teacher sees: the distillation loss is 0. On a GPU the
    plain calls take the library's default executors (CUDA graphs from the second call on), fp32; three rounds (with
    ``layers="last"`` the student's own call is graphed too)."""
    torch.manual_seed(0)
    trainer = tr.Trainer(tiny(schedule=[n], device=device)).build()
    rmt = trainer.rmt.eval()  # no dropout
    ids, labels = (x.to(trainer.device) for x in _batch(trainer, n))
    params = [p for p in rmt.parameters() if p.requires_grad]
    for _ in range(3 if device == "cuda" else 1):
        plain = rmt(input_ids=ids, labels=labels, return_logits=False).loss
        want = torch.autograd.grad(plain, params, allow_unused=True)
        total, answer, distill = distillation_step_loss(rmt, ids, labels, SEG, 0.0, layers=layers)
        torch.testing.assert_close(answer, plain, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(total, plain, rtol=1e-5, atol=1e-6)
        got = torch.autograd.grad(total, params, allow_unused=True)
        for g, w in zip(got, want):
            assert (g is None) == (w is None)
            if g is not None:
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
        if n == 1:
            assert abs(distill.item()) < 1e-5
        else:  # the random tiny model's states hardly depend on context: the last-first teacher is close (~1e-6)
            assert distill.item() > 0
        assert rmt.rmt_config.cuda_graphs == "auto" and rmt.rmt_config.segment_size == SEG


def test_last_layer_is_the_last_of_all():
    """``layers="last"`` is the last layer's term of ``layers="all"``: the teacher's last state is the same tensor,
    and the loss is 1 - cosine there (checked against the per-layer states of an eager call)."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    trainer = tr.Trainer(tiny()).build()
    rmt = trainer.rmt.eval()
    ids, labels = _batch(trainer, 2)
    every, last = teacher_states(rmt, ids, SEG, "all"), teacher_states(rmt, ids, SEG, "last")
    assert len(last) == 1
    torch.testing.assert_close(last[0], every[-1], rtol=1e-5, atol=1e-6)
    student = rmt(input_ids=ids, output_hidden_states=True).hidden_states[-1][:, rmt.runner.scheme.token_span(SEG)]
    want = (1 - F.cosine_similarity(student, every[-1], dim=-1)).mean()
    _, _, got = distillation_step_loss(rmt, ids, labels, SEG, 1.0, layers="last")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="layers"):
        distillation_step_loss(rmt, ids, labels, SEG, 1.0, layers="first")
    with pytest.raises(ValueError, match="order"):
        distillation_step_loss(rmt, ids, labels, SEG, 1.0, order="reversed")


def test_distillation_loss_reaches_the_write_side():
    """The distillation loss alone gives a gradient to the embeddings of words that occur only in the first of two
    segments: the teacher has no gradient, so it comes through the memory that segment wrote."""
    torch.manual_seed(0)
    trainer = tr.Trainer(tiny()).build()
    rmt = trainer.rmt
    ids, labels = _batch(trainer, 2, rows=8)
    first, second = set(ids[:, :SEG].flatten().tolist()), set(ids[:, SEG:].flatten().tolist())
    only_first = sorted(first - second - {trainer.tokenizer.pad_token_id})
    assert only_first
    _, _, distill = distillation_step_loss(rmt, ids, labels, SEG, 1.0)
    distill.backward()
    emb = rmt.model.get_input_embeddings().weight.grad
    assert emb[only_first].abs().sum(1).gt(0).all()
    assert rmt.memory.grad is not None and rmt.memory.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="whole segments"):
        distillation_step_loss(rmt, ids[:, :SEG + 3], labels, SEG, 1.0)
    with pytest.raises(ValueError, match="labels"):
        distillation_step_loss(rmt, ids, labels[:2], SEG, 1.0)


@pytest.mark.parametrize("layers,order", [("all", "last_first"), ("last", "last_first"), ("all", "natural")])
def test_trainer_records_the_distillation_loss(layers, order):
    res = train(tiny(schedule=[1, 2], eval_every=2, max_steps_per_stage=4, distill_layers=layers, distill_order=order))
    one, two = [h for h in res.history if h["num_segments"] == 1], [h for h in res.history if h["num_segments"] == 2]
    assert one and two and all("reconstruction_loss" not in h for h in one + two)
    assert all(h["distillation_loss"] < 1e-5 for h in one)  # tiny-bert has no dropout: one segment is the teacher
    # on two segments: > 0; with the natural order mostly the position (the random tiny model's states hardly depend
    # on context, so the last-first teacher is within ~1e-6)
    assert all(h["distillation_loss"] > (1e-3 if order == "natural" else 0) for h in two)


def test_distillation_options_are_checked():
    for bad in (-0.1, True):
        with pytest.raises(ValueError, match="distill_coef"):
            tiny(distill_coef=bad).validate()
    with pytest.raises(ValueError, match="distill_layers"):
        tiny(distill_layers="first").validate()
    with pytest.raises(ValueError, match="distill_order"):
        tiny(distill_order="reversed").validate()
    with pytest.raises(ValueError, match="distill_coef and reconstruction_coef"):
        tiny(reconstruction_coef=0.5).validate()
    with pytest.raises(ValueError, match="distill_coef: .*encoder"):
        tr.Trainer(tiny(backbone="tiny-gpt2")).build()
    # the teacher's one segment must fit the backbone's positions (tiny-bert: 512): 6 x 100 tokens do not
    with pytest.raises(ValueError, match="distill_coef: .*positions"):
        tr.Trainer(tiny(segment_size=100, schedule=[2, 6])).build()
    tr.Trainer(tiny(segment_size=100, schedule=[2, 4])).build()
