"""What the backends of the fused VAE norm (`group_norm`: GroupNorm + affine + optional spatial
modulation `* scale + shift` + optional SiLU) share: the inputs they take and the two layouts their
kernels read."""
from __future__ import annotations

import torch

Tensor = torch.Tensor


def layout(x: Tensor) -> torch.memory_format:
    """channels_last_3d when x is in it (and not also contiguous), else contiguous: the two layouts
    the kernels take; any other strides are copied into the contiguous one."""
    if x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


def prepare(x: Tensor, weight: Tensor, bias: Tensor, scale: Tensor | None, shift: Tensor | None):
    """x in one of the kernels' layouts, scale/shift in x's, weight/bias contiguous."""
    fmt = layout(x)
    x = x.contiguous(memory_format=fmt)
    if scale is not None:
        scale, shift = scale.contiguous(memory_format=fmt), shift.contiguous(memory_format=fmt)
    return x, weight.contiguous(), bias.contiguous(), scale, shift


def why_not(x, weight, bias, groups, eps, scale=None, shift=None, silu=False) -> list[str]:
    """Why a fused backend cannot take this call of reference.group_norm (empty: it can)."""
    if x.dim() != 5:
        return [f"expects x (batch, channels, frames, height, width), got {tuple(x.shape)}"]
    reasons = []
    if groups <= 0 or x.shape[1] % groups:
        reasons.append(f"groups={groups} does not divide {x.shape[1]} channels")
    if weight is None or bias is None:
        reasons.append("needs the affine weight and bias")
    elif weight.dtype != x.dtype or bias.dtype != x.dtype:
        reasons.append(f"weight/bias dtype {weight.dtype}/{bias.dtype} differs from x's {x.dtype}")
    if (scale is None) != (shift is None):
        reasons.append("scale and shift must both be given or both be None")
    elif scale is not None and (scale.shape != x.shape or shift.shape != x.shape or scale.dtype != x.dtype
                                or shift.dtype != x.dtype):
        reasons.append(f"scale/shift must have x's shape {tuple(x.shape)} and dtype {x.dtype}")
    return reasons
