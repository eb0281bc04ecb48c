"""cvfast's CogVideoX VAE against diffusers' AutoencoderKLCogVideoX (the independent oracle), on a
small random model whose GroupNorm affines are perturbed so that they matter."""
from __future__ import annotations

import copy

import pytest
import torch

from cvfast.models.config import VAEConfig
from cvfast.models.geometry import frame_chunks
from cvfast.models.vae import CogVideoXVAE
from cvfast.ops import OP_NAMES, Impl, OpSet
from cvfast.ops.causal_conv3d import causal_conv3d
from cvfast.ops.registry import reference
from tests.numerics import rel_l2
from tests.extras import require

diffusers = require("diffusers")

TOL = 1e-6  # between two fp32 runs of the same arithmetic (cvfast against itself)


def within_twice_diffusers(got: torch.Tensor, ref32: torch.Tensor, ref64: torch.Tensor) -> None:
    """FlashAttention's rule between two fp32 implementations: cvfast's output is at most twice as
    far (relative L2) from diffusers computed in float64 as diffusers' own fp32 output. (A fixed bar
    does not fit: diffusers' fp32 error on this network is ~1e-6 itself, and the two summation
    orders differ by that much on some CPUs.)"""
    ours, own = rel_l2(got.double(), ref64), rel_l2(ref32.double(), ref64)
    assert ours <= 2 * own, (ours, own)


def in_float64(ref):
    """A float64 copy of a diffusers VAE: the oracle both fp32 implementations are measured against."""
    return copy.deepcopy(ref).double()


def vae_pair(**overrides):
    """(diffusers VAE, cvfast VAE) with the same random weights."""
    kwargs = dict(block_out_channels=(8, 16, 16, 16), norm_num_groups=4, layers_per_block=1, latent_channels=4,
                  down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4)
    kwargs.update(overrides)
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKLCogVideoX(**kwargs).eval()
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.copy_(1 + 0.3 * torch.randn_like(m.weight))
                m.bias.copy_(0.2 * torch.randn_like(m.bias))
    ours = CogVideoXVAE(VAEConfig.from_dict(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.fixture(scope="module")
def pair():
    return vae_pair()


def test_state_dict_names_and_shapes_match(pair):
    ref, ours = pair
    theirs = {k: v.shape for k, v in ref.state_dict().items()}
    mine = {k: v.shape for k, v in ours.state_dict().items()}
    assert set(mine) == set(theirs)
    assert mine == theirs


def test_config_from_diffusers_json():
    d = {"_class_name": "AutoencoderKLCogVideoX", "_diffusers_version": "0.30.0", "act_fn": "silu",
         "block_out_channels": [128, 256, 256, 512], "down_block_types": ["CogVideoXDownBlock3D"] * 4,
         "force_upcast": True, "in_channels": 3, "latent_channels": 16, "latents_mean": None,
         "latents_std": None, "layers_per_block": 3, "norm_eps": 1e-06, "norm_num_groups": 32,
         "out_channels": 3, "sample_height": 480, "sample_width": 720, "scaling_factor": 0.7,
         "shift_factor": None, "temporal_compression_ratio": 4, "up_block_types": ["CogVideoXUpBlock3D"] * 4,
         "use_post_quant_conv": False, "use_quant_conv": False, "invert_scale_latents": True}
    cfg = VAEConfig.from_dict(d)
    assert cfg.block_out_channels == (128, 256, 256, 512) and cfg.scaling_factor == 0.7
    assert cfg.spatial_factor == 8 and cfg.temporal_factor == 4 and cfg.invert_scale_latents
    with pytest.raises(ValueError):
        VAEConfig.from_dict({**d, "act_fn": "relu"})
    with pytest.raises(ValueError):
        VAEConfig.from_dict({**d, "temporal_compression_ratio": 3})


def test_frame_chunks_follow_diffusers():
    assert frame_chunks(13, 2) == [slice(0, 3)] + [slice(i, i + 2) for i in range(3, 13, 2)]
    assert frame_chunks(1, 2) == [slice(0, 1)] and frame_chunks(4, 2) == [slice(0, 2), slice(2, 4)]
    assert frame_chunks(49, 8) == [slice(0, 9)] + [slice(i, i + 8) for i in range(9, 49, 8)]
    assert frame_chunks(5, 8) == [slice(0, 5)]


@pytest.mark.parametrize("latent_frames", [1, 2, 3, 4])
def test_decode_matches_diffusers(pair, latent_frames):
    ref, ours = pair
    z = torch.randn(1, 4, latent_frames, 3, 5, generator=torch.Generator().manual_seed(latent_frames))
    with torch.no_grad():
        expected, exact = ref.decode(z).sample, in_float64(ref).decode(z.double()).sample
    within_twice_diffusers(ours.decode(z), expected, exact)


@pytest.mark.parametrize("frames,height,width", [(1, 8, 8), (5, 16, 24), (9, 16, 24), (17, 8, 8)])
def test_encode_matches_diffusers(pair, frames, height, width):
    ref, ours = pair
    x = torch.rand(2 if frames == 1 else 1, 3, frames, height, width,
                   generator=torch.Generator().manual_seed(frames)) * 2 - 1
    with torch.no_grad():
        dist, exact = ref.encode(x).latent_dist, in_float64(ref).encode(x.double()).latent_dist
    mean, logvar = ours.encode(x)
    within_twice_diffusers(mean, dist.mean, exact.mean)
    within_twice_diffusers(logvar, dist.logvar, exact.logvar)
    # posterior sampling with the same seeded CPU generator (the fp64 oracle takes the same fp32 noise)
    sample = CogVideoXVAE.sample_posterior(mean, logvar, torch.Generator().manual_seed(7))
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7)).double()
    within_twice_diffusers(sample, dist.sample(torch.Generator().manual_seed(7)),
                           exact.mean + torch.exp(0.5 * exact.logvar) * noise)


