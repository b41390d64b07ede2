// Memory-token attention under the RMT segment mask: forward and backward, fp32 / fp16 in, fp32 math.
//
// Plain CUDA cores (builds and runs on sm_61): no tensor cores, static shared memory <= 48 KiB per block.
// Every kernel runs 4 warps (128 threads). A block owns a "row tile" of 16 positions (4 per warp: queries
// in the forward and dQ kernels, keys in the dK/dV kernel) held in shared memory, and streams the other
// side through shared memory 32 positions at a time, one position per lane:
//   scores:  lane l computes the dot products of streamed position l with the warp's 4 rows;
//   updates: lane l owns head-dim columns l, l + 32, ...; the streamed positions' weights are broadcast
//            to it with warp shuffles.
// The streamed tile is stored transposed with an XOR swizzle (see swizzle()) so both access patterns are
// free of bank conflicts without padding. Streamed tiles the mask fully excludes are never visited.
//
// Keys are indexed over [cache | segment]: with a short-term cache (mask.num_cache > 0) k/v hold num_cache
// cache positions before the segment's N, so key j >= num_cache is segment position j - num_cache; without a
// cache the key and segment indices are the same.
#include <math_constants.h>

#include <type_traits>

#include "common.cuh"
#include "rmt_fast_kernels.h"
#include "row_mask.cuh"

