"""The short-term cache (``num_cache_tokens``): against a restatement on transformers' own attention and KV cache,
gradients by ``bptt_depth``, ragged rows, the option's checks and persistence; ``num_cache_tokens=0`` is plain RMT."""
import pytest
import torch
import torch.nn.functional as F
from transformers import (DynamicCache, GPTNeoXConfig, GPTNeoXForCausalLM, MistralConfig, MistralForCausalLM,
                          OPTConfig, OPTForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                          Qwen3Config, Qwen3ForCausalLM)

import rmt_fast
from rmt_fast.short_term_cache import ShortTermCache
from checkpointing import grads_with_and_without_checkpointing
from models import CLS, PAD, SEP, VOCAB, bert_cls, gpt2, llama, tokens

DECODERS = {"gpt2": lambda: gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), "llama": llama}
LLAMA_LIKE = {"mistral": (MistralConfig, MistralForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
              "qwen3": (Qwen3Config, Qwen3ForCausalLM)}


def _llama_like(family):
    config, model = LLAMA_LIKE[family]
    return model(config(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=128, head_dim=8)).eval()


# the other decoder families: partial rotary (GPT-NeoX, Phi-3: half of each head's dims rotated), absolute (OPT)
OTHERS = {
    "gpt_neox": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB,
        max_position_embeddings=128, rotary_pct=0.5, hidden_dropout=0.0, attention_dropout=0.0)).eval(),
    "phi3": lambda: Phi3ForCausalLM(Phi3Config(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        vocab_size=VOCAB, max_position_embeddings=128, pad_token_id=0, eos_token_id=1, bos_token_id=1,
        partial_rotary_factor=0.5)).eval(),
    "opt": lambda: OPTForCausalLM(OPTConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, ffn_dim=64, vocab_size=VOCAB,
        max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0)).eval(),
}
ABSOLUTE = ("gpt2", "opt")


def restated(model, memory, ids, m, s, c, rotary, depth=None, cache_kwarg="cache"):
    """An RMT with a short-term cache of ``c`` tokens, written out on transformers' eager attention: segment ``g``
    runs ``[memory | tokens | memory]`` with ``past_key_values`` holding every layer's keys/values of the previous
    run's last ``c`` token positions, under a mask that shows all of them to every query and is causal over the
    segment. Positions: absolute (GPT-2): every segment at ``0..N-1``, the cached keys as they were computed;
    rotary (Llama): every segment continues the previous one's positions after its last token (offset ``m + L``
    per segment), so the cached keys sit right before it. ``depth``: full BPTT's cuts (memory and cache detached
    before segment ``g`` when ``0 < g < G - depth``). cache_kwarg: the name of the model's KV-cache argument.
    Returns (logits ``[B, T, V]``, loss)."""
    base, emb = model.base_model, model.get_input_embeddings()
    before = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    b, t = ids.shape
    starts = list(range(0, t, s))
    memory = memory.unsqueeze(0).expand(b, -1, -1)
    past, offset, logits = None, 0, []
    try:
        for g, start in enumerate(starts):
            if depth is not None and 0 < g < len(starts) - depth:
                memory = memory.detach()
                past = [(k.detach(), v.detach()) for k, v in past]
            seg = ids[:, start:start + s]
            n_tok = seg.shape[1]
            x = torch.cat([memory, emb(seg), memory], 1)
            n = x.shape[1]
            k = 0 if past is None else c
            allowed = torch.ones(n, k + n, dtype=torch.bool)
            allowed[:, k:] = torch.ones(n, n, dtype=torch.bool).tril()
            mask = torch.zeros(b, 1, n, k + n).masked_fill(~allowed, torch.finfo(torch.float32).min)
            cache = DynamicCache()
            for layer, (pk, pv) in enumerate(past or []):
                cache.update(pk, pv, layer)
            pos = (offset if rotary else 0) + torch.arange(n).expand(b, n)
            out = base(inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=True, **{cache_kwarg: cache})
            h = out.last_hidden_state
            logits.append(model.get_output_embeddings()(h[:, m:m + n_tok]))
            memory = h[:, m + n_tok:]
            last = slice(k + m + n_tok - c, k + m + n_tok)
            past = [(lay.keys[:, :, last], lay.values[:, :, last]) for lay in cache.layers]
            offset += m + n_tok
    finally:
        model.config._attn_implementation = before
    logits = torch.cat(logits, 1)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    return logits, loss