def test_quant_convs_match_diffusers():
    # diffusers sizes quant_conv by out_channels, so it only runs with latent_channels == out_channels
    ref, ours = vae_pair(latent_channels=3, use_quant_conv=True, use_post_quant_conv=True,
                      block_out_channels=(8, 16), temporal_compression_ratio=2,
                      down_block_types=("CogVideoXDownBlock3D",) * 2, up_block_types=("CogVideoXUpBlock3D",) * 2)
    assert set(ours.state_dict()) == set(ref.state_dict())
    z = torch.randn(1, 3, 3, 4, 5, generator=torch.Generator().manual_seed(1))
    x = torch.rand(1, 3, 5, 8, 10, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        expected, dist = ref.decode(z).sample, ref.encode(x).latent_dist
        exact, exact_dist = in_float64(ref).decode(z.double()).sample, in_float64(ref).encode(x.double()).latent_dist
    within_twice_diffusers(ours.decode(z), expected, exact)
    mean, logvar = ours.encode(x)
    within_twice_diffusers(mean, dist.mean, exact_dist.mean)
    within_twice_diffusers(logvar, dist.logvar, exact_dist.logvar)


def test_decode_chunks_carry_the_cache(pair):
    _, ours = pair
    z = torch.randn(1, 4, 3, 3, 5, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        first, cache = ours.decode_chunk(z[:, :, :1])
        second, cache2 = ours.decode_chunk(z[:, :, 1:], cache)
        cold, _ = ours.decode_chunk(z[:, :, 1:])
    assert "conv_in" in cache and "up_blocks.0.resnets.1.conv2" in cache
    assert all(v.shape[2] == 2 for v in cache.values()) and set(cache2) == set(cache)
    assert (second - cold).abs().max() > 1e-4  # the cache is actually used


@pytest.mark.parametrize("split", [1, 2, 4])
def test_reference_causal_conv_cache_equals_one_call(split):
    g = torch.Generator().manual_seed(split)
    x = torch.randn(2, 3, 6, 5, 7, generator=g)
    w, b = torch.randn(4, 3, 3, 3, 3, generator=g), torch.randn(4, generator=g)
    whole = causal_conv3d(x, w, b, None)
    head = causal_conv3d(x[:, :, :split], w, b, None)
    past = torch.cat((x[:, :, :1].expand(-1, -1, 2, -1, -1), x[:, :, :split]), 2)[:, :, -2:]
    tail = causal_conv3d(x[:, :, split:], w, b, past)
    assert rel_l2(torch.cat((head, tail), 2), whole) < TOL


def test_norms_and_3d_convs_go_through_the_op_set(pair):
    """Every GroupNorm and 3D conv parameter reaches an op: group_norm / causal_conv3d, or (with a
    backend that has it, here a spy) the decoder's fused spatial_norm."""
    ref, _ = pair
    seen: dict[str, set[int]] = {"group_norm": set(), "causal_conv3d": set(), "spatial_norm": set()}

    def spy(name):
        fn = reference(name)

        def wrapped(*args, **kwargs):
            seen.setdefault(name, set()).update(a.data_ptr() for a in (*args, *kwargs.values())
                                                if isinstance(a, torch.Tensor))
            return fn(*args, **kwargs)
        return wrapped

    ops = OpSet({name: Impl("spy", spy(name)) for name in OP_NAMES})
    vae = CogVideoXVAE(VAEConfig.from_dict(dict(ref.config)), ops)
    vae.load_state_dict(ref.state_dict())
    vae.decode(torch.randn(1, 4, 3, 2, 2))
    vae.encode(torch.rand(1, 3, 5, 8, 8))
    assert seen["spatial_norm"]
    for module in vae.modules():
        if isinstance(module, torch.nn.GroupNorm):
            assert module.weight.data_ptr() in seen["group_norm"] | seen["spatial_norm"]
        if isinstance(module, torch.nn.Conv3d):
            assert module.weight.data_ptr() in seen["causal_conv3d"] | seen["spatial_norm"]
