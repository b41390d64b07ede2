// Host check of the tile bounds the memory-attention kernels take from RowMask (csrc/row_mask.cuh): over every
// small layout (read/write slots, row length, segment width, cache size and real cache keys, the three masks),
//   - allowed(), and the query run [first_query(j), valid) of each key, equal the specification's rule (mask_rule
//     of rmt_fast/ops/memory_attention/spec.py, restated);
//   - forward / dQ: every key a query of a 16-query tile may attend lies in [key_begin(), key_end(tile)), the keys
//     the tile streams, which lie inside [0, cache + seq);
//   - dK/dV: a 16-key tile that is not key_tile_live() has no query that may attend it, and every query that may
//     attend a key of a live tile lies in [query_begin(tile), valid), the queries the tile streams, inside [0, seq).
// Needs no GPU (nvcc compiles it; main runs on the host). Exit code 0: pass, 1: a bound misses a pair.
#include <cstdio>

#include "row_mask.cuh"

namespace {

using rmt_fast::detail::RowMask;

constexpr int kTile = 16;  // the kernels' row tile (kRowTile of memory_attention.cu)

// mask_rule of spec.py over keys [cache | segment], restated independently of RowMask.
bool spec_allowed(int i, int j, int valid, int num_read, int write_start, bool causal, bool bidir, int cache,
                  int cache_start) {
  if (j < cache) return j >= cache_start && i < valid;
  j -= cache;
  if (i >= valid || j >= valid) return false;
  if (!causal || j <= i) return true;
  return bidir && ((i < num_read && j < num_read) || (i >= write_start && j >= write_start));
}

int failures = 0;

void fail(const char* what, const RowMask& m, int seq, int a, int b) {
  if (++failures <= 10)
    std::printf("FAIL: %s (valid=%d num_read=%d write_start=%d causal=%d bidir=%d cache=%d cache_start=%d seq=%d; "
                "%d, %d)\n", what, m.valid, m.num_read, m.write_start, m.causal, m.bidirectional, m.cache,
                m.cache_start, seq, a, b);
}

void check(const RowMask& m, int seq) {
  const int keys = m.cache + seq;
  for (int i = 0; i < seq; ++i)
    for (int j = 0; j < keys + kTile; ++j) {  // keys past the tensor too: the last dK/dV tile may overhang
      const bool want = spec_allowed(i, j, m.valid, m.num_read, m.write_start, m.causal, m.bidirectional, m.cache,
                                     m.cache_start);
      if (j < keys && m.allowed(i, j) != want) fail("allowed() differs from the spec", m, seq, i, j);
      if ((i >= m.first_query(j) && i < m.valid) != want) fail("first_query() differs from the spec", m, seq, i, j);
    }
  // forward and dQ: query tiles, the kernels skip those at or past valid
  for (int q0 = 0; q0 < seq; q0 += kTile) {
    if (q0 >= m.valid) {
      for (int i = q0; i < q0 + kTile && i < seq; ++i)
        for (int j = 0; j < keys; ++j)
          if (m.allowed(i, j)) fail("a skipped query tile has an allowed pair", m, seq, i, j);
      continue;
    }
    const int begin = m.key_begin(), end = m.key_end(q0, (q0 + kTile < m.valid ? q0 + kTile : m.valid) - 1);
    if (begin < 0 || end > keys) fail("a query tile streams keys out of range", m, seq, begin, end);
    for (int i = q0; i < q0 + kTile && i < seq; ++i)
      for (int j = 0; j < keys; ++j)
        if (m.allowed(i, j) && (j < begin || j >= end))
          fail("a query tile does not stream an allowed key", m, seq, i, j);
  }
  // dK/dV: key tiles over [cache | segment]
  for (int k0 = 0; k0 < keys; k0 += kTile) {
    const bool live = m.key_tile_live(k0, kTile);
    const int last = (k0 + kTile < m.key_valid() ? k0 + kTile : m.key_valid()) - 1;
    const int begin = live ? m.query_begin(k0, last) : 0;
    if (begin < 0 || m.valid > seq) fail("a key tile streams queries out of range", m, seq, begin, m.valid);
    for (int j = k0; j < k0 + kTile && j < keys; ++j)
      for (int i = 0; i < seq; ++i) {
        if (!m.allowed(i, j)) continue;
        if (!live) fail("a skipped key tile has an allowed pair", m, seq, i, j);
        else if (i < begin || i >= m.valid) fail("a key tile does not stream an allowed query", m, seq, i, j);
      }
  }
}

}  // namespace

int main() {
  long cases = 0;
  for (int mode = 0; mode < 3; ++mode) {
    const bool causal = mode > 0, bidir = mode == 2;
    for (int seq : {1, 7, 16, 17, 40})
      for (int num_read : {0, 3, 16})
        for (int num_write : {0, 3, 16})
          for (int seq_len = 0; seq_len <= seq; seq_len += (seq > 17 ? 5 : 2))
            for (int cache : {0, 1, 15, 16, 21, 37})
              for (int cache_len : {0, 1, 3, 16, 21, 37}) {
                if (cache_len > cache) continue;
                check(RowMask::make(num_read, num_write, seq_len, seq, causal, bidir, cache, cache_len), seq);
                ++cases;
              }
  }
  std::printf("%s: RowMask tile bounds over %ld layouts\n", failures ? "FAIL" : "PASS", cases);
  return failures ? 1 : 0;
}
