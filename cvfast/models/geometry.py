"""Frame and size geometry of a CogVideoX model: how many latent frames a video has, the latent shape
the sampler works on (with CogVideoX 1.5's padding frame), the sizes a model accepts, and how the
causal VAE chunks frames.

Every function takes the configs, so the pipeline, the export and the VAE compute these once, the
same way.
"""
from __future__ import annotations

import logging

from ..core.errors import bad_arg
from .config import TransformerConfig, VAEConfig

# Diffusers' frame batching (num_latent_frames_batch_size / num_sample_frames_batch_size). The VAE
# was trained on these chunk lengths; other values change the output (per-chunk GroupNorm).
LATENT_FRAME_BATCH = 2
SAMPLE_FRAME_BATCH = 8
logger = logging.getLogger("cvfast")
# CogVideoX1.5-I2V was trained at a short side of 768 and a long side of 768..1360 (THUDM model card).
I2V_15_SHORT, I2V_15_LONG = 768, (768, 1360)


def frame_chunks(num_frames: int, batch: int) -> list[slice]:
    """The frame slices diffusers' `_encode`/`_decode` process one after the other.

    num_frames // batch chunks of `batch` frames, the *first* one also taking the num_frames % batch
    left over (so 13 latent frames -> [0:3], [3:5], ..., [11:13]; 49 sample frames -> [0:9],
    [9:17], ..., [41:49]). Frame 0 is the causal VAE's lone "image" frame, so the odd leftover rides
    with it and every later chunk has the trained length.
    """
    rem = num_frames % batch
    count = max(num_frames // batch, 1)
    return [slice(0 if i == 0 else batch * i + rem, min(batch * (i + 1) + rem, num_frames)) for i in range(count)]


def decoded_frames(latent_frames: int, time_levels: int) -> int:
    """Video frames the decoder makes from one chunk of `latent_frames`: each of the `time_levels`
    time-doubling upsamplers maps t -> 2t for even t and 2t - 1 for odd t (the lone first frame is not
    repeated), so a chunk of 2 gives 8 and a chunk of 3 gives 9 at temporal factor 4."""
    t = latent_frames
    for _ in range(time_levels):
        t = 2 * t - (t % 2)
    return t


def encoded_frames(sample_frames: int, time_levels: int) -> int:
    """Latent frames the encoder makes from one chunk of `sample_frames`: each time-halving
    downsampler maps t -> (t + 1) // 2 (an odd first frame is kept, the rest averaged in pairs)."""
    t = sample_frames
    for _ in range(time_levels):
        t = (t + 1) // 2
    return t


def video_latent_frames(vae: VAEConfig, num_frames: int) -> int:
    """Latent frames the VAE encodes `num_frames` video frames into (49 -> 13)."""
    return (num_frames - 1) // vae.temporal_factor + 1


def padding_frames(transformer: TransformerConfig, vae: VAEConfig, num_frames: int) -> int:
    """Latent frames put in front of a video's own: CogVideoX 1.5 patches pairs of latent frames, so an
    odd count is padded to even (81 frames: 21 latent frames + 1). The sampler works on the padded
    latents; the padding is dropped before decoding."""
    return -video_latent_frames(vae, num_frames) % transformer.temporal_patch


def latent_shape(transformer: TransformerConfig, vae: VAEConfig, num_frames: int, height: int,
                 width: int) -> tuple[int, int, int, int]:
    """(latent frames including the padding, channels, h, w) of one video's latents, the sampler's
    layout (batch first in front of it)."""
    frames = video_latent_frames(vae, num_frames) + padding_frames(transformer, vae, num_frames)
    sf = vae.spatial_factor
    return frames, transformer.out_channels, height // sf, width // sf


def check_size(transformer: TransformerConfig, vae: VAEConfig, num_frames: int, height: int, width: int, *,
               image_to_video: bool, allow_untrained_size: bool, frames_name: str = "num_frames") -> None:
    """Refuse a video size the model cannot generate (`frames_name`: how the caller names the frame
    count in its message, e.g. the export's `frames`); warn about a size CogVideoX1.5-I2V was not
    trained at, unless `allow_untrained_size`."""
    tf = vae.temporal_factor
    # The VAE decodes latent frames in pairs after an odd first chunk (as CogVideoX does), so an
    # even latent count K decodes to 4K frames, not the 4K - 3 asked for: only an odd K, i.e.
    # (num_frames - 1) divisible by 2 x the temporal factor, gives exactly num_frames frames.
    step = 2 * tf
    if (num_frames - 1) % step:
        below = num_frames - (num_frames - 1) % step
        raise bad_arg(frames_name, num_frames, f"({frames_name} - 1) divisible by {step} (the VAE's temporal "
                      f"factor {tf}, times 2 because it decodes latent frames in pairs), e.g. {below} or "
                      f"{below + step}")
    multiple = vae.spatial_factor * transformer.patch_size
    for name, value in (("height", height), ("width", width)):
        if value % multiple:
            raise bad_arg(name, value, f"a multiple of {multiple} (VAE factor x patch size), e.g. "
                          f"{value - value % multiple or multiple} or {value - value % multiple + multiple}")
    if transformer.use_learned_positional_embeddings:
        table = (transformer.sample_frames, transformer.sample_height * vae.spatial_factor,
                 transformer.sample_width * vae.spatial_factor)
        if (num_frames, height, width) != table:
            raise bad_arg(f"{frames_name}/height/width", (num_frames, height, width),
                          f"this {transformer.variant} model has learned positional embeddings for exactly "
                          f"{table[0]} frames at {table[1]}x{table[2]}")
    if image_to_video and transformer.variant == "1.5-i2v" and not allow_untrained_size:
        short, long = sorted((height, width))
        if short != I2V_15_SHORT or not I2V_15_LONG[0] <= long <= I2V_15_LONG[1] or (num_frames - 1) % 16:
            # A warning, not a refusal: diffusers runs any size, and a fine-tune (or a small test model)
            # may have been trained at others.
            logger.warning("cvfast: %d frames at %dx%d is not a size CogVideoX1.5-I2V was trained at (one side %d, "
                           "the other %d to %d, multiples of 16, 16N+1 frames, e.g. 81 at 768x1360); generating "
                           "anyway (allow_untrained_size=True says this size is intended)", num_frames, height,
                           width, I2V_15_SHORT, *I2V_15_LONG)