namespace rmt_fast {
namespace detail {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kRowsPerWarp = 4;
constexpr int kRowTile = kWarps * kRowsPerWarp;  // resident positions per block
constexpr int kStreamTile = kWarpSize;           // streamed positions per step: one per lane
constexpr float kLog2e = 1.4426950408889634f;

// The dK/dV and dQ kernels hold two resident and two streamed tiles: at head dim 128 that is 48 KiB.
static_assert((2 * kRowTile + 2 * kStreamTile) * kMaxHeadDim * sizeof(float) <= 48 * 1024,
              "static shared memory must fit the 48 KiB of sm_61");

// Element (d, p) of a transposed [head_dim][kStreamTile] tile. Lanes reading a fixed d across p, and lanes
// reading d = lane + 32t at a fixed p, both hit 32 distinct banks.
__device__ __forceinline__ int swizzle(int d, int p) { return d * kStreamTile + (p ^ (d & (kStreamTile - 1))); }

__device__ __forceinline__ RowMask row_mask(const SegmentMask& m, int b, int seq) {
  return RowMask::make(m.num_read, m.num_write, m.seq_lens[b], seq, m.causal, m.memory_bidirectional, m.num_cache,
                       m.cache_lens == nullptr ? m.num_cache : m.cache_lens[b]);
}

// rows x DP floats of positions [first, first + rows) of a [N, D] slice (row stride `stride`), times `mul`;
// positions >= end and columns >= D read as zero.
template <typename T, int DP, int kRows>
__device__ __forceinline__ void load_rows(float (*dst)[DP], const T* src, int64_t stride, int first, int end,
                                          int head_dim, float mul) {
  for (int idx = threadIdx.x; idx < kRows * DP; idx += kThreads) {
    const int r = idx / DP, d = idx % DP, i = first + r;
    float x = 0.f;
    if (i < end && d < head_dim) x = to_float(src[i * stride + d]) * mul;
    dst[r][d] = x;
  }
}

// kStreamTile positions starting at `first`, transposed and swizzled; positions >= end read as zero.
template <typename T, int DP>
__device__ __forceinline__ void load_stream_tile(float* dst, const T* src, int64_t stride, int first, int end,
                                                 int head_dim) {
  for (int idx = threadIdx.x; idx < kStreamTile * DP; idx += kThreads) {
    const int p = idx / DP, d = idx % DP, i = first + p;
    float x = 0.f;
    if (i < end && d < head_dim) x = to_float(src[i * stride + d]);
    dst[swizzle(d, p)] = x;
  }
}

__device__ __forceinline__ float dot4(float4 a, float x0, float x1, float x2, float x3, float acc) {
  return fmaf(a.w, x3, fmaf(a.z, x2, fmaf(a.y, x1, fmaf(a.x, x0, acc))));
}

template <typename T>
struct FwdParams {
  const T* q;
  const T* k;
  const T* v;
  T* out;
  float* lse;
  Strides3 q_strides, k_strides, v_strides;
  AttentionDims dims;
  SegmentMask mask;
  float scale;
};

template <typename T>
struct BwdParams {
  const T* dout;
  const T* q;
  const T* k;
  const T* v;
  const T* out;
  const float* lse;
  float* delta;
  T* dq;
  T* dk;
  T* dv;
  Strides3 dout_strides, q_strides, k_strides, v_strides;
  AttentionDims dims;
  SegmentMask mask;
  float scale;
};

// grid (query tiles, Hq, B). Online softmax in base 2: scores are pre-multiplied by scale * log2(e).
template <typename T, int DP>
__global__ void __launch_bounds__(kThreads) attention_fwd_kernel(const FwdParams<T> p) {
  constexpr int kSlices = DP / kWarpSize;
  __shared__ __align__(16) float q_s[kRowTile][DP];
  __shared__ float k_s[DP * kStreamTile];
  __shared__ __align__(16) float v_s[kStreamTile][DP];

  const int b = blockIdx.z, h = blockIdx.y;
  const int q0 = (gridDim.x - 1 - blockIdx.x) * kRowTile;  // longest causal tiles first
  const int seq = p.dims.seq, head_dim = p.dims.head_dim;
  const int hk = h / (p.dims.heads_q / p.dims.heads_kv);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const RowMask mk = row_mask(p.mask, b, seq);
  const float neg_inf = -CUDART_INF_F;

  const T* q = p.q + b * p.q_strides.b + h * p.q_strides.h;
  const T* k = p.k + b * p.k_strides.b + hk * p.k_strides.h;
  const T* v = p.v + b * p.v_strides.b + hk * p.v_strides.h;
  const int64_t rows = (static_cast<int64_t>(b) * p.dims.heads_q + h) * seq;
  T* out = p.out + rows * head_dim;
  float* lse = p.lse + rows;

  const int row0 = q0 + warp * kRowsPerWarp;
  float acc[kRowsPerWarp][kSlices];
  float m_run[kRowsPerWarp], l_run[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    m_run[r] = neg_inf;
    l_run[r] = 0.f;
#pragma unroll
    for (int t = 0; t < kSlices; ++t) acc[r][t] = 0.f;
  }

  if (q0 < mk.valid) {
    load_rows<T, DP, kRowTile>(q_s, q, p.q_strides.n, q0, mk.valid, head_dim, p.scale * kLog2e);
    const int k_end = mk.key_end(q0, min(q0 + kRowTile, mk.valid) - 1);
    const bool active = row0 < mk.valid;
    for (int k0 = mk.key_begin(); k0 < k_end; k0 += kStreamTile) {
      __syncthreads();  // the previous tile has been consumed
      load_stream_tile<T, DP>(k_s, k, p.k_strides.n, k0, k_end, head_dim);
      load_rows<T, DP, kStreamTile>(v_s, v, p.v_strides.n, k0, k_end, head_dim, 1.f);
      __syncthreads();
      if (!active) continue;

      float s[kRowsPerWarp];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) s[r] = 0.f;
#pragma unroll 8
      for (int d = 0; d < DP; d += 4) {
        const float k0v = k_s[swizzle(d, lane)], k1v = k_s[swizzle(d + 1, lane)];
        const float k2v = k_s[swizzle(d + 2, lane)], k3v = k_s[swizzle(d + 3, lane)];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          const float4 qv = *reinterpret_cast<const float4*>(&q_s[warp * kRowsPerWarp + r][d]);
          s[r] = dot4(qv, k0v, k1v, k2v, k3v, s[r]);
        }
      }

      const int j = k0 + lane;
      float prob[kRowsPerWarp];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const float score = mk.allowed(row0 + r, j) ? s[r] : neg_inf;
        const float m_new = fmaxf(m_run[r], warp_max(score));
        const float m_use = m_new == neg_inf ? 0.f : m_new;  // no key yet: keep exp2 away from inf - inf
        const float alpha = exp2f(m_run[r] - m_use);
        prob[r] = exp2f(score - m_use);
        l_run[r] = l_run[r] * alpha + prob[r];  // per-lane partial sum, reduced once at the end
        m_run[r] = m_new;
#pragma unroll
        for (int t = 0; t < kSlices; ++t) acc[r][t] *= alpha;
      }

      const int n_keys = min(kStreamTile, k_end - k0);
#pragma unroll 4
      for (int jj = 0; jj < n_keys; ++jj) {
        float pj[kRowsPerWarp];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) pj[r] = __shfl_sync(kFullMask, prob[r], jj);
#pragma unroll
        for (int t = 0; t < kSlices; ++t) {
          const float vv = v_s[jj][lane + t * kWarpSize];
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r) acc[r][t] = fmaf(pj[r], vv, acc[r][t]);
        }
      }
    }
  }

  // Every row of the tile is written: padding rows (no allowed key) get zeros and lse = +inf.
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int i = row0 + r;
    if (i >= seq) break;
    const float l = warp_sum(l_run[r]);
    const bool real = i < mk.valid;  // a real row always sees itself, so l > 0
    const float inv = real ? 1.f / l : 0.f;
