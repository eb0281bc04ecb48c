"""What every launcher shares: interpreter detection and output allocation."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Read once, as triton.jit does when it decorates the kernels.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every kernel output is allocated here, uninitialised: each element must be written by the
    kernel (the tests replace this with a NaN-filled allocation to prove it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def dot_upcast(dtype: torch.dtype) -> bool:
    """Whether tl.dot operands go in as fp32. Triton 3.8's interpreter computes bf16 dots wrongly
    (errors of 1e10 on unit inputs, seen on this project's CPU machines); bf16 x bf16 products are
    exact in fp32, so upcasting gives the GPU's result up to summation order."""
    return INTERPRET and dtype != torch.float32


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(n)


# Triton 3.8's interpreter converts fp32 to bf16 by truncation, whatever rounding is asked for (a
# 1-ulp error, seen on this project's CPU machines), where the GPU rounds to nearest even. Kernels
# convert through `rounded` so the interpreter rounds like the GPU.
_ROUND_BF16_BY_HAND = tl.constexpr(INTERPRET)


@triton.jit
def rounded(x, dtype: tl.constexpr):
    """x (fp32) converted to `dtype`, rounding to nearest even."""
    if _ROUND_BF16_BY_HAND and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def voxel_coords(v, frames, height, width):
    """(batch, frame, row, column) of flat voxel indices over a (B, T, H, W) grid."""
    w = v % width
    h = (v // width) % height
    t = (v // (width * height)) % frames
    b = v // (width * height * frames)
    return b, t, h, w
