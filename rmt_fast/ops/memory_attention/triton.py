"""Memory-token attention in Triton: FlashAttention-2 style forward and backward under the RMT segment mask.

The mask is never materialised: every tile computes it from its row/column indices and the row's
``valid = num_read + seq_lens[b] + num_write``. Query tiles visit only the key tiles that can hold an allowed key
(and key tiles only the query tiles that can), and tiles that are fully allowed skip the mask arithmetic.

Kernels (all accumulate in fp32; scores are kept in the log2 domain, ``s2 = q.k * scale * log2(e)``):

- ``_fwd_kernel``: one program per (query tile, b, q head); online softmax; writes O and ``lse2`` (log2-sum-exp,
  ``+inf`` at padding queries so that the backward gives them probability 0).

The backward has three schedules (``_schedule``), built from two program bodies and one dQ kernel:

- ``_bwd_dq_program``: one query tile of one (b, q head): delta = rowsum(dO * O) of its rows, then a loop over
  the key tiles it can see, accumulating dQ (three matmuls per tile pair: S, dP, dQ).
- ``_bwd_dkdv_program``: one key tile of one (b, kv head): loops over the query heads of the GQA group and the
  query tiles that can see it, accumulating dK/dV without atomics (four matmuls: S, dP, dV, dK); optionally
  writes each dS tile it computes.
- ``_bwd_dq_stored_kernel``: dQ = dS K from those stored tiles (one matmul per tile pair).

"fused" (small problems, where an eager call is host-bound): ``_bwd_fused_kernel``, one launch whose 1-D grid
holds the dK/dV programs and then the dQ programs, each computing delta from O itself. "stored" (larger problems
where one GQA group's dS fits ``StoredBackward.max_bytes``): ``_bwd_delta_kernel``, then per chunk of heads
``_bwd_dkdv_kernel`` writing dS and ``_bwd_dq_stored_kernel``: five matmuls per tile pair, like FlashAttention's
backward, without its atomics. On a GPU the chunks alternate between two streams, each with its own dS slot.
"split" (the rest): ``_bwd_dq_kernel`` (stores delta) then ``_bwd_dkdv_kernel`` (reads it): seven matmuls, no
quadratic memory.

Short-term cache (``num_cache > 0``: keys ``[B, Hkv, num_cache + N, D]``, the cache's first; see ``mask_rule``): the
entry points launch the ``*_cache_kernel`` twin of each kernel, the same program body with the constexpr ``CACHE``
set (the plain kernels pass ``CACHE=False``, which leaves their code as it is without the cache). The cache and the
segment reach the kernels as separate views of k/v (and of dk/dv), so the segment's code is the plain one. Each
query tile first visits the cache's key tiles that hold real keys, ``[cache_start, num_cache)`` with
``cache_start = num_cache - cache_lens[b]`` read on the device (``_cache_range``; ``_cache_allowed`` masks the edge
tiles); the first ``cdiv(num_cache, BLOCK_N)`` key tiles of each dK/dV grid row are the cache's, seen by every
valid query; the stored schedule's dS blocks gain ``CP`` rows (``num_cache`` rounded up to 128) in front.

Row loads: on sm_90+ the forward and the stored/split backward of large problems load Q/K/V/O/dO rows (and dS tiles)
through host-side TMA tensor descriptors (``TMA=True``: the Hopper tensor memory accelerator does the address
arithmetic and the bounds; see ``_use_tma``), elsewhere through pointer arithmetic. One code path: ``_rows`` takes
either a descriptor or a pointer.

Under ``TRITON_INTERPRET=1`` (set before this module is imported) the same kernels run on CPU tensors with one fixed
small tile config, and every loaded tile is upcast to fp32 (the interpreter's bf16/fp16 dot is not reliable).
On a GPU the tile sizes come from a fixed table per head dim (``_launch_config``; larger forward and stored-dQ tiles
from ``LONG_ROWS`` rows on sm_90+). The op never synchronises with the host, so it can be captured in a CUDA graph
(the stored schedule's second stream forks from and joins the caller's stream inside the capture).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import warnings

import torch
import triton
import triton.language as tl

try:  # host-side TMA descriptors (Triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: pointer loads only
    TensorDescriptor = None

from ..launch import Launcher

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_LOG2E = math.log2(math.e)


# ----------------------------------------------------------------------------------------------------------------
# The mask and the tile ranges, from indices alone
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _allowed(i, j, valid, num_read, write_start, CAUSAL: tl.constexpr, BIDIR: tl.constexpr):
    """May query ``i`` attend key ``j``: ``mask_rule`` of spec.py (the specification) restated for tiles. Query
    validity is not checked: padding queries are zeroed at the end of the forward and have probability 0 in the
    backward."""
    ok = j < valid
    if CAUSAL:
        rule = j <= i
        if BIDIR:
            rule = rule | ((i < num_read) & (j < num_read)) | ((i >= write_start) & (j >= write_start))
        ok = ok & rule
    return ok


@triton.jit
def _cache_allowed(j, cache_start, num_cache):
    """May a query attend short-term cache key ``j`` (its index in the cache prefix ``[0, num_cache)``): the cache
    part of ``mask_rule``, the row's real cache keys ``[cache_start, num_cache)``. Query validity is not checked,
    as in ``_allowed``."""
    return (j >= cache_start) & (j < num_cache)


@triton.jit
def _cache_start(CACHE_LENS, b, num_cache):
    """Row b's first real cache key: ``num_cache - cache_lens[b]``, the length clamped to ``[0, num_cache]``."""
    cache_len = tl.minimum(tl.maximum(tl.load(CACHE_LENS + b).to(tl.int32), 0), num_cache)
    return num_cache - cache_len


