"""cvfast's transformer against diffusers' CogVideoXTransformer3DModel, per variant, in float32."""
import pytest
import torch

from cvfast.models.config import TransformerConfig
from cvfast.models.transformer import CogVideoXTransformer
from cvfast.checkpoints import load_into
from cvfast.checkpoints.diffusers import transformer_state_dict
from tests.numerics import rel_l2
from tests.extras import require

diffusers = require("diffusers")

VARIANTS = {
    "2b": dict(),
    "5b": dict(use_rotary_positional_embeddings=True),
    "5b-i2v": dict(use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True, in_channels=8),
    "1.5": dict(use_rotary_positional_embeddings=True, patch_size_t=2, patch_bias=False),
    "1.5-i2v": dict(use_rotary_positional_embeddings=True, patch_size_t=2, patch_bias=False, in_channels=8,
                    ofs_embed_dim=16),
}


def make_pair(variant, sample_frames=9, sample_h=6, sample_w=10):
    torch.manual_seed(0)
    kwargs = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=16,
                  text_embed_dim=24, num_layers=2, sample_height=sample_h, sample_width=sample_w,
                  sample_frames=sample_frames, max_text_seq_length=7)
    kwargs.update(VARIANTS[variant])
    ref = diffusers.CogVideoXTransformer3DModel(**kwargs).eval()
    with torch.no_grad():
        for p in ref.parameters():  # every tensor random, so a mis-mapped one cannot hide
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 and p.shape[0] in (16, 32) else 0.0))
    cfg = TransformerConfig.from_dict(dict(ref.config))
    assert cfg.variant == variant
    with torch.device("meta"):
        ours = CogVideoXTransformer(cfg)
    tensors = {k: (v, "mem") for k, v in ref.state_dict().items()}
    load_into(ours, transformer_state_dict(tensors), "transformer", torch.float32, torch.device("cpu"))
    return ref, ours.eval()


def diffusers_rope(ref, frames, h, w):
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import CogVideoXPipeline
    fake = type("P", (), {"transformer": ref, "vae_scale_factor_spatial": 8})()
    return CogVideoXPipeline._prepare_rotary_positional_embeddings(fake, h * 8, w * 8, frames, "cpu")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_matches_diffusers(variant):
    learned = variant == "5b-i2v"
    ref, ours = make_pair(variant)
    # A size other than the sample size (6x10 latent, 3 frames), except for learned positions which
    # only exist at it; 1.5's integer RoPE grid cannot exceed the sample size in diffusers.
    frames, h, w = (3, 6, 10) if learned else (4, 4, 8) if ours.cfg.patch_size_t else (4, 8, 6)
    x = torch.randn(2, frames, ours.cfg.in_channels, h, w)
    text = torch.randn(2, 7, 24)
    t = torch.tensor([999, 421])
    ofs = torch.tensor([2.0, 2.0]) if ours.cfg.ofs_embed_dim else None
    rope = diffusers_rope(ref, frames, h, w) if ours.cfg.use_rotary_positional_embeddings else None
    with torch.no_grad():
        expected = ref(x, text, t, ofs=ofs, image_rotary_emb=rope, return_dict=False)[0]
        got = ours(x, text, t, ours.position_tables(frames, h, w, "cpu"), ofs=ofs)
    assert got.shape == expected.shape
    assert torch.isfinite(got).all()
    assert rel_l2(got, expected) < 1e-5


def test_unknown_and_misshaped_weights_are_named():
    from cvfast import WeightError
    ref, ours = make_pair("2b")
    tensors = {k: (v, "f.safetensors") for k, v in ref.state_dict().items()}
    tensors["transformer_blocks.0.attn1.to_x.weight"] = (torch.zeros(1), "f.safetensors")
    with pytest.raises(WeightError, match="to_x"):
        transformer_state_dict(tensors)
    del tensors["transformer_blocks.0.attn1.to_x.weight"]
    tensors["proj_out.weight"] = (torch.zeros(3, 3), "f.safetensors")
    with pytest.raises(WeightError, match=r"proj_out.weight.*\(3, 3\).*expected"):
        load_into(ours, transformer_state_dict(tensors), "transformer", torch.float32, torch.device("cpu"))
    del tensors["proj_out.weight"]
    with pytest.raises(WeightError, match="lacks 1 tensors.*proj_out.weight"):
        load_into(ours, transformer_state_dict(tensors), "transformer", torch.float32, torch.device("cpu"))
