"""The functional layer the models call.

One module per op (family) holds the op's plain-PyTorch reference (the oracle), its why-not rules and
its backends, and registers them with `registry` as it is imported: `joint_attention.py` (attention,
joint_attention, rope), `adaln.py` (layer_norm, modulate, gated_residual, gated_residual_modulate),
`mlp.py` (gelu_mlp), `group_norm.py`, `causal_conv3d.py`, `spatial_norm.py`. Backends: `sdpa`
(PyTorch's scaled_dot_product_attention), `flash_attn` (FlashAttention 2/3 when installed), `triton`
(the kernels in `cvfast.kernels`, registered as `torch.library` custom ops), `native` (the C++/CUDA
extension `cvfast._C`), and by name only `flash_attn_4` and `sageattention` (when installed). A backend declares where it runs and answers *why not* for an input
(`registry.Impl`); `resolve()` builds the `OpSet` a pipeline's modules call, which chooses once per op
and input signature. No module globals are ever rewritten.

Op contracts (shapes in the references' docstrings):
  attention(q, k, v, scale=None)            (B, H, S, d) x3 -> (B, H, S, d)
  joint_attention(qkv, heads, ...)          (B, S, 3*H*d) -> (B, S, H*d): QK norm + RoPE + attention
  modulate(h, w, b, shift, scale, n_text, eps)              LayerNorm + adaLN per text/video segment
  gated_residual(h, y, gate, n_text)                        h + gate * y
  gated_residual_modulate(h, y, gate, w, b, shift, scale, n_text, eps) -> (h', modulate(h'))
  gelu_mlp(x, w1, b1, w2, b2)                               Linear -> GELU(tanh) -> Linear
  rope, layer_norm, group_norm, causal_conv3d, spatial_norm see their modules
"""
from __future__ import annotations

import functools
import logging

import torch

from ..core.errors import bad_arg
# Imported in the order OP_NAMES lists their ops (each registers its ops as it is imported).
from . import joint_attention, adaln, mlp, group_norm, causal_conv3d, spatial_norm  # noqa: F401
from .registry import Impl, OpSet, op_names, reference_impl, registered_alternatives

__all__ = ["Impl", "OpSet", "OP_NAMES", "AUTO_ORDER", "AUTO_ORDER_BY_OP", "BACKEND_CHOICES", "resolve",
           "alternatives", "attention"]

log = logging.getLogger("cvfast")

OP_NAMES = op_names()
BACKEND_CHOICES = ("auto", "reference", "sdpa", "triton", "flash_attn", "native", "flash_attn_4", "sageattention")

# backend="auto": preference per device type, fastest first; the reference always ends the list.
# On CUDA, attention prefers FlashAttention, then PyTorch SDPA (measured at 59% of the H200's matmul
# ceiling at 5B size, benchmarks/results/h200-2026-11-26-gpu.md), then the Triton kernel, whose
# speed has not been measured on a GPU yet; the memory-bound norms and residuals prefer Triton,
# which fuses 3-6 PyTorch passes into one. Revise from the gpu benchmark suite.
AUTO_ORDER = {
    "cuda": ("flash_attn", "sdpa", "native", "triton"),  # native: the VAE norms (csrc/), before Triton's
    "cpu": ("sdpa",),     # the CPU runs the reference with PyTorch SDPA; Triton only when asked
}
# Exceptions to AUTO_ORDER, per (device type, op). The VAE's causal conv stays with the reference
# (cuDNN conv3d) on CUDA: the Triton implicit GEMM is untuned and has never been timed against
# cuDNN; the gpu benchmark suite measures both (ops: causal_conv3d) and is what should change this.
# The VAE GroupNorm skips the native CUDA kernel: on an H200 it failed all 12 decoder-size checks
# that the Triton kernel passed (benchmarks/results/h200-2026-11-27-gpu-check.md).
AUTO_ORDER_BY_OP = {("cuda", "causal_conv3d"): (), ("cuda", "group_norm"): ("triton",)}


def alternatives(op: str) -> list[Impl]:
    """The registered non-reference implementations of `op` (available or not)."""
    return list(registered_alternatives(op))


def resolve(backend: str, device: torch.device | str) -> OpSet:
    """The OpSet for `backend` on `device`.

    "reference": plain PyTorch everywhere (the oracle). "sdpa", "flash_attn", "triton", "native",
    "flash_attn_4" and "sageattention" (attention only, never under "auto"; see `joint_attention.py`):
    every op that backend implements uses it (an input it cannot take is an error listing the
    reasons), the others the reference. "auto": per op the backends of `AUTO_ORDER` that run on the device, then
    the reference; an input the preferred one cannot take falls to the next with one warning line.
    """
    device = torch.device(device)
    if backend not in BACKEND_CHOICES:
        raise bad_arg("backend", backend, f"one of {BACKEND_CHOICES}")
    if backend == "reference":
        return OpSet({op: reference_impl(op) for op in OP_NAMES}, required="reference")
    if backend != "auto":
        return _resolve_one(backend, device)
    chosen, skipped = {}, {}
    for op in OP_NAMES:
        order = AUTO_ORDER_BY_OP.get((device.type, op), AUTO_ORDER.get(device.type, ()))
        ranked = sorted((i for i in alternatives(op) if i.backend in order), key=lambda i: order.index(i.backend))
        candidates = []
        for impl in ranked:
            reasons = impl.device_reasons(device)
            if not reasons:
                candidates.append(impl)
            elif impl.unavailable and impl.backend != "flash_attn":  # flash_attn is an optional extra
                skipped.setdefault(impl.unavailable, []).append(op)
        chosen[op] = candidates + [reference_impl(op)]
    for reason, skipped_ops in skipped.items():  # one line per backend that failed to load
        log.warning("cvfast: %s; %s use the next backend", reason, ", ".join(skipped_ops))
    return OpSet(chosen)


def _resolve_one(backend: str, device: torch.device) -> OpSet:
    chosen, implemented = {}, False
    for op in OP_NAMES:
        impl = next((i for i in alternatives(op) if i.backend == backend), None)
        if impl is None:
            chosen[op] = reference_impl(op)
            continue
        implemented = True
        reasons = impl.device_reasons(device)
        if reasons:
            raise bad_arg("backend", backend, f"{op} cannot use it on {device}: {'; '.join(reasons)}")
        chosen[op] = impl
    assert implemented, backend
    return OpSet(chosen, required=backend)


@functools.lru_cache(maxsize=None)
def _default_opset(backend: str, device: torch.device) -> OpSet:
    return resolve(backend, device)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
              backend: str | None = None) -> torch.Tensor:
    """Non-causal softmax attention. q: (batch, heads, seq_q, head_dim); k, v: (batch, heads, seq_k,
    head_dim) -> (batch, heads, seq_q, head_dim) in q's dtype. scale: default 1/sqrt(head_dim).
    backend: None/"auto" (the fastest that takes the input), or one of BACKEND_CHOICES."""
    return _default_opset(backend or "auto", q.device).attention(q, k, v, scale=scale)
