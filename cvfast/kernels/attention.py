"""FlashAttention-style forward (online softmax, fp32 accumulation) over any sequence length, and
CogVideoX's joint attention from the fused QKV projection in two passes: `_prepare_qkv` reads each
token once, applies the per-head QK LayerNorm and the RoPE of the video rows, and writes q, k and v
per head, contiguous, in the compute dtype; then the attention kernel runs on them with no prologue.

Why two passes: the earlier design (`joint_attention_fused`, kept for the benchmarks to measure
against) applied the norm and the rotation as each K tile was loaded, i.e. once per *query block*:
at 17,776 tokens with 128-row query blocks each key row was normalised and rotated 139 times on
CUDA cores inside the softmax loop, its partner columns loaded twice, which is the non-matmul work
that caps attention on Hopper (FlashAttention-3, section 3). The extra pass moves 3 x S x H x d
elements twice (about 0.2 GB for 5B with CFG, ~0.05 ms at 4 TB/s against a ~9 ms attention). Both
round the prepared q and k to the compute dtype before the dot, so their outputs are equal bit for bit.

One attention program computes BLOCK_M query rows of one (batch, head) against all keys, BLOCK_N at
a time. Scores use exp2 with log2(e) folded into the scale. Tails are masked (no padding by the
caller). Every tensor is addressed through its strides, so the kernels read (B, H, S, d) tensors or
the (B, S, 3, H, d) view of a QKV projection and write (B, H, S, d) or (B, S, H, d). On a GPU the
attention tiles are autotuned per head dim, dtype and sequence bucket (`GPU_CONFIGS`).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

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
def _attend_block(q, k, v, keys, seq_k, scale_log2, m_i, l_i, acc, in_type: tl.constexpr, dot_type: tl.constexpr,
                  IEEE: tl.constexpr):
    """One key block of the online softmax: q (BLOCK_M, d), k and v (BLOCK_N, d) in `dot_type`, keys
    their row indices (rows >= seq_k are masked out) -> the running max, sum and accumulator."""
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
    return m_new, l_i, acc * alpha[:, None] + pv


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
        m_i, l_i, acc = _attend_block(q, k, v, keys, seq_k, scale_log2, m_i, l_i, acc, in_type, dot_type, IEEE)
    out = acc / l_i[:, None]
    o_base = Out + b * so_b + h * so_h
    tl.store(o_base + rows[:, None] * so_s + cols[None, :] * so_d, rounded(out, Out.dtype.element_ty),
             mask=rows[:, None] < seq_q)


@triton.jit
def _attention_fwd_tma(Q, K, V, Out, sq_b, sq_h, sq_s, sq_d, so_b, so_h, so_s, so_d, heads, seq_q, seq_k, scale_log2,
                       HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
                       UPCAST: tl.constexpr):
    """`_attention_fwd` without prologue, K and V read by the tensor memory accelerator: K and V are
    host tensor descriptors over the (B * H * seq_k, d) rows of contiguous (B, H, seq_k, d) tensors,
    block (BLOCK_N, d). The last block of a head reads past its rows into the next head's (zeros past
    the tensor's end): those keys are masked to -inf, so their p is 0 and their (finite) values add 0."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    cols = tl.arange(0, HEAD_DIM)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    in_type = Q.dtype.element_ty
    dot_type = tl.float32 if UPCAST else in_type
    q = tl.load(Q + b * sq_b + h * sq_h + rows[:, None] * sq_s + cols[None, :] * sq_d, mask=rows[:, None] < seq_q,
                other=0.0).to(dot_type)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    first_key_row = bh * seq_k
    for start in range(0, seq_k, BLOCK_N):
        k = K.load([first_key_row + start, 0]).to(dot_type)
        v = V.load([first_key_row + start, 0]).to(dot_type)
        keys = start + tl.arange(0, BLOCK_N)
        m_i, l_i, acc = _attend_block(q, k, v, keys, seq_k, scale_log2, m_i, l_i, acc, in_type, dot_type, IEEE)
    out = acc / l_i[:, None]
    tl.store(Out + b * so_b + h * so_h + rows[:, None] * so_s + cols[None, :] * so_d,
             rounded(out, Out.dtype.element_ty), mask=rows[:, None] < seq_q)


