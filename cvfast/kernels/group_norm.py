"""The VAE's fused norm: GroupNorm statistics, then one pass writing
SiLU(((x - mean) * rstd * w + b) * scale + shift) (modulation and SiLU optional).

x: (B, C, T, H, W), contiguous or channels_last_3d (scale/shift in x's layout). Positions are the
T * H * W voxels. Statistics: each program folds a slice of one (batch, group) into
(count, mean, M2) (block means and centred squares, merged with Chan's formula, so a mean far from
zero does not cancel the variance); the slices are merged on the host side in float64 (a
(B * G, splits) tensor). Everything in fp32, rounded once at the store.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET, new_output, rounded

BLOCK = 1024                # elements per step of a program: 4 per thread at 8 warps
ELEMENTS_PER_SPLIT = 16384  # per statistics program on a GPU: enough work to hide the merge
MAX_SPLITS = 1024


@triton.jit
def _offsets(e, b, g, channels, positions, per_group, CHANNELS_LAST: tl.constexpr):
    """Memory offsets of elements e of group (b, g), e in the layout's memory order."""
    if CHANNELS_LAST:
        return (b * positions + e // per_group) * channels + g * per_group + e % per_group
    return (b * channels + g * per_group) * positions + e


@triton.jit
def _partial_moments(X, PART, groups, channels, positions, splits,
                     CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    bg = tl.program_id(0)
    split = tl.program_id(1).to(tl.int64)
    b = (bg // groups).to(tl.int64)  # offsets reach past 2**31 at decoder sizes
    g = bg % groups
    per_group = channels // groups
    length = (per_group * positions).to(tl.int64)
    begin = length * split // splits
    end = length * (split + 1) // splits
    n = 0.0
    mean = 0.0
    m2 = 0.0
    for start in range(begin, end, BLOCK):
        e = start + tl.arange(0, BLOCK)
        mask = e < end
        v = tl.load(X + _offsets(e, b, g, channels, positions, per_group, CHANNELS_LAST), mask=mask,
                    other=0.0).to(tl.float32)
        count = tl.sum(mask.to(tl.float32), axis=0)
        block_mean = tl.sum(v, axis=0) / count
        centred = tl.where(mask, v - block_mean, 0.0)
        block_m2 = tl.sum(centred * centred, axis=0)
        total = n + count
        delta = block_mean - mean
        mean += delta * count / total
        m2 += block_m2 + delta * delta * n * count / total
        n = total
    base = (bg * splits + split) * 3
    tl.store(PART + base, n)
    tl.store(PART + base + 1, mean)
    tl.store(PART + base + 2, m2)


@triton.jit
def _apply(X, W, B, SCALE, SHIFT, MEAN, RSTD, OUT, numel, groups, channels, positions,
           CHANNELS_LAST: tl.constexpr, MODULATE: tl.constexpr, SILU: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < numel
    b = i // (channels * positions)
    if CHANNELS_LAST:
        c = i % channels
    else:
        c = (i // positions) % channels
    bg = b * groups + c // (channels // groups)
    x = tl.load(X + i, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(MEAN + bg, mask=mask, other=0.0)
    rstd = tl.load(RSTD + bg, mask=mask, other=0.0)
    w = tl.load(W + c, mask=mask, other=0.0).to(tl.float32)
    bias = tl.load(B + c, mask=mask, other=0.0).to(tl.float32)
    y = (x - mean) * rstd * w + bias
    if MODULATE:
        y = y * tl.load(SCALE + i, mask=mask, other=0.0).to(tl.float32) + \
            tl.load(SHIFT + i, mask=mask, other=0.0).to(tl.float32)
    if SILU:
        y = y / (1.0 + tl.exp(-y))
    tl.store(OUT + i, rounded(y, OUT.dtype.element_ty), mask=mask)


def statistics_splits(length: int) -> int:
    """Statistics programs per (batch, group); the interpreter runs programs one by one, so one there."""
    return 1 if INTERPRET else max(1, min(MAX_SPLITS, length // ELEMENTS_PER_SPLIT))


def _merge(part: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B * G, splits, 3) partial (count, mean, M2) -> fp32 mean and 1/std per (batch, group)."""
    part = part.double()
    n, mean, m2 = part.unbind(-1)
    total = n.sum(1)
    grand = (n * mean).sum(1) / total
    var = (m2 + n * (mean - grand[:, None]) ** 2).sum(1) / total
    return grand.float(), torch.rsqrt(var + eps).float()


def statistics(x: torch.Tensor, groups: int, eps: float, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 mean and 1/std per (batch, group) of x (B, C, ...), contiguous or channels_last_3d."""
    batch, channels = x.shape[:2]
    positions = x.numel() // (batch * channels)
    splits = statistics_splits(channels // groups * positions)
    part = torch.empty(batch * groups, splits, 3, dtype=torch.float32, device=x.device)
    _partial_moments[(batch * groups, splits)](x, part, groups, channels, positions, splits,
                                               CHANNELS_LAST=channels_last, BLOCK=BLOCK)
    return _merge(part, eps)


def group_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float,
               scale: torch.Tensor | None, shift: torch.Tensor | None, silu: bool) -> torch.Tensor:
    """x contiguous or channels_last_3d, scale/shift in x's layout, weight/bias (C,) contiguous."""
    batch, channels = x.shape[:2]
    positions = x.numel() // (batch * channels)
    channels_last = x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()
    if channels_last:  # allocated in memory order, viewed as (B, C, T, H, W)
        out = new_output((batch, *x.shape[2:], channels), x.dtype, x.device).permute(0, 4, 1, 2, 3)
    else:
        out = new_output(x.shape, x.dtype, x.device)
    mean, rstd = statistics(x, groups, eps, channels_last)
    modulate = scale is not None
    _apply[(triton.cdiv(x.numel(), BLOCK),)](x, weight, bias, scale if modulate else x, shift if modulate else x,
                                             mean, rstd, out, x.numel(), groups, channels, positions,
                                             CHANNELS_LAST=channels_last, MODULATE=modulate, SILU=silu, BLOCK=BLOCK,
                                             num_warps=8)
    return out
