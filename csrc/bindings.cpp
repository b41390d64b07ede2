// rmt_fast._C: the only translation unit that sees torch. Checks arguments, allocates outputs and calls the
// torch-free launchers of rmt_fast_kernels.h on the current CUDA stream. Autograd and the torch.library custom ops
// live in rmt_fast/ops/memory_attention/__init__.py and rmt_fast/ops/segment_handoff/__init__.py.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <optional>
#include <vector>

#include "rmt_fast_kernels.h"

namespace {

using at::Tensor;

rmt_fast::DType kernel_dtype(at::ScalarType st, const char* name) {
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, name,
              " must be float32, float16 or bfloat16, got ", st);
  return st == at::kFloat ? rmt_fast::DType::kFloat32
                          : (st == at::kHalf ? rmt_fast::DType::kFloat16 : rmt_fast::DType::kBFloat16);
}

rmt_fast::DType kernel_dtype(const Tensor& t, const char* name) { return kernel_dtype(t.scalar_type(), name); }

void check_cuda(const Tensor& t, const Tensor& like, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), ", expected ", like.device());
}

// The kernels need a contiguous last dimension; everything else is read through strides.
Tensor last_dim_contiguous(const Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

rmt_fast::Strides3 strides_of(const Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// An index tensor as contiguous int32 on `like`'s device.
Tensor index_tensor(const Tensor& t, const Tensor& like, const char* name, int64_t batch) {
  TORCH_CHECK(!at::isFloatingType(t.scalar_type()) && t.scalar_type() != at::kBool, name,
              " must hold integers, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == batch, name, " must have shape [", batch, "], got ", t.sizes());
  return t.to(like.device(), at::kInt).contiguous();
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "rmt_fast: ", what, " failed: ", cudaGetErrorString(err));
}

struct AttentionCall {
  rmt_fast::DType dtype;
  rmt_fast::AttentionDims dims;
  rmt_fast::SegmentMask mask;
  Tensor seq_lens;    // keep the int32 copies alive while the kernels are enqueued
  Tensor cache_lens;  // undefined without per-row cache lengths
};

// k/v hold num_cache short-term cache positions before the segment's N (see SegmentMask).
AttentionCall attention_call(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& seq_lens,
                             int64_t num_read, int64_t num_write, bool causal, bool memory_bidirectional,
                             int64_t num_cache, const std::optional<Tensor>& cache_lens) {
  check_cuda(q, q, "q");
  check_cuda(k, q, "k");
  check_cuda(v, q, "v");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be 4-D [B, H, N, D]");
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v must have the same shape, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(num_cache >= 0 && num_cache <= INT32_MAX - q.size(2), "num_cache must be >= 0, got ", num_cache);
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(2) == q.size(2) + num_cache && k.size(3) == q.size(3),
              "k/v shape ", k.sizes(), " does not match q ", q.sizes(), " in B, N (+ num_cache=", num_cache,
              ") or D");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "q heads (", q.size(1),
              ") must be a multiple of k/v heads (", k.size(1), ")");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "q, k, v must share a dtype");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kHalf,
              "the CUDA attention kernels take float32 or float16, got ", q.scalar_type());
  TORCH_CHECK(q.size(3) >= 1 && q.size(3) <= rmt_fast::kMaxHeadDim, "head dim must be in [1, ",
              rmt_fast::kMaxHeadDim, "], got ", q.size(3));
  TORCH_CHECK(q.size(0) <= 65535 && q.size(1) <= 65535 && q.size(2) <= INT32_MAX,
              "batch and heads must be <= 65535 for the CUDA kernels");
  TORCH_CHECK(num_read >= 0 && num_write >= 0, "num_read and num_write must be >= 0");
  AttentionCall call;
  call.dtype = kernel_dtype(q, "q");
  call.dims = {static_cast<int>(q.size(0)), static_cast<int>(q.size(1)), static_cast<int>(k.size(1)),
               static_cast<int>(q.size(2)), static_cast<int>(q.size(3))};
  call.seq_lens = index_tensor(seq_lens, q, "seq_lens", q.size(0));
  const int32_t* cache_lens_ptr = nullptr;
  if (cache_lens.has_value() && num_cache > 0) {
    call.cache_lens = index_tensor(*cache_lens, q, "cache_lens", q.size(0));
    cache_lens_ptr = call.cache_lens.data_ptr<int32_t>();
  }
  call.mask = {call.seq_lens.data_ptr<int32_t>(), static_cast<int>(num_read), static_cast<int>(num_write), causal,
               memory_bidirectional, static_cast<int>(num_cache), cache_lens_ptr};
  return call;
}

