// Torch-free smoke test of the rmt_fast kernels against a double-precision CPU reference.
// Exit codes: 0 pass, 1 mismatch or CUDA error, 77 no CUDA device (ctest reports it as skipped).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include <cuda_runtime_api.h>

#include "rmt_fast_kernels.h"

namespace {

using rmt_fast::AttentionDims;
using rmt_fast::SegmentMask;

bool ok(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return true;
  std::printf("FAIL: %s: %s\n", what, cudaGetErrorString(err));
  return false;
}

template <typename T>
struct DeviceBuffer {
  T* ptr = nullptr;
  size_t n = 0;
  explicit DeviceBuffer(size_t count) : n(count) { cudaMalloc(reinterpret_cast<void**>(&ptr), count * sizeof(T) + 1); }
  explicit DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size()) {
    cudaMemcpy(ptr, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice);
  }
  ~DeviceBuffer() { cudaFree(ptr); }
  std::vector<T> host() const {
    std::vector<T> out(n);
    cudaMemcpy(out.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost);
    return out;
  }
};

// Key j indexes [cache (m.num_cache) | segment (seq)].
bool allowed(const SegmentMask& m, const std::vector<int32_t>& lens, const std::vector<int32_t>& cache_lens, int b,
             int seq, int i, int j) {
  if (j < m.num_cache) {
    const int valid = std::min(m.num_read + lens[b] + m.num_write, seq);
    return i < valid && j >= m.num_cache - cache_lens[b];
  }
  j -= m.num_cache;
  const int write_start = m.num_read + lens[b];
  const int valid = std::min(write_start + m.num_write, seq);
  if (i >= valid || j >= valid) return false;
  if (!m.causal || j <= i) return true;
  if (!m.memory_bidirectional) return false;
  return (i < m.num_read && j < m.num_read) || (i >= write_start && j >= write_start);
}

double max_abs_diff(const std::vector<float>& got, const std::vector<double>& want) {
  double worst = 0;
  for (size_t i = 0; i < got.size(); ++i) worst = std::max(worst, std::fabs(got[i] - want[i]));
  return worst;
}

