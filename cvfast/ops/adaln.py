"""The transformer's row-wise glue around each block: the adaLN `modulate` (LayerNorm + per-segment
shift/scale), the adaLN-zero `gated_residual` (h + gate * y), and both fused
(`gated_residual_modulate`).

Modulation is (batch, G, dim): G = 1 applies to every row; G = 2 gives the first n_text rows (text)
entry 0 and the others (video) entry 1. Backend `triton`: one row kernel (`cvfast.kernels.norms`, the
custom op `cvfast::residual_norm`) does any subset of residual, LayerNorm and modulation in one pass;
it is also the Triton backend of `layer_norm`, registered here (its reference, the QK norm, is in
`joint_attention.py`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .joint_attention import layer_norm
from .registry import register
from .triton_backend import impl as triton_impl
from .triton_backend import kernels

Tensor = torch.Tensor

# -- reference -------------------------------------------------------------------------------------


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


# -- triton ----------------------------------------------------------------------------------------

@torch.library.custom_op("cvfast::residual_norm", mutates_args=())
def residual_norm_op(h: Tensor, y: Tensor | None, gate: Tensor | None, weight: Tensor | None,
                     bias: Tensor | None, shift: Tensor | None, scale: Tensor | None, n_text: int, eps: float,
                     norm: bool) -> tuple[Tensor, Tensor]:
    """Returns (residual stream, normed); an output that was not asked for is an empty tensor."""
    h_out, n_out = kernels.norms.residual_norm(h.contiguous(), _contig(y), _last_contig(gate), weight, bias,
                                               _last_contig(shift), _last_contig(scale), n_text, eps, norm)
    empty = h.new_empty(0)
    return (empty if h_out is None else h_out), (empty if n_out is None else n_out)


@residual_norm_op.register_fake
def _(h, y, gate, weight, bias, shift, scale, n_text, eps, norm):
    return (h.new_empty(h.shape) if y is not None else h.new_empty(0)), (h.new_empty(h.shape) if norm else h.new_empty(0))


def _contig(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


def _last_contig(t: Tensor | None) -> Tensor | None:
    """(B, G, D) modulation with a unit stride on D (chunks of the modulation Linear's output are)."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def triton_layer_norm(x: Tensor, weight, bias, eps: float) -> Tensor:
    return residual_norm_op(x, None, None, weight, bias, None, None, 0, eps, True)[1]


def triton_modulate(h: Tensor, weight, bias, shift, scale, n_text: int, eps: float) -> Tensor:
    return residual_norm_op(h, None, None, weight, bias, shift, scale, n_text, eps, True)[1]


def triton_gated_residual(h: Tensor, y: Tensor, gate: Tensor, n_text: int) -> Tensor:
    return residual_norm_op(h, y, gate, None, None, None, None, n_text, 0.0, False)[0]


def triton_gated_residual_modulate(h, y, gate, weight, bias, shift, scale, n_text: int, eps: float):
    return residual_norm_op(h, y, gate, weight, bias, shift, scale, n_text, eps, True)


def _rows_why_not(h: Tensor, weight, bias, *modulation: Tensor | None) -> list[str]:
    reasons = []
    if (weight is None) != (bias is None):
        reasons.append("LayerNorm weight and bias must both be given or both be None")
    for param in modulation:
        if param is not None and (param.dim() != 3 or param.shape[1] not in (1, 2) or param.shape[2] != h.shape[-1]
                                  or param.shape[0] != h.shape[0]):
            reasons.append(f"modulation must be (batch, 1 or 2, dim), got {tuple(param.shape)}")
    return reasons


def layer_norm_why_not(x, weight, bias, eps) -> list[str]:
    return _rows_why_not(x, weight, bias)


def modulate_why_not(h, weight, bias, shift, scale, n_text, eps) -> list[str]:
    if h.dim() != 3:
        return [f"expects (batch, seq, dim), got {tuple(h.shape)}"]
    if (shift is None) != (scale is None):
        return ["shift and scale must both be given or both be None"]
    return _rows_why_not(h, weight, bias, shift, scale)


def residual_why_not(h, y, gate, n_text) -> list[str]:
    if h.dim() != 3 or y.shape != h.shape:
        return [f"expects h and y of one (batch, seq, dim) shape, got {tuple(h.shape)} and {tuple(y.shape)}"]
    return _rows_why_not(h, None, None, gate)


def residual_modulate_why_not(h, y, gate, weight, bias, shift, scale, n_text, eps) -> list[str]:
    return residual_why_not(h, y, gate, n_text) + modulate_why_not(h, weight, bias, shift, scale, n_text, eps)


# -- registration ----------------------------------------------------------------------------------

register("layer_norm", layer_norm, [triton_impl(triton_layer_norm, layer_norm_why_not)])
register("modulate", modulate, [triton_impl(triton_modulate, modulate_why_not)])
register("gated_residual", gated_residual, [triton_impl(triton_gated_residual, residual_why_not)])
register("gated_residual_modulate", gated_residual_modulate,
         [triton_impl(triton_gated_residual_modulate, residual_modulate_why_not)])