@triton.jit
def _prepare_qkv(QKV, OUT, WQ, BQ, WK, BK, COS, SIN,
                 s_b, s_s, s_part, s_h, s_d, o_part, o_b, o_h, o_s, o_d,
                 heads, seq, n_text, eps,
                 HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, ROPE: tl.constexpr):
    """OUT[0], OUT[1], OUT[2] (each (B, H, S, d)): q and k of QKV LayerNormed and (ROPE) rotated, and
    v, in OUT's dtype; one program per BLOCK_S tokens of one (batch, head)."""
    pid_s = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    rows = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = tl.arange(0, HEAD_DIM)
    src = QKV + b * s_b + h * s_h
    dst = OUT + b * o_b + h * o_h + rows[:, None] * o_s + cols[None, :] * o_d
    valid = rows[:, None] < seq
    dtype = OUT.dtype.element_ty
    q = _load_rows(src, rows, cols, s_s, s_d, seq, WQ, BQ, COS, SIN, n_text, eps, HEAD_DIM, True, ROPE)
    tl.store(dst, rounded(q, dtype), mask=valid)
    k = _load_rows(src + s_part, rows, cols, s_s, s_d, seq, WK, BK, COS, SIN, n_text, eps, HEAD_DIM, True, ROPE)
    tl.store(dst + o_part, rounded(k, dtype), mask=valid)
    v = tl.load(src + 2 * s_part + rows[:, None] * s_s + cols[None, :] * s_d, mask=valid)
    tl.store(dst + 2 * o_part, v, mask=valid)


# The prepare pass is a copy with a little arithmetic: 64 token rows of one head per program keep the
# (64, d) fp32 tiles of q, k and the partner columns in registers at d <= 128.
PREPARE_ROWS = 64

# sm_90 candidates for the attention tiles, autotuned on the first call per head dim, dtype and
# key length: 128-row query blocks as FlashAttention-2/3 and Triton's fused-attention tutorial use
# (the 128 x d fp32 accumulator in registers), 64- or 128-key blocks, 4 or 8 warps, 2-4 pipeline
# stages (Triton software-pipelines the K/V loads of the loop by num_stages); a 64-row block for
# short sequences. A config that needs more shared memory than the device has is skipped by the tuner.
GPU_TILES = ((128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 4, 4), (64, 64, 4, 3))


def _gpu_configs(pre_hook=None) -> list:
    return [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=warps, num_stages=stages, pre_hook=pre_hook)
            for bm, bn, warps, stages in GPU_TILES]


def _tma_block_shapes(args: dict) -> None:
    """Before each launch of a tuned config: its K/V descriptors' block is (BLOCK_N, d)."""
    for name in ("K", "V"):
        args[name].block_shape = [args["BLOCK_N"], args["HEAD_DIM"]]


_attention_tuned = triton.autotune(_gpu_configs(), key=["seq_k", "HEAD_DIM", "NORM", "ROPE", "IEEE"])(_attention_fwd)
_attention_tma_tuned = triton.autotune(_gpu_configs(_tma_block_shapes), key=["seq_k", "HEAD_DIM", "IEEE"])(
    _attention_fwd_tma)

# Under the interpreter: 64 x 64 tiles (fewer, larger numpy steps); test sequences of 97 and 376 still
# cross several blocks and end in a ragged tail.
INTERPRETER_TILES = dict(BLOCK_M=64, BLOCK_N=64)


def _launch(q4, k4, v4, out4, norm, rope, n_text, scale, batch, heads, seq_q, seq_k, head_dim, dtype):
    """q4/k4/v4/out4: 4D views indexed (batch, head, seq, dim) in any layout."""
    wq, bq, wk, bk, eps = norm if norm is not None else (q4, q4, q4, q4, 0.0)  # unused without NORM
    cos, sin = rope if rope is not None else (q4, q4)
    kernel, tiles = (_attention_fwd, INTERPRETER_TILES) if INTERPRET else (_attention_tuned, {})
    grid = lambda meta: (triton.cdiv(seq_q, meta["BLOCK_M"]), batch * heads)  # noqa: E731
    kernel[grid](q4, k4, v4, out4, wq, bq, wk, bk, cos, sin,
                 *q4.stride(), *k4.stride(), *v4.stride(), *out4.stride(),
                 heads, seq_q, seq_k, n_text, eps, scale * LOG2E,
                 HEAD_DIM=head_dim, NORM=norm is not None, ROPE=rope is not None,
                 IEEE=dtype == torch.float32, UPCAST=dot_upcast(dtype), **tiles)
    return out4


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """q: (B, H, Sq, d); k, v: (B, H, Sk, d) -> (B, H, Sq, d), any strides."""
    batch, heads, seq_q, head_dim = q.shape
    out = new_output(q.shape, q.dtype, q.device)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    return _launch(q, k, v, out, None, None, 0, scale, batch, heads, seq_q, k.shape[2], head_dim, q.dtype)