def _grads(loss, params):
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("family,depth", [("gpt2", None), ("gpt2", 1), ("llama", None), ("llama", 1),
                                          *((f, None) for f in LLAMA_LIKE), *((f, None) for f in OTHERS)])
def test_cache_equals_restatement(family, depth):
    """Logits, loss and gradients (memory, embeddings, an attention projection) against the restatement, over four
    segments (the last one short) with a cache of 3 tokens; ``bptt_depth`` cuts the cache where it cuts memory."""
    torch.manual_seed(0)
    model = (DECODERS[family]() if family in DECODERS else OTHERS[family]() if family in OTHERS
             else _llama_like(family))
    m, s, c = 2, 6, 3
    rmt = rmt_fast.wrap(model, num_mem_tokens=m, segment_size=s, num_cache_tokens=c, bptt_depth=depth)
    ids = tokens(2, 22)
    attn = next(p for n, p in model.named_parameters() if ("attn" in n or ".attention." in n) and p.dim() == 2)
    params = [rmt.memory, model.get_input_embeddings().weight, attn]
    out = rmt(ids, labels=ids)
    want_logits, want_loss = restated(model, rmt.memory, ids, m, s, c, family not in ABSOLUTE, depth,
                                      rmt.adapter.cache_kwarg)
    torch.testing.assert_close(out.logits, want_logits, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out.loss, want_loss, atol=1e-5, rtol=1e-5)
    for g, w in zip(_grads(out.loss, params), _grads(want_loss, params)):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)


