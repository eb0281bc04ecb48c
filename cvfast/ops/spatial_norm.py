"""The VAE decoder's spatial norm `spatial_norm`: GroupNorm(f) * conv_y(zq) + conv_b(zq) (then SiLU),
zq the latent nearest-resized to f's size (`resize_latent`).

Backend `triton`: one pass over f after the GroupNorm statistics (`cvfast.kernels.spatial_norm`, the
custom op `cvfast::spatial_norm`); the resized latent and the two f-sized conv outputs are never
written.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .causal_conv3d import causal_conv3d
from .group_norm import group_norm, layout
from .group_norm import why_not as group_norm_why_not
from .registry import register
from .triton_backend import impl as triton_impl
from .triton_backend import kernels

Tensor = torch.Tensor


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


@torch.library.custom_op("cvfast::spatial_norm", mutates_args=())
def spatial_norm_op(f: Tensor, z: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float, y_weight: Tensor,
                    y_bias: Tensor, b_weight: Tensor, b_bias: Tensor, silu: bool) -> Tensor:
    fmt = layout(f)
    as_matrix = lambda w: w.reshape(w.shape[0], -1).contiguous()  # noqa: E731  (C, z_channels, 1, 1, 1)
    return kernels.spatial_norm.spatial_norm(f.contiguous(memory_format=fmt), z, weight.contiguous(),
                                             bias.contiguous(), groups, eps, as_matrix(y_weight),
                                             y_bias.contiguous(), as_matrix(b_weight), b_bias.contiguous(), silu,
                                             channels_last=fmt == torch.channels_last_3d)


@spatial_norm_op.register_fake
def _(f, z, weight, bias, groups, eps, y_weight, y_bias, b_weight, b_bias, silu):
    return torch.empty_like(f, memory_format=layout(f))


def triton_spatial_norm(f: Tensor, z: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float,
                        y_weight: Tensor, y_bias: Tensor, b_weight: Tensor, b_bias: Tensor, silu: bool = True) -> Tensor:
    return spatial_norm_op(f, z, weight, bias, groups, eps, y_weight, y_bias, b_weight, b_bias, silu)


def triton_why_not(f, z, weight, bias, groups, eps, y_weight, y_bias, b_weight, b_bias, silu=True) -> list[str]:
    reasons = group_norm_why_not(f, weight, bias, groups, eps)
    if reasons or z.dim() != 5 or z.shape[0] != f.shape[0]:
        return reasons or [f"expects z (batch, z_channels, frames, height, width) with f's batch, got {tuple(z.shape)}"]
    conv = (f.shape[1], z.shape[1], 1, 1, 1)
    if any(w is None or tuple(w.shape) != conv for w in (y_weight, b_weight)) or \
            any(v is None or tuple(v.shape) != conv[:1] for v in (y_bias, b_bias)):
        reasons.append(f"conv_y/conv_b must be 1x1x1 convs {conv} with ({f.shape[1]},) biases")
    elif any(t.dtype != f.dtype for t in (z, y_weight, y_bias, b_weight, b_bias)):
        reasons.append(f"z and the conv parameters must have f's dtype {f.dtype}")
    if f.shape[2] > 1 and f.shape[2] % 2 == 1 and z.shape[2] < 2:
        reasons.append(f"{f.shape[2]} frames (odd) need at least 2 latent frames, got {z.shape[2]}")
    return reasons


register("spatial_norm", spatial_norm, [triton_impl(triton_spatial_norm, triton_why_not)])
