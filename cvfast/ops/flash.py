"""Attention through FlashAttention (the optional `flash-attn` package: FA3's `flash_attn_interface`
on Hopper when installed, else FA2's `flash_attn`). Importing this module fails without either,
which the registry reports as the backend's reason for being unavailable.

FlashAttention takes (batch, seq, heads, head_dim) with a contiguous last dim; cvfast's contract is
(batch, heads, seq, head_dim), so q, k, v go in as transposed views and the output comes back as one.
Not verified on a GPU yet: flash-attn cannot be installed on the machines this was written on.
"""
from __future__ import annotations

import functools

import torch

from . import reference
from .dispatch import Impl

try:  # FlashAttention 3 (Hopper)
    from flash_attn_interface import flash_attn_func as _flash
    _VERSION = 3
except ImportError:
    from flash_attn import flash_attn_func as _flash
    _VERSION = 2


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Same contract as `cvfast.ops.reference.attention` (fp16/bf16 only)."""
    out = _flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, causal=False)
    out = out[0] if isinstance(out, tuple) else out  # FA3 returns (out, softmax_lse)
    return out.transpose(1, 2)


def why_not(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> list[str]:
    reasons = []
    if not (q.dtype == k.dtype == v.dtype):
        reasons.append(f"q/k/v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    head_dim = q.shape[-1]
    if head_dim % 8 or head_dim > 256:
        reasons.append(f"head_dim {head_dim} is not a multiple of 8 up to 256")
    return reasons


def _joint_why_not(qkv: torch.Tensor, heads: int, *args, **kwargs) -> list[str]:
    head_dim = qkv.shape[-1] // (3 * heads)
    return [] if head_dim % 8 == 0 and head_dim <= 256 else [f"head_dim {head_dim} is not a multiple of 8 up to 256"]


_HALF = (torch.float16, torch.bfloat16)
IMPLS = {
    "attention": Impl("flash_attn", attention, devices=("cuda",), dtypes=_HALF, min_capability=(8, 0),
                      why_not=why_not),
    "joint_attention": Impl("flash_attn", functools.partial(reference.joint_attention, attend=attention),
                            devices=("cuda",), dtypes=_HALF, min_capability=(8, 0), why_not=_joint_why_not),
}
