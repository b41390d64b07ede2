// Torch-free launch API of the rmt_fast CUDA kernels (sm_61 and newer).
//
// Plain C++: safe to include from host-only translation units (csrc/bindings.cpp, tests). Every launcher
// enqueues its kernels on `stream` and returns the launch status; nothing synchronises.
// Strides are in elements; the last (head / feature) dimension must be contiguous.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace rmt_fast {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// The RMT segment mask of SegmentLayout (rmt_fast/ops/reference.py). Row b holds num_read read slots,
// seq_lens[b] tokens, num_write write slots; valid[b] = num_read + seq_lens[b] + num_write (clamped to
// [0, seq]). Query i may attend key j (both < valid[b]) when !causal, or j <= i, or (memory_bidirectional)
// both lie in [0, num_read) or both lie in [num_read + seq_lens[b], valid[b]).
struct SegmentMask {
  const int32_t* seq_lens;  // [batch], device memory
  int num_read;
  int num_write;
  bool causal;
  bool memory_bidirectional;
};

struct AttentionDims {
  int batch;
  int heads_q;   // a multiple of heads_kv (grouped-query attention)
  int heads_kv;
  int seq;       // N
  int head_dim;  // 1..kMaxHeadDim
};

constexpr int kMaxHeadDim = 128;

// Element strides of a [B, H, N, D] tensor whose last dimension is contiguous.
struct Strides3 {
  int64_t b, h, n;
};

// O = softmax(scale * Q K^T + mask) V in fp32 math.
// q [B, Hq, N, D], k/v [B, Hkv, N, D] of `dtype` (kFloat32 or kFloat16), strided.
// out: contiguous [B, Hq, N, D] of `dtype`; rows at or past valid[b] are written as zeros.
// lse: contiguous [B, Hq, N] fp32, the row log-sum-exp of the *base-2* scores (scale * log2(e) * q.k),
// +inf for padding rows; only memory_attention_backward reads it.
cudaError_t memory_attention_forward(DType dtype, const void* q, Strides3 q_strides, const void* k,
                                     Strides3 k_strides, const void* v, Strides3 v_strides, void* out,
                                     float* lse, AttentionDims dims, SegmentMask mask, float scale,
                                     cudaStream_t stream);

// Gradients of memory_attention_forward. dout is strided like q; out and lse are the forward's outputs.
// delta: fp32 workspace of B * Hq * N elements. dq [B, Hq, N, D], dk/dv [B, Hkv, N, D]: contiguous, of
// `dtype`, fully written (zeros for padding rows; padded keys get zero dk/dv). Deterministic (no atomics).
cudaError_t memory_attention_backward(DType dtype, const void* dout, Strides3 dout_strides, const void* q,
                                      Strides3 q_strides, const void* k, Strides3 k_strides, const void* v,
                                      Strides3 v_strides, const void* out, const float* lse, float* delta,
                                      void* dq, void* dk, void* dv, AttentionDims dims, SegmentMask mask,
                                      float scale, cudaStream_t stream);

// segment_handoff_ref (rmt_fast/ops/reference.py) on contiguous tensors of any of the three dtypes.
// new_memory[b] = hidden[b, gather[b] : gather[b] + m] when has_hidden and gather[b] >= 0, else
// memory[b]; its dtype is hidden's (memory's when !has_hidden). embeds = token_embeds with
// new_memory (converted to embeds' dtype) at [read_offset, read_offset + m) and, when write_offsets is
// given, at [write_offsets[b], write_offsets[b] + m). No device-side checks: a gathered slot outside
// hidden reads as NaN, a write slot outside [0, seq) is skipped.
struct HandoffArgs {
  int batch;
  int slots;        // m
  int width;        // d
  int hidden_seq;   // N_prev (ignored when !has_hidden)
  int seq;          // N of token_embeds
  int read_offset;  // 0 <= read_offset, read_offset + m <= seq
  bool has_hidden;  // false: first segment, new_memory = memory
  const int32_t* gather_offsets;  // [batch], read when has_hidden
  const int32_t* write_offsets;   // [batch] or null
  DType hidden_dtype, memory_dtype, embeds_dtype;
};

// hidden [B, N_prev, d] (read when has_hidden); memory [B, m, d]; token_embeds [B, N, d];
// new_memory [B, m, d] (hidden_dtype, or memory_dtype when !has_hidden); embeds [B, N, d] (embeds_dtype).
cudaError_t segment_handoff_forward(const HandoffArgs& args, const void* hidden, const void* memory,
                                    const void* token_embeds, void* new_memory, void* embeds,
                                    cudaStream_t stream);

// grad_new_memory [B, m, d] (new_memory's dtype) and grad_embeds [B, N, d] (embeds_dtype) may each be null
// (zero). Writes every element of each non-null output: grad_hidden [B, N_prev, d] (hidden_dtype),
// grad_memory [B, m, d] (memory_dtype), grad_token_embeds [B, N, d] (embeds_dtype); null = not wanted.
// A new-memory slot that was written to both a read and a write position gets both positions' gradients.
cudaError_t segment_handoff_backward(const HandoffArgs& args, const void* grad_new_memory,
                                     const void* grad_embeds, void* grad_hidden, void* grad_memory,
                                     void* grad_token_embeds, cudaStream_t stream);

}  // namespace rmt_fast
