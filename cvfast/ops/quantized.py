"""8-bit precision for the denoiser: FP8 linears and 8-bit attention, each with its exact emulation.

- `fp8_linear(x, weight, weight_scale, bias)`: weights in float8 e4m3 with one scale per output
  channel (quantized once, at load: `quantize_rows`), activations quantized per token (per row) at
  each call, the product summed in fp32 and scaled, in x's dtype. Backends: the emulation (the
  reference: the same quantization followed by fp32 matmuls, exact up to fp32 summation order) and
  `torch._scaled_mm` with row-wise scales (CUDA, compute capability >= 8.9).
- `quantized_attention(q, k, v)`: SageAttention2's recipe (`cvfast/kernels/quantized_attention.py`):
  K smoothed, Q and K in INT8 per 64-row block, online softmax in fp32, P and V in FP8 e4m3 (V per
  channel). The emulation runs the kernel's arithmetic block by block in PyTorch (the same scales,
  the same roundings), so the kernel matches it to fp32 rounding. Per-tensor scales would not do:
  CogVideoX's K has channels whose mean dwarfs their spread, which per-tensor FP8 attention turns into
  noise (FA3-FP8 and SageAttention v1 fail on CogVideoX 1.5); subtracting K's mean removes it and
  per-block scales follow the rest.

`quantized(opset, precision, device)` returns the OpSet a quantized denoiser runs with: `fp8_linear`
added, and `joint_attention` through the 8-bit attention; `pipe.backends()` then shows the backends
by name (`fp8-emulated`, `scaled-mm`, `int8-emulated`, `triton-int8`).
"""
from __future__ import annotations

import functools
import logging
import math

import torch

from ..core.errors import bad_arg
from .joint_attention import joint_attention
from .registry import FLOAT_DTYPES, Impl, OpSet
from .triton_backend import impl as triton_impl
from .triton_backend import kernels

log = logging.getLogger("cvfast")

Tensor = torch.Tensor
E4M3_MAX = 448.0   # float8_e4m3fn's largest finite value
INT8_MAX = 127.0
BLOCK = 64         # rows of Q and K per INT8 scale: the 8-bit attention kernel's tile
PRECISIONS = ("bf16", "fp8", "fp8-linear", "fp8-attention")
# Compute capability of FP8 tensor cores (Ada, Hopper): torch._scaled_mm and Triton's FP8 dots need it.
FP8_CAPABILITY = (8, 9)
LOG2E = math.log2(math.e)  # scores are kept in log2 units, as in the kernel: exp2(s * log2 e) = exp(s)


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x (..., n) -> (x in float8 e4m3, (..., 1) float32 scales): one scale per row, its largest
    magnitude mapped to e4m3's largest value; rounding to nearest even (PyTorch's cast), saturated."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def fp8_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None) -> Tensor:
    """The emulation: x (..., in) quantized per row; weight (out, in) float8 e4m3 with weight_scale
    (out, 1) float32 -> (..., out) in x's dtype: (x_q @ w_q^T) * x_scale * w_scale + bias in fp32."""
    rows, row_scale = quantize_rows(x.reshape(-1, x.shape[-1]))
    out = (rows.float() @ weight.float().T) * row_scale * weight_scale.T
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def scaled_mm_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None) -> Tensor:
    """`fp8_linear` on FP8 tensor cores: torch._scaled_mm with row-wise scales (the weight read
    column-major, as it requires), fp32 accumulation, the output and bias in x's dtype."""
    rows, row_scale = quantize_rows(x.reshape(-1, x.shape[-1]))
    out = torch._scaled_mm(rows, weight.T, scale_a=row_scale, scale_b=weight_scale.T,
                           bias=bias.to(x.dtype) if bias is not None else None, out_dtype=x.dtype)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def scaled_mm_why_not(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None) -> list[str]:
    reasons = []
    if x.dtype != torch.bfloat16:
        reasons.append(f"row-wise scaled matmuls give bf16 here, not {x.dtype}")
    if x.shape[-1] % 16 or weight.shape[0] % 16:
        reasons.append(f"FP8 matmuls need widths divisible by 16, got {x.shape[-1]} -> {weight.shape[0]}")
    return reasons


