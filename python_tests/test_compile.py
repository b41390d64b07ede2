"""torch_compile=True: the backbone under torch.compile (inductor) gives the eager results, forward and backward."""
import pytest
import torch

import rmt_fast
from models import gpt2, llama, lm_step, tokens

pytestmark = pytest.mark.slow  # inductor compiles C++ kernels on the CPU: about a minute


@pytest.mark.parametrize("make", [gpt2, llama])
def test_compiled_backbone_equals_eager(make):
    torch.manual_seed(0)
    state = make().state_dict()
    ids = tokens(2, 45)  # 5 segments, the last one ragged
    res = []
    for compiled in (False, True):
        model = make()
        model.load_state_dict(state)
        rmt = rmt_fast.wrap(model, num_mem_tokens=2, segment_size=10, torch_compile=compiled)
        rmt.memory.data.fill_(0.01)
        res.append(lm_step(rmt, ids, model.get_input_embeddings().weight))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_torch_compile_is_validated():
    with pytest.raises(TypeError, match="torch_compile"):
        rmt_fast.wrap(gpt2(), num_mem_tokens=2, segment_size=10, torch_compile="yes")
