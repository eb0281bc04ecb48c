"""The VAE's fused norm `group_norm`: GroupNorm + affine, then optionally the spatial conditioning
`* scale + shift`, then optionally SiLU.

Backends: `triton` (`cvfast.kernels.group_norm`, the custom op `cvfast::group_norm`) and `native`, the
C++/CUDA extension `cvfast._C` (csrc/): the torch.library op `torch.ops.cvfast.native_group_norm`
with a CPU implementation (always built) and CUDA kernels (when it was built against a CUDA build of
PyTorch); its fake implementation is registered here, so torch.compile and the exporters see an
opaque op. When the extension was not built (a failed build, or CVFAST_BUILD_EXT=0) the native
backend is unavailable with a one-line reason. Both take the inputs `why_not` accepts, in one of the
two layouts `layout` names (`prepare` brings the rest to them).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .registry import FLOAT_DTYPES, Impl, placeholder, register
from .triton_backend import impl as triton_impl
from .triton_backend import kernels

try:
    from .. import _C
except Exception as exc:  # not built, or built against another PyTorch
    _C, NATIVE_IMPORT_ERROR = None, exc
else:
    NATIVE_IMPORT_ERROR = None

Tensor = torch.Tensor
BUILD_ERROR = Path(__file__).resolve().parent.parent / "_C_build_error.txt"  # written by setup.py
NATIVE_CUDA = _C is not None and bool(_C.with_cuda)  # built with the CUDA kernels


def group_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float,
               scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
               silu: bool = False) -> torch.Tensor:
    """GroupNorm over (channels/groups, frames, height, width), then optionally the VAE's spatial
    conditioning `norm * scale + shift` (scale, shift shaped like x), then optionally SiLU.

    x: (batch, channels, frames, height, width) -> same.
    """
    out = F.group_norm(x, groups, weight, bias, eps)
    if scale is not None:
        out = out * scale + shift
    return F.silu(out) if silu else out


# -- what the fused backends share -----------------------------------------------------------------

def layout(x: Tensor) -> torch.memory_format:
    """channels_last_3d when x is in it (and not also contiguous), else contiguous: the two layouts
    the kernels take; any other strides are copied into the contiguous one."""
    if x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


def prepare(x: Tensor, weight: Tensor, bias: Tensor, scale: Tensor | None, shift: Tensor | None):
    """x in one of the kernels' layouts, scale/shift in x's, weight/bias contiguous."""
    fmt = layout(x)
    x = x.contiguous(memory_format=fmt)
    if scale is not None:
        scale, shift = scale.contiguous(memory_format=fmt), shift.contiguous(memory_format=fmt)
    return x, weight.contiguous(), bias.contiguous(), scale, shift


def why_not(x, weight, bias, groups, eps, scale=None, shift=None, silu=False) -> list[str]:
    """Why a fused backend cannot take this call of `group_norm` (empty: it can)."""
    if x.dim() != 5:
        return [f"expects x (batch, channels, frames, height, width), got {tuple(x.shape)}"]
    reasons = []
    if groups <= 0 or x.shape[1] % groups:
        reasons.append(f"groups={groups} does not divide {x.shape[1]} channels")
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


# -- triton ----------------------------------------------------------------------------------------

@torch.library.custom_op("cvfast::group_norm", mutates_args=())
def group_norm_op(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float, scale: Tensor | None,
                  shift: Tensor | None, silu: bool) -> Tensor:
    x, weight, bias, scale, shift = prepare(x, weight, bias, scale, shift)
    return kernels.group_norm.group_norm(x, weight, bias, groups, eps, scale, shift, silu)


@group_norm_op.register_fake
def _(x, weight, bias, groups, eps, scale, shift, silu):
    return torch.empty_like(x, memory_format=layout(x))


def triton_group_norm(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float, scale: Tensor | None = None,
                      shift: Tensor | None = None, silu: bool = False) -> Tensor:
    return group_norm_op(x, weight, bias, groups, eps, scale, shift, silu)


# -- native ----------------------------------------------------------------------------------------

def native_group_norm(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float, scale: Tensor | None = None,
                      shift: Tensor | None = None, silu: bool = False) -> Tensor:
    """`group_norm` in one pass after the statistics."""
    x, weight, bias, scale, shift = prepare(x, weight, bias, scale, shift)
    return torch.ops.cvfast.native_group_norm(x, weight, bias, groups, eps, scale, shift, silu)


def _native_fake(x, weight, bias, groups, eps, scale, shift, silu):
    return torch.empty_like(x)  # x's layout, as the kernels allocate it


def extension_error(error: Exception) -> Exception:
    """Why cvfast._C did not import, on one line: for an ImportError, the build's reason when
    setup.py left one."""
    if not isinstance(error, ImportError):
        return error
    why = BUILD_ERROR.read_text().strip() if BUILD_ERROR.exists() else f"{type(error).__name__}: {error}"
    return ImportError(f"cvfast._C cannot be imported: {why}".splitlines()[0])


def _native_impl() -> Impl:
    if NATIVE_IMPORT_ERROR is not None:
        return placeholder("native", extension_error(NATIVE_IMPORT_ERROR))
    return Impl("native", native_group_norm, devices=("cpu", "cuda") if NATIVE_CUDA else ("cpu",),
                dtypes=FLOAT_DTYPES, why_not=why_not,
                device_note="cvfast._C was built without CUDA (a CPU build of PyTorch, or no nvcc)")


if _C is not None:  # the op exists only once the extension is loaded
    torch.library.register_fake("cvfast::native_group_norm")(_native_fake)

register("group_norm", group_norm, [triton_impl(triton_group_norm, why_not), _native_impl()])
