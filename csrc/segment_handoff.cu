// Segment handoff (rmt_fast/ops/segment_handoff/reference.py), in two halves with a backward each: gather the new
// memory from the previous segment's hidden states; place a memory into the next segment's input embeddings.
//
// Memory-bound copies. Every output row is one copy of a source row (converted between fp32 / fp16 / bf16, the
// dtypes resolved at run time), the sum of two source rows (gradients of a slot placed twice), or a constant.
// One kernel per direction and half, a grid over (row, chunk of the row): each thread moves VEC elements with
// 16-byte accesses (VEC = 16 bytes of the narrowest dtype involved) when every pointer and the row width allow,
// else with narrower ones. Index arithmetic is 32-bit per row, 64-bit only for the row's element offset.
#include <math_constants.h>

#include <cstdint>
#include <initializer_list>

#include "common.cuh"
#include "rmt_fast_kernels.h"

namespace rmt_fast {
namespace detail {
namespace {

constexpr int kHandoffThreads = 256;

__host__ __device__ __forceinline__ int element_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Elements [col, col + VEC) of a row as floats; the row and col are aligned to the pack (checked on the host).
template <int VEC>
__device__ __forceinline__ void load_pack(const void* row, DType t, int col, float (&x)[VEC]) {
  if (t == DType::kFloat32) {
    const Pack<float, VEC> p = *reinterpret_cast<const Pack<float, VEC>*>(static_cast<const float*>(row) + col);
#pragma unroll
    for (int i = 0; i < VEC; ++i) x[i] = p.v[i];
  } else {
    const Pack<uint16_t, VEC> p =
        *reinterpret_cast<const Pack<uint16_t, VEC>*>(static_cast<const uint16_t*>(row) + col);
#pragma unroll
    for (int i = 0; i < VEC; ++i)
      x[i] = t == DType::kFloat16 ? __half2float(__ushort_as_half(p.v[i])) : bf16_bits_to_float(p.v[i]);
  }
}

template <int VEC>
__device__ __forceinline__ void store_pack(void* row, DType t, int col, const float (&x)[VEC]) {
  if (t == DType::kFloat32) {
    Pack<float, VEC> p;
#pragma unroll
    for (int i = 0; i < VEC; ++i) p.v[i] = x[i];
    *reinterpret_cast<Pack<float, VEC>*>(static_cast<float*>(row) + col) = p;
  } else {
    Pack<uint16_t, VEC> p;
#pragma unroll
    for (int i = 0; i < VEC; ++i)
      p.v[i] = t == DType::kFloat16 ? __half_as_ushort(__float2half_rn(x[i])) : float_to_bf16_bits(x[i]);
    *reinterpret_cast<Pack<uint16_t, VEC>*>(static_cast<uint16_t*>(row) + col) = p;
  }
}

// Elements [col, col + VEC) copied bit for bit between two rows of dtype t.
template <int VEC>
__device__ __forceinline__ void copy_pack(const void* src, void* dst, DType t, int col) {
  if (t == DType::kFloat32) {
    *reinterpret_cast<Pack<float, VEC>*>(static_cast<float*>(dst) + col) =
        *reinterpret_cast<const Pack<float, VEC>*>(static_cast<const float*>(src) + col);
  } else {
    *reinterpret_cast<Pack<uint16_t, VEC>*>(static_cast<uint16_t*>(dst) + col) =
        *reinterpret_cast<const Pack<uint16_t, VEC>*>(static_cast<const uint16_t*>(src) + col);
  }
}

// What one output row is: src0 (+ src1), or `fill` everywhere when src0 is null.
struct RowCopy {
  void* dst;
  DType dst_type;
  const void* src0 = nullptr;
  DType src0_type = DType::kFloat32;
  const void* src1 = nullptr;
  DType src1_type = DType::kFloat32;
  float fill = 0.f;
};

__device__ __forceinline__ const void* row_at(const void* base, DType t, int64_t row, int width) {
  return static_cast<const char*>(base) + row * width * element_size(t);
}

__device__ __forceinline__ void* row_at(void* base, DType t, int64_t row, int width) {
  return static_cast<char*>(base) + row * width * element_size(t);
}

// Which memory slot (or -1) position n of row b holds after the placement. Read slots win where the two blocks
// overlap (the reference leaves that case unspecified).
__device__ __forceinline__ int slot_at(const HandoffArgs& a, int b, int n) {
  if (n >= a.read_offset && n < a.read_offset + a.slots) return n - a.read_offset;
  if (a.write_offsets != nullptr) {
    const int w = a.write_offsets[b];
    if (n >= w && n - w < a.slots) return n - w;
  }
  return -1;
}

// Rows [0, B*m): new_memory.
struct GatherForward {
  HandoffArgs a;
  const void* hidden;
  const void* memory;
  void* new_memory;