@triton.jit
def _cache_range(m0, valid, cache_start, num_cache, BLOCK_N: tl.constexpr):
    """For the query tile starting at ``m0``: ``(lo, full_lo, full_hi, hi)`` over the cache keys. Key tiles (from
    0 in steps of BLOCK_N) in ``[lo, full_lo)`` and ``[full_hi, hi)`` need the mask (they hold ``cache_start`` or
    ``num_cache``), those in ``[full_lo, full_hi)`` hold real cache keys only. All are 0 when the tile holds no
    valid query or the row has no cache key."""
    lo = (cache_start // BLOCK_N) * BLOCK_N
    full_lo = tl.minimum(tl.cdiv(cache_start, BLOCK_N) * BLOCK_N, num_cache)
    full_hi = tl.maximum((num_cache // BLOCK_N) * BLOCK_N, full_lo)
    none = (m0 >= valid) | (cache_start >= num_cache)
    return (tl.where(none, 0, lo), tl.where(none, 0, full_lo), tl.where(none, 0, full_hi),
            tl.where(none, 0, num_cache))


@triton.jit
def _query_tile(H, GROUPS, BH0):
    """``(bh, b, q head, kv head, query tile)`` of a program of a (heads, query tiles) grid whose first row is
    (b, q head) ``BH0`` (flattened ``b * H + h``), the last query tiles first: under the causal mask they have the
    most keys, so the long programs start in the first wave and the short ones fill the tail."""
    bh = BH0 + tl.program_id(0)
    h = bh % H
    return bh, bh // H, h, h // GROUPS, tl.num_programs(1) - 1 - tl.program_id(1)


@triton.jit
def _row_bounds(SEQ_LENS, b, N, num_read, num_write):
    """Row b's ``(write_start, valid)``: where its write slots start, and how many positions are valid (<= N)."""
    write_start = num_read + tl.load(SEQ_LENS + b).to(tl.int32)
    return write_start, tl.minimum(write_start + num_write, N)


@triton.jit
def _key_range(m0, valid, num_read, write_start, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, BIDIR: tl.constexpr):
    """For the query tile starting at ``m0``: ``(full_end, end)``. Key tiles in ``[0, full_end)`` are allowed for
    every query of the tile (no mask needed), tiles in ``[full_end, end)`` need the mask, later ones hold no
    allowed key. Both are 0 when the tile holds no valid query."""
    if CAUSAL:
        end = m0 + BLOCK_M
        if BIDIR:
            # Read queries see every read key, write queries every write key (the write block ends at valid).
            end = tl.where(m0 < num_read, tl.maximum(end, num_read), end)
            end = tl.where(m0 + BLOCK_M > write_start, valid, end)
        end = tl.minimum(end, valid)
        # Key j <= m0 is allowed for every query i >= m0 of the tile.
        full_end = (tl.minimum(m0 + 1, valid) // BLOCK_N) * BLOCK_N
    else:
        end = valid
        full_end = (valid // BLOCK_N) * BLOCK_N
    end = tl.where(m0 < valid, end, 0)
    full_end = tl.minimum(full_end, end)
    return full_end, end


@triton.jit
def _query_range(n0, valid, num_read, write_start, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, BIDIR: tl.constexpr):
    """For the key tile starting at ``n0``: ``(start, full_start, end)``. Query tiles in ``[start, full_start)``
    need the mask, those in ``[full_start, end)`` are allowed for every key of the tile. The tile that holds
    ``valid`` is always masked (its padding keys must stay out of the sums); all are 0 when the key tile holds no
    valid key."""
    if CAUSAL:
        start = (n0 // BLOCK_M) * BLOCK_M
        if BIDIR:
            # Read keys are seen by every read query, write keys by every write query (even earlier ones).
            start = tl.where(n0 < num_read, 0, start)
            start = tl.where(n0 + BLOCK_N > write_start, tl.minimum(start, (write_start // BLOCK_M) * BLOCK_M),
                             start)
        # Query i >= n0 + BLOCK_N - 1 sees every key of the tile.
        full_start = tl.cdiv(n0 + BLOCK_N - 1, BLOCK_M) * BLOCK_M
    else:
        start = n0 * 0
        full_start = n0 * 0
    end = tl.where(n0 < valid, valid, 0)
    full_start = tl.where(n0 + BLOCK_N > valid, end, full_start)
    start = tl.minimum(start, end)
    full_start = tl.minimum(tl.maximum(full_start, start), end)
    return start, full_start, end


@triton.jit
def _load_tile(ptrs, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    if BLOCK_D == HEAD_DIM:
        x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    else:
        x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _src(X, b, h, stride_b, stride_h, TMA: tl.constexpr):
    """Where the rows of (b, h) of X come from: X itself when it is a tensor descriptor (``TMA``), else the pointer
    to row 0 of (b, h)."""
    src = X
    if not TMA:
        src = X + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
    return src


@triton.jit
def _rows(src, b, h, r0, stride_n, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
          BLOCK: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr):
    """Rows ``[r0, r0 + BLOCK)`` of (b, h), ``[BLOCK, BLOCK_D]``, zeros past ``n_rows`` and ``HEAD_DIM``. With ``TMA``
    ``src`` is a 4-D tensor descriptor ``[B, H, N, D]`` (block ``[1, 1, BLOCK, BLOCK_D]``, zero padding) and the
    copy is the Hopper tensor-memory accelerator's; else ``src`` points at row 0 of (b, h)."""
    if TMA:
        x = src.load([b, h, r0, 0]).reshape(BLOCK, BLOCK_D)
        if UPCAST:
            x = x.to(tl.float32)
    else:
        rows = r0 + tl.arange(0, BLOCK)
        x = _load_tile(src + rows[:, None] * stride_n + offs_d[None, :], rows, n_rows, offs_d, HEAD_DIM, BLOCK_D,
                       UPCAST)
    return x


# ----------------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_src, v_src, b, hk, stride_kn, stride_vn, offs_m, offs_d, lo, hi, N, valid,
               num_read, write_start, cache_start, num_cache, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
               CACHE_KEYS: tl.constexpr, CAUSAL: tl.constexpr, BIDIR: tl.constexpr, UPCAST: tl.constexpr,
               DOT_PRECISION: tl.constexpr, TMA: tl.constexpr):
    """Key tiles ``[lo, hi)`` of ``k_src``/``v_src`` (N rows) into the online softmax: the segment's keys, or with
    ``CACHE_KEYS`` the short-term cache's (N is then ``num_cache``, and the mask ``_cache_allowed``)."""
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _rows(k_src, b, hk, n0, stride_kn, N, offs_d, HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, TMA)
        v = _rows(v_src, b, hk, n0, stride_vn, N, offs_d, HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, TMA)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            if CACHE_KEYS:
                ok = _cache_allowed(offs_n[None, :], cache_start, num_cache)
            else:
                ok = _allowed(offs_m[:, None], offs_n[None, :], valid, num_read, write_start, CAUSAL, BIDIR)
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no allowed key so far keeps m = -inf; shift by 0 instead so that no inf - inf appears.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_program(Q, K, V, O, LSE, SEQ_LENS, KC, VC, CACHE_LENS,
                 stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                 stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                 H, GROUPS, N, num_read, num_write, num_cache, qk_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, BIDIR: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 TMA: tl.constexpr, CACHE: tl.constexpr):
    """One query tile of a (b, q head) of a (B*H, query tiles) grid, the last query tiles first
    (``_query_tile``). K/V hold the segment's keys; with ``CACHE`` also KC/VC, the short-term cache's (same
    strides, ``num_cache`` rows; ``CACHE_LENS`` real ones per row, the last), which every valid query sees."""
    bh, b, h, hk, pid_m = _query_tile(H, GROUPS, 0)
    write_start, valid = _row_bounds(SEQ_LENS, b, N, num_read, num_write)

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    b64 = b.to(tl.int64)
    k_src = _src(K, b, hk, stride_kb, stride_kh, TMA)
    v_src = _src(V, b, hk, stride_vb, stride_vh, TMA)
    q = _rows(_src(Q, b, h, stride_qb, stride_qh, TMA), b, h, m0, stride_qn, N, offs_d, HEAD_DIM, BLOCK_D, BLOCK_M,
              UPCAST, TMA)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if CACHE:
        cache_start = _cache_start(CACHE_LENS, b, num_cache)
        kc_src = _src(KC, b, hk, stride_kb, stride_kh, TMA)
        vc_src = _src(VC, b, hk, stride_vb, stride_vh, TMA)
        lo, full_lo, full_hi, hi = _cache_range(m0, valid, cache_start, num_cache, BLOCK_N)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, kc_src, vc_src, b, hk, stride_kn, stride_vn, offs_m, offs_d,
                                   lo, full_lo, num_cache, valid, num_read, write_start, cache_start, num_cache,
                                   qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, True, True, CAUSAL, BIDIR, UPCAST,
                                   DOT_PRECISION, TMA)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, kc_src, vc_src, b, hk, stride_kn, stride_vn, offs_m, offs_d,
                                   full_lo, full_hi, num_cache, valid, num_read, write_start, cache_start, num_cache,
                                   qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, False, True, CAUSAL, BIDIR, UPCAST,
                                   DOT_PRECISION, TMA)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, kc_src, vc_src, b, hk, stride_kn, stride_vn, offs_m, offs_d,
                                   full_hi, hi, num_cache, valid, num_read, write_start, cache_start, num_cache,
                                   qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, True, True, CAUSAL, BIDIR, UPCAST,
                                   DOT_PRECISION, TMA)
    full_end, end = _key_range(m0, valid, num_read, write_start, BLOCK_M, BLOCK_N, CAUSAL, BIDIR)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_src, v_src, b, hk, stride_kn, stride_vn, offs_m, offs_d,
                               0, full_end, N, valid, num_read, write_start, 0, 0, qk_scale,
                               HEAD_DIM, BLOCK_D, BLOCK_N, False, False, CAUSAL, BIDIR, UPCAST, DOT_PRECISION, TMA)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_src, v_src, b, hk, stride_kn, stride_vn, offs_m, offs_d,
                               full_end, end, N, valid, num_read, write_start, 0, 0, qk_scale,
                               HEAD_DIM, BLOCK_D, BLOCK_N, True, False, CAUSAL, BIDIR, UPCAST, DOT_PRECISION, TMA)

    row_ok = (offs_m < valid) & (l_i > 0.0)
    l_safe = tl.where(row_ok, l_i, 1.0)
    out = tl.where(row_ok[:, None], acc / l_safe[:, None], 0.0)
    lse = tl.where(row_ok, m_i + tl.math.log2(l_safe), float("inf"))
    o_ptrs = O + b64 * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m[:, None] < N) & (offs_d[None, :] < HEAD_DIM))
    tl.store(LSE + bh.to(tl.int64) * N + offs_m, lse, mask=offs_m < N)


@triton.jit(do_not_specialize=["num_read", "num_write"])
def _fwd_kernel(Q, K, V, O, LSE, SEQ_LENS,
                stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                H, GROUPS, N, num_read, num_write, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                CAUSAL: tl.constexpr, BIDIR: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                TMA: tl.constexpr):
    # Grid (B*H, query tiles); no short-term cache.
    _fwd_program(Q, K, V, O, LSE, SEQ_LENS, K, V, SEQ_LENS, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh,
                 stride_kn, stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                 H, GROUPS, N, num_read, num_write, 0, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, CAUSAL, BIDIR,
                 UPCAST, DOT_PRECISION, TMA, False)


@triton.jit(do_not_specialize=["num_read", "num_write", "num_cache"])
def _fwd_cache_kernel(Q, K, V, O, LSE, SEQ_LENS, KC, VC, CACHE_LENS,
                      stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                      stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                      H, GROUPS, N, num_read, num_write, num_cache, qk_scale,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      CAUSAL: tl.constexpr, BIDIR: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      TMA: tl.constexpr):
    # Grid (B*H, query tiles); K/V the segment's keys, KC/VC the short-term cache's (see _fwd_program).
    _fwd_program(Q, K, V, O, LSE, SEQ_LENS, KC, VC, CACHE_LENS, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh,
                 stride_kn, stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                 H, GROUPS, N, num_read, num_write, num_cache, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, CAUSAL,
                 BIDIR, UPCAST, DOT_PRECISION, TMA, True)


# ----------------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_src, do_src, o_src, b, h, lse_base, delta_base, stride_qn, stride_don, stride_on,
                    offs_n, offs_d, lo, hi, N, valid, num_read, write_start, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
                    CAUSAL: tl.constexpr, BIDIR: tl.constexpr, UPCAST: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, DELTA_FROM_O: tl.constexpr, TMA: tl.constexpr,
                    ds_src, ds_row, n0, NP, STORE_DS: tl.constexpr, CACHE_KEYS: tl.constexpr, cache_start,
                    num_cache):
    """Query tiles ``[lo, hi)`` into dK/dV of one key tile (rows ``offs_n``): a segment key tile, or with
    ``CACHE_KEYS`` a tile of the short-term cache (mask ``_cache_allowed``). With ``STORE_DS`` each dS^T tile goes
    to ``ds_src`` (key rows ``offs_n``, or at TMA coordinate ``n0``)."""
    for m0 in range(lo, hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        q = _rows(q_src, b, h, m0, stride_qn, N, offs_d, HEAD_DIM, BLOCK_D, BLOCK_M, UPCAST, TMA)
        do = _rows(do_src, b, h, m0, stride_don, N, offs_d, HEAD_DIM, BLOCK_D, BLOCK_M, UPCAST, TMA)
        # lse is +inf at padding queries: their probabilities are exactly 0.
        lse = tl.load(lse_base + offs_m, mask=offs_m < N, other=float("inf"))
        if DELTA_FROM_O:
            o = _rows(o_src, b, h, m0, stride_on, N, offs_d, HEAD_DIM, BLOCK_D, BLOCK_M, True, TMA)
            delta = tl.sum(o * do.to(tl.float32), 1)
        else:
            delta = tl.load(delta_base + offs_m, mask=offs_m < N, other=0.0)
        # Transposed scores [BLOCK_N, BLOCK_M]: keys along rows, so dK/dV accumulate without transposing back.
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        p_t = tl.math.exp2(s_t - lse[None, :])
        if MASKED:
            if CACHE_KEYS:
                ok = _cache_allowed(offs_n[:, None], cache_start, num_cache)
            else:
                ok = _allowed(offs_m[None, :], offs_n[:, None], valid, num_read, write_start, CAUSAL, BIDIR)
            p_t = tl.where(ok, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        if STORE_DS:  # for the dQ kernel of the "stored" schedule: dS^T, key-major, per (b, q head)
            if TMA:
                tile = ds_t.to(ds_src.dtype).reshape(1, ds_t.shape[0], ds_t.shape[1])
                ds_src.store([ds_row.to(tl.int32), n0, m0], tile)
            else:
                tl.store(ds_src + offs_n[:, None].to(tl.int64) * NP + offs_m[None, :],
                         ds_t.to(ds_src.dtype.element_ty))
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv_tile(n0, b, hk, write_start, valid, Q, K, V, O, DO, LSE, DELTA, DK, DV, DS,
                   stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                   stride_dob, stride_doh, stride_don, stride_dkb, stride_dkh, stride_dkn,
                   stride_dvb, stride_dvh, stride_dvn, H, GROUPS, N, NP, CP, DS_ROW0, num_read, scale, qk_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, BIDIR: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   DELTA_FROM_O: tl.constexpr, TMA: tl.constexpr, STORE_DS: tl.constexpr, CACHE: tl.constexpr):
    """dK/dV of the segment key tile starting at ``n0`` of (b, kv head hk) (see ``_bwd_dkdv_program``). With
    ``CACHE`` the dS blocks start with ``CP`` rows of cache keys: the segment's rows follow them."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    b64 = b.to(tl.int64)
    k = _rows(_src(K, b, hk, stride_kb, stride_kh, TMA), b, hk, n0, stride_kn, N, offs_d, HEAD_DIM, BLOCK_D,
              BLOCK_N, UPCAST, TMA)
    v = _rows(_src(V, b, hk, stride_vb, stride_vh, TMA), b, hk, n0, stride_vn, N, offs_d, HEAD_DIM, BLOCK_D,
              BLOCK_N, UPCAST, TMA)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    start, full_start, end = _query_range(n0, valid, num_read, write_start, BLOCK_M, BLOCK_N, CAUSAL, BIDIR)
    ds_n0 = n0
    if CACHE:
        ds_n0 = n0 + CP
    for g in range(GROUPS):
        h = hk * GROUPS + g
        h64 = h.to(tl.int64)
        bh = b64 * H + h64
        q_src = _src(Q, b, h, stride_qb, stride_qh, TMA)
        do_src = _src(DO, b, h, stride_dob, stride_doh, TMA)
        o_src = _src(O, b, h, stride_ob, stride_oh, TMA)
        ds_row = bh - DS_ROW0
        ds_src = DS  # a TMA descriptor [heads, NP, NP] with TMA, else the pointer to (b, h)'s NP x NP block
        if not TMA:
            if CACHE:  # blocks of (CP + NP) x NP, the segment's rows after the cache's
                ds_src = DS + ds_row * (CP + NP) * NP + CP * NP
            else:
                ds_src = DS + ds_row * NP * NP
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_src, do_src, o_src, b, h, LSE + bh * N, DELTA + bh * N,
                                 stride_qn, stride_don, stride_on, offs_n, offs_d, start, full_start,
                                 N, valid, num_read, write_start, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, True,
                                 CAUSAL, BIDIR, UPCAST, DOT_PRECISION, DELTA_FROM_O, TMA, ds_src, ds_row, ds_n0,
                                 NP, STORE_DS, False, 0, 0)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_src, do_src, o_src, b, h, LSE + bh * N, DELTA + bh * N,
                                 stride_qn, stride_don, stride_on, offs_n, offs_d, full_start, end,
                                 N, valid, num_read, write_start, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, False,
                                 CAUSAL, BIDIR, UPCAST, DOT_PRECISION, DELTA_FROM_O, TMA, ds_src, ds_row, ds_n0,
                                 NP, STORE_DS, False, 0, 0)
    dk = dk * scale
    store_mask = (offs_n[:, None] < N) & (offs_d[None, :] < HEAD_DIM)
    tl.store(DK + b64 * stride_dkb + hk.to(tl.int64) * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=store_mask)
    tl.store(DV + b64 * stride_dvb + hk.to(tl.int64) * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=store_mask)


@triton.jit
def _bwd_dkdv_cache_tile(n0, b, hk, valid, cache_start, num_cache, Q, KC, VC, O, DO, LSE, DELTA, DKC, DVC, DS,
                         stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                         stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                         stride_dob, stride_doh, stride_don, stride_dkb, stride_dkh, stride_dkn,
                         stride_dvb, stride_dvh, stride_dvn, H, GROUPS, N, NP, CP, DS_ROW0, scale, qk_scale,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                         DELTA_FROM_O: tl.constexpr, TMA: tl.constexpr, STORE_DS: tl.constexpr):
    """dK/dV of the short-term cache's key tile starting at ``n0`` of (b, kv head hk): every valid query sees its
    real keys ``[cache_start, num_cache)``, so it loops over all query tiles of the row, masked only where the
    tile also holds padding keys (below ``cache_start`` or past ``num_cache``). A tile without a real key writes
    zeros. dS^T tiles go to the first ``CP`` rows of each (b, q head)'s dS block."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    b64 = b.to(tl.int64)
    k = _rows(_src(KC, b, hk, stride_kb, stride_kh, TMA), b, hk, n0, stride_kn, num_cache, offs_d, HEAD_DIM,
              BLOCK_D, BLOCK_N, UPCAST, TMA)
    v = _rows(_src(VC, b, hk, stride_vb, stride_vh, TMA), b, hk, n0, stride_vn, num_cache, offs_d, HEAD_DIM,
              BLOCK_D, BLOCK_N, UPCAST, TMA)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    end = tl.where(n0 + BLOCK_N > cache_start, valid, 0)  # padding keys only: no query
    full = (n0 >= cache_start) & (n0 + BLOCK_N <= num_cache)
    masked_end = tl.where(full, 0, end)
    full_end = tl.where(full, end, 0)
    for g in range(GROUPS):
        h = hk * GROUPS + g
        bh = b64 * H + h.to(tl.int64)
        q_src = _src(Q, b, h, stride_qb, stride_qh, TMA)
        do_src = _src(DO, b, h, stride_dob, stride_doh, TMA)
        o_src = _src(O, b, h, stride_ob, stride_oh, TMA)
        ds_row = bh - DS_ROW0
        ds_src = DS
        if not TMA:
            ds_src = DS + ds_row * (CP + NP) * NP
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_src, do_src, o_src, b, h, LSE + bh * N, DELTA + bh * N,
                                 stride_qn, stride_don, stride_on, offs_n, offs_d, 0, masked_end,
                                 N, valid, 0, 0, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, True,
                                 False, False, UPCAST, DOT_PRECISION, DELTA_FROM_O, TMA, ds_src, ds_row, n0,
                                 NP, STORE_DS, True, cache_start, num_cache)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_src, do_src, o_src, b, h, LSE + bh * N, DELTA + bh * N,
                                 stride_qn, stride_don, stride_on, offs_n, offs_d, 0, full_end,
                                 N, valid, 0, 0, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, False,
                                 False, False, UPCAST, DOT_PRECISION, DELTA_FROM_O, TMA, ds_src, ds_row, n0,
                                 NP, STORE_DS, True, cache_start, num_cache)
    dk = dk * scale
    store_mask = (offs_n[:, None] < num_cache) & (offs_d[None, :] < HEAD_DIM)
    tl.store(DKC + b64 * stride_dkb + hk.to(tl.int64) * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :],
             dk.to(DKC.dtype.element_ty), mask=store_mask)
    tl.store(DVC + b64 * stride_dvb + hk.to(tl.int64) * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :],
             dv.to(DVC.dtype.element_ty), mask=store_mask)


