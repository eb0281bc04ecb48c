"""What the Triton backend of every op shares: the import of `cvfast.kernels` (and so of triton) and
where its Impls run.

Each op module wraps its kernels in `torch.library` custom ops (`cvfast::...`) with fake
implementations, so torch.compile, CUDA-graph capture and the ONNX exporter see one opaque op. They
run on CUDA devices of compute capability 8.0 or more (bf16 tensor cores), and on the CPU when
TRITON_INTERPRET=1 was set before the first import (Triton's interpreter, for tests).
"""
from __future__ import annotations

from typing import Callable

from .registry import FLOAT_DTYPES, Impl, placeholder

try:
    from .. import kernels
except Exception as exc:  # ImportError, or a compile/driver error raised at import
    kernels, IMPORT_ERROR = None, exc
else:
    IMPORT_ERROR = None


def impl(fn: Callable, why_not: Callable[..., list[str]] | None, backend: str = "triton",
         min_capability: tuple[int, int] = (8, 0)) -> Impl:
    """The Triton Impl of one op, or the placeholder that names why triton did not import.
    min_capability: 8.0 for bf16 tensor cores; 8.9 for kernels with FP8 dots."""
    if IMPORT_ERROR is not None:
        return placeholder(backend, IMPORT_ERROR)
    devices = ("cuda", "cpu") if kernels.common.INTERPRET else ("cuda",)
    return Impl(backend, fn, devices=devices, dtypes=FLOAT_DTYPES, min_capability=min_capability, why_not=why_not,
                device_note="the CPU runs Triton kernels only with TRITON_INTERPRET=1 set before cvfast is imported")