#pragma unroll
    for (int t = 0; t < kSlices; ++t) {
      const int d = lane + t * kWarpSize;
      if (d < head_dim) out[static_cast<int64_t>(i) * head_dim + d] = from_float<T>(acc[r][t] * inv);
    }
    if (lane == 0) lse[i] = real ? m_run[r] + log2f(l) : CUDART_INF_F;
  }
}

// delta[b, h, i] = sum_d dout * out, one warp per row; zero for padding rows.
template <typename T>
__global__ void __launch_bounds__(kThreads) attention_bwd_delta_kernel(const BwdParams<T> p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int seq = p.dims.seq, head_dim = p.dims.head_dim;
  if (row >= static_cast<int64_t>(p.dims.batch) * p.dims.heads_q * seq) return;
  const int i = static_cast<int>(row % seq);
  const int64_t bh = row / seq;
  const int h = static_cast<int>(bh % p.dims.heads_q), b = static_cast<int>(bh / p.dims.heads_q);
  const RowMask mk = row_mask(p.mask, b, seq);
  float acc = 0.f;
  if (i < mk.valid) {
    const T* dout = p.dout + b * p.dout_strides.b + h * p.dout_strides.h + i * p.dout_strides.n;
    const T* out = p.out + row * head_dim;
    for (int d = lane; d < head_dim; d += kWarpSize) acc = fmaf(to_float(dout[d]), to_float(out[d]), acc);
  }
  acc = warp_sum(acc);
  if (lane == 0) p.delta[row] = acc;
}

// grid (key tiles over [cache | segment], Hkv, B). Each block owns 16 keys and streams, for every query head of
// its group, the queries that can see them. dS = P * (dP - delta); dV = P^T dO; dK = scale * dS^T Q.
template <typename T, int DP>
__global__ void __launch_bounds__(kThreads) attention_bwd_dkdv_kernel(const BwdParams<T> p) {
  constexpr int kSlices = DP / kWarpSize;
  __shared__ __align__(16) float k_s[kRowTile][DP];  // times scale * log2(e)
  __shared__ __align__(16) float v_s[kRowTile][DP];
  __shared__ float q_s[DP * kStreamTile];
  __shared__ float do_s[DP * kStreamTile];

  const int b = blockIdx.z, hk = blockIdx.y;
  const int k0 = blockIdx.x * kRowTile;  // causal: low key tiles have the most queries, so they go first
  const int seq = p.dims.seq, head_dim = p.dims.head_dim;
  const int seq_kv = p.mask.num_cache + seq;
  const int groups = p.dims.heads_q / p.dims.heads_kv;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const RowMask mk = row_mask(p.mask, b, seq);

  const int key0 = k0 + warp * kRowsPerWarp;
  float dk[kRowsPerWarp][kSlices], dv[kRowsPerWarp][kSlices];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
#pragma unroll
    for (int t = 0; t < kSlices; ++t) dk[r][t] = dv[r][t] = 0.f;
  }

  const int key_valid = mk.key_valid();
  if (mk.key_tile_live(k0, kRowTile)) {
    const T* k = p.k + b * p.k_strides.b + hk * p.k_strides.h;
    const T* v = p.v + b * p.v_strides.b + hk * p.v_strides.h;
    load_rows<T, DP, kRowTile>(k_s, k, p.k_strides.n, k0, key_valid, head_dim, p.scale * kLog2e);
    load_rows<T, DP, kRowTile>(v_s, v, p.v_strides.n, k0, key_valid, head_dim, 1.f);
    const int q_begin = mk.query_begin(k0, min(k0 + kRowTile, key_valid) - 1);
    const int q_end = mk.valid;
    const bool active = key0 < key_valid;
    int first_query[kRowsPerWarp];  // key key0 + r is attended by the queries [first_query[r], valid)
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) first_query[r] = mk.first_query(key0 + r);

    for (int g = 0; g < groups; ++g) {
      const int h = hk * groups + g;
      const T* q = p.q + b * p.q_strides.b + h * p.q_strides.h;
      const T* dout = p.dout + b * p.dout_strides.b + h * p.dout_strides.h;
      const int64_t rows = (static_cast<int64_t>(b) * p.dims.heads_q + h) * seq;
      const float* lse = p.lse + rows;
      const float* delta = p.delta + rows;

      for (int i0 = q_begin; i0 < q_end; i0 += kStreamTile) {
        __syncthreads();  // the previous tile has been consumed (and k_s / v_s are visible)
        load_stream_tile<T, DP>(q_s, q, p.q_strides.n, i0, q_end, head_dim);
        load_stream_tile<T, DP>(do_s, dout, p.dout_strides.n, i0, q_end, head_dim);
        __syncthreads();
        if (!active) continue;

        const int i = i0 + lane;
        const bool in_range = i < q_end;
        const float lse_i = in_range ? lse[i] : 0.f;
        const float delta_i = in_range ? delta[i] : 0.f;

        float s[kRowsPerWarp], dp[kRowsPerWarp];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) s[r] = dp[r] = 0.f;
#pragma unroll 4
        for (int d = 0; d < DP; d += 4) {
          const float q0v = q_s[swizzle(d, lane)], q1v = q_s[swizzle(d + 1, lane)];
          const float q2v = q_s[swizzle(d + 2, lane)], q3v = q_s[swizzle(d + 3, lane)];
          const float o0v = do_s[swizzle(d, lane)], o1v = do_s[swizzle(d + 1, lane)];
          const float o2v = do_s[swizzle(d + 2, lane)], o3v = do_s[swizzle(d + 3, lane)];
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r) {
            const float4 kv = *reinterpret_cast<const float4*>(&k_s[warp * kRowsPerWarp + r][d]);
            const float4 vv = *reinterpret_cast<const float4*>(&v_s[warp * kRowsPerWarp + r][d]);
            s[r] = dot4(kv, q0v, q1v, q2v, q3v, s[r]);
            dp[r] = dot4(vv, o0v, o1v, o2v, o3v, dp[r]);
          }
        }

        float prob[kRowsPerWarp], dscore[kRowsPerWarp];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          prob[r] = (in_range && i >= first_query[r]) ? exp2f(s[r] - lse_i) : 0.f;
          dscore[r] = prob[r] * (dp[r] - delta_i);
        }

        const int n_queries = min(kStreamTile, q_end - i0);