// num_cache > 0: a short-term cache of num_cache keys, full in row 0 and with 3 real keys in row 1.
bool attention_case(bool causal, bool bidirectional, int num_cache = 0) {
  const AttentionDims dims{2, 4, 2, 45, 40};
  const int B = dims.batch, Hq = dims.heads_q, Hkv = dims.heads_kv, N = dims.seq, D = dims.head_dim;
  const int C = num_cache, NK = C + N;
  const int groups = Hq / Hkv;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  std::vector<int32_t> lens = {N - 6, 17};
  const std::vector<int32_t> cache_lens = {C, std::min(C, 3)};
  std::mt19937 rng(causal * 2 + bidirectional + 4 * C);
  std::normal_distribution<float> normal;
  auto randn = [&](size_t n) {
    std::vector<float> v(n);
    for (auto& x : v) x = normal(rng);
    return v;
  };
  const size_t nq = static_cast<size_t>(B) * Hq * N * D, nk = static_cast<size_t>(B) * Hkv * NK * D;
  const std::vector<float> q = randn(nq), k = randn(nk), v = randn(nk), dout = randn(nq);

  DeviceBuffer<int32_t> d_lens(lens), d_cache_lens(cache_lens);
  const SegmentMask mask{d_lens.ptr, 3, 3, causal, bidirectional, C, C ? d_cache_lens.ptr : nullptr};
  DeviceBuffer<float> d_q(q), d_k(k), d_v(v), d_dout(dout), d_out(nq), d_dq(nq), d_dk(nk), d_dv(nk);
  DeviceBuffer<float> d_lse(static_cast<size_t>(B) * Hq * N), d_delta(static_cast<size_t>(B) * Hq * N);
  const rmt_fast::Strides3 sq{static_cast<int64_t>(Hq) * N * D, static_cast<int64_t>(N) * D, D};
  const rmt_fast::Strides3 sk{static_cast<int64_t>(Hkv) * NK * D, static_cast<int64_t>(NK) * D, D};
  if (!ok(rmt_fast::memory_attention_forward(rmt_fast::DType::kFloat32, d_q.ptr, sq, d_k.ptr, sk, d_v.ptr, sk,
                                             d_out.ptr, d_lse.ptr, dims, mask, scale, nullptr),
          "forward launch") ||
      !ok(rmt_fast::memory_attention_backward(rmt_fast::DType::kFloat32, d_dout.ptr, sq, d_q.ptr, sq, d_k.ptr, sk,
                                              d_v.ptr, sk, d_out.ptr, d_lse.ptr, d_delta.ptr, d_dq.ptr, d_dk.ptr,
                                              d_dv.ptr, dims, mask, scale, nullptr),
          "backward launch") ||
      !ok(cudaDeviceSynchronize(), "kernels"))
    return false;

  std::vector<double> out(nq, 0), dq(nq, 0), dk(nk, 0), dv(nk, 0);
  SegmentMask host_mask = mask;
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < Hq; ++h) {
      const int hk = h / groups;
      auto at_q = [&](int i, int d) { return ((static_cast<size_t>(b) * Hq + h) * N + i) * D + d; };
      auto at_k = [&](int j, int d) { return ((static_cast<size_t>(b) * Hkv + hk) * NK + j) * D + d; };
      for (int i = 0; i < N; ++i) {
        std::vector<double> p(NK, 0), dp(NK, 0);
        double mx = -INFINITY;
        for (int j = 0; j < NK; ++j) {
          if (!allowed(host_mask, lens, cache_lens, b, N, i, j)) continue;
          double s = 0;
          for (int d = 0; d < D; ++d) s += static_cast<double>(q[at_q(i, d)]) * k[at_k(j, d)];
          p[j] = s * scale;
          mx = std::max(mx, p[j]);
        }
        if (mx == -INFINITY) continue;  // padding row: zero output and gradients
        double sum = 0;
        for (int j = 0; j < NK; ++j) {
          p[j] = allowed(host_mask, lens, cache_lens, b, N, i, j) ? std::exp(p[j] - mx) : 0.0;
          sum += p[j];
        }
        double delta = 0;
        for (int j = 0; j < NK; ++j) {
          p[j] /= sum;
          for (int d = 0; d < D; ++d) {
            out[at_q(i, d)] += p[j] * v[at_k(j, d)];
            dp[j] += static_cast<double>(dout[at_q(i, d)]) * v[at_k(j, d)];
          }
          delta += p[j] * dp[j];
        }
        for (int j = 0; j < NK; ++j) {
          const double ds = p[j] * (dp[j] - delta) * scale;
          for (int d = 0; d < D; ++d) {
            dq[at_q(i, d)] += ds * k[at_k(j, d)];
            dk[at_k(j, d)] += ds * q[at_q(i, d)];
            dv[at_k(j, d)] += p[j] * dout[at_q(i, d)];
          }
        }
      }
    }
  const double errs[4] = {max_abs_diff(d_out.host(), out), max_abs_diff(d_dq.host(), dq),
                          max_abs_diff(d_dk.host(), dk), max_abs_diff(d_dv.host(), dv)};
  const char* names[4] = {"out", "dq", "dk", "dv"};
  bool pass = true;
  for (int t = 0; t < 4; ++t) {
    if (!(errs[t] < 2e-3)) {
      std::printf("FAIL: attention causal=%d bidirectional=%d num_cache=%d %s max abs err %.3g\n", causal,
                  bidirectional, C, names[t], errs[t]);
      pass = false;
    }
  }
  return pass;
}