// Returns (out [B, Hq, N, D] in q's dtype, lse [B, Hq, N] fp32, base-2, for the backward).
std::vector<Tensor> memory_attention_fwd(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                         const Tensor& seq_lens, int64_t num_read, int64_t num_write, bool causal,
                                         bool memory_bidirectional, double scale, int64_t num_cache,
                                         const std::optional<Tensor>& cache_lens) {
  const Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  AttentionCall call = attention_call(q, k, v, seq_lens, num_read, num_write, causal, memory_bidirectional,
                                      num_cache, cache_lens);
  const c10::cuda::CUDAGuard guard(q.device());
  Tensor out = at::empty(q.sizes(), q.options());
  Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  check_launch(rmt_fast::memory_attention_forward(call.dtype, q.data_ptr(), strides_of(q), k.data_ptr(),
                                                  strides_of(k), v.data_ptr(), strides_of(v), out.data_ptr(),
                                                  lse.data_ptr<float>(), call.dims, call.mask,
                                                  static_cast<float>(scale), c10::cuda::getCurrentCUDAStream()),
               "memory_attention_forward");
  return {out, lse};
}

// Returns (dq, dk, dv) shaped and typed like q, k, v.
std::vector<Tensor> memory_attention_bwd(const Tensor& dout_in, const Tensor& q_in, const Tensor& k_in,
                                         const Tensor& v_in, const Tensor& out_in, const Tensor& lse_in,
                                         const Tensor& seq_lens, int64_t num_read, int64_t num_write, bool causal,
                                         bool memory_bidirectional, double scale, int64_t num_cache,
                                         const std::optional<Tensor>& cache_lens) {
  const Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  AttentionCall call = attention_call(q, k, v, seq_lens, num_read, num_write, causal, memory_bidirectional,
                                      num_cache, cache_lens);
  check_cuda(dout_in, q, "dout");
  check_cuda(out_in, q, "out");
  check_cuda(lse_in, q, "lse");
  TORCH_CHECK(dout_in.sizes() == q.sizes() && out_in.sizes() == q.sizes(), "dout and out must be shaped like q");
  TORCH_CHECK(dout_in.scalar_type() == q.scalar_type() && out_in.scalar_type() == q.scalar_type(),
              "dout and out must have q's dtype");
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat && lse_in.dim() == 3 && lse_in.size(0) == q.size(0) &&
                  lse_in.size(1) == q.size(1) && lse_in.size(2) == q.size(2),
              "lse must be the float32 [B, Hq, N] of memory_attention_fwd");
  const Tensor dout = last_dim_contiguous(dout_in), out = out_in.contiguous(), lse = lse_in.contiguous();
  const c10::cuda::CUDAGuard guard(q.device());
  Tensor delta = at::empty_like(lse);
  Tensor dq = at::empty(q.sizes(), q.options());
  Tensor dk = at::empty(k.sizes(), k.options());
  Tensor dv = at::empty(v.sizes(), v.options());
  check_launch(rmt_fast::memory_attention_backward(
                   call.dtype, dout.data_ptr(), strides_of(dout), q.data_ptr(), strides_of(q), k.data_ptr(),
                   strides_of(k), v.data_ptr(), strides_of(v), out.data_ptr(), lse.data_ptr<float>(),
                   delta.data_ptr<float>(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), call.dims, call.mask,
                   static_cast<float>(scale), c10::cuda::getCurrentCUDAStream()),
               "memory_attention_backward");
  return {dq, dk, dv};
}

void check_handoff_dims(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 3, name, " must be 3-D [B, rows, d], got ", t.sizes());
  TORCH_CHECK(t.size(0) <= INT32_MAX && t.size(1) <= INT32_MAX && t.size(2) <= INT32_MAX &&
                  t.size(0) * t.size(1) <= INT32_MAX,
              name, ": B * rows and d must be < 2^31 for the CUDA kernels, got ", t.sizes());
}

rmt_fast::HandoffArgs handoff_args(const Tensor& memory) {
  rmt_fast::HandoffArgs a{};
  a.batch = static_cast<int>(memory.size(0));
  a.slots = static_cast<int>(memory.size(1));
  a.width = static_cast<int>(memory.size(2));
  return a;
}

