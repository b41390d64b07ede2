"""Shared by the checkpointing tests: one backward with and without ``checkpoint_segments``."""
import torch

import rmt_fast


def grads_with_and_without_checkpointing(model, ids, labels, mask=None, seed=None, **kw):
    """[(loss, memory grad, {param name: grad}) for checkpoint_segments False, then True], same start.

    The backward also pulls on the recorded per-token logits (when there are) and on the final memory, so every
    output path of the two-sweep schedule carries a gradient."""
    out, mem0 = [], None
    for ckpt in (False, True):
        rmt = rmt_fast.wrap(model, checkpoint_segments=ckpt, backend="reference", **kw)
        if mem0 is None:
            mem0 = rmt.memory.detach().clone()
        rmt.memory.data.copy_(mem0)
        rmt.train()
        model.zero_grad(set_to_none=True)
        if seed is not None:
            torch.manual_seed(seed)
        res = rmt(ids, attention_mask=mask, labels=labels)
        loss = res.loss
        if res.logits is not None and res.logits.dim() == 3:
            loss = loss + res.logits.float().pow(2).mean() * 1e-2
        loss = loss + res.memory.float().pow(2).mean() * 1e-2
        loss.backward()
        mem_grad = rmt.memory.grad if rmt.memory.grad is not None else torch.zeros_like(rmt.memory)
        out.append((res.loss.detach(), mem_grad.clone(),
                    {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    return out
