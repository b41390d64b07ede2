"""rmt_fast.graphs.ParameterAliases: a step run on fresh leaf aliases of the backbone's parameters gives the same
outputs and, against the aliases, the same gradients as against the parameters (tied weights included)."""
import torch

import rmt_fast
from rmt_fast.graphs import ParameterAliases
from rmt_fast.schemes import P_GATHER
from models import gpt2, tokens


def test_aliases_give_the_parameters_gradients():
    torch.manual_seed(0)
    model = gpt2()  # tied input/output embeddings
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    rmt = rmt_fast.wrap(model, num_mem_tokens=2, segment_size=8, keep_logits=False)
    runner = rmt.runner
    ids = tokens(2, 8)
    targets = tokens(2, 8)
    params = torch.zeros(5, 2, dtype=torch.long)
    params[1] = 8  # P_LEN
    params[2] = 10  # P_WRITE
    params[P_GATHER] = 10
    memory = torch.randn(2, 2, 32, requires_grad=True)
    pa = ParameterAliases(model)

    def step():
        return runner.step(memory, ids, targets, params, 8, False, False, True)

    res = []
    for make in (False, True):
        if make:
            pa.make()
            assert all(a is not p and a.data_ptr() == p.data_ptr() for a, p in zip(pa.aliases, pa.parameters))
        out = pa.run(step)
        loss = out.loss_sum + out.memory.square().sum()
        grads = torch.autograd.grad(loss, [memory] + pa.leaves)
        res.append((out.loss_sum.detach(), out.memory.detach(), grads))
    assert len(pa.leaves) == len(list(model.parameters()))  # the tied weight once
    torch.testing.assert_close(res[0][0], res[1][0])
    torch.testing.assert_close(res[0][1], res[1][1])
    for a, b in zip(res[0][2], res[1][2]):
        torch.testing.assert_close(a, b)
    assert model.get_input_embeddings().weight is pa.parameters[pa.names.index("transformer.wte.weight")]