@triton.jit
def _bwd_dkdv_program(bhk, pid_n, Q, K, V, O, DO, LSE, DELTA, DK, DV, DS, SEQ_LENS, KC, VC, DKC, DVC, CACHE_LENS,
                      stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                      stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                      stride_dob, stride_doh, stride_don, stride_dkb, stride_dkh, stride_dkn,
                      stride_dvb, stride_dvh, stride_dvn, H, H_KV, GROUPS, N, NP, DS_ROW0, num_read, num_write,
                      num_cache, CP, scale, qk_scale,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      CAUSAL: tl.constexpr, BIDIR: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      DELTA_FROM_O: tl.constexpr, TMA: tl.constexpr, STORE_DS: tl.constexpr, CACHE: tl.constexpr):
    """dK/dV of key tile ``pid_n`` of (b, kv head) ``bhk``: loops over the query heads of the GQA group and the query
    tiles that can see the key tile. ``DELTA_FROM_O``: compute delta = rowsum(dO * O) per query tile instead of
    reading it from DELTA. ``STORE_DS``: also write each dS^T tile to DS (``[heads, NP, NP]``, key-major; row
    ``b * Hq + h - DS_ROW0`` for (b, q head h): a buffer that holds a chunk of the heads). With ``CACHE`` the first
    ``cdiv(num_cache, BLOCK_N)`` key tiles are the short-term cache's (KC/VC into DKC/DVC, the strides of K/V and
    DK/DV; dS blocks ``[CP + NP, NP]``, the cache's rows first), the rest the segment's."""
    b = bhk // H_KV
    hk = bhk % H_KV
    write_start, valid = _row_bounds(SEQ_LENS, b, N, num_read, num_write)
    if CACHE:
        cache_tiles = tl.cdiv(num_cache, BLOCK_N)
        if pid_n < cache_tiles:
            _bwd_dkdv_cache_tile(pid_n * BLOCK_N, b, hk, valid, _cache_start(CACHE_LENS, b, num_cache), num_cache,
                                 Q, KC, VC, O, DO, LSE, DELTA, DKC, DVC, DS,
                                 stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                                 stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                                 stride_dob, stride_doh, stride_don, stride_dkb, stride_dkh, stride_dkn,
                                 stride_dvb, stride_dvh, stride_dvn, H, GROUPS, N, NP, CP, DS_ROW0, scale, qk_scale,
                                 HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, UPCAST, DOT_PRECISION, DELTA_FROM_O, TMA,
                                 STORE_DS)
        else:
            _bwd_dkdv_tile((pid_n - cache_tiles) * BLOCK_N, b, hk, write_start, valid, Q, K, V, O, DO, LSE, DELTA,
                           DK, DV, DS, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                           stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                           stride_dob, stride_doh, stride_don, stride_dkb, stride_dkh, stride_dkn,
                           stride_dvb, stride_dvh, stride_dvn, H, GROUPS, N, NP, CP, DS_ROW0, num_read, scale,
                           qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, CAUSAL, BIDIR, UPCAST, DOT_PRECISION,
                           DELTA_FROM_O, TMA, STORE_DS, True)
    else:
        _bwd_dkdv_tile(pid_n * BLOCK_N, b, hk, write_start, valid, Q, K, V, O, DO, LSE, DELTA, DK, DV, DS,
                       stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                       stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                       stride_dob, stride_doh, stride_don, stride_dkb, stride_dkh, stride_dkn,
                       stride_dvb, stride_dvh, stride_dvn, H, GROUPS, N, NP, 0, DS_ROW0, num_read, scale, qk_scale,
                       HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, CAUSAL, BIDIR, UPCAST, DOT_PRECISION, DELTA_FROM_O, TMA,
                       STORE_DS, False)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_src, v_src, b, hk, stride_kn, stride_vn, offs_m, offs_d, lo, hi, N,
                  valid, num_read, write_start, cache_start, num_cache, qk_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                  CACHE_KEYS: tl.constexpr, CAUSAL: tl.constexpr, BIDIR: tl.constexpr, UPCAST: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, TMA: tl.constexpr):
    """Key tiles ``[lo, hi)`` of ``k_src``/``v_src`` (N rows) into dQ: the segment's keys, or with ``CACHE_KEYS``
    the short-term cache's (N is then ``num_cache``, and the mask ``_cache_allowed``)."""
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _rows(k_src, b, hk, n0, stride_kn, N, offs_d, HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, TMA)
        v = _rows(v_src, b, hk, n0, stride_vn, N, offs_d, HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, TMA)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:
            if CACHE_KEYS:
                ok = _cache_allowed(offs_n[None, :], cache_start, num_cache)
            else:
                ok = _allowed(offs_m[:, None], offs_n[None, :], valid, num_read, write_start, CAUSAL, BIDIR)
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _bwd_dq_program(bh, pid_m, Q, K, V, O, DO, LSE, DELTA, DQ, SEQ_LENS, KC, VC, CACHE_LENS,
                    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                    stride_dob, stride_doh, stride_don, stride_dqb, stride_dqh, stride_dqn,
                    H, GROUPS, N, num_read, num_write, num_cache, scale, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    CAUSAL: tl.constexpr, BIDIR: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    STORE_DELTA: tl.constexpr, TMA: tl.constexpr, CACHE: tl.constexpr):
    """dQ of query tile ``pid_m`` of (b, q head) ``bh``; delta = rowsum(dO * O) of its rows computed here (and
    stored into DELTA with ``STORE_DELTA``, for a dK/dV kernel that runs after this one). With ``CACHE`` also over
    the short-term cache's keys KC/VC (the strides of K/V)."""
    b = bh // H
    h = bh % H
    hk = h // GROUPS
    write_start, valid = _row_bounds(SEQ_LENS, b, N, num_read, num_write)

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    q = _rows(_src(Q, b, h, stride_qb, stride_qh, TMA), b, h, m0, stride_qn, N, offs_d, HEAD_DIM, BLOCK_D, BLOCK_M,
              UPCAST, TMA)
    do = _rows(_src(DO, b, h, stride_dob, stride_doh, TMA), b, h, m0, stride_don, N, offs_d, HEAD_DIM, BLOCK_D,
               BLOCK_M, UPCAST, TMA)
    o = _rows(_src(O, b, h, stride_ob, stride_oh, TMA), b, h, m0, stride_on, N, offs_d, HEAD_DIM, BLOCK_D, BLOCK_M,
              True, TMA)
    delta = tl.sum(o * do.to(tl.float32), 1)
    if STORE_DELTA:
        tl.store(DELTA + bh.to(tl.int64) * N + offs_m, delta, mask=offs_m < N)
    lse = tl.load(LSE + bh.to(tl.int64) * N + offs_m, mask=offs_m < N, other=float("inf"))
    k_src = _src(K, b, hk, stride_kb, stride_kh, TMA)
    v_src = _src(V, b, hk, stride_vb, stride_vh, TMA)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if CACHE:
        cache_start = _cache_start(CACHE_LENS, b, num_cache)
        kc_src = _src(KC, b, hk, stride_kb, stride_kh, TMA)
        vc_src = _src(VC, b, hk, stride_vb, stride_vh, TMA)
        lo, full_lo, full_hi, hi = _cache_range(m0, valid, cache_start, num_cache, BLOCK_N)
        dq = _bwd_dq_inner(dq, q, do, lse, delta, kc_src, vc_src, b, hk, stride_kn, stride_vn, offs_m, offs_d, lo,
                           full_lo, num_cache, valid, num_read, write_start, cache_start, num_cache, qk_scale,
                           HEAD_DIM, BLOCK_D, BLOCK_N, True, True, CAUSAL, BIDIR, UPCAST, DOT_PRECISION, TMA)
        dq = _bwd_dq_inner(dq, q, do, lse, delta, kc_src, vc_src, b, hk, stride_kn, stride_vn, offs_m, offs_d,
                           full_lo, full_hi, num_cache, valid, num_read, write_start, cache_start, num_cache, qk_scale,
                           HEAD_DIM, BLOCK_D, BLOCK_N, False, True, CAUSAL, BIDIR, UPCAST, DOT_PRECISION, TMA)
        dq = _bwd_dq_inner(dq, q, do, lse, delta, kc_src, vc_src, b, hk, stride_kn, stride_vn, offs_m, offs_d,
                           full_hi, hi, num_cache, valid, num_read, write_start, cache_start, num_cache, qk_scale,
                           HEAD_DIM, BLOCK_D, BLOCK_N, True, True, CAUSAL, BIDIR, UPCAST, DOT_PRECISION, TMA)
    full_end, end = _key_range(m0, valid, num_read, write_start, BLOCK_M, BLOCK_N, CAUSAL, BIDIR)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_src, v_src, b, hk, stride_kn, stride_vn, offs_m, offs_d, 0, full_end,
                       N, valid, num_read, write_start, 0, 0, qk_scale,
                       HEAD_DIM, BLOCK_D, BLOCK_N, False, False, CAUSAL, BIDIR, UPCAST, DOT_PRECISION, TMA)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_src, v_src, b, hk, stride_kn, stride_vn, offs_m, offs_d, full_end,
                       end, N, valid, num_read, write_start, 0, 0, qk_scale,
                       HEAD_DIM, BLOCK_D, BLOCK_N, True, False, CAUSAL, BIDIR, UPCAST, DOT_PRECISION, TMA)
    dq = dq * scale
    tl.store(DQ + b64 * stride_dqb + h64 * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=(offs_m[:, None] < N) & (offs_d[None, :] < HEAD_DIM))


