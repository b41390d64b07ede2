"""Triton kernels of rmt_fast ops (sm_80+ GPUs, or CPU tensors under TRITON_INTERPRET=1)."""
