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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Non-causal softmax attention, scale 1/sqrt(head_dim) unless given.

    q: (batch, heads, seq_q, head_dim), k, v: (batch, heads, seq_k, head_dim) -> (batch, heads,
    seq_q, head_dim), dtype of q. Scores and softmax in (at least) float32.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)  # at least fp32; fp64 stays fp64
    kf_t, vf = k.to(acc).transpose(-1, -2), v.to(acc)
    blocks = []
    for qb in q.split(_QUERY_BLOCK, dim=2):
        probs = torch.softmax(qb.to(acc) @ kf_t * scale, dim=-1)
        blocks.append((probs @ vf).to(q.dtype))
    return torch.cat(blocks, dim=2)


def joint_attention(qkv: torch.Tensor, heads: int, q_weight: torch.Tensor | None, q_bias: torch.Tensor | None,
                    k_weight: torch.Tensor | None, k_bias: torch.Tensor | None, eps: float,
                    cos: torch.Tensor | None, sin: torch.Tensor | None, n_text: int,
                    attend=None) -> torch.Tensor:
    """CogVideoX's attention over the joint [text; video] sequence, from the fused QKV projection:
    per-head LayerNorm of q and k, RoPE on the video tokens (rows n_text onward) when `cos` is
    given, softmax attention (`attend`, default `attention`), heads merged back.

    qkv: (batch, seq, 3 * heads * head_dim), features ordered (q|k|v, head, head_dim);
    cos, sin: (seq - n_text, head_dim) float32 or None -> (batch, seq, heads * head_dim).
    """
    batch, seq, _ = qkv.shape
    q, k, v = qkv.view(batch, seq, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q = layer_norm(q, q_weight, q_bias, eps)
    k = layer_norm(k, k_weight, k_bias, eps)
    if cos is not None:  # split, rotate, concat: no in-place slice writes (ONNX export)
        q = torch.cat((q[:, :, :n_text], rope(q[:, :, n_text:], cos, sin)), dim=2)
        k = torch.cat((k[:, :, :n_text], rope(k[:, :, n_text:], cos, sin)), dim=2)
    return (attend or attention)(q, k, v).transpose(1, 2).reshape(batch, seq, -1)


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


def _per_row(param: torch.Tensor, n_text: int, seq: int) -> torch.Tensor:
    """(batch, G, dim) modulation -> (batch, seq, dim) rows: G=1 applies to every row; G=2 gives
    the first n_text rows (text) entry 0 and the others (video) entry 1."""
    if param.shape[1] == 1:
        return param.expand(-1, seq, -1)
    return torch.cat((param[:, :1].expand(-1, n_text, -1), param[:, 1:].expand(-1, seq - n_text, -1)), dim=1)


def modulate(h: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
             shift: torch.Tensor | None, scale: torch.Tensor | None, n_text: int, eps: float) -> torch.Tensor:
    """adaLN: LayerNorm(h) * (1 + scale) + shift, with per-segment modulation (see `_per_row`);
    without shift/scale a plain LayerNorm.

    h: (batch, seq, dim); shift, scale: (batch, G, dim), G in {1, 2} -> (batch, seq, dim).
    """
    normed = F.layer_norm(h, (h.shape[-1],), weight, bias, eps)
    if scale is None:
        return normed
    seq = h.shape[1]
    return normed * _per_row(1 + scale, n_text, seq) + _per_row(shift, n_text, seq)


def gated_residual(h: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, n_text: int) -> torch.Tensor:
    """The adaLN-zero residual h + gate * y. h, y: (batch, seq, dim); gate: (batch, G, dim)."""
    return h + _per_row(gate, n_text, h.shape[1]) * y


def gated_residual_modulate(h: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor | None,
                            bias: torch.Tensor | None, shift: torch.Tensor, scale: torch.Tensor, n_text: int,
                            eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`gated_residual` followed by the next `modulate`: returns (h + gate * y, its modulated norm)."""
    h = gated_residual(h, y, gate, n_text)
    return h, modulate(h, weight, bias, shift, scale, n_text, eps)


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
                  past: torch.Tensor | None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """Causal 3D convolution, stride 1: `past` (the last kt-1 input frames of the previous chunk) or,
    for the first chunk, kt-1 copies of the first frame are prepended in time; height and width are
    zero-padded by (k-1)/2. Then `+ residual` when given (the resnet's skip connection).

    x: (batch, c_in, frames, h, w); weight: (c_out, c_in, kt, kh, kw); past: (batch, c_in, kt-1, h, w)
    or None; residual: the output's shape or None -> (batch, c_out, frames, h, w).
    """
    kt, kh, kw = weight.shape[2:]
    if kt > 1:
        if past is None:
            past = x[:, :, :1].expand(-1, -1, kt - 1, -1, -1)
        x = torch.cat((past, x), dim=2)
    out = F.conv3d(x, weight, bias, padding=(0, (kh - 1) // 2, (kw - 1) // 2))
    return out if residual is None else out + residual


def resize_latent(z: torch.Tensor, size) -> torch.Tensor:
    """Nearest-resize z (b, c, t, h, w) to size (T, H, W). When T is odd and > 1 the first frame is
    resized on its own and the rest to T-1 frames: the first latent frame stands for one video frame,
    each later one for several, and a plain resize would smear frame 0 over its neighbours."""
    frames = size[0]
    if frames > 1 and frames % 2 == 1:
        first = F.interpolate(z[:, :, :1], size=(1, *size[1:]))
        rest = F.interpolate(z[:, :, 1:], size=(frames - 1, *size[1:]))
        return torch.cat((first, rest), dim=2)
    return F.interpolate(z, size=tuple(size))


def spatial_norm(f: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int,
                 eps: float, y_weight: torch.Tensor, y_bias: torch.Tensor, b_weight: torch.Tensor,
                 b_bias: torch.Tensor, silu: bool = True) -> torch.Tensor:
    """The VAE decoder's spatial norm: GroupNorm(f) * conv_y(zq) + conv_b(zq) (then SiLU), zq the
    latent z nearest-resized to f's frames x height x width (`resize_latent`), conv_y / conv_b 1x1x1.

    f: (batch, channels, T, H, W); z: (batch, z_channels, t, h, w); y_weight, b_weight:
    (channels, z_channels, 1, 1, 1); y_bias, b_bias: (channels,) -> f's shape.
    """
    zq = resize_latent(z, f.shape[-3:])
    scale, shift = causal_conv3d(zq, y_weight, y_bias, None), causal_conv3d(zq, b_weight, b_bias, None)
    return group_norm(f, weight, bias, groups, eps, scale, shift, silu)
