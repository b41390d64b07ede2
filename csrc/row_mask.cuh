// One batch row's RMT segment mask and the tile bounds the memory-attention kernels (memory_attention.cu) take
// from it. Host and device code, no CUDA runtime calls: csrc/tests/row_mask_bounds.cu checks the bounds on the
// host against the mask, pair by pair.
//
// allowed() restates mask_rule of rmt_fast/ops/memory_attention/spec.py, the specification. Query indices are
// segment positions; key indices run over [cache | segment]: with a short-term cache of `cache` keys, key
// j >= cache is segment position j - cache, and without one the key and segment indices are the same.
#pragma once

#define RMT_FAST_HD __host__ __device__ __forceinline__

namespace rmt_fast {
namespace detail {

RMT_FAST_HD int imin(int a, int b) { return a < b ? a : b; }
RMT_FAST_HD int imax(int a, int b) { return a > b ? a : b; }

struct RowMask {
  int valid;        // segment positions < valid are real
  int num_read;     // read block [0, num_read)
  int write_start;  // write block [write_start, valid)
  bool causal;
  bool bidirectional;
  int cache;        // cache keys in front of the segment's keys
  int cache_start;  // the row's real cache keys: [cache_start, cache), visible to every real query

  // A row of seq_len tokens between num_read read and num_write write slots, in a segment of `seq` positions
  // (the valid length is clamped to [0, seq]), behind a cache of num_cache keys of which the last cache_len
  // (clamped to [0, num_cache]) are real.
  RMT_FAST_HD static RowMask make(int num_read, int num_write, int seq_len, int seq, bool causal, bool bidirectional,
                                  int num_cache, int cache_len) {
    RowMask r;
    r.num_read = num_read;
    r.write_start = num_read + seq_len;
    r.valid = imin(imax(r.write_start + num_write, 0), seq);
    r.causal = causal;
    r.bidirectional = bidirectional;
    r.cache = num_cache;
    r.cache_start = num_cache - imin(imax(cache_len, 0), num_cache);
    return r;
  }

  RMT_FAST_HD bool allowed(int i, int j) const {
    if (j < cache) return i < valid && j >= cache_start;
    return segment_allowed(i, j - cache);
  }

  // One past the last real key.
  RMT_FAST_HD int key_valid() const { return cache + valid; }

  // The first key any query may attend.
  RMT_FAST_HD int key_begin() const { return cache_start; }

  // One past the last key any query in [q_first, q_last] may attend (q_last < valid).
  RMT_FAST_HD int key_end(int q_first, int q_last) const { return cache + segment_key_end(q_first, q_last); }

  // Whether any query may attend a key of [k0, k0 + rows): a dK/dV tile that is not live writes zeros.
  RMT_FAST_HD bool key_tile_live(int k0, int rows) const {
    return valid > 0 && k0 < key_valid() && k0 + rows > key_begin();
  }

  // The first query that may attend key j, or valid when none may: the queries that may attend one key are always
  // the run [first_query(j), valid), so the dK/dV kernel tests a pair with two integers per key.
  RMT_FAST_HD int first_query(int j) const {
    if (j < cache) return j >= cache_start ? 0 : valid;
    j -= cache;
    if (j >= valid) return valid;
    if (!causal) return 0;
    if (bidirectional) {
      if (j < num_read) return 0;
      if (j >= write_start) return write_start;
    }
    return j;
  }

  // The first query that may attend any key in [k_first, k_last] (cache_start <= k_last < key_valid()).
  RMT_FAST_HD int query_begin(int k_first, int k_last) const {
    if (k_first < cache) return 0;
    return segment_query_begin(k_first - cache, k_last - cache);
  }

  RMT_FAST_HD bool segment_allowed(int i, int j) const {
    if (i >= valid || j >= valid) return false;
    if (!causal || j <= i) return true;
    if (!bidirectional) return false;
    return (i < num_read && j < num_read) || (i >= write_start && j >= write_start);
  }

  RMT_FAST_HD int segment_key_end(int q_first, int q_last) const {
    if (!causal) return valid;
    int end = q_last + 1;
    if (bidirectional) {
      if (q_last >= write_start) end = valid;
      else if (q_first < num_read) end = imax(end, num_read);
    }
    return imin(end, valid);
  }

  RMT_FAST_HD int segment_query_begin(int k_first, int k_last) const {
    if (!causal) return 0;
    int begin = k_first;
    if (bidirectional) {
      if (k_first < num_read) begin = 0;
      if (k_last >= write_start) begin = imin(begin, write_start);
    }
    return begin;
  }
};

}  // namespace detail
}  // namespace rmt_fast

#undef RMT_FAST_HD
