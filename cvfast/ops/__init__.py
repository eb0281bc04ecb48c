"""The functional layer the models call.

Every op that a later kernel accelerates has a plain-PyTorch reference here (`reference.py`, the
oracle) and zero or more backends. A backend declares the devices it runs on and answers *why not*
for an input; `resolve()` picks one implementation per op once, when a pipeline is loaded, and the
modules call through the `OpSet` they were given (no module globals are ever rewritten).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import bad_arg
from . import reference, sdpa

OP_NAMES = ("attention", "rope", "layer_norm", "adaln_modulate", "gelu_mlp", "group_norm",
            "causal_conv3d")


@dataclass(frozen=True)
class Impl:
    """One backend's implementation of one op."""
    backend: str
    fn: Callable
    devices: tuple[str, ...] = ("cpu", "cuda")
    why_not: Callable[..., list[str]] | None = None  # input-dependent reasons it cannot run

    def reasons(self, device: torch.device, *args) -> list[str]:
        out = [] if device.type in self.devices else [f"runs on {self.devices}, not {device.type}"]
        if self.why_not is not None and args:
            out += self.why_not(*args)
        return out


def _reference_impls() -> dict[str, Impl]:
    return {name: Impl("reference", getattr(reference, name)) for name in OP_NAMES}


# Alternatives to the reference, per op, in order of preference for backend="auto".
_BACKENDS: dict[str, list[Impl]] = {
    "attention": [Impl("sdpa", sdpa.attention, why_not=sdpa.why_not)],
}

BACKEND_CHOICES = ("auto", "reference", "sdpa")


def alternatives(op: str) -> list[Impl]:
    """The registered non-reference implementations of `op`, in order of preference."""
    return list(_BACKENDS.get(op, []))


@dataclass(frozen=True)
class OpSet:
    """The implementation chosen for each op; modules call `ops.attention(...)` etc."""
    impls: dict[str, Impl] = field(default_factory=_reference_impls)

    def __getattr__(self, name: str) -> Callable:
        impls = object.__getattribute__(self, "impls")
        if name in impls:
            return impls[name].fn
        raise AttributeError(name)

    def names(self) -> dict[str, str]:
        return {op: impl.backend for op, impl in self.impls.items()}


def resolve(backend: str, device: torch.device | str) -> OpSet:
    """Choose one implementation per op for `backend` on `device`.

    "reference": plain PyTorch everywhere (the oracle). "sdpa": PyTorch SDPA for attention, the
    reference elsewhere. "auto": the first backend per op that runs on the device, else the
    reference (on the CPU today that is SDPA attention plus the reference ops).
    """
    device = torch.device(device)
    if backend not in BACKEND_CHOICES:
        raise bad_arg("backend", backend, f"one of {BACKEND_CHOICES}")
    chosen = _reference_impls()
    if backend == "reference":
        return OpSet(chosen)
    for op, alternatives in _BACKENDS.items():
        for impl in alternatives:
            if backend != "auto" and impl.backend != backend:
                continue
            reasons = impl.reasons(device)
            if not reasons:
                chosen[op] = impl
                break
            if backend != "auto":
                raise bad_arg("backend", backend, f"{op} cannot use it on {device}: {'; '.join(reasons)}")
    return OpSet(chosen)
