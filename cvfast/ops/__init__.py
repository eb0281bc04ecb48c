"""The functional layer the models call.

Every op has a plain-PyTorch reference here (`reference.py`, the oracle) and zero or more backends:
`sdpa` (PyTorch's scaled_dot_product_attention), `flash_attn` (FlashAttention 2/3 when installed)
and `triton` (the kernels in `cvfast.kernels`, registered as `torch.library` custom ops). A backend
declares where it runs and answers *why not* for an input (`dispatch.Impl`); `resolve()` builds
the `OpSet` a pipeline's modules call, which chooses once per op and input signature. No module
globals are ever rewritten.

Op contracts (shapes in the reference's docstrings):
  attention(q, k, v, scale=None)            (B, H, S, d) x3 -> (B, H, S, d)
  joint_attention(qkv, heads, ...)          (B, S, 3*H*d) -> (B, S, H*d): QK norm + RoPE + attention
  modulate(h, w, b, shift, scale, n_text, eps)              LayerNorm + adaLN per text/video segment
  gated_residual(h, y, gate, n_text)                        h + gate * y
  gated_residual_modulate(h, y, gate, w, b, shift, scale, n_text, eps) -> (h', modulate(h'))
  gelu_mlp(x, w1, b1, w2, b2)                               Linear -> GELU(tanh) -> Linear
  rope, layer_norm, group_norm, causal_conv3d, spatial_norm see reference.py
"""
from __future__ import annotations

import functools
import importlib
import logging

import torch

from ..core.errors import bad_arg
from . import reference, sdpa
from .dispatch import OP_NAMES, Impl, OpSet, reference_impl

__all__ = ["Impl", "OpSet", "OP_NAMES", "BACKEND_CHOICES", "resolve", "alternatives", "attention",
           "unavailable_backends"]

log = logging.getLogger("cvfast")

BACKEND_CHOICES = ("auto", "reference", "sdpa", "triton", "flash_attn", "native")

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
AUTO_ORDER_BY_OP = {("cuda", "causal_conv3d"): ()}


def _sdpa_impls() -> dict[str, list[Impl]]:
    joint = functools.partial(reference.joint_attention, attend=sdpa.attention)
    return {"attention": [Impl("sdpa", sdpa.attention, why_not=sdpa.why_not)],
            "joint_attention": [Impl("sdpa", joint, why_not=sdpa.joint_why_not)]}


def _optional(module: str, backend: str, ops: tuple[str, ...]) -> dict[str, list[Impl]]:
    """A backend's impls from `cvfast.ops.<module>`, or, when it fails to import, placeholders that
    say why (so asking for it names the import error instead of ignoring it)."""
    try:
        impls = importlib.import_module(f"{__name__}.{module}").IMPLS
        return {op: [impl] for op, impl in impls.items()}
    except Exception as exc:  # ImportError, or a compile/driver error raised at import
        reason = f"{backend} is unavailable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        return {op: [Impl(backend, _unavailable(reason), unavailable=reason)] for op in ops}


def _unavailable(reason: str):
    def fn(*args, **kwargs):
        raise RuntimeError(reason)
    return fn


@functools.lru_cache(maxsize=None)
def _registry() -> dict[str, tuple[Impl, ...]]:
    """Every non-reference impl per op, imported once."""
    found: dict[str, list[Impl]] = {op: [] for op in OP_NAMES}
    for part in (_sdpa_impls(),
                 _optional("flash", "flash_attn", ("attention", "joint_attention")),
                 _optional("triton_ops", "triton", ("attention", "joint_attention", "layer_norm", "modulate",
                                                    "gated_residual", "gated_residual_modulate", "gelu_mlp",
                                                    "group_norm", "causal_conv3d", "spatial_norm")),
                 _optional("native_ops", "native", ("group_norm",))):
        for op, impls in part.items():
            found[op] += impls
    return {op: tuple(impls) for op, impls in found.items()}


def alternatives(op: str) -> list[Impl]:
    """The registered non-reference implementations of `op` (available or not)."""
    return list(_registry().get(op, ()))


def unavailable_backends() -> dict[str, str]:
    """{backend: why} for the backends that failed to import here."""
    return {impl.backend: impl.unavailable for impls in _registry().values() for impl in impls if impl.unavailable}


def resolve(backend: str, device: torch.device | str) -> OpSet:
    """The OpSet for `backend` on `device`.

    "reference": plain PyTorch everywhere (the oracle). "sdpa", "flash_attn", "triton": every op
    that backend implements uses it (an input it cannot take is an error listing the reasons), the
    others the reference. "auto": per op the backends of `AUTO_ORDER` that run on the device, then
    the reference; an input the preferred one cannot take falls to the next with one warning line.
    """
    device = torch.device(device)
    if backend not in BACKEND_CHOICES:
        raise bad_arg("backend", backend, f"one of {BACKEND_CHOICES}")
    if backend == "reference":
        return OpSet({op: reference_impl(op) for op in OP_NAMES})
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

