// rmt_fast._C: the only translation unit that sees torch. Checks arguments, allocates outputs and calls the
// torch-free launchers of rmt_fast_kernels.h on the current CUDA stream. Autograd lives in rmt_fast/ops/cuda.py.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <optional>
#include <vector>

#include "rmt_fast_kernels.h"

namespace {

using at::Tensor;

rmt_fast::DType kernel_dtype(const Tensor& t, const char* name) {
  const at::ScalarType st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, name,
              " must be float32, float16 or bfloat16, got ", st);
  return st == at::kFloat ? rmt_fast::DType::kFloat32
                          : (st == at::kHalf ? rmt_fast::DType::kFloat16 : rmt_fast::DType::kBFloat16);
}

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
  Tensor seq_lens;  // keeps the int32 copy alive while the kernels are enqueued
};

AttentionCall attention_call(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& seq_lens,
                             int64_t num_read, int64_t num_write, bool causal, bool memory_bidirectional) {
  check_cuda(q, q, "q");
  check_cuda(k, q, "k");
  check_cuda(v, q, "v");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be 4-D [B, H, N, D]");
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v must have the same shape, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(2) == q.size(2) && k.size(3) == q.size(3), "k/v shape ",
              k.sizes(), " does not match q ", q.sizes(), " in B, N or D");
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
  call.mask = {call.seq_lens.data_ptr<int32_t>(), static_cast<int>(num_read), static_cast<int>(num_write), causal,
               memory_bidirectional};
  return call;
}

