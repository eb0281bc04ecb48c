"""The VAE decoder's spatial norm in one pass over f after the GroupNorm statistics:
SiLU(GroupNorm(f) * conv_y(zq) + conv_b(zq)), zq the latent z nearest-resized to f's size.

The resized latent and the two 1x1x1 conv outputs (each f-sized) are never written: a program takes a
BLOCK_V voxels x BLOCK_C channels tile of f, finds each voxel's source latent voxel by PyTorch's
nearest rule (src = min(floor(dst * (in / out)), in - 1) in fp32, per axis; with an odd frame count
> 1 frame 0 maps to latent frame 0 and the other frames to latent frames 1.., as
`cvfast.ops.spatial_norm.resize_latent`), gathers that (BLOCK_V, z_channels) latent tile (z is small
and stays in cache) and gets scale and shift as two (BLOCK_V x z_channels) @ (z_channels x BLOCK_C) products.
Statistics: `group_norm.statistics`. f contiguous or channels_last_3d (the output takes its layout);
z any strides. fp32 math, one rounding at the store.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET, dot_upcast, new_output, next_pow2, rounded, voxel_coords
from .group_norm import statistics


@triton.jit
def _nearest(dst, in_size, scale):
    """PyTorch's nearest source index (upsample_nearest, sizes given): fp32 scale = in / out."""
    return tl.minimum(tl.floor(dst.to(tl.float32) * scale).to(tl.int64), in_size - 1)


@triton.jit
def _matvec(zq, W, c, c_ok, k, k_ok, z_channels, IEEE: tl.constexpr, dot_type: tl.constexpr):
    """(BLOCK_V, Z) latent tile @ the (C, z_channels) 1x1x1 conv weight's rows c, transposed."""
    w = tl.load(W + c[None, :] * z_channels + k[:, None], mask=k_ok[:, None] & c_ok[None, :], other=0.0)
    if IEEE:
        return tl.dot(zq, w, input_precision="ieee")
    return tl.dot(zq, w.to(dot_type))


@triton.jit
def _spatial_norm(F, Z, W, B, YW, YB, BW, BB, MEAN, RSTD, OUT, voxels, channels, groups, frames, height, width,
                  z_channels, z_frames, z_height, z_width, scale_t, scale_h, scale_w,
                  sf_b, sf_c, sf_t, sf_h, sf_w, sz_b, sz_c, sz_t, sz_h, sz_w,
                  FIRST_ALONE: tl.constexpr, SILU: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                  BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_Z: tl.constexpr):
    v = tl.program_id(0).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)  # int64: f passes 2**31 elements
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    v_ok = v < voxels
    c_ok = c < channels
    b, t, h, w = voxel_coords(v, frames, height, width)
    if FIRST_ALONE:  # frame 0 alone; frames 1.. resized from latent frames 1.. (scale_t for the rest)
        zt = tl.where(t == 0, 0, 1 + _nearest(t - 1, z_frames - 1, scale_t))
    else:
        zt = _nearest(t, z_frames, scale_t)
    z_rows = b * sz_b + zt * sz_t + _nearest(h, z_height, scale_h) * sz_h + _nearest(w, z_width, scale_w) * sz_w
    k = tl.arange(0, BLOCK_Z)
    k_ok = k < z_channels
    dot_type = tl.float32 if UPCAST else Z.dtype.element_ty
    zq = tl.load(Z + z_rows[:, None] + k[None, :] * sz_c, mask=v_ok[:, None] & k_ok[None, :], other=0.0)
    zq = zq.to(dot_type)
    scale = _matvec(zq, YW, c, c_ok, k, k_ok, z_channels, IEEE, dot_type)
    scale += tl.load(YB + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    shift = _matvec(zq, BW, c, c_ok, k, k_ok, z_channels, IEEE, dot_type)
    shift += tl.load(BB + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    mask = v_ok[:, None] & c_ok[None, :]
    bg = b[:, None] * groups + (c // (channels // groups))[None, :]
    mean = tl.load(MEAN + bg, mask=mask, other=0.0)
    rstd = tl.load(RSTD + bg, mask=mask, other=0.0)
    offs = (b * sf_b + t * sf_t + h * sf_h + w * sf_w)[:, None] + c[None, :] * sf_c
    x = tl.load(F + offs, mask=mask, other=0.0).to(tl.float32)
    gamma = tl.load(W + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    beta = tl.load(B + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    y = ((x - mean) * rstd * gamma + beta) * scale + shift
    if SILU:
        y = y / (1.0 + tl.exp(-y))
    tl.store(OUT + offs, rounded(y, OUT.dtype.element_ty), mask=mask)


def tile_config(channels: int, z_channels: int) -> dict:
    """Not tuned (no GPU measured it yet). A memory-bound pass: 64 voxels x 64 channels (4096
    elements, 16 a thread at 4 warps) reads f in 64-channel runs (channels-last) or 64-voxel runs
    (contiguous), both whole 128-byte lines in bf16; the latent tile (64 x 16) and the two 16 x 64
    weight tiles are small and cached. tl.dot needs the latent side >= 16 (the tiny test models have
    4 latent channels: masked). Under the interpreter a program's cost is per operation, not per
    element, so it takes large voxel tiles."""
    block_c = min(64, max(16, next_pow2(channels)))
    block_z = max(16, next_pow2(z_channels))
    if INTERPRET:
        return dict(BLOCK_V=4096, BLOCK_C=block_c, BLOCK_Z=block_z)
    return dict(BLOCK_V=64, BLOCK_C=block_c, BLOCK_Z=block_z, num_warps=4)


def spatial_norm(f: torch.Tensor, z: torch.Tensor, weight, bias, groups: int, eps: float, y_weight, y_bias,
                 b_weight, b_bias, silu: bool, channels_last: bool) -> torch.Tensor:
    """`cvfast.ops.spatial_norm.spatial_norm`. f contiguous (channels_last False) or channels_last_3d
    (True), the output in the same layout; z any strides; y_weight/b_weight (C, z_channels) contiguous; weight,
    bias, y_bias, b_bias (C,) contiguous."""
    batch, channels, frames, height, width = f.shape
    z_channels, z_frames, z_height, z_width = z.shape[1:]
    mean, rstd = statistics(f, groups, eps, channels_last)
    if channels_last:  # allocated in memory order, viewed as (B, C, T, H, W)
        out = new_output((batch, frames, height, width, channels), f.dtype, f.device).permute(0, 4, 1, 2, 3)
    else:
        out = new_output(f.shape, f.dtype, f.device)
    first_alone = frames > 1 and frames % 2 == 1
    scale_t = (z_frames - 1) / (frames - 1) if first_alone else z_frames / frames
    cfg = tile_config(channels, z_channels)
    voxels = batch * frames * height * width
    grid = (triton.cdiv(voxels, cfg["BLOCK_V"]), triton.cdiv(channels, cfg["BLOCK_C"]))
    _spatial_norm[grid](f, z, weight, bias, y_weight, y_bias, b_weight, b_bias, mean, rstd, out, voxels, channels,
                        groups, frames, height, width, z_channels, z_frames, z_height, z_width,
                        scale_t, z_height / height, z_width / width, *f.stride(), *z.stride(),
                        FIRST_ALONE=first_alone, SILU=silu, IEEE=f.dtype == torch.float32,
                        UPCAST=dot_upcast(f.dtype), **cfg)
    return out
