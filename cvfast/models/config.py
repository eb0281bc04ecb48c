"""Config dataclasses, named presets and generation defaults of the CogVideoX family.

`TransformerConfig.from_dict` reads diffusers' `transformer/config.json`, `VAEConfig.from_dict` its
`vae/config.json`; the variant is derived from what the config says (RoPE or sincos, learned
positional embeddings, temporal patching, ofs embedding, input channels), never from a folder name.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

from ..core.checks import known_fields


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

    # What sizes the model: a config without one of these would silently build another model from
    # the defaults (every CogVideoX config.json diffusers ever wrote has them).
    REQUIRED: ClassVar[tuple[str, ...]] = ("num_attention_heads", "attention_head_dim", "num_layers", "in_channels",
                                           "text_embed_dim", "time_embed_dim", "patch_size")
    # Bounds a config must stay within, checked before anything is built (a mistaken config would
    # otherwise build for hours, or until memory runs out): 3.6x CogVideoX-5B's 5.6B parameters, and
    # 24x its 42 blocks (each block is a few dozen Python objects even on the meta device).
    MAX_PARAMETERS: ClassVar[int] = 20_000_000_000
    MAX_LAYERS: ClassVar[int] = 1024

    @classmethod
    def from_dict(cls, d: dict) -> "TransformerConfig":
        missing = [key for key in cls.REQUIRED if key not in d]
        if missing:
            raise ValueError(f"lacks {missing}: the keys that size a CogVideoX transformer")
        cfg = cls(**known_fields(cls, d))
        if cfg.out_channels is None:
            cfg = dataclasses.replace(cfg, out_channels=cfg.in_channels)
        cfg.check()
        return cfg

    def parameter_count(self) -> int:
        """About how many parameters the blocks hold: per block the fused QKV and output projections
        (4 D^2), the feed-forward (8 D^2) and the two adaLN projections (2 x 6 D x time_embed_dim)."""
        dim = self.inner_dim
        return self.num_layers * (12 * dim * dim + 12 * dim * self.time_embed_dim)

    def check(self) -> None:
        for key in self.REQUIRED:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}={value!r}: must be an integer >= 1")
        if self.num_layers > self.MAX_LAYERS:
            raise ValueError(f"num_layers={self.num_layers}: more than the {self.MAX_LAYERS} blocks cvfast builds "
                             "(CogVideoX has 30 to 42): a mistaken config?")
        if self.parameter_count() > self.MAX_PARAMETERS:
            raise ValueError(f"num_layers={self.num_layers}, num_attention_heads={self.num_attention_heads}, "
                             f"attention_head_dim={self.attention_head_dim} make a transformer of about "
                             f"{self.parameter_count() / 1e9:.3g}B parameters, more than the {self.MAX_PARAMETERS / 1e9:.0f}B "
                             "cvfast builds (CogVideoX-5B has 5.6B): a mistaken config?")
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


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 256, 512)
    latent_channels: int = 16
    layers_per_block: int = 3
    act_fn: str = "silu"
    norm_eps: float = 1e-6
    norm_num_groups: int = 32
    temporal_compression_ratio: float = 4
    scaling_factor: float = 1.15258426
    shift_factor: float | None = None
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    invert_scale_latents: bool = False
    sample_height: int = 480
    sample_width: int = 720

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        """From diffusers' `vae/config.json` contents; keys this VAE does not use are ignored, the keys
        that size it are required."""
        missing = [key for key in ("block_out_channels", "latent_channels") if key not in d]
        if missing:
            raise ValueError(f"lacks {missing}: the keys that size the CogVideoX VAE")
        kept = known_fields(cls, d)
        if "block_out_channels" in kept:
            kept["block_out_channels"] = tuple(kept["block_out_channels"])
        for key, block in (("down_block_types", "CogVideoXDownBlock3D"), ("up_block_types", "CogVideoXUpBlock3D")):
            types = d.get(key)
            if types is not None and (len(types) != len(kept.get("block_out_channels", cls.block_out_channels))
                                      or any(t != block for t in types)):
                raise ValueError(f"{key}={types!r}: expected one {block} per entry of block_out_channels")
        cfg = cls(**kept)
        cfg.check()
        return cfg

    def check(self) -> None:
        if self.act_fn not in ("silu", "swish"):
            raise ValueError(f"act_fn={self.act_fn!r}: the CogVideoX VAE uses silu")
        level = math.log2(self.temporal_compression_ratio)
        if level != int(level) or not 0 <= level <= len(self.block_out_channels) - 1:
            raise ValueError(f"temporal_compression_ratio={self.temporal_compression_ratio!r}: expected a power "
                             f"of 2 up to {self.spatial_factor}")
        if self.use_quant_conv and self.latent_channels != self.out_channels:
            # diffusers sizes quant_conv by 2 * out_channels (the *image* channels), so it only
            # runs when latent_channels == out_channels; fail here rather than mid-encode.
            raise ValueError("use_quant_conv needs latent_channels == out_channels (as in diffusers)")
        if self.use_post_quant_conv and self.latent_channels != self.out_channels:
            raise ValueError("use_post_quant_conv needs latent_channels == out_channels (as in diffusers)")

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def temporal_factor(self) -> int:
        return int(self.temporal_compression_ratio)

    @property
    def time_compress_levels(self) -> int:
        """How many of the first down (and up) blocks also halve (double) the frame count."""
        return int(math.log2(self.temporal_compression_ratio))


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


def generation_defaults(transformer: TransformerConfig, vae: VAEConfig) -> dict:
    """generate()'s default num_frames, height, width and fps for a model: its family's, or for a model
    with learned positional embeddings the one size its table has."""
    defaults = dict(GENERATION_DEFAULTS["1.5" if transformer.patch_size_t is not None else "1.0"])
    if transformer.use_learned_positional_embeddings:
        defaults.update(num_frames=transformer.sample_frames, height=transformer.sample_height * vae.spatial_factor,
                        width=transformer.sample_width * vae.spatial_factor)
    return defaults
