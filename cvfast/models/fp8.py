"""FP8 linears for the denoiser (`precision="fp8"` or "fp8-linear").

The transformer's heavy linears (the fused QKV projection, the attention output and the two
feed-forward layers: 4 of every block's 6 weight matrices, and every weight matmul it runs per token)
hold their weights in float8 e4m3 with one scale per output channel, quantized once when the model is
built. The rest stays in the model's dtype: the adaLN modulation (mod1, mod2, out_mod) computes
per-channel shifts, scales and gates from one conditioning vector per sample, so it costs
nothing per token and its error would scale every row at once; the time embedding, patch embedding and
final projection touch the narrow ends of the network (16-64 channels) where one rounding error
lands directly in the predicted noise; and the norms run in fp32 anyway.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.quantized import quantize_rows

# Block linears that `quantize_linears` replaces.
FP8_LINEARS = ("qkv", "attn_out", "ff1", "ff2")


class FP8Linear(nn.Module):
    """A Linear with an e4m3 weight (out, in) and fp32 scales (out, 1); forward runs the OpSet's
    `fp8_linear` (activations quantized per token): (..., in) -> (..., out) in the input's dtype."""

    def __init__(self, linear: nn.Linear, ops):
        super().__init__()
        weight, scale = quantize_rows(linear.weight.detach())
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", scale)
        self.bias = linear.bias
        self.in_features, self.out_features, self.ops = linear.in_features, linear.out_features, ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.fp8_linear(x, self.weight, self.weight_scale, self.bias)


def quantize_linears(transformer: nn.Module) -> None:
    """Replace every block's FP8_LINEARS by FP8Linear, quantized from their current weights."""
    for block in transformer.blocks:
        for name in FP8_LINEARS:
            setattr(block, name, FP8Linear(getattr(block, name), block.ops))


def weight_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (its weight memory)."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
