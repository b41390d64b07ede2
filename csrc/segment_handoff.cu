// Segment handoff (segment_handoff_ref): gather the new memory from the previous segment's hidden states
// and write it into the next segment's input embeddings, forward and backward.
//
// Memory-bound elementwise work: one fused grid-stride kernel per direction, one thread per element, the
// three tensor dtypes resolved at run time (fp32 / fp16 / bf16, bf16 by bit operations so sm_61 builds).
#include <math_constants.h>

#include "common.cuh"
#include "rmt_fast_kernels.h"

namespace rmt_fast {
namespace detail {
namespace {

constexpr int kHandoffThreads = 256;
constexpr int64_t kMaxHandoffBlocks = 1 << 16;

__device__ __forceinline__ DType new_memory_dtype(const HandoffArgs& a) {
  return a.has_hidden ? a.hidden_dtype : a.memory_dtype;
}

// Which memory slot (or -1) position n of row b of the next segment holds. Read slots win where the two
// blocks overlap (the reference's scatter leaves that choice unspecified).
__device__ __forceinline__ int slot_at(const HandoffArgs& a, int b, int n) {
  if (n >= a.read_offset && n < a.read_offset + a.slots) return n - a.read_offset;
  if (a.write_offsets != nullptr) {
    const int w = a.write_offsets[b];
    if (n >= w && n - w < a.slots) return n - w;
  }
  return -1;
}

// new_memory[b, s, c] as a float holding a value of new_memory's dtype.
__device__ __forceinline__ float new_memory_value(const HandoffArgs& a, const void* hidden, const void* memory,
                                                  int b, int s, int c) {
  if (a.has_hidden) {
    const int g = a.gather_offsets[b];
    if (g >= 0) {
      const int pos = g + s;
      if (pos >= a.hidden_seq) return CUDART_NAN_F;
      return load_as_float(hidden, a.hidden_dtype, (static_cast<int64_t>(b) * a.hidden_seq + pos) * a.width + c);
    }
  }
  const float x = load_as_float(memory, a.memory_dtype, (static_cast<int64_t>(b) * a.slots + s) * a.width + c);
  return round_to(new_memory_dtype(a), x);
}

// Elements [0, B*N*d) are embeds, then [B*N*d, B*N*d + B*m*d) new_memory.
__global__ void __launch_bounds__(kHandoffThreads)
    handoff_fwd_kernel(const HandoffArgs a, const void* hidden, const void* memory, const void* token_embeds,
                       void* new_memory, void* embeds) {
  const int64_t n_embeds = static_cast<int64_t>(a.batch) * a.seq * a.width;
  const int64_t total = n_embeds + static_cast<int64_t>(a.batch) * a.slots * a.width;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (idx < n_embeds) {
      const int c = static_cast<int>(idx % a.width);
      const int64_t bn = idx / a.width;
      const int n = static_cast<int>(bn % a.seq), b = static_cast<int>(bn / a.seq);
      const int s = slot_at(a, b, n);
      const float x = s >= 0 ? new_memory_value(a, hidden, memory, b, s, c)
                             : load_as_float(token_embeds, a.embeds_dtype, idx);
      store_from_float(embeds, a.embeds_dtype, idx, x);
    } else {
      const int64_t e = idx - n_embeds;
      const int c = static_cast<int>(e % a.width);
      const int64_t bs = e / a.width;
      const int s = static_cast<int>(bs % a.slots), b = static_cast<int>(bs / a.slots);
      store_from_float(new_memory, new_memory_dtype(a), e, new_memory_value(a, hidden, memory, b, s, c));
    }
  }
}

// d loss / d new_memory[b, s, c] in total: its own gradient plus those of the embeds slots it was written to.
__device__ __forceinline__ float slot_grad(const HandoffArgs& a, const void* grad_new_memory,
                                           const void* grad_embeds, int b, int s, int c) {
  float g = 0.f;
  if (grad_new_memory != nullptr)
    g = load_as_float(grad_new_memory, new_memory_dtype(a), (static_cast<int64_t>(b) * a.slots + s) * a.width + c);
  if (grad_embeds != nullptr) {
    const int64_t row = static_cast<int64_t>(b) * a.seq;
    g += load_as_float(grad_embeds, a.embeds_dtype, (row + a.read_offset + s) * a.width + c);
    if (a.write_offsets != nullptr) {
      const int w = a.write_offsets[b] + s;
      if (w >= 0 && w < a.seq) g += load_as_float(grad_embeds, a.embeds_dtype, (row + w) * a.width + c);
    }
  }
  return g;
}

// Elements: grad_token_embeds [B*N*d], then grad_memory [B*m*d], then grad_hidden [B*N_prev*d]; a null
// output's range is empty.
__global__ void __launch_bounds__(kHandoffThreads)
    handoff_bwd_kernel(const HandoffArgs a, const void* grad_new_memory, const void* grad_embeds,
                       void* grad_hidden, void* grad_memory, void* grad_token_embeds) {
  const int64_t n_embeds = grad_token_embeds != nullptr ? static_cast<int64_t>(a.batch) * a.seq * a.width : 0;
  const int64_t n_memory = grad_memory != nullptr ? static_cast<int64_t>(a.batch) * a.slots * a.width : 0;
  const int64_t n_hidden =
      (grad_hidden != nullptr && a.has_hidden) ? static_cast<int64_t>(a.batch) * a.hidden_seq * a.width : 0;
  const int64_t total = n_embeds + n_memory + n_hidden;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (idx < n_embeds) {
      const int64_t bn = idx / a.width;
      const int n = static_cast<int>(bn % a.seq), b = static_cast<int>(bn / a.seq);
      const bool overwritten = slot_at(a, b, n) >= 0;
      const float g = (overwritten || grad_embeds == nullptr) ? 0.f : load_as_float(grad_embeds, a.embeds_dtype, idx);
      store_from_float(grad_token_embeds, a.embeds_dtype, idx, g);
    } else if (idx < n_embeds + n_memory) {
      const int64_t e = idx - n_embeds;
      const int c = static_cast<int>(e % a.width);
      const int64_t bs = e / a.width;
      const int s = static_cast<int>(bs % a.slots), b = static_cast<int>(bs / a.slots);
      const bool kept = !a.has_hidden || a.gather_offsets[b] < 0;
      const float g = kept ? slot_grad(a, grad_new_memory, grad_embeds, b, s, c) : 0.f;
      store_from_float(grad_memory, a.memory_dtype, e, g);
    } else {
      const int64_t e = idx - n_embeds - n_memory;
      const int c = static_cast<int>(e % a.width);
      const int64_t bn = e / a.width;
      const int n = static_cast<int>(bn % a.hidden_seq), b = static_cast<int>(bn / a.hidden_seq);
      const int g0 = a.gather_offsets[b];
      const bool gathered = g0 >= 0 && n >= g0 && n - g0 < a.slots;
      const float g = gathered ? slot_grad(a, grad_new_memory, grad_embeds, b, n - g0, c) : 0.f;
      store_from_float(grad_hidden, a.hidden_dtype, e, g);
    }
  }
}

unsigned handoff_blocks(int64_t total) {
  const int64_t blocks = (total + kHandoffThreads - 1) / kHandoffThreads;
  return static_cast<unsigned>(blocks < kMaxHandoffBlocks ? blocks : kMaxHandoffBlocks);
}

cudaError_t check_handoff(const HandoffArgs& a) {
  if (a.batch < 0 || a.slots < 0 || a.width < 0 || a.seq < 0 || a.read_offset < 0 ||
      a.read_offset + a.slots > a.seq || (a.has_hidden && (a.hidden_seq < 0 || a.gather_offsets == nullptr)))
    return cudaErrorInvalidValue;
  return cudaSuccess;
}

}  // namespace
}  // namespace detail