// new_memory [B, m, d] in hidden's dtype: hidden[b, g_b : g_b + m], or memory[b] where g_b < 0.
Tensor gather_memory_fwd(const Tensor& hidden_in, const Tensor& memory_in, const Tensor& gather_offsets) {
  check_cuda(hidden_in, hidden_in, "hidden");
  check_cuda(memory_in, hidden_in, "memory");
  check_handoff_dims(hidden_in, "hidden");
  check_handoff_dims(memory_in, "memory");
  TORCH_CHECK(hidden_in.size(0) == memory_in.size(0) && hidden_in.size(2) == memory_in.size(2), "hidden ",
              hidden_in.sizes(), " does not match memory ", memory_in.sizes(), " in B or d");
  const Tensor hidden = hidden_in.contiguous(), memory = memory_in.contiguous();
  const c10::cuda::CUDAGuard guard(hidden.device());
  rmt_fast::HandoffArgs a = handoff_args(memory);
  a.hidden_seq = static_cast<int>(hidden.size(1));
  a.hidden_dtype = kernel_dtype(hidden, "hidden");
  a.memory_dtype = kernel_dtype(memory, "memory");
  const Tensor gather = index_tensor(gather_offsets, hidden, "gather_offsets", a.batch);
  a.gather_offsets = gather.data_ptr<int32_t>();
  Tensor new_memory = at::empty(memory.sizes(), hidden.options());
  check_launch(rmt_fast::gather_memory_forward(a, hidden.data_ptr(), memory.data_ptr(), new_memory.data_ptr(),
                                               c10::cuda::getCurrentCUDAStream()),
               "gather_memory_forward");
  return new_memory;
}

// (grad_hidden [B, hidden_seq, d] of hidden_dtype, grad_memory [B, m, d] of memory_dtype) for grad [B, m, d].
std::vector<Tensor> gather_memory_bwd(const Tensor& grad_in, const Tensor& gather_offsets, int64_t hidden_seq,
                                      at::ScalarType hidden_dtype, at::ScalarType memory_dtype) {
  check_cuda(grad_in, grad_in, "grad");
  check_handoff_dims(grad_in, "grad");
  TORCH_CHECK(grad_in.scalar_type() == hidden_dtype, "grad must have hidden's dtype ", hidden_dtype, ", got ",
              grad_in.scalar_type());
  TORCH_CHECK(hidden_seq >= 0 && grad_in.size(0) * hidden_seq <= INT32_MAX, "hidden_seq out of range");
  const Tensor grad = grad_in.contiguous();
  const c10::cuda::CUDAGuard guard(grad.device());
  rmt_fast::HandoffArgs a = handoff_args(grad);
  a.hidden_seq = static_cast<int>(hidden_seq);
  a.hidden_dtype = kernel_dtype(hidden_dtype, "hidden_dtype");
  a.memory_dtype = kernel_dtype(memory_dtype, "memory_dtype");
  const Tensor gather = index_tensor(gather_offsets, grad, "gather_offsets", a.batch);
  a.gather_offsets = gather.data_ptr<int32_t>();
  Tensor grad_hidden = at::empty({grad.size(0), hidden_seq, grad.size(2)}, grad.options().dtype(hidden_dtype));
  Tensor grad_memory = at::empty(grad.sizes(), grad.options().dtype(memory_dtype));
  check_launch(rmt_fast::gather_memory_backward(a, grad.data_ptr(), grad_hidden.data_ptr(), grad_memory.data_ptr(),
                                                c10::cuda::getCurrentCUDAStream()),
               "gather_memory_backward");
  return {grad_hidden, grad_memory};
}

// embeds [B, N, d] in token_embeds' dtype: token_embeds with memory at the read slots and the write slots.
Tensor place_memory_fwd(const Tensor& memory_in, const Tensor& token_embeds_in, int64_t read_offset,
                        const std::optional<Tensor>& write_offsets) {
  check_cuda(token_embeds_in, token_embeds_in, "token_embeds");
  check_cuda(memory_in, token_embeds_in, "memory");
  check_handoff_dims(token_embeds_in, "token_embeds");
  check_handoff_dims(memory_in, "memory");
  TORCH_CHECK(token_embeds_in.size(0) == memory_in.size(0) && token_embeds_in.size(2) == memory_in.size(2),
              "token_embeds ", token_embeds_in.sizes(), " does not match memory ", memory_in.sizes(), " in B or d");
  TORCH_CHECK(read_offset >= 0 && read_offset + memory_in.size(1) <= token_embeds_in.size(1), "read_offset (",
              read_offset, ") + m (", memory_in.size(1), ") must lie in token_embeds' ", token_embeds_in.size(1),
              " positions");
  const Tensor memory = memory_in.contiguous(), token_embeds = token_embeds_in.contiguous();
  const c10::cuda::CUDAGuard guard(token_embeds.device());
  rmt_fast::HandoffArgs a = handoff_args(memory);
  a.seq = static_cast<int>(token_embeds.size(1));
  a.read_offset = static_cast<int>(read_offset);
  a.memory_dtype = kernel_dtype(memory, "memory");
  a.embeds_dtype = kernel_dtype(token_embeds, "token_embeds");
  Tensor write;
  if (write_offsets) {
    write = index_tensor(*write_offsets, token_embeds, "write_offsets", a.batch);
    a.write_offsets = write.data_ptr<int32_t>();
  }
  Tensor embeds = at::empty(token_embeds.sizes(), token_embeds.options());
  check_launch(rmt_fast::place_memory_forward(a, memory.data_ptr(), token_embeds.data_ptr(), embeds.data_ptr(),
                                              c10::cuda::getCurrentCUDAStream()),
               "place_memory_forward");
  return embeds;
}

