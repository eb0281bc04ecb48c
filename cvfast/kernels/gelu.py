"""Bias + GELU (tanh approximation) as one elementwise pass over the first MLP projection's output,
which the matmul writes without its bias (cuBLAS keeps the GEMM; this replaces the bias add and the
GELU, two passes over a (B, S, 4D) tensor, by one)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET, new_output, rounded

SQRT_2_OVER_PI = 0.7978845608028654


@triton.jit
def _bias_gelu(X, BIAS, OUT, n, width, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    x += tl.load(BIAS + offs % width, mask=mask, other=0.0).to(tl.float32)
    inner = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
    # tanh(u) = 1 - 2 / (exp(2u) + 1): exact at both ends in fp32 (exp overflows to inf -> 1).
    tanh = 1.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0)
    tl.store(OUT + offs, rounded(0.5 * x * (1.0 + tanh), OUT.dtype.element_ty), mask=mask)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x: (..., width) contiguous; bias: (width,) -> gelu_tanh(x + bias), x's dtype."""
    out = new_output(x.shape, x.dtype, x.device)
    n, block = x.numel(), (4096 if INTERPRET else 1024)
    _bias_gelu[(triton.cdiv(n, block),)](x, bias, out, n, x.shape[-1], BLOCK=block)
    return out
