"""What the tests share: relative errors, the tolerance rule and NaN-poisoned kernel outputs.

Tolerance, as FlashAttention's tests state it: in bf16/fp16 a backend's max error against the fp32
reference is at most twice the error of PyTorch doing the same math in that dtype; in fp32 it must
agree to fp32 rounding. Every kernel output can be allocated NaN-filled (`poison_outputs`), so an
element a kernel fails to write fails `check`.
"""
import math

import numpy as np
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LAYOUTS = [torch.contiguous_format, torch.channels_last_3d]
FP32_TOL = 2e-5  # fp32 backends vs the fp32 reference, relative to the reference's largest value


def fp32(*values):
    """The tensors among `values` as float32; other values (None, sizes, flags) as they are."""
    return [v.float() if isinstance(v, torch.Tensor) else v for v in values]


def rel_l2(a, b) -> float:
    """||a - b|| / ||b|| in float64, for two tensors or arrays of one shape, both finite, b not zero."""
    a, b = (np.asarray(x.detach().cpu().double() if isinstance(x, torch.Tensor) else x, np.float64) for x in (a, b))
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.isfinite(a).all() and np.isfinite(b).all()
    norm = np.linalg.norm(b)
    assert norm > 0
    return float(np.linalg.norm(a - b) / norm)


def max_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    return (got.float() - exact.float()).abs().max().item()


def naive_attention(q, k, v, scale=None):
    """Softmax attention in the inputs' dtype, one matrix, no upcast: PyTorch's own low-precision error."""
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    return torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1) @ v


def within_twice_pytorch(got: torch.Tensor, exact: torch.Tensor, own: torch.Tensor) -> None:
    """got's max error against the fp32 `exact` is at most twice that of `own` (PyTorch's result in
    got's dtype)."""
    err, bound = max_error(got, exact), max_error(own, exact)
    assert err <= 2 * bound + 1e-6, (err, bound)


def check(got, exact, own=None) -> None:
    """got: a backend's output (or tuple of outputs) in its dtype; exact: the fp32 reference; own:
    the reference (or PyTorch's naive math) run in got's dtype, needed below fp32."""
    gots, exacts = _tuple(got), _tuple(exact)
    owns = _tuple(own) if own is not None else (None,) * len(gots)
    assert len(gots) == len(exacts) == len(owns)
    for g, e, p in zip(gots, exacts, owns):
        assert g.shape == e.shape
        assert p is None or g.dtype == p.dtype
        assert torch.isfinite(g).all(), "NaN/Inf (or an unwritten element) in the output"
        if g.dtype == torch.float32:
            err = max_error(g, e)
            assert err <= FP32_TOL * max(1.0, e.abs().max().item()), err
        else:
            within_twice_pytorch(g, e, p)


def _tuple(x) -> tuple:
    return x if isinstance(x, tuple) else (x,)


def poison_outputs(monkeypatch, *kernel_modules) -> None:
    """Every output the kernels of these `cvfast.kernels` modules allocate (`new_output`) starts as NaN."""
    def nan_output(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    for module in kernel_modules:
        monkeypatch.setattr(module, "new_output", nan_output)
