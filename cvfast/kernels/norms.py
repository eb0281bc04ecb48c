"""One row-wise kernel for the transformer's memory-bound glue: the gated residual `h + gate * y`,
LayerNorm, and the adaLN modulation `* (1 + scale) + shift`, any subset in one pass.

Rows are the flattened (batch, seq) positions of a (B, S, D) tensor; gate, shift and scale are
(B, G, D) with G = 2 (row s < n_text takes entry 0, the text; the others entry 1, the video) or
G = 1 (every row entry 0, passed with a zero stride). Statistics in fp32; the residual is rounded
to the stream's dtype before it is normalised, as the unfused path stores and reloads it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET, new_output, next_pow2, rounded


@triton.jit
def _residual_norm(H, Y, GATE, W, B, SHIFT, SCALE, H_OUT, N_OUT,
                   n_rows, seq, dim, n_text, eps, sg_b, sg_g, sm_b, sm_g,
                   BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, RESIDUAL: tl.constexpr, NORM: tl.constexpr,
                   AFFINE: tl.constexpr, MODULATE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < dim)
    offs = rows[:, None] * dim + cols[None, :]
    batch = rows // seq
    segment = ((rows % seq) >= n_text).to(tl.int32)
    x = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32)
    if RESIDUAL:
        gate = tl.load(GATE + batch[:, None] * sg_b + segment[:, None] * sg_g + cols[None, :], mask=mask,
                       other=0.0).to(tl.float32)
        y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
        stream = rounded(x + gate * y, H_OUT.dtype.element_ty)
        tl.store(H_OUT + offs, stream, mask=mask)
        x = stream.to(tl.float32)
    if NORM:
        mean = tl.sum(x, axis=1) / dim
        centred = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / dim + eps)
        out = centred * rstd[:, None]
        if AFFINE:
            w = tl.load(W + cols, mask=cols < dim, other=0.0).to(tl.float32)
            b = tl.load(B + cols, mask=cols < dim, other=0.0).to(tl.float32)
            out = out * w[None, :] + b[None, :]
        if MODULATE:
            mod = batch[:, None] * sm_b + segment[:, None] * sm_g + cols[None, :]
            scale = tl.load(SCALE + mod, mask=mask, other=0.0).to(tl.float32)
            shift = tl.load(SHIFT + mod, mask=mask, other=0.0).to(tl.float32)
            out = out * (1.0 + scale) + shift
        tl.store(N_OUT + offs, rounded(out, N_OUT.dtype.element_ty), mask=mask)


def _rows_per_program() -> int:
    """On a GPU one row per program up to D = 4096 (a 3,072-wide row is 12 KB of fp32 in registers
    across the program's warps, the layout of Triton's LayerNorm tutorial); the interpreter runs
    programs one after another, so it takes 16 rows at a time to keep the tests fast."""
    return 16 if INTERPRET else 1


def _modulation_strides(param: torch.Tensor | None) -> tuple[int, int]:
    if param is None:
        return 0, 0
    return param.stride(0), (param.stride(1) if param.shape[1] == 2 else 0)


def residual_norm(h: torch.Tensor, y: torch.Tensor | None, gate: torch.Tensor | None, weight, bias,
                  shift: torch.Tensor | None, scale: torch.Tensor | None, n_text: int, eps: float,
                  norm: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """h, y: (B, S, D) contiguous; gate/shift/scale: (B, G, D) with a contiguous last dim.
    Returns (h + gate * y or None without y, the normed rows or None without norm)."""
    dim = h.shape[-1]
    seq = h.shape[-2] if h.dim() >= 2 else 1
    n_rows = h.numel() // dim
    residual = y is not None
    h_out = new_output(h.shape, h.dtype, h.device) if residual else None
    n_out = new_output(h.shape, h.dtype, h.device) if norm else None
    block_d = next_pow2(dim)
    block_r = _rows_per_program()
    dummy = h
    sg_b, sg_g = _modulation_strides(gate)
    sm_b, sm_g = _modulation_strides(scale)
    if shift is not None:
        assert shift.stride() == scale.stride(), "shift and scale share one layout"
    _residual_norm[(triton.cdiv(n_rows, block_r),)](
        h, y if residual else dummy, gate if residual else dummy,
        weight if weight is not None else dummy, bias if bias is not None else dummy,
        shift if shift is not None else dummy, scale if scale is not None else dummy,
        h_out if residual else dummy, n_out if norm else dummy,
        n_rows, seq, dim, n_text, eps, sg_b, sg_g, sm_b, sm_g,
        BLOCK_R=block_r, BLOCK_D=block_d, RESIDUAL=residual, NORM=norm, AFFINE=weight is not None,
        MODULATE=scale is not None, num_warps=4 if INTERPRET else min(16, max(4, block_d // 256)))
    return h_out, n_out