@triton.jit(do_not_specialize=["num_read", "num_write"])
def _bwd_dq_kernel(Q, K, V, O, DO, LSE, DELTA, DQ, SEQ_LENS,
                   stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                   stride_dob, stride_doh, stride_don, stride_dqb, stride_dqh, stride_dqn,
                   H, GROUPS, N, num_read, num_write, scale, qk_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, BIDIR: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   TMA: tl.constexpr):
    # Grid (B*H, query tiles), the last query tiles first: under the causal mask they have the most keys, so the
    # long programs start in the first wave and the short ones fill the tail.
    _bwd_dq_program(tl.program_id(0), tl.num_programs(1) - 1 - tl.program_id(1), Q, K, V, O, DO, LSE, DELTA, DQ,
                    SEQ_LENS, K, V, SEQ_LENS, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                    stride_dob, stride_doh, stride_don, stride_dqb, stride_dqh, stride_dqn,
                    H, GROUPS, N, num_read, num_write, 0, scale, qk_scale,
                    HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, CAUSAL, BIDIR, UPCAST, DOT_PRECISION, True, TMA, False)


@triton.jit(do_not_specialize=["num_read", "num_write", "num_cache"])
def _bwd_dq_cache_kernel(Q, K, V, O, DO, LSE, DELTA, DQ, SEQ_LENS, KC, VC, CACHE_LENS,
                         stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                         stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                         stride_dob, stride_doh, stride_don, stride_dqb, stride_dqh, stride_dqn,
                         H, GROUPS, N, num_read, num_write, num_cache, scale, qk_scale,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         CAUSAL: tl.constexpr, BIDIR: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                         TMA: tl.constexpr):
    # _bwd_dq_kernel with the short-term cache's keys KC/VC (see _bwd_dq_program).
    _bwd_dq_program(tl.program_id(0), tl.num_programs(1) - 1 - tl.program_id(1), Q, K, V, O, DO, LSE, DELTA, DQ,
                    SEQ_LENS, KC, VC, CACHE_LENS, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                    stride_dob, stride_doh, stride_don, stride_dqb, stride_dqh, stride_dqn,
                    H, GROUPS, N, num_read, num_write, num_cache, scale, qk_scale,
                    HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, CAUSAL, BIDIR, UPCAST, DOT_PRECISION, True, TMA, True)


@triton.jit(do_not_specialize=["PAIR0", "num_read", "num_write"])
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DS, SEQ_LENS,
                     stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                     stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
                     stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                     H, H_KV, GROUPS, N, NP, PAIR0, num_read, num_write, scale, qk_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     CAUSAL: tl.constexpr, BIDIR: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     TMA: tl.constexpr, STORE_DS: tl.constexpr):
    # Grid (kv heads, key tiles), its first row (b, kv head) PAIR0 (flattened b * H_KV + hk): the first key tiles
    # (the most queries under the causal mask) start first. Reads the delta stored by the kernel before it (O is not
    # needed: its strides are passed as 0); with STORE_DS writes dS, row 0 of DS being (b, q head) PAIR0 * GROUPS.
    _bwd_dkdv_program(PAIR0 + tl.program_id(0), tl.program_id(1), Q, K, V, Q, DO, LSE, DELTA, DK, DV, DS, SEQ_LENS,
                      K, V, DK, DV, SEQ_LENS, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                      stride_vb, stride_vh, stride_vn, 0, 0, 0, stride_dob, stride_doh, stride_don,
                      stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                      H, H_KV, GROUPS, N, NP, PAIR0 * GROUPS, num_read, num_write, 0, 0, scale, qk_scale,
                      HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, CAUSAL, BIDIR, UPCAST, DOT_PRECISION, False, TMA, STORE_DS,
                      False)


@triton.jit(do_not_specialize=["PAIR0", "num_read", "num_write", "num_cache", "CP"])
def _bwd_dkdv_cache_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DS, SEQ_LENS, KC, VC, DKC, DVC, CACHE_LENS,
                           stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                           stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
                           stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                           H, H_KV, GROUPS, N, NP, PAIR0, num_read, num_write, num_cache, CP, scale, qk_scale,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, BIDIR: tl.constexpr, UPCAST: tl.constexpr,
                           DOT_PRECISION: tl.constexpr, TMA: tl.constexpr, STORE_DS: tl.constexpr):
    # _bwd_dkdv_kernel with the short-term cache: its key tiles (KC/VC into DKC/DVC) come first in each row of the
    # grid, then the segment's (see _bwd_dkdv_program); with STORE_DS the dS blocks are [CP + NP, NP].
    _bwd_dkdv_program(PAIR0 + tl.program_id(0), tl.program_id(1), Q, K, V, Q, DO, LSE, DELTA, DK, DV, DS, SEQ_LENS,
                      KC, VC, DKC, DVC, CACHE_LENS, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                      stride_vb, stride_vh, stride_vn, 0, 0, 0, stride_dob, stride_doh, stride_don,
                      stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                      H, H_KV, GROUPS, N, NP, PAIR0 * GROUPS, num_read, num_write, num_cache, CP, scale, qk_scale,
                      HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, CAUSAL, BIDIR, UPCAST, DOT_PRECISION, False, TMA, STORE_DS,
                      True)


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, stride_ob, stride_oh, stride_on, stride_dob, stride_doh, stride_don, H, N,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    # Grid (B*H, query tiles): delta = rowsum(dO * O) in fp32, for the "stored" schedule's dK/dV kernel.
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None] * stride_on
                   + offs_d[None, :], offs_m, N, offs_d, HEAD_DIM, BLOCK_D, True)
    do = _load_tile(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh + offs_m[:, None] * stride_don
                    + offs_d[None, :], offs_m, N, offs_d, HEAD_DIM, BLOCK_D, True)
    tl.store(DELTA + bh.to(tl.int64) * N + offs_m, tl.sum(o * do, 1), mask=offs_m < N)


