"""Plain-PyTorch reference implementations: the oracle every fast backend is tested against.

Each function takes and returns tensors in the caller's dtype; where precision matters the math runs
in float32 (RoPE, attention softmax), as diffusers does, and is cast back.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Attention is evaluated one block of queries at a time so that the reference can run at real
# CogVideoX sizes: a full 17,776 x 17,776 fp32 score matrix is 1.26 GB per head; a block of 1,024
# queries over all heads of one batch element at 48 heads is 48 * 1024 * 17,776 * 4 B = 3.5 GB.
_QUERY_BLOCK = 1024


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal softmax attention with scale 1/sqrt(head_dim).

    q, k, v: (batch, heads, seq, head_dim) -> (batch, heads, seq, head_dim), dtype of q.
    Scores and softmax in (at least) float32.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    acc = torch.promote_types(q.dtype, torch.float32)  # at least fp32; fp64 stays fp64
    kf_t, vf = k.to(acc).transpose(-1, -2), v.to(acc)
    blocks = []
    for qb in q.split(_QUERY_BLOCK, dim=2):
        probs = torch.softmax(qb.to(acc) @ kf_t * scale, dim=-1)
        blocks.append((probs @ vf).to(q.dtype))
    return torch.cat(blocks, dim=2)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on interleaved pairs (x0, x1), (x2, x3), ... as CogVideoX uses it.

    x: (batch, heads, seq, head_dim); cos, sin: (seq, head_dim) float32, each frequency repeated twice.
    Returns x's shape and dtype.
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return (x.float() * cos + rotated * sin).to(x.dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float) -> torch.Tensor:
    """LayerNorm over the last dim (the QK norm and the final norm)."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def adaln_modulate(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """adaLN: LayerNorm(x) * (1 + scale) + shift.

    x: (batch, seq, dim); shift, scale: (batch, dim) -> (batch, seq, dim).
    """
    normed = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return normed * (1 + scale)[:, None, :] + shift[:, None, :]


def gelu_mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
             b2: torch.Tensor | None) -> torch.Tensor:
    """Linear -> GELU (tanh approximation) -> Linear. x: (..., dim) -> (..., dim_out)."""
    return F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)


def group_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float,
               scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
               silu: bool = False) -> torch.Tensor:
    """GroupNorm over (channels/groups, frames, height, width), then optionally the VAE's spatial
    conditioning `norm * scale + shift` (scale, shift shaped like x), then optionally SiLU.

    x: (batch, channels, frames, height, width) -> same.
    """
    out = F.group_norm(x, groups, weight, bias, eps)
    if scale is not None:
        out = out * scale + shift
    return F.silu(out) if silu else out


def causal_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  past: torch.Tensor | None) -> torch.Tensor:
    """Causal 3D convolution, stride 1: `past` (the last kt-1 input frames of the previous chunk) or,
    for the first chunk, kt-1 copies of the first frame are prepended in time; height and width are
    zero-padded by (k-1)/2.

    x: (batch, c_in, frames, h, w); weight: (c_out, c_in, kt, kh, kw); past: (batch, c_in, kt-1, h, w)
    or None -> (batch, c_out, frames, h, w).
    """
    kt, kh, kw = weight.shape[2:]
    if kt > 1:
        if past is None:
            past = x[:, :, :1].expand(-1, -1, kt - 1, -1, -1)
        x = torch.cat((past, x), dim=2)
    return F.conv3d(x, weight, bias, padding=(0, (kh - 1) // 2, (kw - 1) // 2))
