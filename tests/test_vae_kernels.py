"""The Triton causal conv3d and fused spatial norm against their references (`cvfast.ops.causal_conv3d`,
`cvfast.ops.spatial_norm`), and the fast (Triton) VAE decode against the reference decode.

Under TRITON_INTERPRET=1 on the CPU (conftest.py): tiny odd sizes (channels 5 and 13, not a multiple
of any block; H x W 7x9 and 10x13; frame counts 1, 2 and 3 with and without a conv cache; kernels
3x3x3 and 1x1x1), contiguous and channels_last_3d inputs, outputs allocated NaN-filled. Tolerance as
in tests/numerics.py (FlashAttention's rule): fp32 to fp32 rounding, bf16 within twice PyTorch's own
bf16 error against the fp32 reference.
"""
import logging

import pytest
import torch

from cvfast import ops
from cvfast.core.errors import CVFastInputError
from cvfast.ops import causal_conv3d as conv
from cvfast.ops import spatial_norm as sn
from cvfast.ops.registry import reference_impl
from tests.numerics import DEVICE, LAYOUTS, check, fp32, poison_outputs
from tests.extras import require

require("triton")
from cvfast.kernels import causal_conv3d as conv_kernel  # noqa: E402
from cvfast.kernels import spatial_norm as spatial_norm_kernel  # noqa: E402

CHANNELS_LAST = torch.channels_last_3d


@pytest.fixture
def poisoned(monkeypatch):
    """Every kernel output starts as NaN."""
    poison_outputs(monkeypatch, conv_kernel, spatial_norm_kernel)