@triton.jit
def _bwd_dq_stored_inner(dq, k_src, ds_src, b, hk, ds_row, stride_kn, NP, m0, offs_m, offs_d, lo, hi, N, valid,
                         num_read, write_start, cache_start, num_cache, ds_key0, HEAD_DIM: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                         CACHE_KEYS: tl.constexpr, CAUSAL: tl.constexpr, BIDIR: tl.constexpr, UPCAST: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, TMA: tl.constexpr):
    """Key tiles ``[lo, hi)`` of ``k_src`` (N rows) and their stored dS^T tiles into dQ: the segment's keys, or with
    ``CACHE_KEYS`` the short-term cache's (N is then ``num_cache``). ``ds_key0``: the TMA row coordinate of key 0 in
    the dS block (``ds_src`` points at it otherwise)."""
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _rows(k_src, b, hk, n0, stride_kn, N, offs_d, HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, TMA)
        if TMA:
            ds_t = ds_src.load([ds_row, n0 + ds_key0, m0]).reshape(BLOCK_N, BLOCK_M)
        else:
            ds_t = tl.load(ds_src + offs_n[:, None].to(tl.int64) * NP + offs_m[None, :])
        if UPCAST:
            ds_t = ds_t.to(tl.float32)
        if MASKED:  # pairs that are not allowed were never written
            if CACHE_KEYS:
                ok = _cache_allowed(offs_n[:, None], cache_start, num_cache)
            else:
                ok = _allowed(offs_m[None, :], offs_n[:, None], valid, num_read, write_start, CAUSAL, BIDIR)
            ds_t = tl.where(ok, ds_t, 0.0)
        dq += tl.dot(tl.trans(ds_t).to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _bwd_dq_stored_program(K, DS, DQ, SEQ_LENS, KC, CACHE_LENS, stride_kb, stride_kh, stride_kn, stride_dqb,
                           stride_dqh, stride_dqn, H, GROUPS, N, NP, BH0, num_read, num_write, num_cache, CP, scale,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, BIDIR: tl.constexpr, UPCAST: tl.constexpr,
                           DOT_PRECISION: tl.constexpr, TMA: tl.constexpr, CACHE: tl.constexpr):
    """Grid (heads, query tiles) from (b, q head) BH0 on (row 0 of DS), the last query tiles first: dQ = dS K * scale
    from the dS^T tiles the dK/dV kernel stored. Only the allowed pairs of valid queries were stored: masked tiles
    select them, and rows past ``valid`` (which may have read unwritten memory) are zeroed at the end; every row
    of dQ depends on its own row of dS only. With ``CACHE`` also the short-term cache's keys KC (the strides of K),
    whose dS^T rows come first in each (b, q head)'s ``[CP + NP, NP]`` block."""
    bh, b, h, hk, pid_m = _query_tile(H, GROUPS, BH0)
    write_start, valid = _row_bounds(SEQ_LENS, b, N, num_read, num_write)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k_src = _src(K, b, hk, stride_kb, stride_kh, TMA)
    ds_row = bh - BH0
    ds_src = DS
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if CACHE:
        cache_start = _cache_start(CACHE_LENS, b, num_cache)
        kc_src = _src(KC, b, hk, stride_kb, stride_kh, TMA)
        if not TMA:
            ds_src = DS + ds_row.to(tl.int64) * (CP + NP) * NP
        lo, full_lo, full_hi, hi = _cache_range(m0, valid, cache_start, num_cache, BLOCK_N)
        dq = _bwd_dq_stored_inner(dq, kc_src, ds_src, b, hk, ds_row, stride_kn, NP, m0, offs_m, offs_d, lo, full_lo,
                                  num_cache, valid, num_read, write_start, cache_start, num_cache, 0, HEAD_DIM,
                                  BLOCK_D, BLOCK_M, BLOCK_N, True, True, CAUSAL, BIDIR, UPCAST, DOT_PRECISION, TMA)
        dq = _bwd_dq_stored_inner(dq, kc_src, ds_src, b, hk, ds_row, stride_kn, NP, m0, offs_m, offs_d, full_lo,
                                  full_hi, num_cache, valid, num_read, write_start, cache_start, num_cache, 0,
                                  HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, False, True, CAUSAL, BIDIR, UPCAST,
                                  DOT_PRECISION, TMA)
        dq = _bwd_dq_stored_inner(dq, kc_src, ds_src, b, hk, ds_row, stride_kn, NP, m0, offs_m, offs_d, full_hi, hi,
                                  num_cache, valid, num_read, write_start, cache_start, num_cache, 0, HEAD_DIM,
                                  BLOCK_D, BLOCK_M, BLOCK_N, True, True, CAUSAL, BIDIR, UPCAST, DOT_PRECISION, TMA)
        if not TMA:
            ds_src = ds_src + CP * NP
        ds_key0 = CP
    else:
        if not TMA:
            ds_src = DS + ds_row.to(tl.int64) * NP * NP
        ds_key0 = 0
    full_end, end = _key_range(m0, valid, num_read, write_start, BLOCK_M, BLOCK_N, CAUSAL, BIDIR)
    dq = _bwd_dq_stored_inner(dq, k_src, ds_src, b, hk, ds_row, stride_kn, NP, m0, offs_m, offs_d, 0, full_end, N,
                              valid, num_read, write_start, 0, 0, ds_key0, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, False,
                              False, CAUSAL, BIDIR, UPCAST, DOT_PRECISION, TMA)
    dq = _bwd_dq_stored_inner(dq, k_src, ds_src, b, hk, ds_row, stride_kn, NP, m0, offs_m, offs_d, full_end, end, N,
                              valid, num_read, write_start, 0, 0, ds_key0, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, True,
                              False, CAUSAL, BIDIR, UPCAST, DOT_PRECISION, TMA)
    dq = tl.where(offs_m[:, None] < valid, dq * scale, 0.0)
    tl.store(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh + offs_m[:, None] * stride_dqn
             + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=(offs_m[:, None] < N) & (offs_d[None, :] < HEAD_DIM))


@triton.jit(do_not_specialize=["BH0", "num_read", "num_write"])
def _bwd_dq_stored_kernel(K, DS, DQ, SEQ_LENS, stride_kb, stride_kh, stride_kn, stride_dqb, stride_dqh, stride_dqn,
                          H, GROUPS, N, NP, BH0, num_read, num_write, scale,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, BIDIR: tl.constexpr, UPCAST: tl.constexpr,
                          DOT_PRECISION: tl.constexpr, TMA: tl.constexpr):
    # See _bwd_dq_stored_program; no short-term cache.
    _bwd_dq_stored_program(K, DS, DQ, SEQ_LENS, K, SEQ_LENS, stride_kb, stride_kh, stride_kn, stride_dqb, stride_dqh,
                           stride_dqn, H, GROUPS, N, NP, BH0, num_read, num_write, 0, 0, scale, HEAD_DIM, BLOCK_D,
                           BLOCK_M, BLOCK_N, CAUSAL, BIDIR, UPCAST, DOT_PRECISION, TMA, False)


@triton.jit(do_not_specialize=["BH0", "num_read", "num_write", "num_cache", "CP"])
def _bwd_dq_stored_cache_kernel(K, DS, DQ, SEQ_LENS, KC, CACHE_LENS, stride_kb, stride_kh, stride_kn, stride_dqb,
                                stride_dqh, stride_dqn, H, GROUPS, N, NP, BH0, num_read, num_write, num_cache, CP,
                                scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, BIDIR: tl.constexpr,
                                UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA: tl.constexpr):
    # See _bwd_dq_stored_program; with the short-term cache's keys KC.
    _bwd_dq_stored_program(K, DS, DQ, SEQ_LENS, KC, CACHE_LENS, stride_kb, stride_kh, stride_kn, stride_dqb,
                           stride_dqh, stride_dqn, H, GROUPS, N, NP, BH0, num_read, num_write, num_cache, CP, scale,
                           HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, CAUSAL, BIDIR, UPCAST, DOT_PRECISION, TMA, True)


@triton.jit
def _bwd_fused_program(Q, K, V, O, DO, LSE, DQ, DK, DV, SEQ_LENS, KC, VC, DKC, DVC, CACHE_LENS,
                       stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                       stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                       stride_dob, stride_doh, stride_don, stride_dqb, stride_dqh, stride_dqn,
                       stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                       H, H_KV, GROUPS, N, KV_PROGRAMS, KV_TILES, Q_TILES, num_read, num_write, num_cache, scale,
                       qk_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M1: tl.constexpr,
                       BLOCK_N1: tl.constexpr, BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr,
                       CAUSAL: tl.constexpr, BIDIR: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       CACHE: tl.constexpr):
    """One launch for the whole backward (1-D grid): the first KV_PROGRAMS programs are dK/dV programs (first key
    tiles first; KV_TILES per (b, kv head), with ``CACHE`` the short-term cache's first), the rest dQ programs (last
    query tiles first). Neither reads the other's output: both compute delta from O themselves."""
    pid = tl.program_id(0)
    if pid < KV_PROGRAMS:
        _bwd_dkdv_program(pid // KV_TILES, pid % KV_TILES, Q, K, V, O, DO, LSE, LSE, DK, DV, LSE, SEQ_LENS,
                          KC, VC, DKC, DVC, CACHE_LENS, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh,
                          stride_kn, stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                          stride_dob, stride_doh, stride_don, stride_dkb, stride_dkh, stride_dkn,
                          stride_dvb, stride_dvh, stride_dvn, H, H_KV, GROUPS, N, 0, 0, num_read, num_write,
                          num_cache, 0, scale, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M1, BLOCK_N1, CAUSAL, BIDIR, UPCAST,
                          DOT_PRECISION, True, False, False, CACHE)
    else:
        j = pid - KV_PROGRAMS
        _bwd_dq_program(j // Q_TILES, Q_TILES - 1 - j % Q_TILES, Q, K, V, O, DO, LSE, LSE, DQ, SEQ_LENS, KC, VC,
                        CACHE_LENS, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                        stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                        stride_dob, stride_doh, stride_don, stride_dqb, stride_dqh, stride_dqn,
                        H, GROUPS, N, num_read, num_write, num_cache, scale, qk_scale,
                        HEAD_DIM, BLOCK_D, BLOCK_M2, BLOCK_N2, CAUSAL, BIDIR, UPCAST, DOT_PRECISION, False, False,
                        CACHE)


@triton.jit(do_not_specialize=["num_read", "num_write"])
def _bwd_fused_kernel(Q, K, V, O, DO, LSE, DQ, DK, DV, SEQ_LENS,
                      stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                      stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                      stride_dob, stride_doh, stride_don, stride_dqb, stride_dqh, stride_dqn,
                      stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                      H, H_KV, GROUPS, N, KV_PROGRAMS, KV_TILES, Q_TILES, num_read, num_write, scale, qk_scale,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M1: tl.constexpr,
                      BLOCK_N1: tl.constexpr, BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr,
                      CAUSAL: tl.constexpr, BIDIR: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # See _bwd_fused_program; no short-term cache.
    _bwd_fused_program(Q, K, V, O, DO, LSE, DQ, DK, DV, SEQ_LENS, K, V, DK, DV, SEQ_LENS,
                       stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                       stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                       stride_dob, stride_doh, stride_don, stride_dqb, stride_dqh, stride_dqn,
                       stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                       H, H_KV, GROUPS, N, KV_PROGRAMS, KV_TILES, Q_TILES, num_read, num_write, 0, scale, qk_scale,
                       HEAD_DIM, BLOCK_D, BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2, CAUSAL, BIDIR, UPCAST,
                       DOT_PRECISION, False)


@triton.jit(do_not_specialize=["num_read", "num_write", "num_cache"])
def _bwd_fused_cache_kernel(Q, K, V, O, DO, LSE, DQ, DK, DV, SEQ_LENS, KC, VC, DKC, DVC, CACHE_LENS,
                            stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                            stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                            stride_dob, stride_doh, stride_don, stride_dqb, stride_dqh, stride_dqn,
                            stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                            H, H_KV, GROUPS, N, KV_PROGRAMS, KV_TILES, Q_TILES, num_read, num_write, num_cache, scale,
                            qk_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M1: tl.constexpr,
                            BLOCK_N1: tl.constexpr, BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr,
                            CAUSAL: tl.constexpr, BIDIR: tl.constexpr, UPCAST: tl.constexpr,
                            DOT_PRECISION: tl.constexpr):
    # See _bwd_fused_program; with the short-term cache (KC/VC into DKC/DVC).
    _bwd_fused_program(Q, K, V, O, DO, LSE, DQ, DK, DV, SEQ_LENS, KC, VC, DKC, DVC, CACHE_LENS,
                       stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                       stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                       stride_dob, stride_doh, stride_don, stride_dqb, stride_dqh, stride_dqn,
                       stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                       H, H_KV, GROUPS, N, KV_PROGRAMS, KV_TILES, Q_TILES, num_read, num_write, num_cache, scale,
                       qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2, CAUSAL, BIDIR, UPCAST,
                       DOT_PRECISION, True)


# ----------------------------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------------------------


KERNELS = ("fwd", "dq", "dkdv", "fused", "dq_stored")


@functools.lru_cache(maxsize=None)
def _launch_config(kernel: str, head_dim: int, dtype: torch.dtype, long_rows: bool = False) -> dict:
    """Tile sizes, warps and pipeline stages for ``kernel`` with the head-dim constants.

    kernel: "fwd", "dq" and "dkdv" (the split backward; "dkdv" also in the stored one), "dq_stored" (the stored
    backward's dQ from dS) or "fused" (the one-launch backward: ``BLOCK_M1`` and ``BLOCK_N1`` of its dK/dV programs,
    ``BLOCK_M2`` and ``BLOCK_N2`` of its dQ programs). Fixed per head dim rather than autotuned: no first-call
    tuning pause, and the op can be captured in a CUDA graph on its first call. The table holds the tiles that
    sweeps on an H200 picked (bf16 at 8x12x544x64, 4x16x2080x128 and 1x16x8224x128; RESULTS.md "2026-11-29: a
    one-launch attention backward", "2026-11-29: TMA row loads", "2026-11-29/30: long-row tiles"); ``long_rows``
    (see :func:`_long_rows`) selects larger forward and stored-dQ tiles for N >= LONG_ROWS at D > 64. The D64 fused
    dK/dV tiles are 16x64 because 16x128 spills registers. The forward's key loop is not warp-specialised
    (``tl.range(warp_specialize=True)``): Triton 3.6 fails to compile it for 64x64 tiles.
    ``python benchmarks/attention.py --sweep`` re-measures the candidates on another GPU.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    dims = {"HEAD_DIM": head_dim, "BLOCK_D": max(16, triton.next_power_of_2(head_dim)), "UPCAST": _INTERPRET,
            "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32"}
    if _INTERPRET:  # the interpreter runs one program at a time on numpy: small tiles
        if kernel == "fused":
            return {**dims, "BLOCK_M1": 16, "BLOCK_N1": 16, "BLOCK_M2": 16, "BLOCK_N2": 16}
        return {**dims, "BLOCK_M": 16, "BLOCK_N": 16}
    if dtype == torch.float32:  # fp32 tiles are twice the bytes: smaller tiles, fewer stages (shared memory)
        table = {"fwd": (64, 32, 4, 2), "dkdv": (32, 32, 4, 2), "dq": (32, 32, 4, 2),
                 "fused": (32, 32, 32, 32, 4, 2), "dq_stored": (32, 32, 4, 2)}
    elif head_dim > 64:
        table = {"fwd": (64, 64, 4, 3), "dkdv": (32, 64, 4, 3), "dq": (64, 32, 4, 3),
                 "fused": (32, 64, 64, 32, 4, 3), "dq_stored": (64, 32, 4, 3)}
        if long_rows:  # N >= LONG_ROWS: longer loops per program favour larger tiles and deeper pipelines
            table.update({"fwd": (128, 128, 8, 3), "dq_stored": (128, 32, 4, 4)})
    else:
        table = {"fwd": (64, 64, 4, 3), "dkdv": (16, 128, 4, 3), "dq": (64, 32, 4, 4),
                 "fused": (16, 64, 64, 32, 4, 3), "dq_stored": (64, 32, 4, 3)}
    *blocks, warps, stages = table[kernel]
    names = ("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2") if kernel == "fused" else ("BLOCK_M", "BLOCK_N")
    return {**dims, **dict(zip(names, blocks)), "num_warps": warps, "num_stages": stages}


# Rows (N) from which the D > 64 half-precision forward and stored dQ kernels take the long-row tiles of
# ``_launch_config`` (RESULTS.md "2026-11-29/30: long-row tiles").
LONG_ROWS = 4096

SCHEDULES = ("split", "fused", "stored")
_schedule_override: str | None = None
# Below this much work (B * Hq * N * (num_cache + N) * D) the backward takes one launch ("fused"): at such sizes an
# eager call is host-bound, and the launch saved is worth more than the GPU time the fused kernel spends recomputing
# delta.
FUSED_MAX_WORK = 8 * 2 ** 30
_NP_ROUND = 128


@dataclasses.dataclass(frozen=True)
class StoredBackward:
    """The memory and streams of the "stored" backward schedule (see :func:`_schedule`).

    Its dS buffer holds NP * NP elements of q's dtype per (b, q head), NP = N rounded up to 128, and lives for one
    backward call. ``max_bytes`` (default 1.25 GiB) caps it: the (b, kv head) pairs run in balanced chunks of whole
    GQA groups that fit (see :func:`_stored_plan`; e.g. 4x16x2080x128 bf16 needs 606 MB in all: two chunks of 32
    heads on two streams; 1x16x8224x128 needs 138 MB per head, 2.2 GB in all: four chunks of 4 heads on two
    streams, 1.1 GB). A problem whose one GQA group does not fit the cap takes the "split" schedule; 0 turns
    "stored" off.

    ``streams`` (1 or 2, default 2): on a GPU the chunks alternate between the caller's stream and a second one,
    each with its own dS slot of half the cap, in at least ``min_chunks`` chunks (>= 1; two streams make two at
    least), so one chunk's memory-bound dQ launch runs beside the other's compute-bound dK/dV launch. One stream
    where there is a single (b, kv head) pair or one GQA group does not fit half the cap; always one on the CPU.
    Measurements: RESULTS.md "2026-11-29: the stored backward in chunks of heads" and "2026-11-29/30: long-row
    tiles".
    """

    max_bytes: int = 5 * 2 ** 28
    streams: int = 2
    min_chunks: int = 2

    def __post_init__(self):
        if not (isinstance(self.max_bytes, int) and self.max_bytes >= 0):
            raise ValueError(f"max_bytes must be an int >= 0, got {self.max_bytes!r}")
        if self.streams not in (1, 2):
            raise ValueError(f"streams must be one of (1, 2), got {self.streams!r}")
        if not (isinstance(self.min_chunks, int) and self.min_chunks >= 1):
            raise ValueError(f"min_chunks must be an int >= 1, got {self.min_chunks!r}")


_stored_backward = StoredBackward()  # what backward() takes when it is given none; set_stored_backward replaces it


def set_stored_backward(config: StoredBackward) -> StoredBackward:
    """Make ``config`` what every later backward of this backend takes (the op's calls through autograd and
    ``torch.compile`` included) unless :func:`backward` is given one; returns the one it replaces. Process-wide on
    purpose: the autograd engine runs CUDA backwards on its own threads, where a context-local setting made around
    ``loss.backward()`` would not be seen. E.g. ``set_stored_backward(StoredBackward(max_bytes=2 ** 30))``."""
    global _stored_backward
    if not isinstance(config, StoredBackward):
        raise TypeError(f"config must be a StoredBackward, got {type(config).__name__}")
    previous, _stored_backward = _stored_backward, config
    return previous


def stored_backward() -> StoredBackward:
    """The :class:`StoredBackward` that a backward given none takes."""
    return _stored_backward


_streams_override: int | None = None


@contextlib.contextmanager
def _override(variable: str, value, allowed: tuple, arg: str):
    """Set the module-level ``variable`` to ``value`` (one of ``allowed``, else a ValueError naming ``arg``) inside
    the context."""
    if value not in allowed:
        raise ValueError(f"{arg} must be one of {allowed}, got {value!r}")
    module = globals()
    saved, module[variable] = module[variable], value
    try:
        yield
    finally:
        module[variable] = saved


def backward_schedule(name: str):
    """Inside this context every backward uses ``name`` (one of :data:`SCHEDULES`) instead of the automatic choice
    (for benchmarks and tests)."""
    return _override("_schedule_override", name, SCHEDULES, "name")


def stored_streams(count: int):
    """Inside this context the stored schedule runs its chunks on ``count`` streams (1 or 2; on the CPU the
    chunks and slots are planned the same way and run in order) instead of ``StoredBackward.streams`` on a GPU and
    one on the CPU (for benchmarks and tests)."""
    return _override("_streams_override", count, (1, 2), "count")


def _stored_streams(q: torch.Tensor, stored: StoredBackward) -> int:
    if _streams_override is not None:
        return _streams_override
    return stored.streams if q.is_cuda else 1


_side_streams: dict[int, torch.cuda.Stream] = {}


class _Streams:
    """Where the stored schedule's chunks run. ``with _Streams(device, count) as on_stream``: ``on_stream(i)`` is a
    context that makes stream i current: 0 the caller's current stream, 1 a second stream of the device (created
    once per device). The second stream first waits for the work queued before the context, and at exit the
    caller's stream waits for it, so outputs and buffers are safe to use and free in the caller's stream order (and
    a CUDA graph capture forks and joins). On the CPU, or with one stream, every ``on_stream(i)`` is a no-op."""

    def __init__(self, device: torch.device, count: int):
        self.streams = None
        if count > 1 and device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            if index not in _side_streams:
                _side_streams[index] = torch.cuda.Stream(device=index)
            self.streams = (torch.cuda.current_stream(index), _side_streams[index])

    def __enter__(self):
        if self.streams is None:
            return lambda i: contextlib.nullcontext()
        self.streams[1].wait_stream(self.streams[0])
        return lambda i: torch.cuda.stream(self.streams[i])

    def __exit__(self, *exc) -> bool:
        if self.streams is not None:
            self.streams[0].wait_stream(self.streams[1])
        return False


def _padded_rows(n: int) -> int:
    """NP: the side of the stored schedule's per-(b, head) dS block."""
    return _cdiv(n, _NP_ROUND) * _NP_ROUND


def _group_bytes(groups: int, n: int, dtype: torch.dtype, num_cache: int = 0) -> int:
    """The stored schedule's dS bytes for one (b, kv head): its GQA group of ``groups`` query heads (with a
    short-term cache each head's block has ``_padded_rows(num_cache)`` more key rows)."""
    np_ = _padded_rows(n)
    return groups * (_padded_rows(num_cache) + np_) * np_ * dtype.itemsize


def _chunk_sizes(pairs: int, groups: int, n: int, dtype: torch.dtype, budget: int, min_chunks: int = 1,
                 num_cache: int = 0) -> list[int]:
    """(b, kv head) pairs of each chunk of the stored schedule: the fewest chunks (at least ``min_chunks``, at most
    one per pair) whose dS fits ``budget`` bytes each, balanced (sizes differ by at most one, larger first)."""
    chunks = max(min_chunks, _cdiv(pairs, max(1, budget // _group_bytes(groups, n, dtype, num_cache))))
    chunks = min(chunks, pairs)
    return [pairs // chunks + (i < pairs % chunks) for i in range(chunks)]


def _stored_plan(pairs: int, groups: int, n: int, dtype: torch.dtype, streams: int,
                 stored: StoredBackward, num_cache: int = 0) -> tuple[list[int], int]:
    """``(pairs of each chunk, streams)`` of the stored schedule for ``pairs`` (b, kv head) pairs on at most
    ``streams`` streams. With two streams each holds one dS slot of half the ``stored.max_bytes`` budget, and there
    are at least ``stored.min_chunks`` chunks (two at least); one stream when there is a single pair or one GQA group
    does not fit half the budget."""
    budget = stored.max_bytes
    if streams > 1 and pairs > 1 and 2 * _group_bytes(groups, n, dtype, num_cache) <= budget:
        return _chunk_sizes(pairs, groups, n, dtype, budget // 2, max(2, stored.min_chunks), num_cache), 2
    return _chunk_sizes(pairs, groups, n, dtype, budget, 1, num_cache), 1


def _schedule(b: int, h: int, h_kv: int, n: int, d: int, dtype: torch.dtype, stored: StoredBackward,
              num_cache: int = 0) -> str:
    """How the backward runs: "fused" (one launch; dK/dV and dQ programs side by side, each computing delta),
    "stored" (delta; dK/dV writing dS; dQ from dS) or "split" (a dQ kernel that stores delta, then a dK/dV kernel
    that reads it). All are deterministic and agree with the reference to rounding; they differ in launches (host
    time), GPU time and memory. "fused" saves host time where an eager call is host-bound and costs GPU time at
    D128 with thousands of rows; there "stored" (five matmuls per tile pair) is faster than "split" (seven) for
    ``NP^2`` elements of transient memory per head (RESULTS.md "2026-11-29: a one-launch attention backward",
    "2026-11-29: TMA row loads"). Hence: "fused" up to FUSED_MAX_WORK, "stored" (its heads in chunks of at most
    ``stored.max_bytes`` of dS) while one GQA group of heads fits that budget, else "split". The work of a layout
    with a short-term cache counts its ``num_cache`` keys too: ``B * Hq * N * (num_cache + N) * D``."""
    name = _schedule_override
    if name is None:
        if b * h * n * (n + num_cache) * d <= FUSED_MAX_WORK:
            name = "fused"
        else:
            name = "stored" if _group_bytes(h // h_kv, n, dtype, num_cache) <= stored.max_bytes else "split"
    return name


LOADS = ("auto", "tma", "pointer")
_loads_override: str | None = None


def row_loads(mode: str):
    """How the forward and the split/stored backward load rows of Q/K/V/O/dO inside this context: "tma" (4-D tensor
    descriptors, the copy done by Hopper's tensor memory accelerator; tensors whose strides or addresses are not
    16-byte aligned still take pointer loads), "pointer" (pointer arithmetic, ``tl.load``) or "auto" (the default:
    TMA on sm_90+ for large problems, see :func:`_use_tma`). For benchmarks and tests."""
    return _override("_loads_override", mode, LOADS, "mode")


@functools.lru_cache(maxsize=None)
def _has_tma(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def _long_rows(q: torch.Tensor) -> bool:
    """Whether the forward and the stored dQ kernel take ``_launch_config``'s long-row tiles: N >= LONG_ROWS on a GPU
    of compute capability 9.0+ (they were measured on an H200 only; with TMA loads the forward's take 225 KB of
    shared memory). CPU tensors (launches that triton_check records and compiles for sm_90) count as such a GPU."""
    return q.shape[2] >= LONG_ROWS and (not q.is_cuda or _has_tma(q.device.index))


def _tma_aligned(x: torch.Tensor) -> bool:
    """16-byte aligned base and (batch, head, row) strides, none of them 0 over more than one element (a broadcast
    view: a TMA descriptor needs real strides)."""
    size = x.element_size()
    return x.data_ptr() % 16 == 0 and all(st * size % 16 == 0 and (st > 0 or dim == 1)
                                          for st, dim in zip(x.stride()[:3], x.shape[:3]))


def _use_tma(work: int, *xs: torch.Tensor) -> bool:
    """Load rows through TMA descriptors: forced by :func:`row_loads`, or ("auto") on a GPU of compute capability
    9.0+ when ``work`` (B * Hq * N * (num_cache + N) * D) is above FUSED_MAX_WORK. Either way only when every
    tensor's base address and (batch, head, row) strides are 16-byte aligned (a TMA requirement), and never again
    after a TMA launch failed (``_tma_off``). Timings with and without: RESULTS.md "2026-11-29: TMA row loads"."""
    mode = _loads_override or "auto"
    if mode == "pointer" or TensorDescriptor is None or _tma_failed is not None:
        return False
    if mode == "auto" and not (not _INTERPRET and work > FUSED_MAX_WORK and xs[0].is_cuda
                               and _has_tma(xs[0].device.index)):
        return False
    return all(_tma_aligned(x) for x in xs)


def _arg(x: torch.Tensor, tma: bool, *block: int):
    """``x`` as a kernel argument: itself, or with ``tma`` a TMA descriptor over it whose block is ``block`` in its
    trailing dims (leading dims 1): ``[rows, BLOCK_D]`` of one (b, h) of ``[B, H, N, D]`` (columns past D and rows
    past N read as zeros), ``[key rows, query cols]`` of one (b, h) of the stored dS^T ``[B * Hq, NP, NP]``."""
    if not tma:
        return x
    return TensorDescriptor(x, list(x.shape), list(x.stride()), [1] * (x.dim() - len(block)) + list(block))


_tma_failed: str | None = None


def _tma_off(e: Exception) -> None:
    """A launch with TMA loads failed (an installed Triton or driver that cannot build or run them): from now on
    every call takes pointer loads; one warning."""
    global _tma_failed
    _tma_failed = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    warnings.warn(f"rmt_fast: memory_attention's TMA row loads failed ({_tma_failed}); using pointer loads",
                  RuntimeWarning, stacklevel=3)


def _strides(*xs: torch.Tensor) -> list[int]:
    """The (batch, head, row) strides of each tensor in turn; the kernels index the head dim as contiguous."""
    out = []
    for x in xs:
        out += x.stride()[:3]
    return out


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # triton.cdiv is a constexpr function: several microseconds per host call


def _inner_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


# Launch plans (rmt_fast.ops.launch.Plan) of the one-launch calls, the host-bound ones: the forward without TMA
# loads and the "fused" backward, each at most FUSED_MAX_WORK (where the automatic choices take neither TMA nor
# another schedule). Keyed by what determines every non-pointer argument of the launch: the inputs' shapes,
# strides and dtypes, the mask arguments and the scale (outputs are allocated like q, k, v: their strides follow).
# A plan skips the schedule and launch-config lookups, the argument building and the launch key (host times:
# RESULTS.md "2026-11-30: lean Triton launches").
_plans: dict = {}
MAX_PLANS = 4096


def _remember(key, launcher: Launcher, grid: tuple, args: tuple, meta: dict) -> None:
    """Keep a plan of this launch (just made) under ``key`` once the launcher has one to give, or False once it says
    there will be none (another Triton: the key is then not built again for nothing)."""
    plan = launcher.plan(grid, *args, **meta)
    if plan is not None:
        if len(_plans) >= MAX_PLANS:
            _plans.clear()
        _plans[key] = plan


_fwd = Launcher(_fwd_kernel)
_bwd_dq = Launcher(_bwd_dq_kernel)
_bwd_dkdv = Launcher(_bwd_dkdv_kernel)
_bwd_fused = Launcher(_bwd_fused_kernel)
_bwd_delta = Launcher(_bwd_delta_kernel)
_bwd_dq_stored = Launcher(_bwd_dq_stored_kernel)
# the same with a short-term cache
_fwd_cache = Launcher(_fwd_cache_kernel)
_bwd_dq_cache = Launcher(_bwd_dq_cache_kernel)
_bwd_dkdv_cache = Launcher(_bwd_dkdv_cache_kernel)
_bwd_fused_cache = Launcher(_bwd_fused_cache_kernel)
_bwd_dq_stored_cache = Launcher(_bwd_dq_stored_cache_kernel)


# ----------------------------------------------------------------------------------------------------------------
# Entry points (called by the rmt_fast::memory_attention custom ops)
# ----------------------------------------------------------------------------------------------------------------


def _segment(x: torch.Tensor, num_cache: int) -> torch.Tensor:
    """The segment's rows of keys (or their gradient) ``[B, H, num_cache + N, D]``: the last N, a view."""
    return x.narrow(2, num_cache, x.shape[2] - num_cache)


def _cache_prefix(x: torch.Tensor, num_cache: int) -> torch.Tensor:
    """The short-term cache's rows of keys (or their gradient): the first ``num_cache``, a view."""
    return x.narrow(2, 0, num_cache)


def _full_cache_lens(cache_lens: torch.Tensor | None, b: int, num_cache: int, device) -> torch.Tensor:
    return torch.full((b,), num_cache, dtype=torch.int32, device=device) if cache_lens is None else cache_lens


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor, num_read: int,
            num_write: int, causal: bool, bidirectional: bool, scale: float, num_cache: int = 0,
            cache_lens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q ``[B, Hq, N, D]``, k/v ``[B, Hkv, num_cache + N, D]`` (one dtype, any strides), seq_lens ``[B]``
    int32/int64. With ``num_cache > 0`` the first ``num_cache`` keys of each row are its short-term cache, of which
    the last ``cache_lens[b]`` (``[B]`` int32/int64; None: all) are real, seen by every valid query (``mask_rule``).

    Returns ``(out, lse)``: out ``[B, Hq, N, D]`` like q (dtype and memory layout; zeros at padding queries),
    lse ``[B, Hq, N]`` fp32, the base-2 log-sum-exp (``+inf`` at padding queries). No host synchronisation:
    ``valid[b]`` is clamped to N and ``cache_lens[b]`` to ``[0, num_cache]``, not checked.
    """
    q, k, v = _inner_contiguous(q), _inner_contiguous(k), _inner_contiguous(v)
    b, h, n, d = q.shape
    o = torch.empty_like(q)
    lse = q.new_empty((b, h, n), dtype=torch.float32)
    if num_cache:
        cache_lens = _full_cache_lens(cache_lens, b, num_cache, q.device)
    work = b * h * n * (n + num_cache) * d
    key = None
    if q.is_cuda and _loads_override is None and work <= FUSED_MAX_WORK:
        key = ("fwd", q.shape, k.shape, q.stride(), k.stride(), v.stride(), q.dtype, k.dtype, v.dtype, seq_lens.dtype,
               num_read, num_write, causal, bidirectional, scale)
        if num_cache:
            key += (cache_lens.dtype,)
            plan = _plans.get(key)
            done = plan and plan(q, _segment(k, num_cache), _segment(v, num_cache), o, lse, seq_lens, k, v, cache_lens)
        else:
            plan = _plans.get(key)
            done = plan and plan(q, k, v, o, lse, seq_lens)
        if done:
            return o, lse
        if plan is not None:  # a plan that declined this call, or none to be had: nothing to remember
            key = None
    cfg = _launch_config("fwd", d, q.dtype, _long_rows(q))
    _with_tma_fallback(_forward, _use_tma(work, q, k, v), q, k, v, o, lse, seq_lens, num_read, num_write, causal,
                       bidirectional, scale, num_cache, cache_lens, cfg, key)
    return o, lse


def _with_tma_fallback(run, tma: bool, *args) -> None:
    """``run(*args, tma=tma)``. If the TMA launch fails, the same call with pointer loads: when that one succeeds,
    TMA was at fault (an installed Triton or driver that cannot build or run it) and is turned off for the process
    (``_tma_off``, one warning); when it fails too, its error is the caller's (bad inputs) and TMA stays on."""
    if tma:
        try:
            run(*args, tma=True)
            return
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - judged below by the pointer path
            error = e
        run(*args, tma=False)
        _tma_off(error)
        return
    run(*args, tma=False)


def _forward(q, k, v, o, lse, seq_lens, num_read, num_write, causal, bidirectional, scale, num_cache, cache_lens, cfg,
             plan_key, tma: bool) -> None:
    b, h, n, _ = q.shape
    m, nn, bd = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_D"]
    grid = (b * h, _cdiv(n, m))
    meta = dict(CAUSAL=causal, BIDIR=bidirectional, TMA=tma, **cfg)
    if num_cache:
        launcher = _fwd_cache
        args = (_arg(q, tma, m, bd), _arg(_segment(k, num_cache), tma, nn, bd),
                _arg(_segment(v, num_cache), tma, nn, bd), o, lse, seq_lens,
                _arg(_cache_prefix(k, num_cache), tma, nn, bd), _arg(_cache_prefix(v, num_cache), tma, nn, bd),
                cache_lens, *_strides(q, k, v, o), h, h // k.shape[1], n, num_read, num_write, num_cache,
                scale * _LOG2E)
    else:
        launcher = _fwd
        args = (_arg(q, tma, m, bd), _arg(k, tma, nn, bd), _arg(v, tma, nn, bd), o, lse, seq_lens,
                *_strides(q, k, v, o), h, h // k.shape[1], n, num_read, num_write, scale * _LOG2E)
    launcher(grid, *args, **meta)
    if plan_key is not None and not tma:
        _remember(plan_key, launcher, grid, args, meta)


def backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, seq_lens: torch.Tensor, num_read: int, num_write: int, causal: bool,
             bidirectional: bool, scale: float, num_cache: int = 0, cache_lens: torch.Tensor | None = None,
             stored: StoredBackward | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` shaped, typed and laid out like q, k, v (k/v ``[B, Hkv, num_cache + N, D]``, the
    short-term cache's keys first, as in :func:`forward`); exactly 0 at padding positions (padding cache keys
    included).

    One launch ("fused") for small problems; "stored" (delta, dK/dV writing dS, dQ from dS) or "split" (dQ, which
    also writes ``delta = rowsum(dO * O)``, then dK/dV) otherwise: see :func:`_schedule`. ``stored``: the stored
    schedule's dS budget and streams, default :func:`stored_backward` (see :func:`set_stored_backward`).
    """
    if stored is None:
        stored = _stored_backward
    q, k, v, do = _inner_contiguous(q), _inner_contiguous(k), _inner_contiguous(v), _inner_contiguous(dout)
    b, h, n, d = q.shape
    h_kv = k.shape[1]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if num_cache:
        cache_lens = _full_cache_lens(cache_lens, b, num_cache, q.device)
    work = b * h * n * (n + num_cache) * d
    key = None
    if q.is_cuda and _schedule_override is None and work <= FUSED_MAX_WORK:
        key = ("bwd", q.shape, k.shape, q.stride(), k.stride(), v.stride(), out.stride(), do.stride(), q.dtype,
               k.dtype, v.dtype, out.dtype, do.dtype, lse.dtype, seq_lens.dtype, num_read, num_write, causal,
               bidirectional, scale)
        if num_cache:
            key += (cache_lens.dtype,)
            plan = _plans.get(key)
            done = plan and plan(q, _segment(k, num_cache), _segment(v, num_cache), out, do, lse, dq,
                                 _segment(dk, num_cache), _segment(dv, num_cache), seq_lens, k, v, dk, dv, cache_lens)
        else:
            plan = _plans.get(key)
            done = plan and plan(q, k, v, out, do, lse, dq, dk, dv, seq_lens)
        if done:
            return dq, dk, dv
        if plan is not None:  # a plan that declined this call, or none to be had: nothing to remember
            key = None
    schedule = _schedule(b, h, h_kv, n, d, q.dtype, stored, num_cache)
    if schedule == "fused":
        cfg = _launch_config("fused", d, q.dtype)
        kv_tiles, q_tiles = _cdiv(n, cfg["BLOCK_N1"]) + _cdiv(num_cache, cfg["BLOCK_N1"]), _cdiv(n, cfg["BLOCK_M2"])
        kv_programs = b * h_kv * kv_tiles
        grid = (kv_programs + b * h * q_tiles,)
        strides = _strides(q, k, v, out, do, dq, dk, dv)
        if num_cache:
            launcher = _bwd_fused_cache
            args = (q, _segment(k, num_cache), _segment(v, num_cache), out, do, lse, dq, _segment(dk, num_cache),
                    _segment(dv, num_cache), seq_lens, k, v, dk, dv, cache_lens, *strides, h, h_kv, h // h_kv, n,
                    kv_programs, kv_tiles, q_tiles, num_read, num_write, num_cache, scale, scale * _LOG2E)
        else:
            launcher = _bwd_fused
            args = (q, k, v, out, do, lse, dq, dk, dv, seq_lens, *strides, h, h_kv, h // h_kv, n, kv_programs,
                    kv_tiles, q_tiles, num_read, num_write, scale, scale * _LOG2E)
        meta = dict(CAUSAL=causal, BIDIR=bidirectional, **cfg)
        launcher(grid, *args, **meta)
        if key is not None:
            _remember(key, launcher, grid, args, meta)
        return dq, dk, dv
    run = _backward_split
    if schedule == "stored":
        groups = h // h_kv
        chunks, streams = _stored_plan(b * h_kv, groups, n, q.dtype, _stored_streams(q, stored), stored, num_cache)
        try:
            np_ = _padded_rows(n)
            rows = streams * chunks[0] * groups
            if num_cache:
                ds = _new_ds(q, rows, np_, _padded_rows(num_cache) + np_)
            else:
                ds = _new_ds(q, rows, np_)
            run = functools.partial(_backward_stored, ds=ds, chunks=chunks, streams=streams)
        except torch.OutOfMemoryError:  # no room for dS: the split schedule needs none
            pass
    _with_tma_fallback(run, _use_tma(work, q, k, v, out, do), q, k, v, out, do, lse, dq, dk, dv, seq_lens, num_read,
                       num_write, causal, bidirectional, scale, num_cache, cache_lens)
    return dq, dk, dv


def _new_ds(q: torch.Tensor, rows: int, np_: int, key_rows: int | None = None) -> torch.Tensor:
    """The stored schedule's dS^T buffer ``[rows, key_rows, NP]`` (``key_rows`` default NP; with a short-term cache
    ``CP + NP``) in q's dtype, one block per query head of a chunk (uninitialised: only the pairs the dQ kernel reads
    unmasked are written)."""
    return q.new_empty((rows, np_ if key_rows is None else key_rows, np_))


def _backward_split(q, k, v, out, do, lse, dq, dk, dv, seq_lens, num_read, num_write, causal, bidirectional,
                    scale, num_cache, cache_lens, tma: bool) -> None:
    """The "split" schedule: dQ (which stores delta), then dK/dV (which reads it)."""
    b, h, n, d = q.shape
    h_kv = k.shape[1]
    delta = torch.empty_like(lse)
    cfg = _launch_config("dq", d, q.dtype)
    m, nn, bd = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_D"]  # q/o/dO: a query tile, k/v: key tiles
    meta = dict(CAUSAL=causal, BIDIR=bidirectional, TMA=tma, **cfg)
    if num_cache:
        _bwd_dq_cache((b * h, _cdiv(n, m)),
                      _arg(q, tma, m, bd), _arg(_segment(k, num_cache), tma, nn, bd),
                      _arg(_segment(v, num_cache), tma, nn, bd), _arg(out, tma, m, bd), _arg(do, tma, m, bd), lse,
                      delta, dq, seq_lens, _arg(_cache_prefix(k, num_cache), tma, nn, bd),
                      _arg(_cache_prefix(v, num_cache), tma, nn, bd), cache_lens, *_strides(q, k, v, out, do, dq),
                      h, h // h_kv, n, num_read, num_write, num_cache, scale, scale * _LOG2E, **meta)
    else:
        _bwd_dq((b * h, _cdiv(n, m)),
                _arg(q, tma, m, bd), _arg(k, tma, nn, bd), _arg(v, tma, nn, bd), _arg(out, tma, m, bd),
                _arg(do, tma, m, bd), lse, delta, dq, seq_lens, *_strides(q, k, v, out, do, dq),
                h, h // h_kv, n, num_read, num_write, scale, scale * _LOG2E, **meta)
    cfg = _launch_config("dkdv", d, q.dtype)
    m, nn, bd = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_D"]  # k/v: a key tile, q/dO: query tiles
    meta = dict(CAUSAL=causal, BIDIR=bidirectional, TMA=tma, STORE_DS=False, **cfg)
    if num_cache:
        _bwd_dkdv_cache((b * h_kv, _cdiv(num_cache, nn) + _cdiv(n, nn)),
                        _arg(q, tma, m, bd), _arg(_segment(k, num_cache), tma, nn, bd),
                        _arg(_segment(v, num_cache), tma, nn, bd), _arg(do, tma, m, bd), lse, delta,
                        _segment(dk, num_cache), _segment(dv, num_cache), delta, seq_lens,
                        _arg(_cache_prefix(k, num_cache), tma, nn, bd), _arg(_cache_prefix(v, num_cache), tma, nn, bd),
                        dk, dv, cache_lens, *_strides(q, k, v, do, dk, dv), h, h_kv, h // h_kv, n, 0, 0, num_read,
                        num_write, num_cache, 0, scale, scale * _LOG2E, **meta)
    else:
        _bwd_dkdv((b * h_kv, _cdiv(n, nn)),
                  _arg(q, tma, m, bd), _arg(k, tma, nn, bd), _arg(v, tma, nn, bd), _arg(do, tma, m, bd),
                  lse, delta, dk, dv, delta, seq_lens, *_strides(q, k, v, do, dk, dv),
                  h, h_kv, h // h_kv, n, 0, 0, num_read, num_write, scale, scale * _LOG2E, **meta)


def _backward_stored(q, k, v, out, do, lse, dq, dk, dv, seq_lens, num_read, num_write, causal, bidirectional,
                     scale, num_cache, cache_lens, tma: bool, ds: torch.Tensor, chunks: list[int],
                     streams: int = 1) -> None:
    """The "stored" schedule: delta, then per chunk of (b, kv head) pairs (``chunks``: their sizes) dK/dV (which also
    writes every dS tile it computes into its stream's slot of ``ds``, ``[chunk's query heads, NP, NP]`` in q's
    dtype, NP = N rounded up to 128; with a short-term cache ``[heads, CP + NP, NP]``, its ``CP = num_cache``
    rounded up to 128 key rows first) and dQ = dS K from the stored tiles: five matmuls per tile pair instead of the
    split schedule's seven, for ``NP * NP`` (``(CP + NP) * NP``) elements of transient memory per query head of a
    slot (freed on return; at most ``StoredBackward.max_bytes``, see :func:`_stored_plan`). With ``streams`` 2 chunk
    i runs on stream i % 2. Each chunk is two launches of their own kernels (not one kernel running a chunk's dK/dV
    programs beside the previous chunk's dQ programs), so each kernel keeps its own registers and shared memory
    (RESULTS.md "2026-11-29: the stored backward in chunks of heads")."""
    b, h, n, d = q.shape
    h_kv = k.shape[1]
    groups = h // h_kv
    np_ = ds.shape[-1]
    cp = ds.shape[-2] - np_
    delta = torch.empty_like(lse)
    block_d = max(16, triton.next_power_of_2(d))
    rows = 16 if _INTERPRET else 64
    _bwd_delta((b * h, _cdiv(n, rows)), out, do, delta, *_strides(out, do), h, n,
               HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=rows, num_warps=4)
    cfg = _launch_config("dkdv", d, q.dtype)
    cfg_dq = _launch_config("dq_stored", d, q.dtype, _long_rows(q))
    if any(np_ % cfg_[key] or cp % cfg_[key] for cfg_ in (cfg, cfg_dq) for key in ("BLOCK_M", "BLOCK_N")):
        raise ValueError(f"stored schedule: tiles must divide {np_} and {cp} (dS is read and written without masks)")
    m, nn, bd = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_D"]
    m_dq, nn_dq = cfg_dq["BLOCK_M"], cfg_dq["BLOCK_N"]
    slots = ds.chunk(streams)  # one dS slot per stream; the other arguments are shared
    if num_cache:
        dkdv_launch, dq_launch = _bwd_dkdv_cache, _bwd_dq_stored_cache
        ks, vs = _segment(k, num_cache), _segment(v, num_cache)
        head = (_arg(q, tma, m, bd), _arg(ks, tma, nn, bd), _arg(vs, tma, nn, bd), _arg(do, tma, m, bd), lse, delta,
                _segment(dk, num_cache), _segment(dv, num_cache))
        tail = (seq_lens, _arg(_cache_prefix(k, num_cache), tma, nn, bd),
                _arg(_cache_prefix(v, num_cache), tma, nn, bd), dk, dv, cache_lens, *_strides(q, k, v, do, dk, dv),
                h, h_kv, groups, n, np_)
        k_dq = _arg(ks, tma, nn_dq, bd)
        tail_dq = (dq, seq_lens, _arg(_cache_prefix(k, num_cache), tma, nn_dq, bd), cache_lens, *_strides(k, dq), h,
                   groups, n, np_)
        cache_args = (num_cache, cp)
    else:
        dkdv_launch, dq_launch = _bwd_dkdv, _bwd_dq_stored
        head = (_arg(q, tma, m, bd), _arg(k, tma, nn, bd), _arg(v, tma, nn, bd), _arg(do, tma, m, bd), lse, delta, dk,
                dv)
        tail = (seq_lens, *_strides(q, k, v, do, dk, dv), h, h_kv, groups, n, np_)
        k_dq, tail_dq = _arg(k, tma, nn_dq, bd), (dq, seq_lens, *_strides(k, dq), h, groups, n, np_)
        cache_args = ()
    dkdv_args = [(*head, _arg(slot, tma, nn, m), *tail) for slot in slots]
    dq_args = [(k_dq, _arg(slot, tma, nn_dq, m_dq), *tail_dq) for slot in slots]
    kv_tiles = _cdiv(num_cache, nn) + _cdiv(n, nn)
    with _Streams(q.device, streams) as on_stream:
        # Chunk i runs on stream i % streams through that stream's slot; within a stream each dQ launch reads its
        # slot before the next dK/dV launch writes it.
        pair0 = 0
        for i, pairs in enumerate(chunks):
            with on_stream(i % streams):
                dkdv_launch((pairs, kv_tiles), *dkdv_args[i % streams], pair0, num_read, num_write, *cache_args,
                            scale, scale * _LOG2E, CAUSAL=causal, BIDIR=bidirectional, TMA=tma, STORE_DS=True, **cfg)
                dq_launch((pairs * groups, _cdiv(n, m_dq)), *dq_args[i % streams], pair0 * groups, num_read,
                          num_write, *cache_args, scale, CAUSAL=causal, BIDIR=bidirectional, TMA=tma, **cfg_dq)
            pair0 += pairs