  __device__ RowCopy row(int r) const {
    const int b = r / a.slots, s = r - b * a.slots;
    const int g = a.gather_offsets[b];
    RowCopy c{row_at(new_memory, a.hidden_dtype, r, a.width), a.hidden_dtype};
    if (g < 0) {
      c.src0 = row_at(memory, a.memory_dtype, r, a.width);
      c.src0_type = a.memory_dtype;
    } else if (g + s < a.hidden_seq) {
      c.src0 = row_at(hidden, a.hidden_dtype, static_cast<int64_t>(b) * a.hidden_seq + g + s, a.width);
      c.src0_type = a.hidden_dtype;
    } else {
      c.fill = CUDART_NAN_F;  // past the end of hidden
    }
    return c;
  }
};

// Rows [0, B*N_prev): grad_hidden, then [B*N_prev, B*N_prev + B*m): grad_memory.
struct GatherBackward {
  HandoffArgs a;
  const void* grad_new_memory;  // hidden_dtype, or null (zero)
  void* grad_hidden;
  void* grad_memory;

  __device__ RowCopy row(int r) const {
    const int hidden_rows = a.batch * a.hidden_seq;
    if (r < hidden_rows) {
      const int b = r / a.hidden_seq, n = r - b * a.hidden_seq;
      const int g = a.gather_offsets[b];
      RowCopy c{row_at(grad_hidden, a.hidden_dtype, r, a.width), a.hidden_dtype};
      if (grad_new_memory != nullptr && g >= 0 && n >= g && n - g < a.slots) {
        c.src0 = row_at(grad_new_memory, a.hidden_dtype, static_cast<int64_t>(b) * a.slots + n - g, a.width);
        c.src0_type = a.hidden_dtype;
      }
      return c;
    }
    const int e = r - hidden_rows, b = e / a.slots;
    RowCopy c{row_at(grad_memory, a.memory_dtype, e, a.width), a.memory_dtype};
    if (grad_new_memory != nullptr && a.gather_offsets[b] < 0) {
      c.src0 = row_at(grad_new_memory, a.hidden_dtype, e, a.width);
      c.src0_type = a.hidden_dtype;
    }
    return c;
  }
};

// Rows [0, B*N): embeds.
struct PlaceForward {
  HandoffArgs a;
  const void* memory;
  const void* token_embeds;
  void* embeds;

  __device__ RowCopy row(int r) const {
    const int b = r / a.seq, n = r - b * a.seq;
    const int s = slot_at(a, b, n);
    RowCopy c{row_at(embeds, a.embeds_dtype, r, a.width), a.embeds_dtype};
    if (s >= 0) {
      c.src0 = row_at(memory, a.memory_dtype, static_cast<int64_t>(b) * a.slots + s, a.width);
      c.src0_type = a.memory_dtype;
    } else {
      c.src0 = row_at(token_embeds, a.embeds_dtype, r, a.width);
      c.src0_type = a.embeds_dtype;
    }
    return c;
  }
};

// Rows [0, B*N): grad_token_embeds, then [B*N, B*N + B*m): grad_memory.
struct PlaceBackward {
  HandoffArgs a;
  const void* grad_embeds;  // embeds_dtype, or null (zero)
  void* grad_memory;
  void* grad_token_embeds;

