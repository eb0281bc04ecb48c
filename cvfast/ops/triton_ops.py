"""The Triton backend: each kernel of `cvfast.kernels` as a `torch.library` custom op (`cvfast::...`)
with a fake implementation, so torch.compile, CUDA-graph capture and the ONNX exporter see one
opaque op; plus what each one supports. Importing this module imports triton; the registry in
`cvfast.ops` turns an import failure into the backend's reason for being unavailable.

Runs on CUDA devices of compute capability 8.0 or more (bf16 tensor cores), and on the CPU when
TRITON_INTERPRET=1 was set before the first import (Triton's interpreter, for tests).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..kernels import attention as attention_kernel
from ..kernels import causal_conv3d as conv_kernel
from ..kernels import gelu as gelu_kernel
from ..kernels import group_norm as group_norm_kernel
from ..kernels import norms as norms_kernel
from ..kernels import spatial_norm as spatial_norm_kernel
from ..kernels.common import INTERPRET
from . import reference, vae_norm
from .dispatch import FLOAT_DTYPES, Impl

Tensor = torch.Tensor
MAX_HEAD_DIM = 128  # a 128 x 128 fp32 accumulator tile is the most a program keeps in registers


@torch.library.custom_op("cvfast::attention", mutates_args=())
def attention_op(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    return attention_kernel.attention(q, k, v, scale)


@attention_op.register_fake
def _(q, k, v, scale):
    return q.new_empty(q.shape)


@torch.library.custom_op("cvfast::joint_attention", mutates_args=())
def joint_attention_op(qkv: Tensor, heads: int, q_weight: Tensor, q_bias: Tensor, k_weight: Tensor,
                       k_bias: Tensor, eps: float, cos: Tensor | None, sin: Tensor | None, n_text: int) -> Tensor:
    rope = (cos.contiguous(), sin.contiguous()) if cos is not None else None
    return attention_kernel.joint_attention(qkv.contiguous(), heads, (q_weight, q_bias, k_weight, k_bias, eps),
                                            rope, n_text)


@joint_attention_op.register_fake
def _(qkv, heads, q_weight, q_bias, k_weight, k_bias, eps, cos, sin, n_text):
    return qkv.new_empty(qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3)


@torch.library.custom_op("cvfast::residual_norm", mutates_args=())
def residual_norm_op(h: Tensor, y: Tensor | None, gate: Tensor | None, weight: Tensor | None,
                     bias: Tensor | None, shift: Tensor | None, scale: Tensor | None, n_text: int, eps: float,
                     norm: bool) -> tuple[Tensor, Tensor]:
    """Returns (residual stream, normed); an output that was not asked for is an empty tensor."""
    h_out, n_out = norms_kernel.residual_norm(h.contiguous(), _contig(y), _last_contig(gate), weight, bias,
                                              _last_contig(shift), _last_contig(scale), n_text, eps, norm)
    empty = h.new_empty(0)
    return (empty if h_out is None else h_out), (empty if n_out is None else n_out)


@residual_norm_op.register_fake
def _(h, y, gate, weight, bias, shift, scale, n_text, eps, norm):
    return (h.new_empty(h.shape) if y is not None else h.new_empty(0)), (h.new_empty(h.shape) if norm else h.new_empty(0))


@torch.library.custom_op("cvfast::bias_gelu", mutates_args=())
def bias_gelu_op(x: Tensor, bias: Tensor) -> Tensor:
    return gelu_kernel.bias_gelu(x.contiguous(), bias.contiguous())


@bias_gelu_op.register_fake
def _(x, bias):
    return x.new_empty(x.shape)


@torch.library.custom_op("cvfast::group_norm", mutates_args=())
def group_norm_op(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float, scale: Tensor | None,
                  shift: Tensor | None, silu: bool) -> Tensor:
    x, weight, bias, scale, shift = vae_norm.prepare(x, weight, bias, scale, shift)
    return group_norm_kernel.group_norm(x, weight, bias, groups, eps, scale, shift, silu)


@group_norm_op.register_fake
def _(x, weight, bias, groups, eps, scale, shift, silu):
    return torch.empty_like(x, memory_format=vae_norm.layout(x))


@torch.library.custom_op("cvfast::causal_conv3d", mutates_args=())
def causal_conv3d_op(x: Tensor, weight: Tensor, bias: Tensor | None, past: Tensor | None,
                     residual: Tensor | None) -> Tensor:
    """The kernel reads x, past and residual through their strides; the output takes x's layout."""
    return conv_kernel.causal_conv3d(x, weight, bias, past, residual,
                                     channels_last=vae_norm.layout(x) == torch.channels_last_3d)