def conv_inputs(batch, c_in, c_out, frames, size, kernel, cached, dtype, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    x = rand(batch, c_in, frames, *size)
    weight = rand(c_out, c_in, *kernel) / (c_in * kernel[0] * kernel[1] * kernel[2]) ** 0.5
    bias = rand(c_out)
    past = rand(batch, c_in, kernel[0] - 1, *size) if cached else None
    move = lambda t: None if t is None else t.to(DEVICE, dtype).contiguous(memory_format=layout)  # noqa: E731
    return move(x), weight.to(DEVICE, dtype), bias.to(DEVICE, dtype), move(past)


def check_conv(x, weight, bias, past, residual=None):
    """The kernel against the fp32 reference; its output keeps x's layout."""
    got = conv.triton_causal_conv3d(x, weight, bias, past, residual)
    exact = conv.causal_conv3d(*fp32(x, weight, bias, past, residual))
    check(got, exact, conv.causal_conv3d(x, weight, bias, past, residual))
    assert got.is_contiguous(memory_format=CHANNELS_LAST) == x.is_contiguous(memory_format=CHANNELS_LAST)


# frames -> (batch, c_in, c_out, height x width): odd channel counts both ways, two batch elements once
SIZES = {1: (1, 5, 13, (7, 9)), 2: (2, 13, 5, (10, 13)), 3: (1, 5, 13, (10, 13))}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("frames", [1, 2, 3])
@pytest.mark.parametrize("kernel,cached", [((3, 3, 3), False), ((3, 3, 3), True), ((1, 1, 1), False)],
                         ids=["3x3x3", "3x3x3-cache", "1x1x1"])
def test_causal_conv3d_matches_reference(poisoned, dtype, layout, frames, kernel, cached):
    batch, c_in, c_out, size = SIZES[frames]
    check_conv(*conv_inputs(batch, c_in, c_out, frames, size, kernel, cached, dtype, layout, seed=frames + c_in))


@pytest.mark.parametrize("kernel", [(3, 1, 1), (1, 3, 3)], ids=["3x1x1", "1x3x3"])
def test_causal_conv3d_other_kernels(poisoned, kernel):
    """Kernels the CogVideoX VAE does not use, but the op takes: time-only and space-only."""
    check_conv(*conv_inputs(1, 5, 13, 2, (7, 9), kernel, True, torch.float32, CHANNELS_LAST, seed=7))


def test_causal_conv3d_mixed_layouts_and_fused_residual(poisoned):
    """x channels-last with a contiguous cache and residual (and the reverse); without a bias."""
    x, weight, _, past = conv_inputs(1, 13, 5, 2, (7, 9), (3, 3, 3), True, torch.float32, CHANNELS_LAST, seed=3)
    residual = torch.randn(1, 5, 2, 7, 9, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    check_conv(x, weight, None, past.contiguous(), residual)
    check_conv(x.contiguous(), weight, None, past, residual.contiguous(memory_format=CHANNELS_LAST))
    x, weight, bias, _ = conv_inputs(1, 13, 5, 2, (7, 9), (3, 3, 3), False, torch.bfloat16, CHANNELS_LAST, seed=5)
    check_conv(x, weight, bias, None, residual.bfloat16())


def test_causal_conv3d_tile_tails(poisoned, monkeypatch):
    """Several programs along every GEMM side, each with a ragged last tile: 140 voxels in tiles of
    64, 19 output channels in tiles of 16, 21 input channels in steps of 16."""
    monkeypatch.setattr(conv_kernel, "tile_config", lambda c_in, c_out: dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=16))
    check_conv(*conv_inputs(2, 21, 19, 2, (5, 7), (3, 3, 3), True, torch.float32, CHANNELS_LAST, seed=11))


def test_causal_conv3d_refusals(caplog):
    """Inputs the kernel cannot take: an error naming the reason under backend='triton', one warning
    line and the reference under 'auto' (and on the CPU in the interpreter)."""
    x = torch.randn(1, 4, 2, 5, 6, device=DEVICE)
    cases = {"not odd": (x, torch.randn(3, 4, 3, 2, 2, device=DEVICE), None, None),
             "grouped convs": (x, torch.randn(3, 2, 3, 3, 3, device=DEVICE), None, None),
             "past must be": (x, torch.randn(3, 4, 3, 3, 3, device=DEVICE), None, x[:, :, :1]),
             "dtypes differ": (x, torch.randn(3, 4, 3, 3, 3, device=DEVICE).double(), None, None)}
    (triton,) = [impl for impl in ops.alternatives("causal_conv3d") if impl.backend == "triton"]
    for reason, args in cases.items():
        required = ops.OpSet({"causal_conv3d": triton}, required="triton")
        with pytest.raises(CVFastInputError, match=reason):
            required.causal_conv3d(*args)
    auto = ops.OpSet({"causal_conv3d": [triton, reference_impl("causal_conv3d")]})
    weight = torch.randn(3, 4, 3, 2, 2, device=DEVICE)
    with caplog.at_level(logging.WARNING, logger="cvfast"):
        got = auto.causal_conv3d(x, weight, None, None)
    assert len(caplog.records) == 1 and "not odd" in caplog.records[0].getMessage()
    torch.testing.assert_close(got, conv.causal_conv3d(x, weight, None, None), rtol=0, atol=0)


def test_causal_conv3d_fake_and_opcheck():
    """torch.compile / export see one op with the output's shape and layout (x's)."""
    with torch.device("meta"):
        x = torch.empty(1, 4, 3, 5, 6).contiguous(memory_format=CHANNELS_LAST)
        out = torch.ops.cvfast.causal_conv3d(x, torch.empty(7, 4, 3, 3, 3), None, torch.empty(1, 4, 2, 5, 6), None)
    assert out.shape == (1, 7, 3, 5, 6) and out.is_contiguous(memory_format=CHANNELS_LAST)
    x, weight, bias, past = conv_inputs(1, 3, 5, 2, (3, 4), (3, 3, 3), True, torch.float32, CHANNELS_LAST, seed=2)
    torch.library.opcheck(torch.ops.cvfast.causal_conv3d.default, (x, weight, bias, past, None))


# -- the fused spatial norm -------------------------------------------------------------------------

# (f: batch, channels, frames, height, width), (z: channels, frames, height, width), groups. Frame
# counts as the decoder has them (9 from 3 latent frames: the first alone; 8 from 2; 5 from 3; 1
# from 1), spatial factors 8, 2 and 1, and 10 rows from 3 (a ratio that is no power of two: PyTorch's
# fp32 nearest rule).
SPATIAL_CASES = [((1, 12, 9, 16, 24), (4, 3, 2, 3), 4), ((2, 20, 8, 10, 13), (5, 2, 3, 13), 4),
                 ((1, 12, 5, 7, 9), (16, 3, 7, 9), 2), ((1, 10, 1, 6, 8), (4, 1, 3, 4), 5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("f_shape,z_shape,groups", SPATIAL_CASES, ids=lambda v: "x".join(map(str, v))
                         if isinstance(v, tuple) else str(v))
def test_spatial_norm_matches_reference(poisoned, dtype, layout, f_shape, z_shape, groups):
    gen = torch.Generator().manual_seed(sum(f_shape))
    rand = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    channels, z_channels = f_shape[1], z_shape[0]
    f = (rand(*f_shape) * 2 + rand(1, channels, 1, 1, 1)).to(DEVICE, dtype).contiguous(memory_format=layout)
    # z channels-last when f is contiguous and the reverse: z is read through its strides
    z_layout = CHANNELS_LAST if layout == torch.contiguous_format else torch.contiguous_format
    z = rand(f_shape[0], *z_shape).to(DEVICE, dtype).contiguous(memory_format=z_layout)
    params = [rand(channels) * 0.5 + 1, rand(channels) * 0.2, rand(channels, z_channels, 1, 1, 1) * 0.5,
              rand(channels) * 0.3 + 1, rand(channels, z_channels, 1, 1, 1) * 0.5, rand(channels) * 0.3]
    w, b, yw, yb, bw, bb = (p.to(DEVICE, dtype) for p in params)
    args = (f, z, w, b, groups, 1e-6, yw, yb, bw, bb, True)
    got = sn.triton_spatial_norm(*args)
    exact = sn.spatial_norm(*fp32(*args))
    check(got, exact, sn.spatial_norm(*args))
    assert got.is_contiguous(memory_format=layout)


# -- the fast VAE decode --------------------------------------------------------------------------

@pytest.mark.parametrize("variant,latent_frames,frame_batch", [("2b", 2, 1), ("1.5", 3, 2)],
                         ids=["2b-chunks-of-1", "1.5-one-chunk-of-3"])
def test_fast_vae_decode_matches_reference(variant, latent_frames, frame_batch):
    """fp32: the decode through the Triton norms, spatial norms and causal convs (channels-last from
    the first conv to the last) equals the reference decode. Chunks of 1 latent frame carry a conv
    cache built from a chunk shorter than the cache; a chunk of 3 has odd frame counts at every level
    (the lone first frame of the time upsamplers and of the spatial norm's latent resize)."""
    import cvfast
    from tests.fixtures import tiny_folder
    folder = tiny_folder(variant)
    z = torch.randn(1, 4, latent_frames, 2, 3, generator=torch.Generator().manual_seed(latent_frames), device=DEVICE)
    videos = {}
    for backend in ("reference", "triton"):
        pipe = cvfast.load(folder, device=DEVICE, dtype=torch.float32, backend=backend)
        videos[backend] = pipe.vae.decode(z, frame_batch=frame_batch)
    used = pipe.backends()
    assert used["group_norm"] == used["causal_conv3d"] == used["spatial_norm"] == "triton", used
    fast, ref = videos["triton"].double(), videos["reference"].double()
    assert torch.isfinite(fast).all()
    assert ((fast - ref).norm() / ref.norm()).item() < 1e-4