  __device__ RowCopy row(int r) const {
    const int embeds_rows = a.batch * a.seq;
    if (r < embeds_rows) {
      const int b = r / a.seq, n = r - b * a.seq;
      RowCopy c{row_at(grad_token_embeds, a.embeds_dtype, r, a.width), a.embeds_dtype};
      if (grad_embeds != nullptr && slot_at(a, b, n) < 0) {
        c.src0 = row_at(grad_embeds, a.embeds_dtype, r, a.width);
        c.src0_type = a.embeds_dtype;
      }
      return c;
    }
    const int e = r - embeds_rows, b = e / a.slots, s = e - b * a.slots;
    RowCopy c{row_at(grad_memory, a.memory_dtype, e, a.width), a.memory_dtype};
    if (grad_embeds == nullptr) return c;
    const int64_t row0 = static_cast<int64_t>(b) * a.seq;
    c.src0 = row_at(grad_embeds, a.embeds_dtype, row0 + a.read_offset + s, a.width);
    c.src0_type = a.embeds_dtype;
    if (a.write_offsets != nullptr) {
      const int w = a.write_offsets[b] + s;
      if (w >= 0 && w < a.seq) {
        c.src1 = row_at(grad_embeds, a.embeds_dtype, row0 + w, a.width);
        c.src1_type = a.embeds_dtype;
      }
    }
    return c;
  }
};

// blockDim = (threads along a row, rows per block); grid = (row blocks, chunks of a row).
template <int VEC, typename Plan>
__global__ void __launch_bounds__(kHandoffThreads) copy_rows_kernel(const Plan plan, int rows, int vecs_per_row) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const int vec = blockIdx.y * blockDim.x + threadIdx.x;
  if (row >= rows || vec >= vecs_per_row) return;
  const RowCopy c = plan.row(static_cast<int>(row));
  const int col = vec * VEC;
  if (c.src0 != nullptr && c.src1 == nullptr && c.src0_type == c.dst_type) {  // the common case: a plain copy
    copy_pack<VEC>(c.src0, c.dst, c.dst_type, col);
    return;
  }
  float x[VEC];
  if (c.src0 == nullptr) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) x[i] = c.fill;
  } else {
    load_pack<VEC>(c.src0, c.src0_type, col, x);
    if (c.src1 != nullptr) {
      float y[VEC];
      load_pack<VEC>(c.src1, c.src1_type, col, y);
#pragma unroll
      for (int i = 0; i < VEC; ++i) x[i] += y[i];
    }
  }
  store_pack<VEC>(c.dst, c.dst_type, col, x);
}

struct Operand {
  const void* ptr;
  DType dtype;
};

// Elements per access: 16 bytes of the narrowest dtype, halved until every operand's base and the row width allow
// the aligned access (a row starts at row * width elements).
int vector_width(int width, std::initializer_list<Operand> operands) {
  int narrowest = 4;
  for (const Operand& o : operands) narrowest = element_size(o.dtype) < narrowest ? element_size(o.dtype) : narrowest;
  for (int vec = 16 / narrowest; vec > 1; vec /= 2) {
    bool aligned = width % vec == 0;
    for (const Operand& o : operands)
      aligned = aligned && reinterpret_cast<uintptr_t>(o.ptr) % (static_cast<uintptr_t>(vec) * element_size(o.dtype)) == 0;
    if (aligned) return vec;
  }
  return 1;
}

template <typename Plan>
cudaError_t launch_rows(const Plan& plan, int64_t rows, int width, int vec, cudaStream_t stream) {
  if (rows == 0 || width == 0) return cudaSuccess;
  if (rows > INT32_MAX) return cudaErrorInvalidValue;
  const int vecs = width / vec;
  // Threads along a row: whole warps for long rows; for short rows a power of two, several rows per warp.
  int along = 1;
  while (along < vecs && along < 32) along *= 2;
  if (vecs > 32) along = vecs < kHandoffThreads ? (vecs + 31) / 32 * 32 : kHandoffThreads;
  const dim3 block(along, kHandoffThreads / along);
  const dim3 grid(static_cast<unsigned>((rows + block.y - 1) / block.y), (vecs + along - 1) / along);
  if (grid.y > 65535) return cudaErrorInvalidValue;
  const int n = static_cast<int>(rows);
  switch (vec) {
    case 8:
      copy_rows_kernel<8><<<grid, block, 0, stream>>>(plan, n, vecs);
      break;
    case 4:
      copy_rows_kernel<4><<<grid, block, 0, stream>>>(plan, n, vecs);
      break;
    case 2:
      copy_rows_kernel<2><<<grid, block, 0, stream>>>(plan, n, vecs);
      break;
    default:
      copy_rows_kernel<1><<<grid, block, 0, stream>>>(plan, n, vecs);
  }
  return cudaGetLastError();
}

