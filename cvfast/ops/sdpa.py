"""Attention through torch.nn.functional.scaled_dot_product_attention (PyTorch picks its kernel)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Same contract as `cvfast.ops.reference.attention`."""
    return F.scaled_dot_product_attention(q, k, v)


def why_not(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[str]:
    reasons = []
    if not (q.dtype == k.dtype == v.dtype):
        reasons.append(f"q/k/v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if q.dim() != 4:
        reasons.append(f"expects (batch, heads, seq, head_dim), got {tuple(q.shape)}")
    return reasons
