"""The VAE's causal 3D convolution `causal_conv3d` (stride 1, optional fused residual add).

Backend `triton`: an implicit GEMM (`cvfast.kernels.causal_conv3d`, the custom op
`cvfast::causal_conv3d`) that reads x, the cached past frames and the residual through their strides
and writes the output in x's layout (`group_norm.layout`), so a channels-last chain stays
channels-last.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .group_norm import layout
from .registry import register
from .triton_backend import impl as triton_impl
from .triton_backend import kernels

Tensor = torch.Tensor


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


@torch.library.custom_op("cvfast::causal_conv3d", mutates_args=())
def causal_conv3d_op(x: Tensor, weight: Tensor, bias: Tensor | None, past: Tensor | None,
                     residual: Tensor | None) -> Tensor:
    """The kernel reads x, past and residual through their strides; the output takes x's layout."""
    return kernels.causal_conv3d.causal_conv3d(x, weight, bias, past, residual,
                                               channels_last=layout(x) == torch.channels_last_3d)


@causal_conv3d_op.register_fake
def _(x, weight, bias, past, residual):
    shape = (x.shape[0], weight.shape[0], *x.shape[2:])
    return x.new_empty(shape).contiguous(memory_format=layout(x))


def triton_causal_conv3d(x: Tensor, weight: Tensor, bias: Tensor | None, past: Tensor | None,
                         residual: Tensor | None = None) -> Tensor:
    return causal_conv3d_op(x, weight, bias, past, residual)


def triton_why_not(x, weight, bias, past, residual=None) -> list[str]:
    if x.dim() != 5 or weight.dim() != 5:
        return [f"expects x (batch, channels, frames, height, width) and a 5-d weight, got {tuple(x.shape)} "
                f"and {tuple(weight.shape)}"]
    batch, c_in, _, height, width = x.shape
    c_out, w_in, kt, kh, kw = weight.shape
    reasons = []
    if w_in != c_in:
        reasons.append(f"weight takes {w_in} input channels, x has {c_in} (grouped convs are not supported)")
    if kh % 2 == 0 or kw % 2 == 0:
        reasons.append(f"spatial kernel {kh}x{kw} is not odd (the 'same' zero padding needs (k-1)/2 a side)")
    if any(t is not None and t.dtype != x.dtype for t in (weight, bias, past, residual)):
        reasons.append(f"weight/bias/past/residual dtypes differ from x's {x.dtype}")
    if bias is not None and tuple(bias.shape) != (c_out,):
        reasons.append(f"bias must be ({c_out},), got {tuple(bias.shape)}")
    if past is not None and kt > 1 and tuple(past.shape) != (batch, c_in, kt - 1, height, width):
        reasons.append(f"past must be {(batch, c_in, kt - 1, height, width)}, got {tuple(past.shape)}")
    if residual is not None and tuple(residual.shape) != (batch, c_out, *x.shape[2:]):
        reasons.append(f"residual must be the output's shape {(batch, c_out, *x.shape[2:])}, "
                       f"got {tuple(residual.shape)}")
    return reasons


register("causal_conv3d", causal_conv3d, [triton_impl(triton_causal_conv3d, triton_why_not)])
