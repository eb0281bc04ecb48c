"""Attention and what CogVideoX does around it: `attention`, `joint_attention` (per-head QK LayerNorm,
RoPE on the video rows, attention, straight from the fused QKV projection) and `rope`; also the
reference of `layer_norm` (the QK norm), an op that `adaln.py` registers with its row kernel.

References (plain PyTorch, the oracle; math in float32 where precision matters, as diffusers does,
cast back) and backends:
- `sdpa`: torch.nn.functional.scaled_dot_product_attention (PyTorch picks its kernel: FlashAttention-2,
  cuDNN or memory-efficient on CUDA, a fused C++ kernel on the CPU; on Hopper cvfast asks for cuDNN
  first, `SDPA_PRIORITY_BY_ARCH`).
- `flash_attn`: the optional `flash-attn` package (FA3's `flash_attn_interface` on Hopper when
  installed, else FA2's `flash_attn`). FlashAttention takes (batch, seq, heads, head_dim) with a
  contiguous last dim; cvfast's contract is (batch, heads, seq, head_dim), so q, k, v go in as
  transposed views and the output comes back as one. Not verified on a GPU yet: flash-attn cannot be
  installed on the machines this was written on.
- `triton`: `cvfast.kernels.attention` as the custom ops `cvfast::attention` and
  `cvfast::joint_attention` (a pass applying the QK norm and RoPE, then the attention kernel).
- `flash_attn_4`: the optional `flash-attn-4` package (`flash_attn.cute`: FlashAttention 4 in
  NVIDIA's CuTe DSL, Hopper and Blackwell, head dims 64/96/128), same layout handling as
  `flash_attn`. Opt-in by name only until the gpu suite has timed it: its libraries
  (nvidia-cutlass-dsl, 92 MB) cannot reach the lent device machines, so it has never run here.
- `sageattention`: the optional `sageattention` package (1.0.x: INT8 Q.K^T with per-block scales,
  fp16 P.V, Triton kernels). Opt-in by name only, never under "auto": its 8-bit scores are outside
  FlashAttention's 2x rule, and SageAttention v1 is published to fail on CogVideoX-1.5
  (`../shared/anchors.md`; cvfast's own 8-bit attention is `precision="fp8-attention"`). Here for
  the benchmarks to measure against, and for users who ask for it.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .registry import Impl, placeholder, register
from .triton_backend import impl as triton_impl
from .triton_backend import kernels

try:
    try:  # FlashAttention 3 (Hopper)
        from flash_attn_interface import flash_attn_func
    except ImportError:
        from flash_attn import flash_attn_func
except Exception as exc:  # not installed, or its CUDA libraries fail to load
    flash_attn_func, FLASH_IMPORT_ERROR = None, exc
else:
    FLASH_IMPORT_ERROR = None

try:  # FlashAttention 4 (CuTe DSL, the `flash-attn-4` wheel over nvidia-cutlass-dsl)
    from flash_attn.cute import flash_attn_func as flash_attn_4_func
except Exception as exc:  # not installed, or its CUDA libraries fail to load
    flash_attn_4_func, FLASH4_IMPORT_ERROR = None, exc
else:
    FLASH4_IMPORT_ERROR = None

try:
    from sageattention import sageattn
except Exception as exc:  # not installed
    sageattn, SAGE_IMPORT_ERROR = None, exc
else:
    SAGE_IMPORT_ERROR = None

Tensor = torch.Tensor

# -- reference -------------------------------------------------------------------------------------

# Attention is evaluated one block of queries at a time so that the reference can run at real
# CogVideoX sizes: a full 17,776 x 17,776 fp32 score matrix is 1.26 GB per head; a block of 1,024
# queries over all heads of one batch element at 48 heads is 48 * 1024 * 17,776 * 4 B = 3.5 GB.
QUERY_BLOCK = 1024


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Non-causal softmax attention, scale 1/sqrt(head_dim) unless given.

    q: (batch, heads, seq_q, head_dim), k, v: (batch, heads, seq_k, head_dim) -> (batch, heads,
    seq_q, head_dim), dtype of q. Scores and softmax in (at least) float32.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)  # at least fp32; fp64 stays fp64
    kf_t, vf = k.to(acc).transpose(-1, -2), v.to(acc)
    blocks = []
    for qb in q.split(QUERY_BLOCK, dim=2):
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


def _dtype_reasons(q: Tensor, k: Tensor, v: Tensor) -> list[str]:
    return [] if q.dtype == k.dtype == v.dtype else [f"q/k/v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})"]


def _head_dim_reasons(head_dim: int, accepted: tuple[int, ...]) -> list[str]:
    """For a backend with kernels for the head dims `accepted` only."""
    return [] if head_dim in accepted else [f"head_dim {head_dim} is not one of {accepted}"]


# -- sdpa ------------------------------------------------------------------------------------------

# PyTorch's SDPA tries its CUDA kernels in one fixed order, FlashAttention-2 first. On Hopper cuDNN's
# attention kernels are faster: 631 against 329 TFLOP/s for SDPA's default at (1, 24, 4608, 128)
# bf16 on an H100 (pytorch/pytorch#142132), 1.7-2.3x across shapes, and on Hopper only: slower on
# A100 (0.82x) and Blackwell (0.88x) (huggingface/transformers#48163). So on compute capability 9.x
# cvfast's SDPA puts cuDNN first, as a preference: an input cuDNN cannot take goes to the next kernel
# in the list. The gpu suite measures each kernel forced at CogVideoX sizes (ops: `sdpa-cudnn`,
# `sdpa-flash`), which is what should confirm or change this table.
SDPA_PRIORITY_BY_ARCH = {9: (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                             SDPBackend.MATH)}


@torch.compiler.assume_constant_result
def _arch_major(device_index: int | None) -> int:
    """The CUDA device's (None: the current one's) compute capability major; a constant to
    torch.compile, which reads it once while tracing (no guard, no graph break)."""
    return torch.cuda.get_device_capability(device_index)[0]


def sdpa_priority(device: torch.device) -> tuple | None:
    """The SDPA kernel order cvfast sets on `device`, or None for PyTorch's own."""
    if device.type != "cuda":
        return None
    return SDPA_PRIORITY_BY_ARCH.get(_arch_major(device.index))


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """Same contract as `attention`."""
    priority = sdpa_priority(q.device)
    if priority is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    with sdpa_kernel(list(priority), set_priority=True):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)


