"""Every argument check of `Pipeline.generate`: a call becomes a `Request` (or a `CVFastInputError`
naming the argument, its value and what is accepted) before any work starts."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch

from ..core.checks import is_number, pick, positive_int
from ..core.errors import bad_arg
from ..models.geometry import check_size, latent_shape
from ..models.vae_tiling import keeps_size
from ..runtime import Runtime
from ..runtime.tensorrt import TensorRTTransformer
from ..sampler import cache as step_cache
from ..sampler import graph, schedulers
from ..sampler.schedulers import SCHEDULER_KINDS, SchedulerConfig
from .components import Components
from .media import FITS, frame_size, frames_list

logger = logging.getLogger("cvfast")

OUTPUT_TYPES = ("np", "pt", "latent")


@dataclass(frozen=True)
class Text:
    """The validated text side of a call: prompts (or their embeddings) and CFG."""
    prompts: list[str] | None
    negative: list[str] | None
    prompt_embeds: torch.Tensor | None
    negative_embeds: torch.Tensor | None
    batch: int
    guidance: float
    max_len: int


@dataclass(frozen=True)
class Request:
    """A validated generate() call."""
    text: Text
    num_frames: int
    height: int
    width: int
    steps: int
    dynamic_cfg: bool
    output_type: str
    mode: str = "t2v"                     # "t2v", "i2v" or "v2v"
    frames: list | None = None            # the image (one frame) or the video's frames
    image_noise_sigma: float | str | None = None
    start: int = 0                        # first step of the schedule (video-to-video)
    vae_tiling: bool | str = "auto"
    cuda_graph: bool = False              # replay the step from a cached CUDA graph
    cache: object = None                  # a checked step-cache policy (`sampler.cache`), or None
    fit: str = "crop"                     # how conditioning frames of another aspect are fitted (media.FITS)
    scheduler: SchedulerConfig | None = None  # this call's sampler (None: the pipeline's)

    @property
    def batch(self) -> int:
        return self.text.batch

    @property
    def guidance(self) -> float:
        return self.text.guidance


def prompt_list(name: str, value) -> list[str] | None:
    if value is None:
        return None
    prompts = [value] if isinstance(value, str) else value
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise bad_arg(name, value, "a string or a non-empty list of strings")
    for prompt in prompts:
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as exc:  # lone surrogates: bytes a shell argument could not decode
            raise bad_arg(name, prompt, f"text that is valid Unicode (character {exc.start} is an undecodable "
                          "byte: save the prompt as UTF-8)") from None
    return list(prompts)


def validate_text(components: Components, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                  guidance_scale, max_sequence_length) -> Text:
    cfg = components.transformer.cfg
    prompts, negative = prompt_list("prompt", prompt), prompt_list("negative_prompt", negative_prompt)
    if prompts is not None and prompt_embeds is not None:
        raise bad_arg("prompt_embeds", f"tensor{tuple(prompt_embeds.shape)}",
                      "None when `prompt` is given: pass either the prompt or its embeddings")
    if prompts is None and prompt_embeds is None:
        raise bad_arg("prompt", None, "a string or list of strings (or pass prompt_embeds)")
    if negative is not None and negative_prompt_embeds is not None:
        raise bad_arg("negative_prompt_embeds", "tensor", "None when `negative_prompt` is given")
    batch = len(prompts) if prompts is not None else prompt_embeds.shape[0]
    if negative is not None and len(negative) != batch:
        raise bad_arg("negative_prompt", negative_prompt, f"one negative prompt per prompt ({batch})")
    if not is_number(guidance_scale) or guidance_scale < 0:
        raise bad_arg("guidance_scale", guidance_scale, "a finite number >= 0 (values <= 1 disable CFG)")
    max_len = positive_int("max_sequence_length", pick(max_sequence_length, cfg.max_text_seq_length))
    if cfg.use_learned_positional_embeddings and max_len != cfg.max_text_seq_length:
        raise bad_arg("max_sequence_length", max_len, f"{cfg.max_text_seq_length} for this model "
                      "(its learned positional table includes the text tokens)")
    for name, emb in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
        if emb is not None and (emb.dim() != 3 or emb.shape[0] != batch or emb.shape[2] != cfg.text_embed_dim):
            raise bad_arg(name, f"tensor{tuple(emb.shape)}", f"shape ({batch}, seq, {cfg.text_embed_dim})")
    return Text(prompts, negative, prompt_embeds, negative_prompt_embeds, batch, float(guidance_scale), max_len)


def check_condition(components: Components, image, video, strength, image_noise_sigma, latents, num_frames,
                    steps) -> tuple[str, list | None, int]:
    """(the mode, the conditioning frames, the first step: > 0 for video-to-video)."""
    cfg = components.transformer.cfg
    if image is not None and video is not None:
        raise bad_arg("video", "frames", "None when `image` is given: one conditioning input at a time")
    if cfg.is_image_to_video and image is None:
        raise bad_arg("image", None, f"an image: this {cfg.variant} model is image-to-video")
    if image is not None and not cfg.is_image_to_video:
        raise bad_arg("image", type(image).__name__, f"None for this {cfg.variant} text-to-video model "
                      "(use an image-to-video model, or video= for video-to-video)")
    if not (image_noise_sigma is None or image_noise_sigma == "sample" or (
            is_number(image_noise_sigma) and image_noise_sigma >= 0)):
        raise bad_arg("image_noise_sigma", image_noise_sigma, "None, a number >= 0 or 'sample'")
    if image_noise_sigma is not None and image is None:
        raise bad_arg("image_noise_sigma", image_noise_sigma, "None without an image")
    if image is not None:
        return "i2v", frames_list("image", image)[:1], 0
    if video is None:
        return "t2v", None, 0
    if cfg.patch_size_t is not None:
        raise bad_arg("video", "frames", f"None for this {cfg.variant} model: video-to-video needs a "
                      "latent frame count divisible by its temporal patch (2), which this VAE cannot decode "
                      "back to the video's frame count; use a CogVideoX 1.0 (2B/5B) model")
    frames = frames_list("video", video)
    if num_frames is not None and num_frames > len(frames):
        raise bad_arg("num_frames", num_frames, f"None or at most the video's frame count {len(frames)}")
    if latents is not None:
        raise bad_arg("latents", "tensor", "None with video=: the video's latents start the denoising")
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise bad_arg("strength", strength, "a number in (0, 1]")
    if int(steps * strength) < 1:
        raise bad_arg("strength", strength, f"at least 1 / num_inference_steps = {1 / steps:.3g}: with "
                      f"{steps} steps no denoising step would run")
    return "v2v", frames, schedulers.first_step(steps, strength)


def check_generator(generator, videos: int, runtime: Runtime) -> None:
    """None, a torch.Generator, or a list of `videos` of them: video k's noise from generator k."""
    if generator is None or isinstance(generator, torch.Generator):
        return
    described = f"a list of {len(generator)}" if isinstance(generator, (list, tuple)) else type(generator).__name__
    if not isinstance(generator, list) or not all(isinstance(g, torch.Generator) for g in generator):
        raise bad_arg("generator", described, f"a torch.Generator or a list of {videos} (one per video)")
    if len(generator) != videos:
        raise bad_arg("generator", described, f"one generator per video: {videos} (prompts x num_videos_per_prompt)")
    if runtime.parallel is not None:
        raise bad_arg("generator", described, "one torch.Generator in a parallel job (rank 0's state is every rank's)")


