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

// The RMT segment mask, restating mask_rule of rmt_fast/ops/memory_attention/spec.py (the specification). Row b
// holds num_read read slots, seq_lens[b] tokens, num_write write slots; valid[b] = num_read + seq_lens[b] +
// num_write (clamped to [0, seq]). Query i may attend key j (both < valid[b]) when !causal, or j <= i, or
// (memory_bidirectional) both lie in [0, num_read) or both lie in [num_read + seq_lens[b], valid[b]).
// With a short-term cache (num_cache > 0) the keys are [cache (num_cache) | segment (N)]: key j >= num_cache is
// segment position j - num_cache under the rule above, and the row's real cache keys, the last cache_lens[b]
// (clamped to [0, num_cache]) of the prefix, are visible to every query < valid[b]. num_cache = 0 (the default
// of an aggregate initialiser that stops after memory_bidirectional) is the rule above, unchanged.
struct SegmentMask {
  const int32_t* seq_lens;  // [batch], device memory
  int num_read;
  int num_write;
  bool causal;
  bool memory_bidirectional;
  int num_cache;              // cache keys in front of the segment's keys, >= 0
  const int32_t* cache_lens;  // [batch] real cache keys per row, device memory; null: all num_cache
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
// q [B, Hq, N, D], k/v [B, Hkv, num_cache + N, D] of `dtype` (kFloat32 or kFloat16), strided.
// out: contiguous [B, Hq, N, D] of `dtype`; rows at or past valid[b] are written as zeros.
// lse: contiguous [B, Hq, N] fp32, the row log-sum-exp of the *base-2* scores (scale * log2(e) * q.k),
// +inf for padding rows; only memory_attention_backward reads it.
cudaError_t memory_attention_forward(DType dtype, const void* q, Strides3 q_strides, const void* k,
                                     Strides3 k_strides, const void* v, Strides3 v_strides, void* out,
                                     float* lse, AttentionDims dims, SegmentMask mask, float scale,
                                     cudaStream_t stream);

// Gradients of memory_attention_forward. dout is strided like q; out and lse are the forward's outputs.
// delta: fp32 workspace of B * Hq * N elements. dq [B, Hq, N, D], dk/dv [B, Hkv, num_cache + N, D]: contiguous,
// of `dtype`, fully written (zeros for padding rows; keys no query attends, padding and cache padding included,
// get zero dk/dv). Deterministic (no atomics).
cudaError_t memory_attention_backward(DType dtype, const void* dout, Strides3 dout_strides, const void* q,
                                      Strides3 q_strides, const void* k, Strides3 k_strides, const void* v,
                                      Strides3 v_strides, const void* out, const float* lse, float* delta,
                                      void* dq, void* dk, void* dv, AttentionDims dims, SegmentMask mask,
                                      float scale, cudaStream_t stream);

// The segment handoff (rmt_fast/ops/segment_handoff/reference.py) in its two halves, on contiguous tensors of any
// of the three dtypes. Outputs are fully written; no device-side checks.
struct HandoffArgs {
  int batch;
  int slots;        // m
  int width;        // d
  int hidden_seq;   // N_prev of hidden (gather)
  int seq;          // N of token_embeds (place)
  int read_offset;  // place: first read slot, 0 <= read_offset, read_offset + m <= seq
  const int32_t* gather_offsets;  // gather: [batch]
  const int32_t* write_offsets;   // place: [batch] first write slot of each row, or null (no write slots)
  DType hidden_dtype, memory_dtype, embeds_dtype;
};

// Gather: new_memory[b] = hidden[b, g_b : g_b + m] where g_b = gather_offsets[b] >= 0, else memory[b] (converted).
// hidden [B, N_prev, d] (hidden_dtype), memory [B, m, d] (memory_dtype) -> new_memory [B, m, d] (hidden_dtype).
// A gathered row at or past N_prev reads as NaN.
cudaError_t gather_memory_forward(const HandoffArgs& args, const void* hidden, const void* memory, void* new_memory,
                                  cudaStream_t stream);

// The gather's gradient: grad_new_memory [B, m, d] (hidden_dtype; null = zero) -> grad_hidden [B, N_prev, d]
// (hidden_dtype, the gathered rows, zero elsewhere) and grad_memory [B, m, d] (memory_dtype, the kept rows).
cudaError_t gather_memory_backward(const HandoffArgs& args, const void* grad_new_memory, void* grad_hidden,
                                   void* grad_memory, cudaStream_t stream);

// Place: embeds [B, N, d] (embeds_dtype) = token_embeds [B, N, d] (embeds_dtype) with memory [B, m, d]
// (memory_dtype, converted) at [read_offset, read_offset + m) and, with write_offsets, at [w_b, w_b + m).
// Write slots outside [0, seq) are skipped; where the two blocks overlap, the read slot's value is written.
cudaError_t place_memory_forward(const HandoffArgs& args, const void* memory, const void* token_embeds, void* embeds,
                                 cudaStream_t stream);

// The placement's gradient: grad_embeds [B, N, d] (embeds_dtype; null = zero) -> grad_memory [B, m, d]
// (memory_dtype, each slot's gradient summed over its read and write positions) and grad_token_embeds [B, N, d]
// (embeds_dtype, zero at every slot position).
cudaError_t place_memory_backward(const HandoffArgs& args, const void* grad_embeds, void* grad_memory,
                                  void* grad_token_embeds, cudaStream_t stream);

}  // namespace rmt_fast
