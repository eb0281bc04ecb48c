"""8-bit attention forward, SageAttention2's recipe: Q and K in INT8 with one scale per 64-row block
(K smoothed by the caller: its per-channel mean over the sequence subtracted, which softmax ignores),
their product accumulated in int32; online softmax in fp32; P, in [0, 1], in FP8 e4m3 with the static
scale 448 (e4m3's largest value) and V in FP8 e4m3 with one scale per channel, their product
accumulated in fp32.

One program: BLOCK rows of queries of one (batch, head) against all keys, BLOCK at a time; one block
is one scale block of Q and of K, so the scales are read, never computed, here. The inputs are
(B, H, S, d) int8 / float8 tensors from `cvfast.ops.quantized.quantize_attention_inputs`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET, new_output, rounded

LOG2E = 1.4426950408889634
# Rows of Q and K that share one INT8 scale, and the kernel's tile height: SageAttention2 scales Q and
# K per block of this order (64-128 rows); one tile per scale block keeps the kernel from mixing them.
BLOCK = 64
P_SCALE = 448.0  # float8_e4m3fn's largest finite value: P in [0, 1] uses e4m3's whole range

# Triton 3.8's interpreter converts fp32 to fp8 e4m3 wrongly where rounding carries into the exponent
# (31.4 -> 16 instead of 32, seen on this project's CPU machines); the GPU rounds to nearest even.
# Under the interpreter P is rounded by hand, into fp32 values e4m3 represents exactly.
_ROUND_E4M3_BY_HAND = tl.constexpr(INTERPRET)


@triton.jit
def _to_e4m3(x):
    """x (fp32, in [0, 448]) converted to float8 e4m3, rounding to nearest even."""
    if _ROUND_E4M3_BY_HAND:
        bits = x.to(tl.uint32, bitcast=True)
        normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)  # 3 mantissa bits
        # Below 2^-6 e4m3 is subnormal, a multiple of 2^-9: 1.5 * 2^23 added and removed rounds x * 512
        # to the nearest even integer in fp32.
        subnormal = ((x * 512.0 + 12582912.0) - 12582912.0) / 512.0
        x = tl.where(x < 0.015625, subnormal, normal)
    return x.to(tl.float8e4nv)


@triton.jit
def _quantized_attention_fwd(Q, K, V, QS, KS, VS, Out, sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s,
                             so_b, so_h, so_s, heads, seq, blocks, scale_log2,
                             HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, P_SCALE: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // heads, bh % heads
    cols = tl.arange(0, HEAD_DIM)
    rows = pid_m * BLOCK + tl.arange(0, BLOCK)
    q = tl.load(Q + b * sq_b + h * sq_h + rows[:, None] * sq_s + cols[None, :], mask=rows[:, None] < seq, other=0)
    q_scale = tl.load(QS + bh * blocks + pid_m) * scale_log2
    m_i = tl.full((BLOCK,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK,), tl.float32)
    acc = tl.zeros((BLOCK, HEAD_DIM), tl.float32)
    for start in range(0, seq, BLOCK):
        keys = start + tl.arange(0, BLOCK)
        valid = keys[:, None] < seq
        k = tl.load(K + b * sk_b + h * sk_h + keys[:, None] * sk_s + cols[None, :], mask=valid, other=0)
        v = tl.load(V + b * sv_b + h * sv_h + keys[:, None] * sv_s + cols[None, :], mask=valid, other=0.0)
        s = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32) * (q_scale * tl.load(KS + bh * blocks +
                                                                                            start // BLOCK))
        s = tl.where(keys[None, :] < seq, s, float("-inf"))
        # Every key block holds at least one valid key, so m_new is finite and alpha is well defined.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(_to_e4m3(p * P_SCALE), v)
        m_i = m_new
    out = acc / (l_i[:, None] * P_SCALE) * tl.load(VS + bh * HEAD_DIM + cols)[None, :]
    tl.store(Out + b * so_b + h * so_h + rows[:, None] * so_s + cols[None, :], rounded(out, Out.dtype.element_ty),
             mask=rows[:, None] < seq)


def quantized_attention(q: torch.Tensor, q_scale: torch.Tensor, k: torch.Tensor, k_scale: torch.Tensor,
                        v: torch.Tensor, v_scale: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """q, k: (B, H, S, d) int8 with q_scale, k_scale (B, H, ceil(S / BLOCK)) float32; v: (B, H, S, d)
    float8_e4m3fn with v_scale (B, H, d) float32; scale: the softmax scale -> (B, H, S, d) in dtype.
    The last dimension of each input must be contiguous."""
    batch, heads, seq, head_dim = q.shape
    out = new_output(q.shape, dtype, q.device)
    blocks = triton.cdiv(seq, BLOCK)
    _quantized_attention_fwd[(blocks, batch * heads)](
        q, k, v, q_scale.contiguous(), k_scale.contiguous(), v_scale.contiguous(), out,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], heads, seq, blocks, scale * LOG2E,
        HEAD_DIM=head_dim, BLOCK=BLOCK, P_SCALE=P_SCALE, num_warps=4)
    return out