@causal_conv3d_op.register_fake
def _(x, weight, bias, past, residual):
    shape = (x.shape[0], weight.shape[0], *x.shape[2:])
    return x.new_empty(shape).contiguous(memory_format=vae_norm.layout(x))


@torch.library.custom_op("cvfast::spatial_norm", mutates_args=())
def spatial_norm_op(f: Tensor, z: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float, y_weight: Tensor,
                    y_bias: Tensor, b_weight: Tensor, b_bias: Tensor, silu: bool) -> Tensor:
    fmt = vae_norm.layout(f)
    as_matrix = lambda w: w.reshape(w.shape[0], -1).contiguous()  # noqa: E731  (C, z_channels, 1, 1, 1)
    return spatial_norm_kernel.spatial_norm(f.contiguous(memory_format=fmt), z, weight.contiguous(), bias.contiguous(),
                                            groups, eps, as_matrix(y_weight), y_bias.contiguous(),
                                            as_matrix(b_weight), b_bias.contiguous(), silu,
                                            channels_last=fmt == torch.channels_last_3d)


@spatial_norm_op.register_fake
def _(f, z, weight, bias, groups, eps, y_weight, y_bias, b_weight, b_bias, silu):
    return torch.empty_like(f, memory_format=vae_norm.layout(f))