def sdpa_why_not(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> list[str]:
    reasons = _dtype_reasons(q, k, v)
    if q.dim() != 4:
        reasons.append(f"expects (batch, heads, seq, head_dim), got {tuple(q.shape)}")
    return reasons


def sdpa_joint_why_not(qkv: Tensor, *args, **kwargs) -> list[str]:
    return [] if qkv.dim() == 3 else [f"expects qkv (batch, seq, 3 * dim), got {tuple(qkv.shape)}"]


# -- flash_attn ------------------------------------------------------------------------------------

def _flash_call(flash_fn, q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    out = flash_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, causal=False)
    out = out[0] if isinstance(out, tuple) else out  # FA3 and FA4 return (out, softmax_lse)
    return out.transpose(1, 2)


def flash_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """Same contract as `attention` (fp16/bf16 only)."""
    return _flash_call(flash_attn_func, q, k, v, scale)


def _flash_head_dim_reasons(head_dim: int) -> list[str]:
    return [f"head_dim {head_dim} is not a multiple of 8 up to 256"] if head_dim % 8 or head_dim > 256 else []


def flash_why_not(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> list[str]:
    return _dtype_reasons(q, k, v) + _flash_head_dim_reasons(q.shape[-1])


def flash_joint_why_not(qkv: Tensor, heads: int, *args, **kwargs) -> list[str]:
    return _flash_head_dim_reasons(qkv.shape[-1] // (3 * heads))


def _optional_impl(backend: str, import_error: Exception | None, fn, why_not,
                   min_capability: tuple[int, int] = (8, 0)) -> Impl:
    """An optional package's backend (CUDA, fp16/bf16, Ampere on unless said), or the placeholder
    naming why it did not import."""
    if import_error is not None:
        return placeholder(backend, import_error)
    return Impl(backend, fn, devices=("cuda",), dtypes=(torch.float16, torch.bfloat16), min_capability=min_capability,
                why_not=why_not)


# -- flash_attn_4 ----------------------------------------------------------------------------------

FLASH4_HEAD_DIMS = (64, 96, 128)  # the head dims flash_attn.cute compiles forward kernels for on sm_90
FLASH4_CAPABILITY = (9, 0)  # Hopper and Blackwell only (its interface refuses other architectures)


def flash4_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """Same contract as `attention` (fp16/bf16 only)."""
    return _flash_call(flash_attn_4_func, q, k, v, scale)


def flash4_why_not(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> list[str]:
    return _dtype_reasons(q, k, v) + _head_dim_reasons(q.shape[-1], FLASH4_HEAD_DIMS)


def flash4_joint_why_not(qkv: Tensor, heads: int, *args, **kwargs) -> list[str]:
    return _head_dim_reasons(qkv.shape[-1] // (3 * heads), FLASH4_HEAD_DIMS)


# -- sageattention ---------------------------------------------------------------------------------

SAGE_HEAD_DIMS = (64, 96, 128)  # the head dims sageattn 1.0.x has kernels for


def sage_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """Same contract as `attention` (CUDA, fp16/bf16). K is smoothed here, out of place: sageattn's
    own smoothing (softmax is invariant to K's mean over the sequence) subtracts it from the
    caller's k in place."""
    k = k - k.mean(dim=2, keepdim=True)
    return sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=scale, smooth_k=False)


def sage_why_not(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> list[str]:
    reasons = _dtype_reasons(q, k, v) + _head_dim_reasons(q.shape[-1], SAGE_HEAD_DIMS)
    if q.dim() != 4 or any(t.stride(-1) != 1 for t in (q, v)):
        reasons.append("expects (batch, heads, seq, head_dim) with a contiguous last dim")
    return reasons


def sage_joint_why_not(qkv: Tensor, heads: int, *args, **kwargs) -> list[str]:
    return _head_dim_reasons(qkv.shape[-1] // (3 * heads), SAGE_HEAD_DIMS)


# -- triton ----------------------------------------------------------------------------------------

MAX_HEAD_DIM = 128  # a 128 x 128 fp32 accumulator tile is the most a program keeps in registers


@torch.library.custom_op("cvfast::attention", mutates_args=())
def attention_op(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    return kernels.attention.attention(q, k, v, scale)


@attention_op.register_fake
def _(q, k, v, scale):
    return q.new_empty(q.shape)


@torch.library.custom_op("cvfast::joint_attention", mutates_args=())
def joint_attention_op(qkv: Tensor, heads: int, q_weight: Tensor, q_bias: Tensor, k_weight: Tensor,
                       k_bias: Tensor, eps: float, cos: Tensor | None, sin: Tensor | None, n_text: int) -> Tensor:
    """`joint_attention` in one kernel."""
    rope_tables = (cos.contiguous(), sin.contiguous()) if cos is not None else None
    return kernels.attention.joint_attention(qkv.contiguous(), heads, (q_weight, q_bias, k_weight, k_bias, eps),
                                             rope_tables, n_text)


@joint_attention_op.register_fake
def _(qkv, heads, q_weight, q_bias, k_weight, k_bias, eps, cos, sin, n_text):
    return qkv.new_empty(qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3)


def triton_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """Same contract as `attention`."""
    return attention_op(q, k, v, q.shape[-1] ** -0.5 if scale is None else scale)


# The unfused variant, for the benchmarks to measure the fusion against: QK LayerNorm and RoPE in
# PyTorch (each a pass over q and k), then the Triton attention kernel.
triton_joint_attention_unfused = functools.partial(joint_attention, attend=triton_attention)


def _triton_head_dim_reasons(head_dim: int) -> list[str]:
    if head_dim & (head_dim - 1) or not 16 <= head_dim <= MAX_HEAD_DIM:
        return [f"head_dim {head_dim} is not a power of two in 16..{MAX_HEAD_DIM} (tl.arange tiles)"]
    return []


def triton_why_not(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> list[str]:
    if not (q.dim() == k.dim() == v.dim() == 4):
        return [f"expects (batch, heads, seq, head_dim), got {tuple(q.shape)}"]
    reasons = _dtype_reasons(q, k, v)
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        reasons.append(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match")
    return reasons + _triton_head_dim_reasons(q.shape[-1])


def triton_joint_why_not(qkv, heads, q_weight, q_bias, k_weight, k_bias, eps, cos, sin, n_text) -> list[str]:
    if qkv.dim() != 3 or qkv.shape[-1] % (3 * heads):
        return [f"expects qkv (batch, seq, 3 * heads * head_dim) with heads={heads}, got {tuple(qkv.shape)}"]
    head_dim = qkv.shape[-1] // (3 * heads)
    reasons = _triton_head_dim_reasons(head_dim)
    if any(t is None for t in (q_weight, q_bias, k_weight, k_bias)):
        reasons.append("the fused QK LayerNorm needs weight and bias for q and k")
    if cos is not None and (cos.shape != (qkv.shape[1] - n_text, head_dim) or cos.dtype != torch.float32):
        reasons.append(f"rope tables must be float32 ({qkv.shape[1] - n_text}, {head_dim}), got "
                       f"{cos.dtype} {tuple(cos.shape)}")
    return reasons


# -- registration ----------------------------------------------------------------------------------

register("attention", attention, [
    Impl("sdpa", sdpa_attention, why_not=sdpa_why_not),
    _optional_impl("flash_attn", FLASH_IMPORT_ERROR, flash_attention, flash_why_not),
    triton_impl(triton_attention, triton_why_not),
    _optional_impl("flash_attn_4", FLASH4_IMPORT_ERROR, flash4_attention, flash4_why_not, FLASH4_CAPABILITY),
    _optional_impl("sageattention", SAGE_IMPORT_ERROR, sage_attention, sage_why_not),
])
register("joint_attention", joint_attention, [
    Impl("sdpa", functools.partial(joint_attention, attend=sdpa_attention), why_not=sdpa_joint_why_not),
    _optional_impl("flash_attn", FLASH_IMPORT_ERROR, functools.partial(joint_attention, attend=flash_attention),
                   flash_joint_why_not),
    triton_impl(joint_attention_op, triton_joint_why_not),
    _optional_impl("flash_attn_4", FLASH4_IMPORT_ERROR, functools.partial(joint_attention, attend=flash4_attention),
                   flash4_joint_why_not, FLASH4_CAPABILITY),
    _optional_impl("sageattention", SAGE_IMPORT_ERROR, functools.partial(joint_attention, attend=sage_attention),
                   sage_joint_why_not),
])
register("rope", rope)
