"""Registration and capability dispatch.

Each op module registers, when it is imported, the op's plain-PyTorch reference (the oracle) and its
backends' `Impl`s; a backend that failed to import registers a placeholder that names the import
error. Each `Impl` declares where it runs and answers *why not* for an input; an `OpSet` chooses once
per op and input signature (shapes, strides, dtypes, device and the scalar arguments) and remembers
the choice.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..core.errors import CVFastInputError

log = logging.getLogger("cvfast")

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Impl:
    """One backend's implementation of one op.

    devices: device types it runs on; dtypes: dtypes of its first tensor input (None: any);
    min_capability: least CUDA compute capability; why_not(*args, **kwargs): input-dependent
    reasons it cannot run (shapes, head dims, ...); unavailable: why it cannot run at all (an
    import or build error), or None.
    """
    backend: str
    fn: Callable
    devices: tuple[str, ...] = ("cpu", "cuda")
    dtypes: tuple[torch.dtype, ...] | None = None
    min_capability: tuple[int, int] | None = None
    why_not: Callable[..., list[str]] | None = None
    unavailable: str | None = None
    device_note: str = ""     # appended to a device refusal (e.g. how to enable it there)

    def device_reasons(self, device: torch.device) -> list[str]:
        """Why it cannot run on `device` whatever the input."""
        if self.unavailable:
            return [self.unavailable]
        if device.type not in self.devices:
            note = f" ({self.device_note})" if self.device_note else ""
            return [f"runs on {'/'.join(self.devices)}, not {device.type}{note}"]
        if device.type == "cuda" and self.min_capability is not None:
            have = torch.cuda.get_device_capability(device)
            if have < self.min_capability:
                return [f"needs compute capability {self.min_capability}, device has {have}"]
        return []

    def reasons(self, *args, **kwargs) -> list[str]:
        """Why it cannot run this call (empty: it can)."""
        tensors = [a for a in _flat(args) + _flat(tuple(kwargs.values())) if isinstance(a, torch.Tensor)]
        out = self.device_reasons(tensors[0].device) if tensors else []
        if self.dtypes is not None and tensors and tensors[0].dtype not in self.dtypes:
            out.append(f"takes {', '.join(str(d) for d in self.dtypes)}, not {tensors[0].dtype}")
        if self.why_not is not None and not out:
            out += self.why_not(*args, **kwargs)
        return out


# -- registration ----------------------------------------------------------------------------------

@dataclass
class _Op:
    reference: Callable
    alternatives: tuple[Impl, ...]


_OPS: dict[str, _Op] = {}  # in registration order: the order of `op_names()`


def register(op: str, reference: Callable, alternatives: Sequence[Impl] = ()) -> None:
    """Called by each op module as it is imported: `op`'s reference and its backends' Impls."""
    if op in _OPS:
        raise RuntimeError(f"op {op!r} is registered twice")
    _OPS[op] = _Op(reference, tuple(alternatives))


def op_names() -> tuple[str, ...]:
    """The registered ops in registration order, which the import order of `cvfast/ops/__init__.py` fixes."""
    return tuple(_OPS)


def reference(op: str) -> Callable:
    """The plain-PyTorch reference of `op` (the oracle every backend is tested against)."""
    return _OPS[op].reference


def reference_impl(op: str) -> Impl:
    return Impl("reference", reference(op), devices=("cpu", "cuda", "meta"))


def registered_alternatives(op: str) -> tuple[Impl, ...]:
    """The non-reference Impls registered for `op`, available or not, in registration order."""
    return _OPS[op].alternatives if op in _OPS else ()


def placeholder(backend: str, error: BaseException) -> Impl:
    """The Impl of a backend that failed to import (`error`): it runs nowhere, gives the error as its
    one-line reason, and raises that reason when called, so asking for the backend by name names the
    import error instead of ignoring it."""
    message = str(error).splitlines()[0] if str(error) else ""
    reason = f"{backend} is unavailable ({type(error).__name__}: {message})"

    def fn(*args, **kwargs):
        raise RuntimeError(reason)
    return Impl(backend, fn, unavailable=reason)


# -- dispatch --------------------------------------------------------------------------------------

def _flat(values: tuple) -> list:
    out = []
    for v in values:
        out.extend(_flat(tuple(v)) if isinstance(v, (tuple, list)) else [v])
    return out


def _signature(value):
    """What a choice depends on: a tensor's shape, strides, dtype and device; other values as they are."""
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.stride(), value.dtype, value.device)
    if isinstance(value, (tuple, list)):
        return tuple(_signature(v) for v in value)
    if isinstance(value, dict):
        return tuple((k, _signature(v)) for k, v in sorted(value.items()))
    return value if isinstance(value, (int, float, str, bool, type(None))) else id(value)