def _contig(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


def _last_contig(t: Tensor | None) -> Tensor | None:
    """(B, G, D) modulation with a unit stride on D (chunks of the modulation Linear's output are)."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


# -- the functions the OpSet calls, with the reference's signatures --------------------------------

def attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    return attention_op(q, k, v, q.shape[-1] ** -0.5 if scale is None else scale)


def joint_attention(qkv, heads, q_weight, q_bias, k_weight, k_bias, eps, cos, sin, n_text) -> Tensor:
    return joint_attention_op(qkv, heads, q_weight, q_bias, k_weight, k_bias, eps, cos, sin, n_text)


def layer_norm(x: Tensor, weight, bias, eps: float) -> Tensor:
    return residual_norm_op(x, None, None, weight, bias, None, None, 0, eps, True)[1]


def modulate(h: Tensor, weight, bias, shift, scale, n_text: int, eps: float) -> Tensor:
    return residual_norm_op(h, None, None, weight, bias, shift, scale, n_text, eps, True)[1]


def gated_residual(h: Tensor, y: Tensor, gate: Tensor, n_text: int) -> Tensor:
    return residual_norm_op(h, y, gate, None, None, None, None, n_text, 0.0, False)[0]


def gated_residual_modulate(h, y, gate, weight, bias, shift, scale, n_text: int, eps: float):
    return residual_norm_op(h, y, gate, weight, bias, shift, scale, n_text, eps, True)


def group_norm(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float, scale: Tensor | None = None,
               shift: Tensor | None = None, silu: bool = False) -> Tensor:
    return group_norm_op(x, weight, bias, groups, eps, scale, shift, silu)


def causal_conv3d(x: Tensor, weight: Tensor, bias: Tensor | None, past: Tensor | None,
                  residual: Tensor | None = None) -> Tensor:
    return causal_conv3d_op(x, weight, bias, past, residual)


def spatial_norm(f: Tensor, z: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float, y_weight: Tensor,
                 y_bias: Tensor, b_weight: Tensor, b_bias: Tensor, silu: bool = True) -> Tensor:
    return spatial_norm_op(f, z, weight, bias, groups, eps, y_weight, y_bias, b_weight, b_bias, silu)


def gelu_mlp(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None) -> Tensor:
    hidden = F.linear(x, w1)
    hidden = bias_gelu_op(hidden, b1 if b1 is not None else hidden.new_zeros(hidden.shape[-1]))
    return F.linear(hidden, w2, b2)


# -- what each supports ----------------------------------------------------------------------------

def _head_dim_reasons(head_dim: int) -> list[str]:
    if head_dim & (head_dim - 1) or not 16 <= head_dim <= MAX_HEAD_DIM:
        return [f"head_dim {head_dim} is not a power of two in 16..{MAX_HEAD_DIM} (tl.arange tiles)"]
    return []


def _attention_why_not(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> list[str]:
    reasons = []
    if not (q.dim() == k.dim() == v.dim() == 4):
        return [f"expects (batch, heads, seq, head_dim), got {tuple(q.shape)}"]
    if not (q.dtype == k.dtype == v.dtype):
        reasons.append(f"q/k/v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        reasons.append(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match")
    return reasons + _head_dim_reasons(q.shape[-1])


def _joint_why_not(qkv, heads, q_weight, q_bias, k_weight, k_bias, eps, cos, sin, n_text) -> list[str]:
    if qkv.dim() != 3 or qkv.shape[-1] % (3 * heads):
        return [f"expects qkv (batch, seq, 3 * heads * head_dim) with heads={heads}, got {tuple(qkv.shape)}"]
    head_dim = qkv.shape[-1] // (3 * heads)
    reasons = _head_dim_reasons(head_dim)
    if any(t is None for t in (q_weight, q_bias, k_weight, k_bias)):
        reasons.append("the fused QK LayerNorm needs weight and bias for q and k")
    if cos is not None and (cos.shape != (qkv.shape[1] - n_text, head_dim) or cos.dtype != torch.float32):
        reasons.append(f"rope tables must be float32 ({qkv.shape[1] - n_text}, {head_dim}), got "
                       f"{cos.dtype} {tuple(cos.shape)}")
    return reasons


def _rows_why_not(h: Tensor, weight, bias, *modulation: Tensor | None) -> list[str]:
    reasons = []
    if (weight is None) != (bias is None):
        reasons.append("LayerNorm weight and bias must both be given or both be None")
    for param in modulation:
        if param is not None and (param.dim() != 3 or param.shape[1] not in (1, 2) or param.shape[2] != h.shape[-1]
                                  or param.shape[0] != h.shape[0]):
            reasons.append(f"modulation must be (batch, 1 or 2, dim), got {tuple(param.shape)}")
    return reasons


def _layer_norm_why_not(x, weight, bias, eps) -> list[str]:
    return _rows_why_not(x, weight, bias)


def _modulate_why_not(h, weight, bias, shift, scale, n_text, eps) -> list[str]:
    if h.dim() != 3:
        return [f"expects (batch, seq, dim), got {tuple(h.shape)}"]
    if (shift is None) != (scale is None):
        return ["shift and scale must both be given or both be None"]
    return _rows_why_not(h, weight, bias, shift, scale)


def _residual_why_not(h, y, gate, n_text) -> list[str]:
    if h.dim() != 3 or y.shape != h.shape:
        return [f"expects h and y of one (batch, seq, dim) shape, got {tuple(h.shape)} and {tuple(y.shape)}"]
    return _rows_why_not(h, None, None, gate)


def _residual_modulate_why_not(h, y, gate, weight, bias, shift, scale, n_text, eps) -> list[str]:
    return _residual_why_not(h, y, gate, n_text) + _modulate_why_not(h, weight, bias, shift, scale, n_text, eps)


def _conv_why_not(x, weight, bias, past, residual=None) -> list[str]:
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


def _spatial_norm_why_not(f, z, weight, bias, groups, eps, y_weight, y_bias, b_weight, b_bias, silu=True) -> list[str]:
    reasons = vae_norm.why_not(f, weight, bias, groups, eps)
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


def _impl(fn, why_not) -> Impl:
    devices = ("cuda", "cpu") if INTERPRET else ("cuda",)
    return Impl("triton", fn, devices=devices, dtypes=FLOAT_DTYPES, min_capability=(8, 0), why_not=why_not,
                device_note="the CPU runs Triton kernels only with TRITON_INTERPRET=1 set before cvfast is imported")


IMPLS = {
    "attention": _impl(attention, _attention_why_not),
    "joint_attention": _impl(joint_attention, _joint_why_not),
    "layer_norm": _impl(layer_norm, _layer_norm_why_not),
    "modulate": _impl(modulate, _modulate_why_not),
    "gated_residual": _impl(gated_residual, _residual_why_not),
    "gated_residual_modulate": _impl(gated_residual_modulate, _residual_modulate_why_not),
    "gelu_mlp": _impl(gelu_mlp, None),
    "group_norm": _impl(group_norm, vae_norm.why_not),
    "causal_conv3d": _impl(causal_conv3d, _conv_why_not),
    "spatial_norm": _impl(spatial_norm, _spatial_norm_why_not),
}

# The unfused variant, for the benchmarks to measure the fusion against: QK LayerNorm and RoPE in
# PyTorch (each a pass over q and k), then the Triton attention kernel.
joint_attention_unfused = functools.partial(reference.joint_attention, attend=attention)