bool valid_dims(const HandoffArgs& a) { return a.batch >= 0 && a.slots >= 0 && a.width >= 0; }

}  // namespace
}  // namespace detail

cudaError_t gather_memory_forward(const HandoffArgs& args, const void* hidden, const void* memory, void* new_memory,
                                  cudaStream_t stream) {
  if (!detail::valid_dims(args) || args.hidden_seq < 0 || args.gather_offsets == nullptr || new_memory == nullptr)
    return cudaErrorInvalidValue;
  const int vec = detail::vector_width(
      args.width, {{hidden, args.hidden_dtype}, {memory, args.memory_dtype}, {new_memory, args.hidden_dtype}});
  return detail::launch_rows(detail::GatherForward{args, hidden, memory, new_memory},
                             static_cast<int64_t>(args.batch) * args.slots, args.width, vec, stream);
}

cudaError_t gather_memory_backward(const HandoffArgs& args, const void* grad_new_memory, void* grad_hidden,
                                   void* grad_memory, cudaStream_t stream) {
  if (!detail::valid_dims(args) || args.hidden_seq < 0 || args.gather_offsets == nullptr || grad_hidden == nullptr ||
      grad_memory == nullptr)
    return cudaErrorInvalidValue;
  const int vec = detail::vector_width(args.width, {{grad_new_memory, args.hidden_dtype},
                                                    {grad_hidden, args.hidden_dtype},
                                                    {grad_memory, args.memory_dtype}});
  const int64_t rows = static_cast<int64_t>(args.batch) * (args.hidden_seq + args.slots);
  return detail::launch_rows(detail::GatherBackward{args, grad_new_memory, grad_hidden, grad_memory}, rows,
                             args.width, vec, stream);
}

cudaError_t place_memory_forward(const HandoffArgs& args, const void* memory, const void* token_embeds, void* embeds,
                                 cudaStream_t stream) {
  if (!detail::valid_dims(args) || args.seq < 0 || args.read_offset < 0 || args.read_offset + args.slots > args.seq ||
      embeds == nullptr)
    return cudaErrorInvalidValue;
  const int vec = detail::vector_width(
      args.width, {{memory, args.memory_dtype}, {token_embeds, args.embeds_dtype}, {embeds, args.embeds_dtype}});
  return detail::launch_rows(detail::PlaceForward{args, memory, token_embeds, embeds},
                             static_cast<int64_t>(args.batch) * args.seq, args.width, vec, stream);
}

cudaError_t place_memory_backward(const HandoffArgs& args, const void* grad_embeds, void* grad_memory,
                                  void* grad_token_embeds, cudaStream_t stream) {
  if (!detail::valid_dims(args) || args.seq < 0 || args.read_offset < 0 || args.read_offset + args.slots > args.seq ||
      grad_memory == nullptr || grad_token_embeds == nullptr)
    return cudaErrorInvalidValue;
  const int vec = detail::vector_width(args.width, {{grad_embeds, args.embeds_dtype},
                                                    {grad_memory, args.memory_dtype},
                                                    {grad_token_embeds, args.embeds_dtype}});
  const int64_t rows = static_cast<int64_t>(args.batch) * (args.seq + args.slots);
  return detail::launch_rows(detail::PlaceBackward{args, grad_embeds, grad_memory, grad_token_embeds}, rows,
                             args.width, vec, stream);
}

}  // namespace rmt_fast
