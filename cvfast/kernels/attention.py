"""FlashAttention-style forward (online softmax, fp32 accumulation) over any sequence length, with
an optional prologue that applies CogVideoX's per-head QK LayerNorm and the RoPE of the video rows
as q and k tiles are loaded, so they come straight from the fused QKV projection's output.

One program computes BLOCK_M query rows of one (batch, head) against all keys, BLOCK_N at a time.
Scores use exp2 with log2(e) folded into the scale. Tails are masked (no padding by the caller).
Every tensor is addressed through its strides, so the same kernel reads (B, H, S, d) tensors or the
(B, S, 3, H, d) view of a QKV projection and writes (B, H, S, d) or (B, S, H, d).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .common import INTERPRET, dot_upcast, new_output, rounded

LOG2E = 1.4426950408889634


@triton.jit
def _load_rows(base, rows, cols, stride_s, stride_d, seq, w_ptr, b_ptr, cos_ptr, sin_ptr, n_text, eps,
               HEAD_DIM: tl.constexpr, NORM: tl.constexpr, ROPE: tl.constexpr):
    """A (rows, HEAD_DIM) fp32 tile; with NORM each row LayerNormed (weight, bias), with ROPE the rows
    at index >= n_text rotated by cos/sin row (index - n_text) on interleaved pairs."""
    valid = rows[:, None] < seq
    x = tl.load(base + rows[:, None] * stride_s + cols[None, :] * stride_d, mask=valid, other=0.0).to(tl.float32)
    if NORM:
        mean = tl.sum(x, axis=1) / HEAD_DIM
        rstd = 1.0 / tl.sqrt(tl.sum((x - mean[:, None]) * (x - mean[:, None]), axis=1) / HEAD_DIM + eps)
        w = tl.load(w_ptr + cols).to(tl.float32)
        b = tl.load(b_ptr + cols).to(tl.float32)
        x = (x - mean[:, None]) * rstd[:, None] * w[None, :] + b[None, :]
    if ROPE:
        # The pair partner of column c is c ^ 1: rotated[2i] = -x[2i+1], rotated[2i+1] = x[2i].
        partner = cols ^ 1
        xp = tl.load(base + rows[:, None] * stride_s + partner[None, :] * stride_d, mask=valid,
                     other=0.0).to(tl.float32)
        if NORM:
            wp = tl.load(w_ptr + partner).to(tl.float32)
            bp = tl.load(b_ptr + partner).to(tl.float32)
            xp = (xp - mean[:, None]) * rstd[:, None] * wp[None, :] + bp[None, :]
        video_row = rows - n_text
        is_video = (video_row >= 0) & (rows < seq)
        table = video_row[:, None] * HEAD_DIM + cols[None, :]
        cos = tl.load(cos_ptr + table, mask=is_video[:, None], other=1.0)  # text rows: identity
        sin = tl.load(sin_ptr + table, mask=is_video[:, None], other=0.0)
        sign = tl.where(cols % 2 == 0, -1.0, 1.0)
        x = x * cos + sign[None, :] * xp * sin
    return x


@triton.jit
def _attention_fwd(Q, K, V, Out, WQ, BQ, WK, BK, COS, SIN,
                   sq_b, sq_h, sq_s, sq_d, sk_b, sk_h, sk_s, sk_d, sv_b, sv_h, sv_s, sv_d,
                   so_b, so_h, so_s, so_d,
                   heads, seq_q, seq_k, n_text, eps, scale_log2,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   NORM: tl.constexpr, ROPE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    q_base = Q + b * sq_b + h * sq_h
    k_base = K + b * sk_b + h * sk_h
    v_base = V + b * sv_b + h * sv_h
    cols = tl.arange(0, HEAD_DIM)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    in_type = V.dtype.element_ty
    dot_type = tl.float32 if UPCAST else in_type
    q = _load_rows(q_base, rows, cols, sq_s, sq_d, seq_q, WQ, BQ, COS, SIN, n_text, eps, HEAD_DIM, NORM, ROPE)
    q = rounded(q, in_type).to(dot_type)  # normed/rotated q enters the dot in the input dtype
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    for start in range(0, seq_k, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, keys, cols, sk_s, sk_d, seq_k, WK, BK, COS, SIN, n_text, eps, HEAD_DIM, NORM, ROPE)
        k = rounded(k, in_type).to(dot_type)
        v = tl.load(v_base + keys[:, None] * sv_s + cols[None, :] * sv_d, mask=keys[:, None] < seq_k,
                    other=0.0).to(dot_type)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(keys[None, :] < seq_k, s * scale_log2, float("-inf"))
        # Every key block holds at least one valid key, so m_new is finite and alpha is well defined.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(rounded(p, in_type).to(dot_type), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    out = acc / l_i[:, None]
    o_base = Out + b * so_b + h * so_h
    tl.store(o_base + rows[:, None] * so_s + cols[None, :] * so_d, rounded(out, Out.dtype.element_ty),
             mask=rows[:, None] < seq_q)


def tile_config(head_dim: int) -> dict:
    """Tile sizes and launch shape. On a GPU: 128 query rows x 64 keys, as FlashAttention-2 and
    Triton's fused-attention tutorial use on A100/H100 (the fp32 accumulator of 128 x d stays in
    registers; 8 warps at d=128 for the larger tile); not yet tuned on a GPU by this project. Under
    the interpreter, 64 x 64 (fewer, larger numpy steps); test sequences of 97 and 376 still cross
    several blocks and end in a ragged tail."""
    if INTERPRET:
        return dict(BLOCK_M=64, BLOCK_N=64)
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4 if head_dim <= 64 else 8, num_stages=3 if head_dim <= 64 else 2)


def _launch(q4, k4, v4, out4, norm, rope, n_text, scale, batch, heads, seq_q, seq_k, head_dim, dtype):
    """q4/k4/v4/out4: 4D views indexed (batch, head, seq, dim) in any layout."""
    cfg = tile_config(head_dim)
    wq, bq, wk, bk, eps = norm if norm is not None else (q4, q4, q4, q4, 0.0)  # unused without NORM
    cos, sin = rope if rope is not None else (q4, q4)
    grid = (triton.cdiv(seq_q, cfg["BLOCK_M"]), batch * heads)
    _attention_fwd[grid](q4, k4, v4, out4, wq, bq, wk, bk, cos, sin,
                         *q4.stride(), *k4.stride(), *v4.stride(), *out4.stride(),
                         heads, seq_q, seq_k, n_text, eps, scale * LOG2E,
                         HEAD_DIM=head_dim, NORM=norm is not None, ROPE=rope is not None,
                         IEEE=dtype == torch.float32, UPCAST=dot_upcast(dtype), **cfg)
    return out4


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """q: (B, H, Sq, d); k, v: (B, H, Sk, d) -> (B, H, Sq, d), any strides."""
    batch, heads, seq_q, head_dim = q.shape
    out = new_output(q.shape, q.dtype, q.device)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    return _launch(q, k, v, out, None, None, 0, scale, batch, heads, seq_q, k.shape[2], head_dim, q.dtype)


def joint_attention(qkv: torch.Tensor, heads: int, norm: tuple, rope: tuple | None, n_text: int) -> torch.Tensor:
    """qkv: (B, S, 3*H*d) contiguous; norm: (q_weight, q_bias, k_weight, k_bias, eps) of the QK
    LayerNorms; rope: (cos, sin) contiguous fp32 (S - n_text, d) or None -> (B, S, H*d)."""
    batch, seq, width = qkv.shape
    head_dim = width // (3 * heads)
    q, k, v = qkv.view(batch, seq, 3, heads, head_dim).permute(2, 0, 3, 1, 4)  # views, no copies
    out = new_output((batch, seq, heads, head_dim), qkv.dtype, qkv.device)
    _launch(q, k, v, out.permute(0, 2, 1, 3), norm, rope, n_text, 1.0 / math.sqrt(head_dim), batch, heads,
            seq, seq, head_dim, qkv.dtype)
    return out.view(batch, seq, heads * head_dim)