class _Dispatcher:
    """Calls of one op: the first candidate that can take an input's signature, chosen once."""

    def __init__(self, op: str, candidates: Sequence[Impl], required: str | None):
        self.op, self.candidates, self.required = op, tuple(candidates), required
        self.chosen: dict[tuple, Impl] = {}

    def __call__(self, *args, **kwargs):
        if len(self.candidates) == 1 and self.candidates[0].backend == "reference":  # nothing to check
            return self.candidates[0].fn(*args, **kwargs)
        if torch.compiler.is_compiling():
            # Under torch.compile / torch.export a signature lookup would compare symbolic sizes and
            # specialise them (a dynamic batch would become a constant); the reasons look only at
            # static properties (head_dim, dtype, device).
            return self._first(args, kwargs, run=False)[0].fn(*args, **kwargs)
        key = _signature((args, kwargs))
        impl = self.chosen.get(key)
        if impl is not None:
            return impl.fn(*args, **kwargs)
        impl, out = self._first(args, kwargs, run=True)
        self.chosen[key] = impl
        return out

    def _first(self, args, kwargs, run: bool):
        """The first candidate that can take the input: (impl, its output when `run`). Unless it is the
        required backend or the reference, a candidate that raises on its first run (a kernel that
        fails to compile on this device, say) is passed over like one that declared it cannot."""
        skipped = []
        for impl in self.candidates:
            reasons = impl.reasons(*args, **kwargs)
            if reasons and impl.backend == self.required:
                raise CVFastInputError(f"backend={self.required!r}: {self.op} cannot take {_describe(args)}: "
                                       + "; ".join(reasons))
            out = None
            if not reasons and run:
                try:
                    out = impl.fn(*args, **kwargs)
                except Exception as exc:
                    if impl.backend in (self.required, "reference"):
                        raise
                    reasons = [f"failed on its first run: {type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
                               if str(exc).strip() else f"failed on its first run: {type(exc).__name__}"]
            if not reasons:
                if skipped:  # never silent: one line per op and input signature
                    log.warning("cvfast: %s uses %s instead of %s for %s", self.op, impl.backend,
                                "; ".join(skipped), _describe(args))
                return impl, out
            skipped.append(f"{impl.backend} ({'; '.join(reasons)})")
        raise CVFastInputError(f"no backend of {self.op} can take {_describe(args)}: " + "; ".join(skipped))

    def backends(self) -> list[str]:
        """Backends chosen so far (in first-use order), else the one planned for a typical input."""
        used = list(dict.fromkeys(impl.backend for impl in self.chosen.values()))
        return used or [self.candidates[0].backend]


def _describe(args) -> str:
    parts = [f"{tuple(a.shape)} {str(a.dtype).replace('torch.', '')} on {a.device.type}"
             for a in _flat(tuple(args)) if isinstance(a, torch.Tensor)]
    return "inputs " + ", ".join(parts[:3]) + (", ..." if len(parts) > 3 else "")


class OpSet:
    """The implementations a model's modules call: `ops.attention(q, k, v)` and so on.

    Each op maps to one `Impl` (always used) or to candidates in order of preference, the last of
    them the reference; the first candidate that can take a call's input signature is chosen on the
    first call with that signature and kept. `required` names a backend whose refusal is an error
    instead of a fallback (`backend="triton"`). Without `impls`, every registered op's reference.
    """

    def __init__(self, impls: dict[str, Impl | Sequence[Impl]] | None = None, required: str | None = None):
        impls = {op: reference_impl(op) for op in op_names()} if impls is None else impls
        self.required = required
        self._ops = {op: _Dispatcher(op, [c] if isinstance(c, Impl) else c, required) for op, c in impls.items()}

    def with_impls(self, impls: dict[str, Impl | Sequence[Impl]]) -> OpSet:
        """A new OpSet: these ops (added, or replacing this one's) with `impls`, every other op this
        one's, its choices so far included."""
        out = OpSet(impls, self.required)
        out._ops = {**self._ops, **out._ops}
        return out

    def __getattr__(self, name: str) -> Callable:
        ops = self.__dict__.get("_ops", {})
        if name in ops:
            return ops[name]
        raise AttributeError(name)

    def planned(self, op: str) -> str:
        """The backend `op` tries first: the one every call takes unless it refuses the input."""
        return self._ops[op].candidates[0].backend

    def names(self) -> dict[str, str]:
        """{op: backend}; an op that used several backends (for different inputs) lists them joined by '+'."""
        return {op: "+".join(d.backends()) for op, d in self._ops.items()}