// Returns (out [B, Hq, N, D] in q's dtype, lse [B, Hq, N] fp32, base-2, for the backward).
std::vector<Tensor> memory_attention_fwd(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                         const Tensor& seq_lens, int64_t num_read, int64_t num_write, bool causal,
                                         bool memory_bidirectional, double scale) {
  const Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  AttentionCall call = attention_call(q, k, v, seq_lens, num_read, num_write, causal, memory_bidirectional);
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
                                         bool memory_bidirectional, double scale) {
  const Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  AttentionCall call = attention_call(q, k, v, seq_lens, num_read, num_write, causal, memory_bidirectional);
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

rmt_fast::HandoffArgs handoff_args(const std::optional<Tensor>& hidden, const Tensor& memory,
                                   const Tensor& token_embeds, int64_t read_offset) {
  TORCH_CHECK(memory.dim() == 3 && token_embeds.dim() == 3, "memory must be [B, m, d] and token_embeds [B, N, d]");
  TORCH_CHECK(token_embeds.size(0) == memory.size(0) && token_embeds.size(2) == memory.size(2),
              "token_embeds ", token_embeds.sizes(), " does not match memory ", memory.sizes(), " in B or d");
  TORCH_CHECK(read_offset >= 0 && read_offset + memory.size(1) <= token_embeds.size(1), "read_offset (",
              read_offset, ") + m (", memory.size(1), ") must lie in token_embeds' ", token_embeds.size(1),
              " positions");
  TORCH_CHECK(token_embeds.size(0) <= INT32_MAX && token_embeds.size(1) <= INT32_MAX &&
                  token_embeds.size(2) <= INT32_MAX && (!hidden || hidden->size(1) <= INT32_MAX),
              "every dimension must be < 2^31 for the CUDA kernels");
  rmt_fast::HandoffArgs a{};
  a.batch = static_cast<int>(memory.size(0));
  a.slots = static_cast<int>(memory.size(1));
  a.width = static_cast<int>(memory.size(2));
  a.seq = static_cast<int>(token_embeds.size(1));
  a.read_offset = static_cast<int>(read_offset);
  a.has_hidden = hidden.has_value();
  a.memory_dtype = kernel_dtype(memory, "memory");
  a.embeds_dtype = kernel_dtype(token_embeds, "token_embeds");
  a.hidden_dtype = a.memory_dtype;
  if (hidden) {
    TORCH_CHECK(hidden->dim() == 3 && hidden->size(0) == memory.size(0) && hidden->size(2) == memory.size(2),
                "hidden must be [B, N_prev, d] matching memory ", memory.sizes(), ", got ", hidden->sizes());
    a.hidden_seq = static_cast<int>(hidden->size(1));
    a.hidden_dtype = kernel_dtype(*hidden, "hidden");
  }
  return a;
}

// Returns (new_memory [B, m, d] in hidden's dtype (memory's without hidden), embeds [B, N, d]).
std::vector<Tensor> segment_handoff_fwd(const std::optional<Tensor>& hidden_in, const Tensor& memory_in,
                                        const std::optional<Tensor>& gather_offsets, const Tensor& token_embeds_in,
                                        int64_t read_offset, const std::optional<Tensor>& write_offsets) {
  check_cuda(token_embeds_in, token_embeds_in, "token_embeds");
  check_cuda(memory_in, token_embeds_in, "memory");
  const Tensor memory = memory_in.contiguous(), token_embeds = token_embeds_in.contiguous();
  std::optional<Tensor> hidden;
  if (hidden_in) {
    check_cuda(*hidden_in, token_embeds, "hidden");
    TORCH_CHECK(gather_offsets.has_value(), "gather_offsets is required when hidden is given");
    hidden = hidden_in->contiguous();
  }
  rmt_fast::HandoffArgs a = handoff_args(hidden, memory, token_embeds, read_offset);
  const c10::cuda::CUDAGuard guard(token_embeds.device());
  Tensor gather, write;
  if (hidden) {
    gather = index_tensor(*gather_offsets, token_embeds, "gather_offsets", a.batch);
    a.gather_offsets = gather.data_ptr<int32_t>();
  }
  if (write_offsets) {
    write = index_tensor(*write_offsets, token_embeds, "write_offsets", a.batch);
    a.write_offsets = write.data_ptr<int32_t>();
  }
  Tensor new_memory = at::empty(memory.sizes(), memory.options().dtype(hidden ? hidden->scalar_type()
                                                                                : memory.scalar_type()));
  Tensor embeds = at::empty(token_embeds.sizes(), token_embeds.options());
  check_launch(rmt_fast::segment_handoff_forward(a, hidden ? hidden->data_ptr() : nullptr, memory.data_ptr(),
                                                 token_embeds.data_ptr(), new_memory.data_ptr(), embeds.data_ptr(),
                                                 c10::cuda::getCurrentCUDAStream()),
               "segment_handoff_forward");
  return {new_memory, embeds};
}

// Writes the wanted gradients into preallocated contiguous outputs; an output passed as None is not wanted,
// a gradient passed as None is zero. dims = (B, m, d, N_prev, N); dtypes = codes (0 fp32, 1 fp16, 2 bf16) of
// (hidden, memory, token_embeds); the forward had hidden iff gather_offsets is given.
void segment_handoff_bwd(const std::optional<Tensor>& grad_new_memory_in, const std::optional<Tensor>& grad_embeds_in,
                         const std::optional<Tensor>& gather_offsets, const std::optional<Tensor>& write_offsets,
                         int64_t read_offset, std::vector<int64_t> dims, std::vector<int64_t> dtypes,
                         const std::optional<Tensor>& grad_hidden, const std::optional<Tensor>& grad_memory,
                         const std::optional<Tensor>& grad_token_embeds) {
  TORCH_CHECK(dims.size() == 5 && dtypes.size() == 3, "dims must be (B, m, d, N_prev, N), dtypes 3 codes");
  for (int64_t c : dtypes) TORCH_CHECK(c >= 0 && c <= 2, "dtype codes are 0 (fp32), 1 (fp16), 2 (bf16)");
  rmt_fast::HandoffArgs a{};
  a.batch = static_cast<int>(dims[0]);
  a.slots = static_cast<int>(dims[1]);
  a.width = static_cast<int>(dims[2]);
  a.hidden_seq = static_cast<int>(dims[3]);
  a.seq = static_cast<int>(dims[4]);
  a.read_offset = static_cast<int>(read_offset);
  a.has_hidden = gather_offsets.has_value();
  a.hidden_dtype = static_cast<rmt_fast::DType>(dtypes[0]);
  a.memory_dtype = static_cast<rmt_fast::DType>(dtypes[1]);
  a.embeds_dtype = static_cast<rmt_fast::DType>(dtypes[2]);
  TORCH_CHECK(read_offset >= 0 && read_offset + a.slots <= a.seq, "read_offset out of range");

  // Every tensor argument must sit on one CUDA device; take it from the first one present.
  std::optional<Tensor> anchor;
  for (const auto* t : {&grad_memory, &grad_token_embeds, &grad_hidden, &grad_new_memory_in, &grad_embeds_in})
    if (t->has_value() && !anchor) anchor = **t;
  if (!anchor) return;  // nothing wanted
  check_cuda(*anchor, *anchor, "gradient");
  const c10::cuda::CUDAGuard guard(anchor->device());

  auto check_out = [&](const std::optional<Tensor>& t, std::vector<int64_t> shape, rmt_fast::DType dt,
                       const char* name) -> void* {
    if (!t) return nullptr;
    check_cuda(*t, *anchor, name);
    TORCH_CHECK(t->is_contiguous() && t->sizes() == at::IntArrayRef(shape) && kernel_dtype(*t, name) == dt, name,
                " must be a contiguous ", at::IntArrayRef(shape), " tensor of the declared dtype");
    return t->data_ptr();
  };
  const rmt_fast::DType new_dtype = a.has_hidden ? a.hidden_dtype : a.memory_dtype;
  Tensor grad_new_memory, grad_embeds;
  if (grad_new_memory_in) {
    check_cuda(*grad_new_memory_in, *anchor, "grad_new_memory");
    grad_new_memory = grad_new_memory_in->contiguous();
    check_out(grad_new_memory, {a.batch, a.slots, a.width}, new_dtype, "grad_new_memory");
  }
  if (grad_embeds_in) {
    check_cuda(*grad_embeds_in, *anchor, "grad_embeds");
    grad_embeds = grad_embeds_in->contiguous();
    check_out(grad_embeds, {a.batch, a.seq, a.width}, a.embeds_dtype, "grad_embeds");
  }
  void* gh = a.has_hidden ? check_out(grad_hidden, {a.batch, a.hidden_seq, a.width}, a.hidden_dtype, "grad_hidden")
                          : nullptr;
  void* gm = check_out(grad_memory, {a.batch, a.slots, a.width}, a.memory_dtype, "grad_memory");
  void* ge = check_out(grad_token_embeds, {a.batch, a.seq, a.width}, a.embeds_dtype, "grad_token_embeds");
  Tensor gather, write;
  if (gather_offsets) {
    gather = index_tensor(*gather_offsets, *anchor, "gather_offsets", a.batch);
    a.gather_offsets = gather.data_ptr<int32_t>();
  }
  if (write_offsets) {
    write = index_tensor(*write_offsets, *anchor, "write_offsets", a.batch);
    a.write_offsets = write.data_ptr<int32_t>();
  }
  check_launch(rmt_fast::segment_handoff_backward(a, grad_new_memory.defined() ? grad_new_memory.data_ptr() : nullptr,
                                                  grad_embeds.defined() ? grad_embeds.data_ptr() : nullptr, gh, gm, ge,
                                                  c10::cuda::getCurrentCUDAStream()),
               "segment_handoff_backward");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rmt_fast CUDA kernels (sm_61+): memory attention and segment handoff";
  m.def("memory_attention_fwd", &memory_attention_fwd, "memory attention forward -> (out, lse)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("seq_lens"), py::arg("num_read"), py::arg("num_write"),
        py::arg("causal"), py::arg("memory_bidirectional"), py::arg("scale"));
  m.def("memory_attention_bwd", &memory_attention_bwd, "memory attention backward -> (dq, dk, dv)",
        py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"),
        py::arg("seq_lens"), py::arg("num_read"), py::arg("num_write"), py::arg("causal"),
        py::arg("memory_bidirectional"), py::arg("scale"));
  m.def("segment_handoff_fwd", &segment_handoff_fwd, "segment handoff forward -> (new_memory, embeds)",
        py::arg("hidden"), py::arg("memory"), py::arg("gather_offsets"), py::arg("token_embeds"),
        py::arg("read_offset"), py::arg("write_offsets"));
  m.def("segment_handoff_bwd", &segment_handoff_bwd, "segment handoff backward, into preallocated gradients",
        py::arg("grad_new_memory"), py::arg("grad_embeds"), py::arg("gather_offsets"), py::arg("write_offsets"),
        py::arg("read_offset"), py::arg("dims"), py::arg("dtypes"), py::arg("grad_hidden"), py::arg("grad_memory"),
        py::arg("grad_token_embeds"));
}
