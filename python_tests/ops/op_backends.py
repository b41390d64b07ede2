"""What both op conformance suites need: the device, and pytest params for the fused backends (skipped, with the
reason, where the machine cannot run them)."""
import os

import pytest
import torch

from rmt_fast.ops import cuda as cuda_ext
from rmt_fast.ops import resolve_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _triton_usable() -> bool:
    if not (torch.cuda.is_available() or INTERPRET):
        return False
    try:
        resolve_backend("triton", torch.device(DEVICE))
    except ValueError:
        return False
    return True


TRITON = pytest.param("triton", marks=pytest.mark.skipif(
    not _triton_usable(), reason="triton needs a GPU, or TRITON_INTERPRET=1 set before triton is imported"))


def cuda_param(op: str):
    """The "cuda" backend as a param, skipped unless rmt_fast._C provides ``op`` on a CUDA device."""
    return pytest.param("cuda", marks=pytest.mark.skipif(not cuda_ext.has_op(op),
                                                         reason="rmt_fast._C not built or no CUDA device"))