def prepare_qkv(qkv: torch.Tensor, heads: int, norm: tuple, rope: tuple | None, n_text: int) -> torch.Tensor:
    """qkv: (B, S, 3*H*d) -> (3, B, H, S, d) contiguous in qkv's dtype: q and k LayerNormed (norm:
    q_weight, q_bias, k_weight, k_bias, eps) and rotated on rows n_text onward (rope: cos, sin
    contiguous fp32 (S - n_text, d), or None), and v."""
    batch, seq, width = qkv.shape
    head_dim = width // (3 * heads)
    src = qkv.view(batch, seq, 3, heads, head_dim)
    out = new_output((3, batch, heads, seq, head_dim), qkv.dtype, qkv.device)
    wq, bq, wk, bk, eps = norm
    cos, sin = rope if rope is not None else (qkv, qkv)  # unused without ROPE
    grid = (triton.cdiv(seq, PREPARE_ROWS), batch * heads)
    _prepare_qkv[grid](src, out, wq, bq, wk, bk, cos, sin,
                       src.stride(0), src.stride(1), src.stride(2), src.stride(3), src.stride(4), *out.stride(),
                       heads, seq, n_text, eps, HEAD_DIM=head_dim, BLOCK_S=PREPARE_ROWS, ROPE=rope is not None)
    return out


def joint_attention(qkv: torch.Tensor, heads: int, norm: tuple, rope: tuple | None, n_text: int) -> torch.Tensor:
    """qkv: (B, S, 3*H*d) contiguous; norm, rope as `prepare_qkv` takes them -> (B, S, H*d): the
    prepare pass, then the attention kernel on its output."""
    batch, seq, width = qkv.shape
    head_dim = width // (3 * heads)
    q, k, v = prepare_qkv(qkv, heads, norm, rope, n_text)
    out = new_output((batch, seq, heads, head_dim), qkv.dtype, qkv.device)
    _launch(q, k, v, out.permute(0, 2, 1, 3), None, None, 0, 1.0 / math.sqrt(head_dim), batch, heads, seq, seq,
            head_dim, qkv.dtype)
    return out.view(batch, seq, heads * head_dim)


def joint_attention_tma(qkv: torch.Tensor, heads: int, norm: tuple, rope: tuple | None, n_text: int) -> torch.Tensor:
    """`joint_attention` with K and V read through tensor descriptors (TMA on sm_90; the interpreter
    runs the same loads in numpy): for the benchmarks to measure against the pointer loads before
    the `triton` backend adopts it."""
    batch, seq, width = qkv.shape
    head_dim = width // (3 * heads)
    q, k, v = prepare_qkv(qkv, heads, norm, rope, n_text)
    out = new_output((batch, seq, heads, head_dim), qkv.dtype, qkv.device)
    out4 = out.permute(0, 2, 1, 3)
    kernel, tiles = (_attention_fwd_tma, INTERPRETER_TILES) if INTERPRET else (_attention_tma_tuned, {})
    # The tuned launch sets each config's block in `_tma_block_shapes`; (1, d) is a placeholder.
    block = [tiles.get("BLOCK_N", 1), head_dim]
    k_desc, v_desc = (TensorDescriptor.from_tensor(t.view(-1, head_dim), block) for t in (k, v))
    grid = lambda meta: (triton.cdiv(seq, meta["BLOCK_M"]), batch * heads)  # noqa: E731
    kernel[grid](q, k_desc, v_desc, out4, *q.stride(), *out4.stride(), heads, seq, seq,
                 1.0 / math.sqrt(head_dim) * LOG2E, HEAD_DIM=head_dim, IEEE=qkv.dtype == torch.float32,
                 UPCAST=dot_upcast(qkv.dtype), **tiles)
    return out.view(batch, seq, heads * head_dim)


def joint_attention_fused(qkv: torch.Tensor, heads: int, norm: tuple, rope: tuple | None,
                          n_text: int) -> torch.Tensor:
    """`joint_attention` in one kernel, the QK norm and RoPE applied as q and k tiles are loaded (the
    earlier design, per query block; see the module docstring): for the benchmarks' comparison."""
    batch, seq, width = qkv.shape
    head_dim = width // (3 * heads)
    q, k, v = qkv.view(batch, seq, 3, heads, head_dim).permute(2, 0, 3, 1, 4)  # views, no copies
    out = new_output((batch, seq, heads, head_dim), qkv.dtype, qkv.device)
    _launch(q, k, v, out.permute(0, 2, 1, 3), norm, rope, n_text, 1.0 / math.sqrt(head_dim), batch, heads,
            seq, seq, head_dim, qkv.dtype)
    return out.view(batch, seq, heads * head_dim)
