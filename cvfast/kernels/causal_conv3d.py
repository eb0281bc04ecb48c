"""The VAE's causal 3D convolution (stride 1) as an implicit GEMM, with nothing padded or copied.

out[b, :, t, h, w] = bias + sum over taps (dt, dh, dw) and input channels of
    weight[:, ci, dt, dh, dw] * src[b, ci, t + dt - (kt-1), h + dh - (kh-1)/2, w + dw - (kw-1)/2]
(+ residual[b, :, t, h, w]), where a negative source frame is read from `past` (the previous
chunk's last kt-1 input frames) or, without it, from frame 0 (the first frame replicated), and a
source pixel outside the frame is zero. Both paddings are index arithmetic on the loads (the source
frame is chosen per row, out-of-frame pixels are masked to zero): the padded input that
the reference (`cvfast.ops.causal_conv3d`) builds with cat/pad is never written.

GEMM view: M = batch * frames * height * width output voxels, N = c_out, K = taps * c_in. A program
owns a BLOCK_M x BLOCK_N output tile and walks K tap by tap, BLOCK_K input channels at a time: the A tile is BLOCK_M voxels x BLOCK_K channels gathered from x, the B tile BLOCK_K x BLOCK_N
from the weight rearranged to (taps * c_in, c_out). fp32 accumulation; bias and the residual are
added to the fp32 tile before the one rounding at the store.

Layouts: every tensor is addressed through its strides. In channels-last 3D (NDHWC, what the fast
VAE path keeps) the A tile's BLOCK_K channels of a voxel are contiguous, so loads coalesce; a
contiguous (NCDHW) input is read correctly but with strided channel loads. The caller picks the
output's layout (the op keeps x's, `cvfast.ops.group_norm.layout`, so a channels-last chain stays
channels-last).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET, dot_upcast, new_output, next_pow2, rounded, voxel_coords


@triton.jit
def _causal_conv3d(X, PAST, W, BIAS, RES, OUT, voxels, frames, height, width, c_in, c_out,
                   sx_b, sx_c, sx_t, sx_h, sx_w, sp_b, sp_c, sp_t, sp_h, sp_w,
                   sr_b, sr_c, sr_t, sr_h, sr_w, so_b, so_c, so_t, so_h, so_w,
                   KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, HAS_PAST: tl.constexpr,
                   HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # int64 voxel indices: at decoder sizes (128 channels x 9 frames x 768 x 1360) element offsets
    # pass 2**31.
    m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = m < voxels
    n_ok = n < c_out
    b, t, h, w = voxel_coords(m, frames, height, width)
    dot_type = tl.float32 if UPCAST else X.dtype.element_ty
    k = tl.arange(0, BLOCK_K)
    w_kn = k[:, None] * c_out + n[None, :]
    tap_size = c_in * c_out
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    # Taps unrolled (kt*kh*kw copies of the channel loop): the offsets and masks of a tap are
    # computed once per tap, not once per channel block, and the channel loop is what gets
    # software-pipelined (c_in / BLOCK_K steps: 16 at 512 channels).
    for dt in tl.static_range(KT):
        ts = t + (dt - (KT - 1))  # negative: a frame before this chunk
        if HAS_PAST and dt < KT - 1:  # only these taps reach before the chunk: per row, x or past
            from_past = ts < 0
            rows_t = tl.where(from_past, PAST + (b * sp_b + (ts + (KT - 1)) * sp_t),
                              X + (b * sx_b + tl.maximum(ts, 0) * sx_t))
            s_h, s_w = tl.where(from_past, sp_h, sx_h), tl.where(from_past, sp_w, sx_w)
            s_c = tl.where(from_past, sp_c, sx_c)[:, None]
        else:  # without a cache the frames before the chunk are copies of frame 0: clamp the index
            rows_t = X + (b * sx_b + tl.maximum(ts, 0) * sx_t)
            s_h, s_w, s_c = sx_h, sx_w, sx_c
        for dh in tl.static_range(KH):
            hs = h + (dh - (KH - 1) // 2)
            h_ok = m_ok & (hs >= 0) & (hs < height)
            rows_th = rows_t + hs * s_h
            for dw in tl.static_range(KW):
                ws = w + (dw - (KW - 1) // 2)
                inside = h_ok & (ws >= 0) & (ws < width)  # zero padding: masked, never read
                rows = (rows_th + ws * s_w)[:, None]
                w_tap = W + ((dt * KH + dh) * KW + dw) * tap_size
                for c0 in range(0, c_in, BLOCK_K):
                    ci = c0 + k
                    k_ok = ci < c_in
                    a = tl.load(rows + ci[None, :] * s_c, mask=inside[:, None] & k_ok[None, :], other=0.0)
                    wk = tl.load(w_tap + c0 * c_out + w_kn, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                    if IEEE:
                        acc = tl.dot(a, wk, acc, input_precision="ieee")
                    else:
                        acc = tl.dot(a.to(dot_type), wk.to(dot_type), acc)
    if HAS_BIAS:
        acc += tl.load(BIAS + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if HAS_RES:
        res = RES + (b * sr_b + t * sr_t + h * sr_h + w * sr_w)[:, None] + n[None, :] * sr_c
        acc += tl.load(res, mask=mask, other=0.0).to(tl.float32)
    out = OUT + (b * so_b + t * so_t + h * so_h + w * so_w)[:, None] + n[None, :] * so_c
    tl.store(out, rounded(acc, OUT.dtype.element_ty), mask=mask)


def tile_config(c_in: int, c_out: int) -> dict:
    """Tile sizes. Not tuned (no GPU measured them yet): on a GPU, 128 voxels x 128 output channels x
    32 input channels per step is the standard tensor-core GEMM tile (a 64 KiB fp32 accumulator over
    8 warps, 64 registers a thread; A and B tiles of 8 KiB in bf16 per pipeline stage, 3 stages), cut
    down to the next power of two of narrow channel counts (the decoder's 16 latent channels, the
    3 output channels) so that masked lanes do not dominate; tl.dot needs every side >= 16. Under the
    interpreter each program step is a few numpy calls whatever its size, so larger M tiles (fewer
    programs) are what make it fast."""
    block_n = min(128, max(16, next_pow2(c_out)))
    block_k = min(32, max(16, next_pow2(c_in)))
    if INTERPRET:
        return dict(BLOCK_M=4096, BLOCK_N=block_n, BLOCK_K=min(64, max(16, next_pow2(c_in))))
    return dict(BLOCK_M=128, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=8 if block_n >= 128 else 4, num_stages=3)


def causal_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, past: torch.Tensor | None,
                  residual: torch.Tensor | None, channels_last: bool) -> torch.Tensor:
    """`cvfast.ops.causal_conv3d.causal_conv3d(x, weight, bias, past)` (+ residual). x, past, residual:
    any strides; weight (c_out, c_in, kt, kh, kw) with odd kh, kw; the output channels_last_3d or contiguous."""
    batch, c_in, frames, height, width = x.shape
    c_out, _, kt, kh, kw = weight.shape
    # (taps * c_in, c_out) with c_out contiguous: a B tile row is one coalesced load. The weight is
    # small next to the activations (14 MiB at 512 channels in bf16), so this copy per call is cheap.
    w = weight.permute(2, 3, 4, 1, 0).reshape(kt * kh * kw * c_in, c_out).contiguous()
    if channels_last:  # allocated in memory order, viewed as (B, C, T, H, W)
        out = new_output((batch, frames, height, width, c_out), x.dtype, x.device).permute(0, 4, 1, 2, 3)
    else:
        out = new_output((batch, c_out, frames, height, width), x.dtype, x.device)
    has_past = past is not None and kt > 1
    cfg = tile_config(c_in, c_out)
    voxels = batch * frames * height * width
    grid = (triton.cdiv(voxels, cfg["BLOCK_M"]), triton.cdiv(c_out, cfg["BLOCK_N"]))
    _causal_conv3d[grid](x, past if has_past else x, w, bias if bias is not None else w,
                         residual if residual is not None else out, out,
                         voxels, frames, height, width, c_in, c_out,
                         *x.stride(), *(past if has_past else x).stride(),
                         *(residual if residual is not None else out).stride(), *out.stride(),
                         KT=kt, KH=kh, KW=kw, HAS_PAST=has_past, HAS_BIAS=bias is not None,
                         HAS_RES=residual is not None, IEEE=x.dtype == torch.float32,
                         UPCAST=dot_upcast(x.dtype), **cfg)
    return out
