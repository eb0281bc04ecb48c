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


def _layout(x: Tensor) -> torch.memory_format:
    """channels_last_3d when x is in it (and not also contiguous), else contiguous: the two layouts
    the kernels take; any other strides are copied into the contiguous one."""
    if x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


def group_norm(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float, scale: Tensor | None = None,
               shift: Tensor | None = None, silu: bool = False) -> Tensor:
    """reference.group_norm in one pass after the statistics; scale/shift are brought to x's layout."""
    layout = _layout(x)
    x = x.contiguous(memory_format=layout)
    if scale is not None:
        scale, shift = scale.contiguous(memory_format=layout), shift.contiguous(memory_format=layout)
    return torch.ops.cvfast.native_group_norm(x, weight.contiguous(), bias.contiguous(), groups, eps, scale, shift,
                                              silu)


def _group_norm_why_not(x, weight, bias, groups, eps, scale=None, shift=None, silu=False) -> list[str]:
    if x.dim() != 5:
        return [f"expects x (batch, channels, frames, height, width), got {tuple(x.shape)}"]
    reasons = []
    if weight is None or bias is None:
        reasons.append("needs the affine weight and bias")
    elif weight.dtype != x.dtype or bias.dtype != x.dtype:
        reasons.append(f"weight/bias dtype {weight.dtype}/{bias.dtype} differs from x's {x.dtype}")
    if (scale is None) != (shift is None):
        reasons.append("scale and shift must both be given or both be None")
    elif scale is not None and (scale.shape != x.shape or shift.shape != x.shape or scale.dtype != x.dtype
                                or shift.dtype != x.dtype):
        reasons.append(f"scale/shift must have x's shape {tuple(x.shape)} and dtype {x.dtype}")
    return reasons


IMPLS = {
    "group_norm": Impl("native", group_norm, devices=("cpu", "cuda") if CUDA else ("cpu",), dtypes=FLOAT_DTYPES,
                       why_not=_group_norm_why_not,
                       device_note="cvfast._C was built without CUDA (a CPU build of PyTorch, or no nvcc)"),
}