cudaError_t segment_handoff_forward(const HandoffArgs& args, const void* hidden, const void* memory,
                                    const void* token_embeds, void* new_memory, void* embeds,
                                    cudaStream_t stream) {
  if (cudaError_t err = detail::check_handoff(args); err != cudaSuccess) return err;
  const int64_t total = static_cast<int64_t>(args.batch) * (args.seq + args.slots) * args.width;
  if (total == 0) return cudaSuccess;
  detail::handoff_fwd_kernel<<<detail::handoff_blocks(total), detail::kHandoffThreads, 0, stream>>>(
      args, hidden, memory, token_embeds, new_memory, embeds);
  return cudaGetLastError();
}

cudaError_t segment_handoff_backward(const HandoffArgs& args, const void* grad_new_memory,
                                     const void* grad_embeds, void* grad_hidden, void* grad_memory,
                                     void* grad_token_embeds, cudaStream_t stream) {
  if (cudaError_t err = detail::check_handoff(args); err != cudaSuccess) return err;
  const int64_t rows = (grad_token_embeds != nullptr ? args.seq : 0) + (grad_memory != nullptr ? args.slots : 0) +
                       (grad_hidden != nullptr && args.has_hidden ? args.hidden_seq : 0);
  const int64_t total = static_cast<int64_t>(args.batch) * rows * args.width;
  if (total == 0) return cudaSuccess;
  detail::handoff_bwd_kernel<<<detail::handoff_blocks(total), detail::kHandoffThreads, 0, stream>>>(
      args, grad_new_memory, grad_embeds, grad_hidden, grad_memory, grad_token_embeds);
  return cudaGetLastError();
}

}  // namespace rmt_fast
