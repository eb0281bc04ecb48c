"""Attention through torch.nn.functional.scaled_dot_product_attention (PyTorch picks its kernel:
FlashAttention-2, cuDNN or memory-efficient on CUDA, a fused C++ kernel on the CPU)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Same contract as `cvfast.ops.reference.attention`."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def why_not(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> list[str]:
    reasons = []
    if not (q.dtype == k.dtype == v.dtype):
        reasons.append(f"q/k/v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if q.dim() != 4:
        reasons.append(f"expects (batch, heads, seq, head_dim), got {tuple(q.shape)}")
    return reasons


def joint_why_not(qkv: torch.Tensor, *args, **kwargs) -> list[str]:
    return [] if qkv.dim() == 3 else [f"expects qkv (batch, seq, 3 * dim), got {tuple(qkv.shape)}"]