#pragma unroll 4
        for (int ii = 0; ii < n_queries; ++ii) {
          float pb[kRowsPerWarp], db[kRowsPerWarp];
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r) {
            pb[r] = __shfl_sync(kFullMask, prob[r], ii);
            db[r] = __shfl_sync(kFullMask, dscore[r], ii);
          }
#pragma unroll
          for (int t = 0; t < kSlices; ++t) {
            const int a = swizzle(lane + t * kWarpSize, ii);
            const float ov = do_s[a], qv = q_s[a];
#pragma unroll
            for (int r = 0; r < kRowsPerWarp; ++r) {
              dv[r][t] = fmaf(pb[r], ov, dv[r][t]);
              dk[r][t] = fmaf(db[r], qv, dk[r][t]);
            }
          }
        }
      }
    }
  }

  // Every key of the tile is written: keys no query sees (padding included) get zeros.
  const int64_t rows = (static_cast<int64_t>(b) * p.dims.heads_kv + hk) * seq_kv;
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int j = key0 + r;
    if (j >= seq_kv) break;
#pragma unroll
    for (int t = 0; t < kSlices; ++t) {
      const int d = lane + t * kWarpSize;
      if (d < head_dim) {
        const int64_t o = (rows + j) * head_dim + d;
        p.dk[o] = from_float<T>(dk[r][t] * p.scale);
        p.dv[o] = from_float<T>(dv[r][t]);
      }
    }
  }
}