// (grad_memory [B, slots, d] of memory_dtype, grad_token_embeds [B, N, d]) for grad [B, N, d].
std::vector<Tensor> place_memory_bwd(const Tensor& grad_in, int64_t read_offset,
                                     const std::optional<Tensor>& write_offsets, int64_t slots,
                                     at::ScalarType memory_dtype) {
  check_cuda(grad_in, grad_in, "grad");
  check_handoff_dims(grad_in, "grad");
  TORCH_CHECK(slots >= 0 && read_offset >= 0 && read_offset + slots <= grad_in.size(1), "read_offset (", read_offset,
              ") + slots (", slots, ") must lie in the ", grad_in.size(1), " positions");
  const Tensor grad = grad_in.contiguous();
  const c10::cuda::CUDAGuard guard(grad.device());
  rmt_fast::HandoffArgs a{};
  a.batch = static_cast<int>(grad.size(0));
  a.slots = static_cast<int>(slots);
  a.width = static_cast<int>(grad.size(2));
  a.seq = static_cast<int>(grad.size(1));
  a.read_offset = static_cast<int>(read_offset);
  a.memory_dtype = kernel_dtype(memory_dtype, "memory_dtype");
  a.embeds_dtype = kernel_dtype(grad, "grad");
  Tensor write;
  if (write_offsets) {
    write = index_tensor(*write_offsets, grad, "write_offsets", a.batch);
    a.write_offsets = write.data_ptr<int32_t>();
  }
  Tensor grad_memory = at::empty({grad.size(0), slots, grad.size(2)}, grad.options().dtype(memory_dtype));
  Tensor grad_token_embeds = at::empty(grad.sizes(), grad.options());
  check_launch(rmt_fast::place_memory_backward(a, grad.data_ptr(), grad_memory.data_ptr(),
                                               grad_token_embeds.data_ptr(), c10::cuda::getCurrentCUDAStream()),
               "place_memory_backward");
  return {grad_memory, grad_token_embeds};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rmt_fast CUDA kernels (sm_61+): memory attention and segment handoff";
  m.def("memory_attention_fwd", &memory_attention_fwd, "memory attention forward -> (out, lse)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("seq_lens"), py::arg("num_read"), py::arg("num_write"),
        py::arg("causal"), py::arg("memory_bidirectional"), py::arg("scale"), py::arg("num_cache") = 0,
        py::arg("cache_lens") = py::none());
  m.def("memory_attention_bwd", &memory_attention_bwd, "memory attention backward -> (dq, dk, dv)",
        py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"),
        py::arg("seq_lens"), py::arg("num_read"), py::arg("num_write"), py::arg("causal"),
        py::arg("memory_bidirectional"), py::arg("scale"), py::arg("num_cache") = 0,
        py::arg("cache_lens") = py::none());
  m.def("gather_memory_fwd", &gather_memory_fwd, "segment handoff, gather half -> new_memory", py::arg("hidden"),
        py::arg("memory"), py::arg("gather_offsets"));
  m.def("gather_memory_bwd", &gather_memory_bwd, "gather half backward -> (grad_hidden, grad_memory)",
        py::arg("grad"), py::arg("gather_offsets"), py::arg("hidden_seq"), py::arg("hidden_dtype"),
        py::arg("memory_dtype"));
  m.def("place_memory_fwd", &place_memory_fwd, "segment handoff, place half -> embeds", py::arg("memory"),
        py::arg("token_embeds"), py::arg("read_offset"), py::arg("write_offsets"));
  m.def("place_memory_bwd", &place_memory_bwd, "place half backward -> (grad_memory, grad_token_embeds)",
        py::arg("grad"), py::arg("read_offset"), py::arg("write_offsets"), py::arg("slots"), py::arg("memory_dtype"));
}