// Both halves of the handoff and their gradients, fp32, at width d (d = 16 takes the 16-byte path, d = 5 the
// scalar one). Values are distinct integers, so every comparison is exact.
bool handoff_case(int d) {
  const int B = 2, m = 3, n_prev = 12, n = 16;
  std::vector<float> hidden(B * n_prev * d), memory(B * m * d), embeds(B * n * d);
  for (size_t i = 0; i < hidden.size(); ++i) hidden[i] = 1000.f + i;
  for (size_t i = 0; i < memory.size(); ++i) memory[i] = 2000.f + i;
  for (size_t i = 0; i < embeds.size(); ++i) embeds[i] = 3000.f + i;
  const std::vector<int32_t> gather = {4, -1}, write = {9, 12};
  DeviceBuffer<int32_t> d_gather(gather), d_write(write);
  DeviceBuffer<float> d_hidden(hidden), d_memory(memory), d_embeds(embeds), d_new(memory.size()),
      d_out(embeds.size()), d_grad_hidden(hidden.size()), d_grad_memory(memory.size()),
      d_grad_memory2(memory.size()), d_grad_tok(embeds.size());
  rmt_fast::HandoffArgs a{};
  a.batch = B;
  a.slots = m;
  a.width = d;
  a.hidden_seq = n_prev;
  a.seq = n;
  a.read_offset = 1;
  a.gather_offsets = d_gather.ptr;
  a.write_offsets = d_write.ptr;
  a.hidden_dtype = a.memory_dtype = a.embeds_dtype = rmt_fast::DType::kFloat32;
  // the placement's and the gather's gradients, fed with the forward outputs as output gradients
  if (!ok(rmt_fast::gather_memory_forward(a, d_hidden.ptr, d_memory.ptr, d_new.ptr, nullptr), "gather launch") ||
      !ok(rmt_fast::place_memory_forward(a, d_new.ptr, d_embeds.ptr, d_out.ptr, nullptr), "place launch") ||
      !ok(rmt_fast::place_memory_backward(a, d_out.ptr, d_grad_memory.ptr, d_grad_tok.ptr, nullptr),
          "place backward launch") ||
      !ok(rmt_fast::gather_memory_backward(a, d_new.ptr, d_grad_hidden.ptr, d_grad_memory2.ptr, nullptr),
          "gather backward launch") ||
      !ok(cudaDeviceSynchronize(), "handoff kernels"))
    return false;
  const std::vector<float> got_new = d_new.host(), got_out = d_out.host(), got_grad_memory = d_grad_memory.host(),
                           got_grad_tok = d_grad_tok.host(), got_grad_hidden = d_grad_hidden.host(),
                           got_grad_memory2 = d_grad_memory2.host();
  bool pass = true;
  for (int b = 0; b < B; ++b) {
    for (int s = 0; s < m; ++s)
      for (int c = 0; c < d; ++c) {
        const float want = gather[b] >= 0 ? hidden[(b * n_prev + gather[b] + s) * d + c] : memory[(b * m + s) * d + c];
        pass &= got_new[(b * m + s) * d + c] == want;
        pass &= got_out[(b * n + a.read_offset + s) * d + c] == want;
        const bool write_fits = write[b] + s < n;
        if (write_fits) pass &= got_out[(b * n + write[b] + s) * d + c] == want;
        pass &= got_grad_memory[(b * m + s) * d + c] == (write_fits ? 2 * want : want);
        pass &= got_grad_memory2[(b * m + s) * d + c] == (gather[b] >= 0 ? 0.f : want);
      }
    for (int pos = 0; pos < n; ++pos) {
      const bool slot = (pos >= a.read_offset && pos < a.read_offset + m) || (pos >= write[b] && pos < write[b] + m);
      for (int c = 0; c < d; ++c) {
        const size_t i = (b * n + pos) * d + c;
        if (!slot) pass &= got_out[i] == embeds[i];
        pass &= got_grad_tok[i] == (slot ? 0.f : got_out[i]);
      }
    }
    for (int pos = 0; pos < n_prev; ++pos)
      for (int c = 0; c < d; ++c) {
        const bool gathered = gather[b] >= 0 && pos >= gather[b] && pos < gather[b] + m;
        const size_t i = (b * n_prev + pos) * d + c;
        pass &= got_grad_hidden[i] == (gathered ? hidden[i] : 0.f);
      }
  }
  if (!pass) std::printf("FAIL: segment handoff, d = %d\n", d);
  return pass;
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("SKIP: no CUDA device; rmt_fast kernel smoke test not run\n");
    return 77;
  }
  bool pass = true;
  pass &= attention_case(false, false);
  pass &= attention_case(true, false);
  pass &= attention_case(true, true);
  pass &= attention_case(false, false, 21);  // a cache over one key tile
  pass &= attention_case(true, true, 37);    // row 1's real cache keys in the second tile
  pass &= handoff_case(16);
  pass &= handoff_case(5);
  std::printf("%s: rmt_fast kernel smoke test\n", pass ? "PASS" : "FAIL");
  return pass ? 0 : 1;
}