def quantize_int8_blocks(x: Tensor) -> tuple[Tensor, Tensor]:
    """x (B, H, S, d) -> (int8 (B, H, S, d), (B, H, ceil(S / BLOCK)) float32): one scale per BLOCK
    rows of each head, its largest magnitude mapped to 127; rounding to nearest even."""
    batch, heads, seq, dim = x.shape
    padded = torch.nn.functional.pad(x.float(), (0, 0, 0, -seq % BLOCK)).view(batch, heads, -1, BLOCK, dim)
    scale = padded.abs().amax(dim=(3, 4)).clamp(min=1e-12) / INT8_MAX
    quantized = torch.round(padded / scale[..., None, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return quantized.view(batch, heads, -1, dim)[:, :, :seq], scale


def quantize_attention_inputs(q: Tensor, k: Tensor, v: Tensor):
    """The 8-bit attention's inputs: Q and K in INT8 per block (K minus its per-channel mean over the
    sequence: softmax(q.k) is unchanged by a shift of k common to all keys), V in e4m3 per channel."""
    k = k.float() - k.float().mean(dim=2, keepdim=True)
    q8, q_scale = quantize_int8_blocks(q)
    k8, k_scale = quantize_int8_blocks(k)
    v_scale = v.abs().amax(dim=2).float().clamp(min=1e-12) / E4M3_MAX  # (B, H, d)
    v8 = (v.float() / v_scale[:, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q8, q_scale, k8, k_scale, v8, v_scale


def quantized_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """The emulation of the 8-bit attention kernel: (B, H, S, d) q, k, v -> (B, H, S, d) in q's dtype,
    block by block with the kernel's arithmetic (int8 products summed exactly, scores in log2 units,
    online softmax, P rounded to e4m3 at scale 448)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    q8, q_scale, k8, k_scale, v8, v_scale = quantize_attention_inputs(q, k, v)
    q_factor = (q_scale * (scale * LOG2E)).repeat_interleave(BLOCK, dim=2)[:, :, :q.shape[2], None]
    rows, device = q.shape[:3], q.device
    m = torch.full(rows, float("-inf"), device=device)
    total, acc = torch.zeros(rows, device=device), torch.zeros(q.shape, device=device)
    for block, start in enumerate(range(0, k.shape[2], BLOCK)):
        keys = slice(start, start + BLOCK)
        # |int8 x int8| <= 16,129; summed over d <= 128 that stays below 2^24: exact in fp32.
        s = (q8.float() @ k8[:, :, keys].float().transpose(-1, -2)) * (q_factor * k_scale[:, :, block, None, None])
        m_new = torch.maximum(m, s.amax(dim=-1))
        p = torch.exp2(s - m_new[..., None])
        alpha = torch.exp2(m - m_new)
        total = total * alpha + p.sum(dim=-1)
        p8 = (p * E4M3_MAX).to(torch.float8_e4m3fn).float()
        acc = acc * alpha[..., None] + p8 @ v8[:, :, keys].float()
        m = m_new
    return (acc / (total[..., None] * E4M3_MAX) * v_scale[:, :, None]).to(q.dtype)


def triton_quantized_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    q8, q_scale, k8, k_scale, v8, v_scale = quantize_attention_inputs(q, k, v)
    return quantized_attention_op(q8, q_scale, k8, k_scale, v8, v_scale, scale, q.dtype)


@torch.library.custom_op("cvfast::quantized_attention", mutates_args=())
def quantized_attention_op(q: Tensor, q_scale: Tensor, k: Tensor, k_scale: Tensor, v: Tensor, v_scale: Tensor,
                           scale: float, dtype: torch.dtype) -> Tensor:
    return kernels.quantized_attention.quantized_attention(q, q_scale, k, k_scale, v, v_scale, scale, dtype)


@quantized_attention_op.register_fake
def _(q, q_scale, k, k_scale, v, v_scale, scale, dtype):
    return q.new_empty(q.shape, dtype=dtype)


def quantized_why_not(qkv: Tensor, heads: int, *args, **kwargs) -> list[str]:
    head_dim = qkv.shape[-1] // (3 * heads)
    return [] if head_dim in (16, 32, 64, 128) else [f"head_dim {head_dim} is not 16, 32, 64 or 128"]


def check_precision(precision: str, device: torch.device, dtype: torch.dtype) -> str:
    """`precision` if it can run on this device in this dtype: FP8 tensor cores and bf16 activations on
    CUDA (the row-wise scaled matmul gives bf16), the emulation on the CPU in any float dtype.
    "bf16" means unquantized: the model runs in `dtype`."""
    if precision not in PRECISIONS:
        raise bad_arg("precision", precision, f"one of {PRECISIONS}")
    if precision == "bf16" or device.type != "cuda":
        return precision
    have = torch.cuda.get_device_capability(device)
    if have < FP8_CAPABILITY:
        raise bad_arg("precision", precision, f"'bf16' on this GPU (compute capability {have[0]}.{have[1]}): FP8 "
                      "needs 8.9 or more (Ada, Hopper); on the CPU the FP8 arithmetic is emulated")
    if dtype != torch.bfloat16:
        raise bad_arg("dtype", str(dtype).replace("torch.", ""), f"bfloat16 with precision={precision!r} on CUDA "
                      "(FP8 matmuls with row-wise scales give bf16)")
    return precision


def quantized(opset: OpSet, precision: str, device: torch.device) -> OpSet:
    """The OpSet a denoiser at `precision` runs with on `device` (bf16: `opset` itself): `fp8_linear`
    added for the FP8 linears, `joint_attention` replaced by the 8-bit attention. The fast backend
    comes first where it runs on the device, the emulation last; with backend="reference" only the
    emulations (the oracle)."""
    impls, oracle = {}, opset.required == "reference"
    if precision in ("fp8", "fp8-linear"):
        emulated = Impl("fp8-emulated", fp8_linear, dtypes=FLOAT_DTYPES)
        impls["fp8_linear"] = [emulated] if oracle else [
            Impl("scaled-mm", scaled_mm_linear, devices=("cuda",), min_capability=FP8_CAPABILITY,
                 why_not=scaled_mm_why_not), emulated]
    if precision in ("fp8", "fp8-attention"):
        emulated = Impl("int8-emulated", functools.partial(joint_attention, attend=quantized_attention),
                        dtypes=FLOAT_DTYPES)
        kernel = triton_impl(functools.partial(joint_attention, attend=triton_quantized_attention), quantized_why_not,
                             "triton-int8", FP8_CAPABILITY)
        # As for every op: the CPU runs Triton (under its interpreter) only when backend="triton" asks.
        impls["joint_attention"] = [kernel, emulated] if not oracle and (device.type == "cuda" or
                                                                         opset.required == "triton") else [emulated]
    runnable = {}
    for op, candidates in impls.items():
        runnable[op] = [impl for impl in candidates if not impl.device_reasons(device)]
        for impl in candidates:
            if impl.unavailable:  # one line, as `resolve` gives for a backend that failed to load
                log.warning("cvfast: %s; %s uses the next backend", impl.unavailable, op)
    return opset.with_impls(runnable) if runnable else opset
