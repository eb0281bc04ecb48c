"""The transformer's feed-forward `gelu_mlp`: Linear -> GELU (tanh approximation) -> Linear.

Backend `triton`: the matmuls stay with cuBLAS (the first without its bias); the bias add and the
GELU are one pass (`cvfast.kernels.gelu`, the custom op `cvfast::bias_gelu`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import register
from .triton_backend import impl as triton_impl
from .triton_backend import kernels

Tensor = torch.Tensor


def gelu_mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
             b2: torch.Tensor | None) -> torch.Tensor:
    """Linear -> GELU (tanh approximation) -> Linear. x: (..., dim) -> (..., dim_out)."""
    return F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)


@torch.library.custom_op("cvfast::bias_gelu", mutates_args=())
def bias_gelu_op(x: Tensor, bias: Tensor) -> Tensor:
    return kernels.gelu.bias_gelu(x.contiguous(), bias.contiguous())


@bias_gelu_op.register_fake
def _(x, bias):
    return x.new_empty(x.shape)


def triton_gelu_mlp(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None) -> Tensor:
    hidden = F.linear(x, w1)
    hidden = bias_gelu_op(hidden, b1 if b1 is not None else hidden.new_zeros(hidden.shape[-1]))
    return F.linear(hidden, w2, b2)


register("gelu_mlp", gelu_mlp, [triton_impl(triton_gelu_mlp, None)])
