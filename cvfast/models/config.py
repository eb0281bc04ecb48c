"""Config dataclasses and named presets of the CogVideoX family.

`TransformerConfig.from_dict` reads diffusers' `transformer/config.json`; the variant is derived from
what the config says (RoPE or sincos, learned positional embeddings, temporal patching, ofs
embedding, input channels), never from a folder name.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


def _known_fields(cls, d: dict) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclass(frozen=True)
class TransformerConfig:
    num_attention_heads: int = 30
    attention_head_dim: int = 64
    in_channels: int = 16
    out_channels: int = 16
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    time_embed_dim: int = 512
    ofs_embed_dim: int | None = None
    text_embed_dim: int = 4096
    num_layers: int = 30
    attention_bias: bool = True
    sample_width: int = 90          # latent width the model was trained at
    sample_height: int = 60         # latent height
    sample_frames: int = 49         # *pixel* frames ((K-1)*4+1 for K latent frames), as diffusers stores it
    patch_size: int = 2
    patch_size_t: int | None = None
    temporal_compression_ratio: int = 4
    max_text_seq_length: int = 226
    activation_fn: str = "gelu-approximate"
    timestep_activation_fn: str = "silu"
    norm_elementwise_affine: bool = True
    norm_eps: float = 1e-5
    spatial_interpolation_scale: float = 1.875
    temporal_interpolation_scale: float = 1.0
    use_rotary_positional_embeddings: bool = False
    use_learned_positional_embeddings: bool = False
    patch_bias: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> "TransformerConfig":
        cfg = cls(**_known_fields(cls, d))
        if cfg.out_channels is None:
            cfg = dataclasses.replace(cfg, out_channels=cfg.in_channels)
        cfg.check()
        return cfg

    def check(self) -> None:
        if self.activation_fn != "gelu-approximate" or self.timestep_activation_fn != "silu":
            raise ValueError(f"unsupported activations {self.activation_fn!r}/{self.timestep_activation_fn!r}: "
                             "CogVideoX uses gelu-approximate and silu")
        if self.use_learned_positional_embeddings and not self.use_rotary_positional_embeddings:
            raise ValueError("learned positional embeddings without RoPE: no CogVideoX model has this")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def temporal_patch(self) -> int:
        return self.patch_size_t or 1

    @property
    def is_image_to_video(self) -> bool:
        return self.in_channels == 2 * self.out_channels

    @property
    def variant(self) -> str:
        """'2b' (sincos), '5b' (RoPE), '5b-i2v' (learned positions), '1.5' or '1.5-i2v' (temporal patching)."""
        if self.patch_size_t is not None:
            return "1.5-i2v" if self.is_image_to_video else "1.5"
        if self.use_learned_positional_embeddings:
            return "5b-i2v"
        if self.use_rotary_positional_embeddings:
            return "5b-i2v" if self.is_image_to_video else "5b"
        return "2b"


# Generation defaults per family (frames, height, width, fps), from the CogVideoX model cards; never
# from transformer.config.sample_* (which for 1.5 describes the RoPE base grid, not a video size).
GENERATION_DEFAULTS = {
    "1.0": dict(num_frames=49, height=480, width=720, fps=8),
    "1.5": dict(num_frames=81, height=768, width=1360, fps=16),
}

# Named presets of the real architectures (diffusers' config.json values of the THUDM releases).
PRESETS: dict[str, TransformerConfig] = {
    "2b": TransformerConfig(),
    "5b": TransformerConfig(num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True),
    "5b-i2v": TransformerConfig(num_attention_heads=48, num_layers=42, in_channels=32,
                                use_rotary_positional_embeddings=True,
                                use_learned_positional_embeddings=True),
    "1.5-5b": TransformerConfig(num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True,
                                patch_size_t=2, patch_bias=False, sample_height=300, sample_width=300,
                                sample_frames=81),
    "1.5-5b-i2v": TransformerConfig(num_attention_heads=48, num_layers=42, in_channels=32, ofs_embed_dim=512,
                                    use_rotary_positional_embeddings=True, patch_size_t=2, patch_bias=False,
                                    sample_height=300, sample_width=300, sample_frames=81),
}