def adapted_video(cfg, vae, frames: list, num_frames, height, width, fit: str) -> tuple[list, int, int, int]:
    """A video-to-video input as the model takes it: its first `num_frames` frames, else as many as
    an accepted count allows ((frames - 1) divisible by 2 x the VAE's temporal factor); unless given,
    its own size rounded down to the size multiple. What was adapted is said in one line."""
    step, multiple = 2 * vae.temporal_factor, vae.spatial_factor * cfg.patch_size
    count = num_frames if num_frames is not None else len(frames) - (len(frames) - 1) % step
    rows, cols = frame_size(frames[0])
    height = height if height is not None else max(rows - rows % multiple, multiple)
    width = width if width is not None else max(cols - cols % multiple, multiple)
    said = []
    if num_frames is None and count != len(frames):
        said.append(f"its first {count} of {len(frames)} frames (this model takes (frames - 1) divisible by {step})")
    if (height, width) != (rows, cols):
        said.append(f"{height}x{width} from its {rows}x{cols} ({fit}; sizes in multiples of {multiple})")
    if said:
        logger.warning("cvfast: video-to-video: using %s", " and ".join(said))
    return frames[:count], count, height, width


def validate(components: Components, runtime: Runtime, *, prompt=None, negative_prompt=None, prompt_embeds=None,
             negative_prompt_embeds=None, image=None, image_noise_sigma=None, video=None, strength=0.8,
             num_frames=None, height=None, width=None, num_inference_steps=50, guidance_scale=6.0,
             use_dynamic_cfg=False, seed=None, generator=None, latents=None, max_sequence_length=None,
             vae_tiling="auto", output_type="np", allow_untrained_size=False, cuda_graph=None, cache=None,
             fit="crop", scheduler=None) -> Request:
    """generate()'s arguments (the same names and defaults) -> a Request, or the error of the first
    argument it cannot take."""
    cfg, vae, defaults = components.transformer.cfg, components.vae.config, components.defaults
    text = validate_text(components, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                         guidance_scale, max_sequence_length)
    steps = positive_int("num_inference_steps", num_inference_steps)
    if steps > components.scheduler.num_train_timesteps:
        raise bad_arg("num_inference_steps", steps, f"at most {components.scheduler.num_train_timesteps}")
    mode, frames, start = check_condition(components, image, video, strength, image_noise_sigma, latents,
                                          num_frames, steps)
    if fit not in FITS:
        raise bad_arg("fit", fit, f"one of {FITS}")
    if mode == "v2v":  # the video sets the frame count and, unless given, the size
        frames, num_frames, height, width = adapted_video(cfg, vae, frames, num_frames, height, width, fit)
    num_frames = positive_int("num_frames", pick(num_frames, defaults["num_frames"]))
    height = positive_int("height", pick(height, defaults["height"]))
    width = positive_int("width", pick(width, defaults["width"]))
    check_size(cfg, vae, num_frames, height, width, image_to_video=mode == "i2v",
               allow_untrained_size=allow_untrained_size)
    if output_type not in OUTPUT_TYPES:
        raise bad_arg("output_type", output_type, f"one of {OUTPUT_TYPES}")
    if vae_tiling not in ("auto", True, False):
        raise bad_arg("vae_tiling", vae_tiling, "'auto', True or False")
    if vae_tiling is True and not keeps_size(vae, height, width, encode=mode != "t2v"):
        raise bad_arg("vae_tiling", True, f"False or 'auto' at {height}x{width} for this VAE: its tiles (half "
                      "its sample size, diffusers' defaults) do not fit this size exactly and would change the "
                      "output size (see Tiling.exact_for)")
    if seed is not None and generator is not None:
        raise bad_arg("seed", seed, "None when `generator` is given: pass one or the other")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))
                             or not 0 <= seed < 2 ** 64):
        raise bad_arg("seed", seed, "an integer from 0 to 2**64 - 1 (what torch.Generator.manual_seed takes)")
    check_generator(generator, text.batch, runtime)
    shape = latent_shape(cfg, vae, num_frames, height, width)
    if isinstance(components.transformer, TensorRTTransformer):  # the engine's size and batch
        components.transformer.check_request(shape, text.max_len, text.batch * (2 if text.guidance > 1 else 1))
    if latents is not None:
        expected = (text.batch, *shape)
        if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != expected:
            raise bad_arg("latents", getattr(latents, "shape", latents), f"a tensor of shape {expected}")
    use_graph = graph.check_setting(runtime.cuda_graph if cuda_graph is None else cuda_graph, runtime.device,
                                    runtime.offload.mode)
    if runtime.parallel is not None:
        runtime.parallel.check_request(text.guidance, use_graph)
    policy = step_cache.parse(runtime.cache if cache is None else cache, cfg.variant)
    if policy is not None and isinstance(components.transformer, TensorRTTransformer):
        raise bad_arg("cache", policy.name, "None with backend='tensorrt': the engine runs the whole transformer "
                      "and does not expose its blocks' residual; use a PyTorch backend")
    if scheduler not in (None, *SCHEDULER_KINDS.values()):
        raise bad_arg("scheduler", scheduler, f"None (the pipeline's) or one of {sorted(set(SCHEDULER_KINDS.values()))}")
    sampler = None if scheduler is None else dataclasses.replace(components.scheduler, kind=scheduler)
    return Request(text, num_frames, height, width, steps, bool(use_dynamic_cfg), output_type, mode, frames,
                   image_noise_sigma, start, vae_tiling, use_graph, policy, fit, sampler)
