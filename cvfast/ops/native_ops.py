"""The native backend: the ops of the C++/CUDA extension `cvfast._C` (csrc/), torch.library ops
`torch.ops.cvfast.native_*` with a CPU implementation (always built) and CUDA kernels (when it was
built against a CUDA build of PyTorch). Their fake implementations are registered here, so
torch.compile and the exporters see opaque ops.

Importing this module fails, with a one-line reason, when the extension was not built (a failed
build, or CVFAST_BUILD_EXT=0); the registry in `cvfast.ops` turns that into the backend's reason
for being unavailable.
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import vae_norm
from .dispatch import FLOAT_DTYPES, Impl

Tensor = torch.Tensor
_BUILD_ERROR = Path(__file__).resolve().parent.parent / "_C_build_error.txt"  # written by setup.py


def _import_extension():
    try:
        from .. import _C
    except ImportError as exc:
        why = _BUILD_ERROR.read_text().strip() if _BUILD_ERROR.exists() else f"{type(exc).__name__}: {exc}"
        raise ImportError(f"cvfast._C cannot be imported: {why}".splitlines()[0]) from exc
    return _C


_C = _import_extension()
CUDA = bool(_C.with_cuda)  # built with the CUDA kernels


@torch.library.register_fake("cvfast::native_group_norm")
def _(x, weight, bias, groups, eps, scale, shift, silu):
    return torch.empty_like(x)  # x's layout, as the kernels allocate it


def group_norm(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float, scale: Tensor | None = None,
               shift: Tensor | None = None, silu: bool = False) -> Tensor:
    """reference.group_norm in one pass after the statistics."""
    x, weight, bias, scale, shift = vae_norm.prepare(x, weight, bias, scale, shift)
    return torch.ops.cvfast.native_group_norm(x, weight, bias, groups, eps, scale, shift, silu)


IMPLS = {
    "group_norm": Impl("native", group_norm, devices=("cpu", "cuda") if CUDA else ("cpu",), dtypes=FLOAT_DTYPES,
                       why_not=vae_norm.why_not,
                       device_note="cvfast._C was built without CUDA (a CPU build of PyTorch, or no nvcc)"),
}