// grid (query tiles, Hq, B). dQ = scale * dS K, keys streamed like the forward.
template <typename T, int DP>
__global__ void __launch_bounds__(kThreads) attention_bwd_dq_kernel(const BwdParams<T> p) {
  constexpr int kSlices = DP / kWarpSize;
  __shared__ __align__(16) float q_s[kRowTile][DP];  // times scale * log2(e)
  __shared__ __align__(16) float do_s[kRowTile][DP];
  __shared__ float k_s[DP * kStreamTile];
  __shared__ float v_s[DP * kStreamTile];

  const int b = blockIdx.z, h = blockIdx.y;
  const int q0 = (gridDim.x - 1 - blockIdx.x) * kRowTile;
  const int seq = p.dims.seq, head_dim = p.dims.head_dim;
  const int hk = h / (p.dims.heads_q / p.dims.heads_kv);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const RowMask mk = row_mask(p.mask, b, seq);

  const int64_t rows = (static_cast<int64_t>(b) * p.dims.heads_q + h) * seq;
  const int row0 = q0 + warp * kRowsPerWarp;
  float dq[kRowsPerWarp][kSlices];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
#pragma unroll
    for (int t = 0; t < kSlices; ++t) dq[r][t] = 0.f;
  }

  if (q0 < mk.valid) {
    const T* q = p.q + b * p.q_strides.b + h * p.q_strides.h;
    const T* dout = p.dout + b * p.dout_strides.b + h * p.dout_strides.h;
    const T* k = p.k + b * p.k_strides.b + hk * p.k_strides.h;
    const T* v = p.v + b * p.v_strides.b + hk * p.v_strides.h;
    load_rows<T, DP, kRowTile>(q_s, q, p.q_strides.n, q0, mk.valid, head_dim, p.scale * kLog2e);
    load_rows<T, DP, kRowTile>(do_s, dout, p.dout_strides.n, q0, mk.valid, head_dim, 1.f);
    float lse_r[kRowsPerWarp], delta_r[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const bool real = row0 + r < mk.valid;
      lse_r[r] = real ? p.lse[rows + row0 + r] : 0.f;
      delta_r[r] = real ? p.delta[rows + row0 + r] : 0.f;
    }
    const int k_end = mk.key_end(q0, min(q0 + kRowTile, mk.valid) - 1);
    const bool active = row0 < mk.valid;

    for (int k0 = mk.key_begin(); k0 < k_end; k0 += kStreamTile) {
      __syncthreads();
      load_stream_tile<T, DP>(k_s, k, p.k_strides.n, k0, k_end, head_dim);
      load_stream_tile<T, DP>(v_s, v, p.v_strides.n, k0, k_end, head_dim);
      __syncthreads();
      if (!active) continue;

      float s[kRowsPerWarp], dp[kRowsPerWarp];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) s[r] = dp[r] = 0.f;
#pragma unroll 4
      for (int d = 0; d < DP; d += 4) {
        const float k0v = k_s[swizzle(d, lane)], k1v = k_s[swizzle(d + 1, lane)];
        const float k2v = k_s[swizzle(d + 2, lane)], k3v = k_s[swizzle(d + 3, lane)];
        const float v0v = v_s[swizzle(d, lane)], v1v = v_s[swizzle(d + 1, lane)];
        const float v2v = v_s[swizzle(d + 2, lane)], v3v = v_s[swizzle(d + 3, lane)];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          const float4 qv = *reinterpret_cast<const float4*>(&q_s[warp * kRowsPerWarp + r][d]);
          const float4 ov = *reinterpret_cast<const float4*>(&do_s[warp * kRowsPerWarp + r][d]);
          s[r] = dot4(qv, k0v, k1v, k2v, k3v, s[r]);
          dp[r] = dot4(ov, v0v, v1v, v2v, v3v, dp[r]);
        }
      }

      const int j = k0 + lane;
      float dscore[kRowsPerWarp];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        dscore[r] = mk.allowed(row0 + r, j) ? exp2f(s[r] - lse_r[r]) * (dp[r] - delta_r[r]) : 0.f;
      }

      const int n_keys = min(kStreamTile, k_end - k0);
#pragma unroll 4
      for (int jj = 0; jj < n_keys; ++jj) {
        float db[kRowsPerWarp];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) db[r] = __shfl_sync(kFullMask, dscore[r], jj);
#pragma unroll
        for (int t = 0; t < kSlices; ++t) {
          const float kv = k_s[swizzle(lane + t * kWarpSize, jj)];
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r) dq[r][t] = fmaf(db[r], kv, dq[r][t]);
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int i = row0 + r;
    if (i >= seq) break;
#pragma unroll
    for (int t = 0; t < kSlices; ++t) {
      const int d = lane + t * kWarpSize;
      if (d < head_dim) p.dq[(rows + i) * head_dim + d] = from_float<T>(dq[r][t] * p.scale);
    }
  }
}

int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Calls f(std::integral_constant<int, DP>) with the head dim rounded up to a multiple of 32.
template <typename F>
cudaError_t with_padded_head_dim(int head_dim, F&& f) {
  if (head_dim <= 32) return f(std::integral_constant<int, 32>{});
  if (head_dim <= 64) return f(std::integral_constant<int, 64>{});
  if (head_dim <= 96) return f(std::integral_constant<int, 96>{});
  return f(std::integral_constant<int, 128>{});
}

