"""Text-to-video generation: validate, encode text, denoise, decode."""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .errors import CVFastInputError, NonFiniteLatentsError, bad_arg
from .models.config import TransformerConfig
from .models.text_encoder import TextEncoder
from .models.transformer import CogVideoXTransformer
from .models.vae import CogVideoXVAE
from .ops import OpSet
from .sampler import schedulers

OUTPUT_TYPES = ("np", "pt", "latent")


@dataclass
class GenerationResult:
    """`frames`: np (batch, frames, height, width, 3) float32 in [0, 1]; pt (batch, frames, 3, height,
    width); latent (batch, latent_frames, channels, h, w). `timings`: seconds per stage."""
    frames: np.ndarray | torch.Tensor
    timings: dict[str, float] = field(default_factory=dict)
    fps: int = 8
    seed: int | None = None


@dataclass
class _Request:
    """A validated generate() call."""
    prompts: list[str] | None
    negative: list[str] | None
    prompt_embeds: torch.Tensor | None
    negative_embeds: torch.Tensor | None
    batch: int
    num_frames: int
    height: int
    width: int
    steps: int
    guidance: float
    dynamic_cfg: bool
    max_len: int
    output_type: str


def _as_prompt_list(name: str, value) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(p, str) for p in value):
        return list(value)
    raise bad_arg(name, value, "a string or a non-empty list of strings")


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise bad_arg(name, value, "an integer >= 1")
    return int(value)


def dynamic_guidance(scale: float, timestep: int, num_steps: int) -> float:
    """CogVideoX's dynamic CFG: the scale ramps up as timesteps fall, as its pipelines compute it."""
    return 1 + scale * ((1 - math.cos(math.pi * ((num_steps - timestep) / num_steps) ** 5.0)) / 2)


