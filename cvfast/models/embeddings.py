"""Positional, rotary and timestep embeddings of CogVideoX, computed on the host once per shape.

The formulas follow the CogVideoX papers and diffusers' implementation (the oracle in tests); the
sincos tables are computed in float64 as diffusers does on the CPU, then cast by the caller.
"""
from __future__ import annotations

import math

import torch


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(n,) positions -> (n, dim): [sin(p * w_i) | cos(p * w_i)], w_i = 10000^(-i / (dim/2))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = torch.outer(positions.reshape(-1).double(), omega)
    return torch.cat((angles.sin(), angles.cos()), dim=1)


def sincos_3d(dim: int, frames: int, height: int, width: int, spatial_scale: float,
              temporal_scale: float) -> torch.Tensor:
    """CogVideoX-2B's fixed 3D positional table over the patch grid.

    Returns (frames * height * width, dim) float64: a quarter of the channels encodes time, three
    quarters space (half of those the column index, half the row index, in that order).
    """
    spatial_dim, temporal_dim = 3 * dim // 4, dim // 4
    rows = torch.arange(height, dtype=torch.float32) / spatial_scale
    cols = torch.arange(width, dtype=torch.float32) / spatial_scale
    col_grid = cols[None, :].expand(height, width)
    row_grid = rows[:, None].expand(height, width)
    spatial = torch.cat((_sincos_1d(spatial_dim // 2, col_grid), _sincos_1d(spatial_dim // 2, row_grid)), 1)
    temporal = _sincos_1d(temporal_dim, torch.arange(frames, dtype=torch.float32) / temporal_scale)
    table = torch.cat((temporal[:, None, :].expand(-1, height * width, -1),
                       spatial[None].expand(frames, -1, -1)), dim=-1)
    return table.reshape(frames * height * width, dim)


def _rope_1d(dim: int, positions: torch.Tensor, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) positions -> cos, sin (n, dim) float32, each frequency repeated for an interleaved pair."""
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    angles = torch.outer(positions.float(), freqs)
    return angles.cos().repeat_interleave(2, dim=1), angles.sin().repeat_interleave(2, dim=1)


def _crop_region(grid_h: int, grid_w: int, base_h: int, base_w: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Where a (grid_h, grid_w) grid sits, resized to cover and centred, in the base grid the model
    was trained on (CogVideoX 1.0's RoPE positions): ((top, left), (bottom, right))."""
    if grid_h / grid_w > base_h / base_w:
        height, width = base_h, int(round(base_h / grid_h * grid_w))
    else:
        width, height = base_w, int(round(base_w / grid_w * grid_h))
    top, left = int(round((base_h - height) / 2.0)), int(round((base_w - width) / 2.0))
    return (top, left), (top + height, left + width)


def rope_3d(head_dim: int, frames: int, grid_h: int, grid_w: int, base_h: int, base_w: int,
            slice_grid: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """3D RoPE tables for the video tokens (frame-major, then row, then column).

    head_dim is split time : height : width = 1/4 : 3/8 : 3/8. CogVideoX 1.0 (slice_grid=False)
    spreads the grid over the base (training) grid by linspace; CogVideoX 1.5 (slice_grid=True)
    uses integer positions. Returns cos, sin: (frames * grid_h * grid_w, head_dim) float32.
    """
    dim_t, dim_hw = head_dim // 4, head_dim // 8 * 3
    if slice_grid:
        pos_h = torch.arange(grid_h, dtype=torch.float32)
        pos_w = torch.arange(grid_w, dtype=torch.float32)
        pos_t = torch.arange(frames, dtype=torch.float32)
    else:
        (top, left), (bottom, right) = _crop_region(grid_h, grid_w, base_h, base_w)
        pos_h = torch.linspace(top, bottom * (grid_h - 1) / grid_h, grid_h, dtype=torch.float32)
        pos_w = torch.linspace(left, right * (grid_w - 1) / grid_w, grid_w, dtype=torch.float32)
        pos_t = torch.linspace(0, frames * (frames - 1) / frames, frames, dtype=torch.float32)
    tables = []
    for part in range(2):  # 0: cos, 1: sin
        t = _rope_1d(dim_t, pos_t)[part][:, None, None, :].expand(-1, grid_h, grid_w, -1)
        h = _rope_1d(dim_hw, pos_h)[part][None, :, None, :].expand(frames, -1, grid_w, -1)
        w = _rope_1d(dim_hw, pos_w)[part][None, None, :, :].expand(frames, grid_h, -1, -1)
        tables.append(torch.cat((t, h, w), dim=-1).reshape(frames * grid_h * grid_w, -1))
    return tables[0], tables[1]


def timestep_features(timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool, shift: float) -> torch.Tensor:
    """Sinusoidal timestep features (batch,) -> (batch, dim) float32, as in DDPM/diffusers
    `get_timestep_embedding` with max period 10000."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / (half - shift)
    angles = timesteps[:, None].float() * torch.exp(exponent)[None, :]
    sin, cos = angles.sin(), angles.cos()
    emb = torch.cat((cos, sin) if flip_sin_to_cos else (sin, cos), dim=-1)
    return torch.nn.functional.pad(emb, (0, dim % 2))