def test_gradients_cross_the_cache():
    """With bptt_depth=0 the memory carries no gradient back, but without the cut the cache does: a token's loss
    in segment 2 reaches the embeddings of segment 1's last tokens only through the cache (no memory slots; every
    token id distinct; the LM head untied from the embeddings)."""
    model = gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False)
    ids = torch.arange(10, 22).view(1, 12)
    emb = model.get_input_embeddings().weight

    def grad_of_first_segment(depth):
        rmt = rmt_fast.wrap(model, num_mem_tokens=0, segment_size=6, num_cache_tokens=2, bptt_depth=depth)
        out = rmt(ids)
        (g,) = torch.autograd.grad(out.logits[0, 6:].sum(), emb)
        return g[ids[0, 4:6]].abs().sum()  # rows of the first segment's last two tokens (cached)

    assert grad_of_first_segment(None) > 0
    assert grad_of_first_segment(0) == 0


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_ragged_rows_equal_running_each_alone(family):
    """Rows of different lengths (left padding): each row's logits equal running it alone; its short last segment
    and its cache of fewer real tokens (a segment shorter than the cache) included."""
    model = DECODERS[family]()
    rmt = rmt_fast.wrap(model, num_mem_tokens=2, segment_size=5, num_cache_tokens=4)
    ids = tokens(3, 17)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # 8 tokens: a full segment and one of 3 (< cache)
    mask[2, :15] = 0  # 2 tokens: one segment shorter than the cache
    out = rmt(ids, attention_mask=mask)
    for row in range(3):
        keep = mask[row].bool()
        alone = rmt(ids[row:row + 1, keep]).logits[0]
        torch.testing.assert_close(out.logits[row, keep], alone, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family,depth", [("gpt2", None), ("gpt2", 1), ("llama", None)])
def test_two_sweep_schedule_equals_full_bptt(family, depth):
    """checkpoint_segments=True saves the cache entering each segment and hands its gradient back: the loss and
    every gradient as full BPTT's, with ragged rows (a left-padded row ends its segments elsewhere)."""
    ids = tokens(2, 29)
    mask = torch.ones_like(ids)
    mask[1, :8] = 0
    (l0, m0, p0), (l1, m1, p1) = grads_with_and_without_checkpointing(
        DECODERS[family](), ids, ids, mask=mask, num_mem_tokens=2, segment_size=6, num_cache_tokens=4,
        bptt_depth=depth)
    torch.testing.assert_close(l0, l1, atol=0, rtol=0)
    torch.testing.assert_close(m0, m1, atol=1e-6, rtol=1e-4)
    assert p0.keys() == p1.keys() and len(p0) > 0
    for n in p0:
        torch.testing.assert_close(p0[n], p1[n], atol=1e-6, rtol=1e-4, msg=lambda msg: f"{n}: {msg}")


@pytest.mark.parametrize("make", [DECODERS["gpt2"], DECODERS["llama"], bert_cls])
def test_zero_cache_is_plain_rmt(make):
    """``num_cache_tokens=0`` is today's RMT bit for bit: outputs and gradients of the same model and memory."""
    model = make()
    kw = dict(cls_token_id=CLS, sep_token_id=SEP, pad_token_id=PAD) if make is bert_cls else {}
    plain = rmt_fast.wrap(model, num_mem_tokens=2, segment_size=6, **kw)
    zero = rmt_fast.wrap(model, num_mem_tokens=2, segment_size=6, num_cache_tokens=0, **kw)
    zero.memory = plain.memory
    ids = tokens(2, 20)
    labels = torch.tensor([1, 3]) if make is bert_cls else ids
    results = []
    for rmt in (plain, zero):
        out = rmt(ids, labels=labels)
        results.append((out.logits, out.loss, *_grads(out.loss, [rmt.memory, model.get_input_embeddings().weight])))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_triton_backend_equals_the_reference():
    """backend="triton" (on the CPU: the kernels in Triton's interpreter) runs the cache layouts in the Triton
    kernels: logits, loss and gradients as the reference's, with GQA, rotary positions and ragged rows (a row whose
    cache holds fewer real tokens than its width)."""
    model = DECODERS["llama"]()
    ids = tokens(2, 13)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    ref, tri = (rmt_fast.wrap(model, num_mem_tokens=2, segment_size=5, num_cache_tokens=3, backend=backend)
                for backend in ("reference", "triton"))
    tri.memory = ref.memory
    results = []
    for rmt in (ref, tri):
        out = rmt(ids, attention_mask=mask, labels=ids)
        results.append((out.logits[mask.bool()], out.loss,
                        *_grads(out.loss, [rmt.memory, model.get_input_embeddings().weight])))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_save_and_load_keep_the_cache(tmp_path):
    rmt = rmt_fast.wrap(DECODERS["llama"](), num_mem_tokens=2, segment_size=6, num_cache_tokens=3)
    rmt.save_pretrained(tmp_path)
    back = rmt_fast.from_pretrained(tmp_path)
    assert back.rmt_config.num_cache_tokens == 3
    ids = tokens(2, 20)
    torch.testing.assert_close(back(ids).logits, rmt(ids).logits)
    cfg = rmt.rmt_config.to_dict()
    del cfg["num_cache_tokens"]  # a config saved before the option: no cache
    assert rmt_fast.RMTConfig.from_dict(cfg).num_cache_tokens == 0


def test_bad_values_raise():
    model = DECODERS["gpt2"]()
    for value, err in [(-1, ValueError), (7, ValueError), (True, TypeError), (2.0, TypeError)]:
        with pytest.raises(err, match="num_cache_tokens"):
            rmt_fast.wrap(model, num_mem_tokens=2, segment_size=6, num_cache_tokens=value)
    with pytest.raises(ValueError, match="num_cache_tokens.*sdpa"):
        rmt_fast.wrap(model, num_mem_tokens=2, segment_size=6, num_cache_tokens=2, backend="sdpa")
    for backend in ("auto", "reference", "triton", "cuda"):  # every backend with a fused or reference cache path
        wrapped = rmt_fast.wrap(model, num_mem_tokens=2, segment_size=6, num_cache_tokens=2, backend=backend)
        assert wrapped.rmt_config.backend == backend
    with pytest.raises(ValueError, match="num_cache_tokens.*decoder"):
        rmt_fast.wrap(bert_cls(), num_mem_tokens=2, segment_size=6, num_cache_tokens=2, cls_token_id=CLS,
                      sep_token_id=SEP)
    rmt = rmt_fast.wrap(model, num_mem_tokens=2, segment_size=6, num_cache_tokens=2)
    with pytest.raises(TypeError, match="short_term_cache"):
        rmt(tokens(1, 8), short_term_cache=("not", "a cache"))
    with pytest.raises(ValueError, match="short_term_cache"):
        rmt(tokens(2, 8), short_term_cache=rmt(tokens(1, 6)).short_term_cache)  # another batch
    plain = rmt_fast.wrap(DECODERS["gpt2"](), num_mem_tokens=2, segment_size=6)
    with pytest.raises(ValueError, match="num_cache_tokens=0"):
        plain(tokens(1, 8), short_term_cache=rmt(tokens(1, 6)).short_term_cache)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_ragged_batch_continues_as_each_row_alone(family):
    """A shorter row's idle segments keep its cache, as they keep its memory: a second call continuing a ragged
    batch gives each row what continuing it alone gives."""
    torch.manual_seed(0)
    rmt = rmt_fast.wrap(DECODERS[family](), num_mem_tokens=2, segment_size=5, num_cache_tokens=4).eval()
    ids, more = tokens(2, 17), tokens(2, 7)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # row 1: 8 tokens (segments of 5 and 3, then two idle segments)
    with torch.no_grad():
        first = rmt(ids, attention_mask=mask)
        second = rmt(more, memory=first.memory, short_term_cache=first.short_term_cache)
        assert first.short_term_cache.lens.tolist() == [2, 3]  # each row's last segment: 2 and 3 tokens
        for row in range(2):
            keep = mask[row].bool()
            alone = rmt(ids[row:row + 1, keep])
            then = rmt(more[row:row + 1], memory=alone.memory, short_term_cache=alone.short_term_cache)
            torch.testing.assert_close(second.logits[row], then.logits[0], atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(second.memory[row], then.memory[0], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_call_continues_from_the_previous_calls_cache(family):
    """Two calls, the second from the first's memory and short-term cache, equal one call over the joined input
    when the first ends on a segment boundary (here after two segments)."""
    torch.manual_seed(0)
    rmt = rmt_fast.wrap(DECODERS[family](), num_mem_tokens=2, segment_size=6, num_cache_tokens=3).eval()
    ids = tokens(2, 22)
    with torch.no_grad():
        whole = rmt(ids)
        first = rmt(ids[:, :12])
        second = rmt(ids[:, 12:], memory=first.memory, short_term_cache=first.short_term_cache)
    torch.testing.assert_close(second.logits, whole.logits[:, 12:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second.memory, whole.memory, atol=1e-5, rtol=1e-5)
    assert whole.short_term_cache is not None and len(whole.short_term_cache.keys) == 2


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_generate_keeps_the_cache(family):
    """Streaming greedy decoding across segment boundaries equals re-running the whole sequence at every step."""
    torch.manual_seed(0)
    rmt = rmt_fast.wrap(DECODERS[family](), num_mem_tokens=2, segment_size=5, num_cache_tokens=3).eval()
    prompt = tokens(2, 8)
    out = rmt.generate(prompt, max_new_tokens=14, do_sample=False, eos_token_id=[])
    seq = prompt
    with torch.no_grad():
        for _ in range(14):
            nxt = rmt(seq).logits[:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], 1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_decoding_logits_equal_the_forward_pass(family):
    """The streaming decoder's next-token logits (prefill, KV-cached steps, segment roll-overs, with the short-term
    cache before every segment) equal the forward pass over the sequence so far, step by step."""
    from rmt_fast.generation import _SegmentDecoder

    torch.manual_seed(0)
    rmt = rmt_fast.wrap(DECODERS[family](), num_mem_tokens=2, segment_size=5, num_cache_tokens=3).eval()
    seq = tokens(2, 8)
    with torch.no_grad():
        first = rmt(seq[:, :5], return_logits=False)
        dec = _SegmentDecoder(rmt, first.memory, first.short_term_cache)
        logits = dec.start(seq[:, 5:])
        for _ in range(12):
            torch.testing.assert_close(logits, rmt(seq).logits[:, -1], atol=1e-5, rtol=1e-5)
            nxt = tokens(2, 1)[:, 0]
            seq = torch.cat([seq, nxt[:, None]], 1)
            logits = dec.push(nxt)


def test_generate_with_padded_rows_equals_each_row_alone():
    """Left-padded prompts of different lengths: each row decodes as it would alone (rows are grouped by length)."""
    torch.manual_seed(0)
    rmt = rmt_fast.wrap(DECODERS["llama"](), num_mem_tokens=2, segment_size=5, num_cache_tokens=3,
                        pad_token_id=0).eval()
    a, b = tokens(1, 12), tokens(1, 7)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], 1)])
    mask = torch.cat([torch.ones(1, 12), torch.cat([torch.zeros(1, 5), torch.ones(1, 7)], 1)]).long()
    both = rmt.generate(ids, attention_mask=mask, max_new_tokens=9, do_sample=False, eos_token_id=[])
    alone_a = rmt.generate(a, max_new_tokens=9, do_sample=False, eos_token_id=[])
    alone_b = rmt.generate(b, max_new_tokens=9, do_sample=False, eos_token_id=[])
    assert torch.equal(both[0, 12:], alone_a[0, 12:]) and torch.equal(both[1, 12:], alone_b[0, 7:])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_training_call_continues_a_detached_cache(family):
    """A training call that continues the previous call's memory and (detached) short-term cache: the two-sweep
    schedule (checkpoint_segments=True) gives full BPTT's loss, logits, cache and gradients; a cache that still
    carries the previous call's graph is refused by the two-sweep schedule (full BPTT takes it, gradient included)."""
    torch.manual_seed(0)
    model = DECODERS[family]()
    ids = tokens(2, 22)
    results = {}
    for ckpt in (False, True):
        rmt = rmt_fast.wrap(model, num_mem_tokens=2, segment_size=6, num_cache_tokens=3, checkpoint_segments=ckpt)
        rmt.memory.data.copy_(torch.linspace(-1, 1, rmt.memory.numel()).view_as(rmt.memory) * 0.02)
        first = rmt(ids[:, :12], labels=ids[:, :12])
        out = rmt(ids[:, 12:], labels=ids[:, 12:], memory=first.memory.detach(),
                  short_term_cache=first.short_term_cache.detach())
        params = [rmt.memory, *model.parameters()]
        grads = torch.autograd.grad(out.loss + out.logits.square().mean(), params, allow_unused=True)
        results[ckpt] = (out, grads)
        if ckpt:  # (the two-sweep schedule's own cache comes detached: one with a graph is made here)
            c = first.short_term_cache
            graded = ShortTermCache(tuple(k.clone().requires_grad_() for k in c.keys),
                                    tuple(v.clone().requires_grad_() for v in c.values), c.lens)
            with pytest.raises(ValueError, match=r"short_term_cache=out.short_term_cache.detach\(\)"):
                rmt(ids[:, 12:], labels=ids[:, 12:], short_term_cache=graded)
    (want, g_want), (got, g_got) = results[False], results[True]
    torch.testing.assert_close(got.loss, want.loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-6, rtol=1e-5)
    for g, w in zip((*got.short_term_cache.keys, *got.short_term_cache.values),
                    (*want.short_term_cache.keys, *want.short_term_cache.values)):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
    for g, w in zip(g_got, g_want):
        if w is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, w, atol=2e-6, rtol=1e-4)