cudaError_t check_dims(const AttentionDims& d, const SegmentMask& m) {
  if (d.batch < 0 || d.seq < 0 || d.heads_q < 1 || d.heads_kv < 1 || d.heads_q % d.heads_kv != 0 ||
      d.head_dim < 1 || d.head_dim > kMaxHeadDim || d.batch > 65535 || d.heads_q > 65535 || m.num_cache < 0 ||
      m.num_cache > INT32_MAX - d.seq)
    return cudaErrorInvalidValue;
  return cudaSuccess;
}

template <typename T>
cudaError_t forward_typed(const FwdParams<T>& p, cudaStream_t stream) {
  const dim3 grid(ceil_div(p.dims.seq, kRowTile), p.dims.heads_q, p.dims.batch);
  return with_padded_head_dim(p.dims.head_dim, [&](auto dp) {
    attention_fwd_kernel<T, decltype(dp)::value><<<grid, kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

template <typename T>
cudaError_t backward_typed(const BwdParams<T>& p, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(p.dims.batch) * p.dims.heads_q * p.dims.seq;
  attention_bwd_delta_kernel<T><<<static_cast<unsigned>((rows + kWarps - 1) / kWarps), kThreads, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const dim3 grid_kv(ceil_div(p.mask.num_cache + p.dims.seq, kRowTile), p.dims.heads_kv, p.dims.batch);
  const dim3 grid_q(ceil_div(p.dims.seq, kRowTile), p.dims.heads_q, p.dims.batch);
  return with_padded_head_dim(p.dims.head_dim, [&](auto dp) {
    attention_bwd_dkdv_kernel<T, decltype(dp)::value><<<grid_kv, kThreads, 0, stream>>>(p);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    attention_bwd_dq_kernel<T, decltype(dp)::value><<<grid_q, kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace
}  // namespace detail

cudaError_t memory_attention_forward(DType dtype, const void* q, Strides3 q_strides, const void* k,
                                     Strides3 k_strides, const void* v, Strides3 v_strides, void* out,
                                     float* lse, AttentionDims dims, SegmentMask mask, float scale,
                                     cudaStream_t stream) {
  if (cudaError_t err = detail::check_dims(dims, mask); err != cudaSuccess) return err;
  if (dims.batch == 0 || dims.seq == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32:
      return detail::forward_typed(
          detail::FwdParams<float>{static_cast<const float*>(q), static_cast<const float*>(k),
                                   static_cast<const float*>(v), static_cast<float*>(out), lse, q_strides,
                                   k_strides, v_strides, dims, mask, scale},
          stream);
    case DType::kFloat16:
      return detail::forward_typed(
          detail::FwdParams<__half>{static_cast<const __half*>(q), static_cast<const __half*>(k),
                                    static_cast<const __half*>(v), static_cast<__half*>(out), lse, q_strides,
                                    k_strides, v_strides, dims, mask, scale},
          stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t memory_attention_backward(DType dtype, const void* dout, Strides3 dout_strides, const void* q,
                                      Strides3 q_strides, const void* k, Strides3 k_strides, const void* v,
                                      Strides3 v_strides, const void* out, const float* lse, float* delta,
                                      void* dq, void* dk, void* dv, AttentionDims dims, SegmentMask mask,
                                      float scale, cudaStream_t stream) {
  if (cudaError_t err = detail::check_dims(dims, mask); err != cudaSuccess) return err;
  if (dims.batch == 0 || dims.seq == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32:
      return detail::backward_typed(
          detail::BwdParams<float>{static_cast<const float*>(dout), static_cast<const float*>(q),
                                   static_cast<const float*>(k), static_cast<const float*>(v),
                                   static_cast<const float*>(out), lse, delta, static_cast<float*>(dq),
                                   static_cast<float*>(dk), static_cast<float*>(dv), dout_strides, q_strides,
                                   k_strides, v_strides, dims, mask, scale},
          stream);
    case DType::kFloat16:
      return detail::backward_typed(
          detail::BwdParams<__half>{static_cast<const __half*>(dout), static_cast<const __half*>(q),
                                    static_cast<const __half*>(k), static_cast<const __half*>(v),
                                    static_cast<const __half*>(out), lse, delta, static_cast<__half*>(dq),
                                    static_cast<__half*>(dk), static_cast<__half*>(dv), dout_strides, q_strides,
                                    k_strides, v_strides, dims, mask, scale},
          stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace rmt_fast