class Pipeline:
    """A loaded CogVideoX model. Build with `cvfast.load()`."""

    def __init__(self, *, name: str, transformer: CogVideoXTransformer, vae: CogVideoXVAE,
                 text_encoder: TextEncoder, scheduler: schedulers.SchedulerConfig, ops: OpSet,
                 device: torch.device, dtype: torch.dtype, defaults: dict):
        self.name, self.transformer, self.vae = name, transformer, vae
        self.text_encoder, self.scheduler, self.ops = text_encoder, scheduler, ops
        self.device, self.dtype, self.defaults = device, dtype, defaults

    @property
    def config(self) -> TransformerConfig:
        return self.transformer.cfg

    def backends(self) -> dict[str, str]:
        """Which backend each op got, e.g. {'attention': 'sdpa', 'rope': 'reference', ...}."""
        return self.ops.names()

    def __repr__(self) -> str:
        return (f"Pipeline({self.name!r}, variant={self.config.variant}, device={self.device}, "
                f"dtype={self.dtype}, scheduler={self.scheduler.kind})")

    # -- validation ---------------------------------------------------------------------------

    def _check_size(self, num_frames: int, height: int, width: int) -> None:
        cfg, tf = self.config, self.vae.config.temporal_factor
        # The VAE decodes latent frames in pairs after an odd first chunk (as CogVideoX does), so an
        # even latent count K decodes to 4K frames, not the 4K - 3 asked for: only an odd K, i.e.
        # (num_frames - 1) divisible by 2 x the temporal factor, gives exactly num_frames frames.
        step = 2 * tf
        if (num_frames - 1) % step:
            below = num_frames - (num_frames - 1) % step
            raise bad_arg("num_frames", num_frames, f"(num_frames - 1) divisible by {step} (the VAE's temporal "
                          f"factor {tf}, times 2 because it decodes latent frames in pairs), e.g. {below} or "
                          f"{below + step}")
        multiple = self.vae.config.spatial_factor * cfg.patch_size
        for name, value in (("height", height), ("width", width)):
            if value % multiple:
                raise bad_arg(name, value, f"a multiple of {multiple} (VAE factor x patch size), e.g. "
                              f"{value - value % multiple or multiple} or {value - value % multiple + multiple}")
        if cfg.use_learned_positional_embeddings:
            table = (cfg.sample_frames, cfg.sample_height * self.vae.config.spatial_factor,
                     cfg.sample_width * self.vae.config.spatial_factor)
            if (num_frames, height, width) != table:
                raise bad_arg("num_frames/height/width", (num_frames, height, width),
                              f"this {cfg.variant} model has learned positional embeddings for exactly "
                              f"{table[0]} frames at {table[1]}x{table[2]}")

    def _validate(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_frames, height,
                  width, num_inference_steps, guidance_scale, use_dynamic_cfg, max_sequence_length,
                  output_type, latents, seed, generator) -> _Request:
        prompts, negative = _as_prompt_list("prompt", prompt), _as_prompt_list("negative_prompt", negative_prompt)
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
        pick = lambda value, default: default if value is None else value  # noqa: E731 (0 is not "unset")
        num_frames = _positive_int("num_frames", pick(num_frames, self.defaults["num_frames"]))
        height = _positive_int("height", pick(height, self.defaults["height"]))
        width = _positive_int("width", pick(width, self.defaults["width"]))
        self._check_size(num_frames, height, width)
        steps = _positive_int("num_inference_steps", num_inference_steps)
        if steps > self.scheduler.num_train_timesteps:
            raise bad_arg("num_inference_steps", steps, f"at most {self.scheduler.num_train_timesteps}")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
                or not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise bad_arg("guidance_scale", guidance_scale, "a finite number >= 0 (values <= 1 disable CFG)")
        max_len = _positive_int("max_sequence_length", pick(max_sequence_length, self.config.max_text_seq_length))
        if self.config.use_learned_positional_embeddings and max_len != self.config.max_text_seq_length:
            raise bad_arg("max_sequence_length", max_len, f"{self.config.max_text_seq_length} for this model "
                          "(its learned positional table includes the text tokens)")
        for name, emb in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if emb is not None and (emb.dim() != 3 or emb.shape[0] != batch or emb.shape[2] != self.config.text_embed_dim):
                raise bad_arg(name, f"tensor{tuple(emb.shape)}", f"shape ({batch}, seq, {self.config.text_embed_dim})")
        if output_type not in OUTPUT_TYPES:
            raise bad_arg("output_type", output_type, f"one of {OUTPUT_TYPES}")
        if seed is not None and generator is not None:
            raise bad_arg("seed", seed, "None when `generator` is given: pass one or the other")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
            raise bad_arg("seed", seed, "a non-negative integer")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise bad_arg("generator", generator, "a torch.Generator")
        if latents is not None:
            expected = (batch, *self._latent_shape(num_frames, height, width))
            if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != expected:
                raise bad_arg("latents", getattr(latents, "shape", latents), f"a tensor of shape {expected}")
        return _Request(prompts, negative, prompt_embeds, negative_prompt_embeds, batch, num_frames, height, width,
                        steps, float(guidance_scale), bool(use_dynamic_cfg), max_len, output_type)

    def _extra_latent_frames(self, num_frames: int) -> int:
        """CogVideoX 1.5 patches pairs of latent frames; an odd count is padded at the front and the
        padding is dropped before decoding."""
        latent_frames = (num_frames - 1) // self.vae.config.temporal_factor + 1
        return -latent_frames % self.config.temporal_patch

    def _latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, ...]:
        latent_frames = (num_frames - 1) // self.vae.config.temporal_factor + 1 + self._extra_latent_frames(num_frames)
        sf = self.vae.config.spatial_factor
        return latent_frames, self.config.out_channels, height // sf, width // sf

    # -- stages -------------------------------------------------------------------------------

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def encode_prompts(self, req: _Request) -> torch.Tensor:
        """Text embeddings for the batch: (2B, L, D) [negative; positive] with CFG, else (B, L, D).
        Whatever needs encoding goes through T5 in one batched call."""
        cfg_on = req.guidance > 1.0
        texts = []
        if cfg_on and req.negative_embeds is None:
            texts += req.negative or [""] * req.batch
        if req.prompt_embeds is None:
            texts += req.prompts
        encoded = self.text_encoder.encode(texts, req.max_len, self.device, self.dtype) if texts else None
        cond = req.prompt_embeds.to(self.device, self.dtype) if req.prompt_embeds is not None else encoded[-req.batch:]
        if not cfg_on:
            return cond
        uncond = req.negative_embeds.to(self.device, self.dtype) if req.negative_embeds is not None \
            else encoded[:req.batch]
        return torch.cat((uncond, cond))

    @torch.no_grad()
    def encode_text(self, prompt, *, negative_prompt=None, guidance_scale: float = 6.0,
                    max_sequence_length: int | None = None) -> torch.Tensor:
        """The text stage of `generate` on its own: (2B, L, D) [negative; positive] with CFG
        (guidance_scale > 1), else (B, L, D); split it into prompt_embeds/negative_prompt_embeds."""
        req = self._validate(prompt, negative_prompt, None, None, None, None, None, 1, guidance_scale, False,
                             max_sequence_length, "latent", None, None, None)
        return self.encode_prompts(req)

    def _randn(self, shape, generator: torch.Generator) -> torch.Tensor:
        # Drawn on the generator's device in the latent dtype, then moved: what diffusers' randn_tensor
        # does, so that a CPU generator gives the same numbers whatever device runs the model.
        return torch.randn(shape, generator=generator, device=generator.device, dtype=self.dtype).to(self.device)

    def denoise(self, latents: torch.Tensor, text: torch.Tensor, req: _Request, generator: torch.Generator,
                callback: Callable | None, progress: bool) -> torch.Tensor:
        """latents (B, F, C, h, w) noise -> denoised latents, same shape and dtype."""
        plan = schedulers.make_plan(self.scheduler, req.steps, self.device)
        cfg_on = req.guidance > 1.0
        scales = [dynamic_guidance(req.guidance, t, req.steps) if req.dynamic_cfg else req.guidance
                  for t in plan.timesteps_host]
        tables = self.transformer.position_tables(latents.shape[1], latents.shape[3], latents.shape[4], self.device)
        # The first non-finite step is recorded on the device and checked once after the loop: no
        # host sync per step.
        first_bad = torch.full((), -1, dtype=torch.int64, device=self.device)
        step_ids = torch.arange(req.steps, device=self.device)
        prev_x0 = None
        steps = range(req.steps)
        if progress:
            from tqdm.auto import tqdm
            steps = tqdm(steps, desc="denoising", unit="step")
        for i in steps:
            model_in = torch.cat((latents, latents)) if cfg_on else latents
            t = plan.timesteps[i].expand(model_in.shape[0])
            out = self.transformer(model_in, text, t, tables).float()
            if cfg_on:
                uncond, cond = out.chunk(2)
                out = uncond + scales[i] * (cond - uncond)
            noise = [self._randn(latents.shape, generator) for _ in range(plan.noise_draws[i])]
            new, prev_x0 = schedulers.step(plan, i, out, latents, prev_x0, noise)
            latents = new.to(self.dtype)
            if callback is not None:
                callback(i, plan.timesteps_host[i], latents)
            bad = ~torch.isfinite(latents).all()
            first_bad = torch.where(bad & (first_bad < 0), step_ids[i], first_bad)
        bad_step = int(first_bad)
        if bad_step >= 0:
            raise NonFiniteLatentsError(
                f"latents became NaN/Inf at denoising step {bad_step} (timestep {plan.timesteps_host[bad_step]}) "
                f"running {self.name} ({self.config.variant}) in {self.dtype}; no video was written. "
                + {torch.float16: "fp16 overflows in this model: use bfloat16 or float32.",
                   torch.bfloat16: "Try float32 to see whether it is a precision problem."}.get(
                    self.dtype, "The weights or inputs (latents, embeddings) produce non-finite values."))
        return latents

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, F, C, h, w) latents -> (B, 3, frames, H, W) video in [-1, 1] (unclamped)."""
        z = latents.permute(0, 2, 1, 3, 4) / self.vae.config.scaling_factor
        return self.vae.decode(z.to(next(self.vae.parameters()).dtype))

    # -- the public call ----------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompt=None, *, negative_prompt=None, prompt_embeds=None, negative_prompt_embeds=None,
                 num_frames: int | None = None, height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 6.0, use_dynamic_cfg: bool = False,
                 seed: int | None = None, generator: torch.Generator | None = None,
                 latents: torch.Tensor | None = None, max_sequence_length: int | None = None,
                 output_type: str = "np", callback: Callable | None = None,
                 progress: bool = True) -> GenerationResult:
        """Generate video(s) for `prompt`.

        `seed=s` gives the same video as diffusers' pipeline called with
        `generator=torch.Generator("cpu").manual_seed(s)`. `callback(step, timestep, latents)` is
        called after each step. Bad arguments raise `CVFastInputError` before any work starts.
        """
        req = self._validate(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_frames, height,
                             width, num_inference_steps, guidance_scale, use_dynamic_cfg, max_sequence_length,
                             output_type, latents, seed, generator)
        if generator is None:
            seed = random.randrange(2 ** 63) if seed is None else int(seed)
            generator = torch.Generator("cpu").manual_seed(seed)
        timings = {}
        start = time.perf_counter()
        text = self.encode_prompts(req)
        self._sync()
        timings["text_encoding"] = time.perf_counter() - start

        start = time.perf_counter()
        if latents is None:
            latents = self._randn((req.batch, *self._latent_shape(req.num_frames, req.height, req.width)), generator)
        latents = self.denoise(latents.to(self.device, self.dtype), text, req, generator, callback, progress)
        self._sync()
        timings["denoising"] = time.perf_counter() - start
        fps = self.defaults["fps"]
        if req.output_type == "latent":
            return GenerationResult(latents, timings, fps, seed)

        start = time.perf_counter()
        video = self.decode(latents[:, self._extra_latent_frames(req.num_frames):])
        video = (video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)  # (B, F, 3, H, W)
        if not torch.isfinite(video).all():
            raise NonFiniteLatentsError(f"the VAE decode of {self.name} produced NaN/Inf in {self.dtype}; "
                                        "no video was written. Try float32.")
        frames = video.permute(0, 1, 3, 4, 2).cpu().numpy() if req.output_type == "np" else video
        self._sync()
        timings["decoding"] = time.perf_counter() - start
        return GenerationResult(frames, timings, fps, seed)
