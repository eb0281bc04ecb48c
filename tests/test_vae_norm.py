"""The fused VAE norm (GroupNorm + affine + optional spatial modulation `* scale + shift` + optional
SiLU) of each backend against the reference `cvfast.ops.group_norm.group_norm`.

Odd sizes: channels per group 3 and 5 (not a multiple of any block), frame counts 1, 2 and 3, height
and width not multiples of 8, contiguous and channels_last_3d inputs. Tolerance (tests/numerics.py,
FlashAttention's rule): in bf16 the backend's max error against the fp32 reference is at most twice
PyTorch's own bf16 error; in fp32 it agrees to fp32 rounding. An unwritten output element fails the
element-wise comparison (the Triton kernel's outputs are also allocated NaN-filled).
"""
import pytest
import torch

from cvfast import ops
from cvfast.ops import group_norm as gn
from tests.numerics import DEVICE, LAYOUTS, check, fp32, poison_outputs
from tests.extras import require


@pytest.fixture(params=["native", "triton"])
def group_norm(request, monkeypatch):
    """The backend's group_norm; the Triton kernel's outputs start as NaN."""
    if request.param == "triton":
        require("triton")
    (impl,) = [i for i in ops.alternatives("group_norm") if i.backend == request.param]
    if impl.unavailable:
        pytest.fail(f"backend {request.param} does not import: {impl.unavailable}")
    if request.param == "triton":
        from cvfast.kernels import group_norm as kernel
        poison_outputs(monkeypatch, kernel)
    return impl.fn


def inputs(shape, groups, dtype, layout, spatial, seed):
    gen = torch.Generator().manual_seed(seed)
    channels = shape[1]
    # an offset mean per channel: the statistics must not rely on centred data
    x = torch.randn(shape, generator=gen) * 2 + torch.randn(1, channels, 1, 1, 1, generator=gen)
    w, b = torch.randn(channels, generator=gen) * 0.5 + 1, torch.randn(channels, generator=gen) * 0.2
    scale = shift = None
    if spatial:
        scale, shift = torch.randn(shape, generator=gen) * 0.5 + 1, torch.randn(shape, generator=gen) * 0.3
    move = lambda t: None if t is None else t.to(DEVICE, dtype).contiguous(memory_format=layout)  # noqa: E731
    return move(x), w.to(DEVICE, dtype), b.to(DEVICE, dtype), move(scale), move(shift)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("shape,groups", [((1, 12, 1, 5, 7), 4), ((2, 20, 2, 9, 13), 4), ((1, 10, 3, 6, 11), 2)])
@pytest.mark.parametrize("spatial,silu", [(True, True), (False, True), (False, False)],
                         ids=["spatial_silu", "silu", "plain"])
def test_group_norm_matches_reference(group_norm, dtype, layout, shape, groups, spatial, silu):
    x, w, b, scale, shift = inputs(shape, groups, dtype, layout, spatial, seed=sum(shape) + groups)
    got = group_norm(x, w, b, groups, 1e-6, scale, shift, silu)
    exact = gn.group_norm(*fp32(x, w, b), groups, 1e-6, *fp32(scale, shift), silu=silu)
    check(got, exact, gn.group_norm(x, w, b, groups, 1e-6, scale, shift, silu=silu))


def test_group_norm_mixed_layouts(group_norm):
    """x channels-last with contiguous scale/shift (and the reverse): the result does not depend on it."""
    x, w, b, scale, shift = inputs((1, 12, 2, 5, 7), 3, torch.float32, torch.channels_last_3d, True, seed=1)
    exact = gn.group_norm(x, w, b, 3, 1e-6, scale, shift, silu=True)
    check(group_norm(x, w, b, 3, 1e-6, scale.contiguous(), shift.contiguous(), True), exact, exact)
    check(group_norm(x.contiguous(), w, b, 3, 1e-6, scale, shift, True), exact, exact)


def test_triton_statistics_merge_across_programs(monkeypatch):
    """On a GPU a group's statistics are split over several programs and merged (the interpreter
    uses one): force 3 splits, with a large channel mean that a naive sum of squares would cancel."""
    require("triton")
    from cvfast.kernels import group_norm as kernel
    monkeypatch.setattr(kernel, "statistics_splits", lambda length: 3)
    for layout in LAYOUTS:
        x, w, b, scale, shift = inputs((2, 12, 3, 5, 7), 4, torch.float32, layout, True, seed=5)
        x = x + 300.0
        # float64: at |x| ~ 300 fp32's own GroupNorm is off by its input rounding
        exact = gn.group_norm(*(t.double() for t in (x, w, b)), 4, 1e-6, scale.double(), shift.double(),
                              silu=True).float()
        check(gn.triton_group_norm(x, w, b, 4, 1e-6, scale, shift, True), exact, exact)
