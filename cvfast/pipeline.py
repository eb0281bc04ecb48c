"""Generation: validate, encode text (and the image or video), denoise, decode.

Three modes share one path: text-to-video; image-to-video (an I2V model: the image's latent is
concatenated to the noise on channels); video-to-video (a T2V model: the video's latent, noised to
the timestep `strength` selects, replaces the initial noise).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .errors import CVFastInputError, NonFiniteLatentsError, bad_arg
from .media import frames_list, to_vae_input
from .models.config import TransformerConfig
from .models.text_encoder import TextEncoder
from .models.transformer import CogVideoXTransformer
from .models.vae import CogVideoXVAE, Tiling
from .models.vae_memory import (choose_tiling, free_device_bytes, projected_decode_peak_bytes,
                                projected_encode_peak_bytes)
from .ops import OpSet
from .sampler import graph, schedulers, static_step

log = logging.getLogger("cvfast")
OUTPUT_TYPES = ("np", "pt", "latent")
OFFLOAD_CHOICES = ("none", "model")
# CogVideoX1.5-I2V was trained at a short side of 768 and a long side of 768..1360 (THUDM model card).
I2V_15_SHORT, I2V_15_LONG = 768, (768, 1360)


@dataclass
class GenerationResult:
    """`frames`: np (batch, frames, height, width, 3) float32 in [0, 1]; pt (batch, frames, 3, height,
    width); latent (batch, latent_frames, channels, h, w). `timings`: seconds per stage;
    `peak_memory_gib`: the peak device memory allocated in each stage (CUDA only, else empty)."""
    frames: np.ndarray | torch.Tensor
    timings: dict[str, float] = field(default_factory=dict)
    fps: int = 8
    seed: int | None = None
    peak_memory_gib: dict[str, float] = field(default_factory=dict)


@dataclass
class _Text:
    """The validated text side of a call."""
    prompts: list[str] | None
    negative: list[str] | None
    prompt_embeds: torch.Tensor | None
    negative_embeds: torch.Tensor | None
    batch: int
    guidance: float
    max_len: int


@dataclass
class _Request:
    """A validated generate() call."""
    text: _Text
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

    @property
    def batch(self) -> int:
        return self.text.batch

    @property
    def guidance(self) -> float:
        return self.text.guidance


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


def _pick(value, default):
    return default if value is None else value  # 0 is a value, not "unset"


def _frame_size(frame) -> tuple[int, int]:
    """(height, width) of one conditioning frame, whatever its type."""
    if hasattr(frame, "size") and not callable(frame.size) and not isinstance(frame, np.ndarray):
        width, height = frame.size  # PIL
        return height, width
    shape = tuple(frame.shape)
    return (shape[1], shape[2]) if isinstance(frame, torch.Tensor) else (shape[0], shape[1])


def dynamic_guidance(scale: float, timestep: int, num_steps: int) -> float:
    """CogVideoX's dynamic CFG: the scale ramps up as timesteps fall, as its pipelines compute it."""
    return 1 + scale * ((1 - math.cos(math.pi * ((num_steps - timestep) / num_steps) ** 5.0)) / 2)


class Pipeline:
    """A loaded CogVideoX model. Build with `cvfast.load()`."""

    def __init__(self, *, name: str, transformer: CogVideoXTransformer, vae: CogVideoXVAE,
                 text_encoder: TextEncoder, scheduler: schedulers.SchedulerConfig, ops: OpSet,
                 device: torch.device, dtype: torch.dtype, defaults: dict, offload: str = "none"):
        self.name, self.transformer, self.vae = name, transformer, vae
        self.text_encoder, self.scheduler, self.ops = text_encoder, scheduler, ops
        self.device, self.dtype, self.defaults = device, dtype, defaults
        # offload="model": components live on the CPU and each comes to `device` only while it runs.
        self.offload, self.home = offload, torch.device("cpu")
        self._lora_backup: dict[str, torch.Tensor] = {}  # base tensors of the layers LoRAs changed
        # generate()'s default for cuda_graph (load() sets it); the step graphs, made on first use.
        self.cuda_graph: bool | str = "auto"
        self.graphs: graph.GraphCache | None = None
        # A `cvfast.parallel.ParallelContext` when load(parallel=...) spread this pipeline over ranks.
        self.parallel = None

    @property
    def config(self) -> TransformerConfig:
        return self.transformer.cfg

    def backends(self) -> dict[str, str]:
        """Which backend each op got, e.g. {'attention': 'sdpa', 'rope': 'reference', ...}."""
        return self.ops.names()

    def __repr__(self) -> str:
        return (f"Pipeline({self.name!r}, variant={self.config.variant}, device={self.device}, "
                f"dtype={self.dtype}, scheduler={self.scheduler.kind}, offload={self.offload})")

    # -- LoRA -------------------------------------------------------------------------------------

    def load_lora(self, path, scale: float = 1.0, *, trust_pickle: bool = False) -> list[str]:
        """Merge a LoRA into the transformer's weights: W += scale * alpha / r * B @ A. path: a
        diffusers/PEFT-format .safetensors (or a folder holding one), or SAT matrix_A/matrix_B adapters
        (a SAT checkpoint directory, its .pt, or a .safetensors with SAT names; see
        `cvfast.sat_io.read_adapter`). trust_pickle: as in `cvfast.load`. Several LoRAs stack;
        `unload_lora()` restores the base weights bit for bit. Returns the parameters it changed."""
        from .sat_io import read_adapter
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise bad_arg("scale", scale, "a finite number")
        return self.merge_lora(read_adapter(path, trust_pickle), scale, str(path))

    @torch.no_grad()
    def merge_lora(self, layers: dict[str, dict], scale: float, source: str) -> list[str]:
        """Merge LoRA layers ({diffusers layer: {"A", "B", "alpha"}}, as `read_adapter` returns them)."""
        from .models.lora import lora_deltas
        if not isinstance(self.transformer, CogVideoXTransformer):
            raise CVFastInputError(f"{source}: a LoRA cannot be merged into a TensorRT engine; merge it into the "
                                   "model (load_lora on a PyTorch pipeline), then build the engine from that")
        params = dict(self.transformer.named_parameters())
        deltas = lora_deltas(layers, params, float(scale), source)  # all checks before any change
        for name, parts in deltas.items():
            weight = params[name]
            self._lora_backup.setdefault(name, weight.detach().to("cpu", copy=True))
            for rows, delta in parts:
                weight[rows] += delta.to(weight.device, weight.dtype)
        return sorted(deltas)

    @torch.no_grad()
    def unload_lora(self) -> None:
        """Put back the base weights of every layer a LoRA changed (bit-identical)."""
        params = dict(self.transformer.named_parameters())
        for name, original in self._lora_backup.items():
            params[name].copy_(original)
        self._lora_backup.clear()

    # -- placement (offload="model") ----------------------------------------------------------

    def _components(self) -> dict[str, torch.nn.Module]:
        return {"text_encoder": self.text_encoder.model, "transformer": self.transformer, "vae": self.vae}

    def placement(self) -> dict[str, str]:
        """Where each component's weights are now, e.g. {'transformer': 'cpu', 'vae': 'cuda:0', ...}."""
        return {name: str(next(m.parameters()).device) for name, m in self._components().items()}

    def _place(self, module: torch.nn.Module, device: torch.device) -> None:
        if next(module.parameters()).device != device:
            module.to(device)

    def _use(self, name: str) -> None:
        """With offload="model", bring `name` to the compute device and send the others home first
        (so the device never holds two components); without offload, nothing moves."""
        if self.offload != "model":
            return
        for other, module in self._components().items():
            if other != name:
                self._place(module, self.home)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # give what the others held back before the next one arrives
        self._place(self._components()[name], self.device)

    # -- validation ---------------------------------------------------------------------------

    def _check_size(self, num_frames: int, height: int, width: int, mode: str, allow_untrained_size: bool) -> None:
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
        if mode == "i2v" and cfg.variant == "1.5-i2v" and not allow_untrained_size:
            short, long = sorted((height, width))
            if short != I2V_15_SHORT or not I2V_15_LONG[0] <= long <= I2V_15_LONG[1] or (num_frames - 1) % 16:
                raise bad_arg("num_frames/height/width", (num_frames, height, width),
                              f"CogVideoX1.5-I2V sizes: one side {I2V_15_SHORT}, the other {I2V_15_LONG[0]} to "
                              f"{I2V_15_LONG[1]} (multiples of 16), 16N+1 frames, e.g. (81, 768, 1360); "
                              "pass allow_untrained_size=True to generate at other sizes anyway")

    def _check_condition(self, image, video, strength, image_noise_sigma, latents, num_frames, steps) -> tuple:
        """The mode and the conditioning frames; the first step for video-to-video."""
        i2v_model = self.config.is_image_to_video
        if image is not None and video is not None:
            raise bad_arg("video", "frames", "None when `image` is given: one conditioning input at a time")
        if i2v_model and image is None:
            raise bad_arg("image", None, f"an image: this {self.config.variant} model is image-to-video")
        if image is not None and not i2v_model:
            raise bad_arg("image", type(image).__name__, f"None for this {self.config.variant} text-to-video model "
                          "(use an image-to-video model, or video= for video-to-video)")
        if not (image_noise_sigma is None or image_noise_sigma == "sample" or (
                isinstance(image_noise_sigma, (int, float)) and not isinstance(image_noise_sigma, bool)
                and math.isfinite(image_noise_sigma) and image_noise_sigma >= 0)):
            raise bad_arg("image_noise_sigma", image_noise_sigma, "None, a number >= 0 or 'sample'")
        if image_noise_sigma is not None and image is None:
            raise bad_arg("image_noise_sigma", image_noise_sigma, "None without an image")
        if image is not None:
            return "i2v", frames_list("image", image)[:1], 0
        if video is None:
            return "t2v", None, 0
        if self.config.patch_size_t is not None:
            raise bad_arg("video", "frames", f"None for this {self.config.variant} model: video-to-video needs a "
                          "latent frame count divisible by its temporal patch (2), which this VAE cannot decode "
                          "back to the video's frame count; use a CogVideoX 1.0 (2B/5B) model")
        frames = frames_list("video", video)
        if num_frames is not None and num_frames != len(frames):
            raise bad_arg("num_frames", num_frames, f"None or the video's frame count {len(frames)}")
        if latents is not None:
            raise bad_arg("latents", "tensor", "None with video=: the video's latents start the denoising")
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
            raise bad_arg("strength", strength, "a number in (0, 1]")
        if int(steps * strength) < 1:
            raise bad_arg("strength", strength, f"at least 1 / num_inference_steps = {1 / steps:.3g}: with "
                          f"{steps} steps no denoising step would run")
        return "v2v", frames, schedulers.first_step(steps, strength)

    def _validate_text(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, guidance_scale,
                       max_sequence_length) -> _Text:
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
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
                or not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise bad_arg("guidance_scale", guidance_scale, "a finite number >= 0 (values <= 1 disable CFG)")
        max_len = _positive_int("max_sequence_length", _pick(max_sequence_length, self.config.max_text_seq_length))
        if self.config.use_learned_positional_embeddings and max_len != self.config.max_text_seq_length:
            raise bad_arg("max_sequence_length", max_len, f"{self.config.max_text_seq_length} for this model "
                          "(its learned positional table includes the text tokens)")
        for name, emb in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if emb is not None and (emb.dim() != 3 or emb.shape[0] != batch or emb.shape[2] != self.config.text_embed_dim):
                raise bad_arg(name, f"tensor{tuple(emb.shape)}", f"shape ({batch}, seq, {self.config.text_embed_dim})")
        return _Text(prompts, negative, prompt_embeds, negative_prompt_embeds, batch, float(guidance_scale), max_len)

    def _validate(self, *, prompt=None, negative_prompt=None, prompt_embeds=None, negative_prompt_embeds=None,
                  image=None, image_noise_sigma=None, video=None, strength=0.8, num_frames=None, height=None,
                  width=None, num_inference_steps=50, guidance_scale=6.0, use_dynamic_cfg=False, seed=None,
                  generator=None, latents=None, max_sequence_length=None, vae_tiling="auto", output_type="np",
                  allow_untrained_size=False, cuda_graph=None) -> _Request:
        text = self._validate_text(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, guidance_scale,
                                   max_sequence_length)
        steps = _positive_int("num_inference_steps", num_inference_steps)
        if steps > self.scheduler.num_train_timesteps:
            raise bad_arg("num_inference_steps", steps, f"at most {self.scheduler.num_train_timesteps}")
        mode, frames, start = self._check_condition(image, video, strength, image_noise_sigma, latents,
                                                    num_frames, steps)
        # A video sets the frame count and, unless given, the size; otherwise the family defaults.
        size = _frame_size(frames[0]) if mode == "v2v" else (self.defaults["height"], self.defaults["width"])
        num_frames = _positive_int("num_frames", len(frames) if mode == "v2v" else
                                   _pick(num_frames, self.defaults["num_frames"]))
        height = _positive_int("height", _pick(height, size[0]))
        width = _positive_int("width", _pick(width, size[1]))
        self._check_size(num_frames, height, width, mode, allow_untrained_size)
        if output_type not in OUTPUT_TYPES:
            raise bad_arg("output_type", output_type, f"one of {OUTPUT_TYPES}")
        if vae_tiling not in ("auto", True, False):
            raise bad_arg("vae_tiling", vae_tiling, "'auto', True or False")
        if vae_tiling is True and not self._tiling_keeps_size(mode, num_frames, height, width):
            raise bad_arg("vae_tiling", True, f"False or 'auto' at {height}x{width} for this VAE: its tiles (half "
                          "its sample size, diffusers' defaults) do not fit this size exactly and would change the "
                          "output size (see Tiling.exact_for)")
        if seed is not None and generator is not None:
            raise bad_arg("seed", seed, "None when `generator` is given: pass one or the other")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
            raise bad_arg("seed", seed, "a non-negative integer")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise bad_arg("generator", generator, "a torch.Generator")
        check_engine = getattr(self.transformer, "check_request", None)  # a TensorRT engine's size and batch
        if check_engine is not None:
            check_engine(self._latent_shape(num_frames, height, width), text.max_len,
                         text.batch * (2 if text.guidance > 1 else 1))
        if latents is not None:
            expected = (text.batch, *self._latent_shape(num_frames, height, width))
            if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != expected:
                raise bad_arg("latents", getattr(latents, "shape", latents), f"a tensor of shape {expected}")
        use_graph = graph.check_setting(self.cuda_graph if cuda_graph is None else cuda_graph, self.device,
                                        self.offload)
        if self.parallel is not None:
            self.parallel.check_request(text.guidance, use_graph)
        return _Request(text, num_frames, height, width, steps, bool(use_dynamic_cfg), output_type, mode, frames,
                        image_noise_sigma, start, vae_tiling, use_graph)

    def _extra_latent_frames(self, num_frames: int) -> int:
        """CogVideoX 1.5 patches pairs of latent frames; an odd count is padded at the front and the
        padding is dropped before decoding (not for video-to-video, whose frames are the video's)."""
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

    def encode_prompts(self, text: _Text) -> torch.Tensor:
        """Text embeddings for the batch: (2B, L, D) [negative; positive] with CFG, else (B, L, D).
        Whatever needs encoding goes through T5 in one batched call."""
        cfg_on = text.guidance > 1.0
        texts = []
        if cfg_on and text.negative_embeds is None:
            texts += text.negative or [""] * text.batch
        if text.prompt_embeds is None:
            texts += text.prompts
        encoded = None
        if texts:
            self._use("text_encoder")
            encoded = self.text_encoder.encode(texts, text.max_len, self.device, self.dtype)
        cond = text.prompt_embeds.to(self.device, self.dtype) if text.prompt_embeds is not None \
            else encoded[-text.batch:]
        if not cfg_on:
            return cond
        uncond = text.negative_embeds.to(self.device, self.dtype) if text.negative_embeds is not None \
            else encoded[:text.batch]
        return torch.cat((uncond, cond))

    @torch.no_grad()
    def encode_text(self, prompt, *, negative_prompt=None, guidance_scale: float = 6.0,
                    max_sequence_length: int | None = None) -> torch.Tensor:
        """The text stage of `generate` on its own: (2B, L, D) [negative; positive] with CFG
        (guidance_scale > 1), else (B, L, D); split it into prompt_embeds/negative_prompt_embeds."""
        return self.encode_prompts(self._validate_text(prompt, negative_prompt, None, None, guidance_scale,
                                                       max_sequence_length))

    def _randn(self, shape, generator: torch.Generator) -> torch.Tensor:
        # Drawn on the generator's device in the latent dtype, then moved: what diffusers' randn_tensor
        # does, so that a CPU generator gives the same numbers whatever device runs the model.
        return torch.randn(shape, generator=generator, device=generator.device, dtype=self.dtype).to(self.device)

    def _encode_frames(self, req: _Request, generator: torch.Generator) -> torch.Tensor:
        """The conditioning frames through the VAE encoder and a posterior draw:
        (1, latent_frames, C, h, w) in the pipeline dtype, not yet scaled."""
        self._use("vae")
        vae_dtype = next(self.vae.parameters()).dtype
        x = to_vae_input("image" if req.mode == "i2v" else "video", req.frames, req.height, req.width,
                         self.device, vae_dtype)
        if req.image_noise_sigma is not None:
            # The SAT engine's first-frame augmentation: Gaussian pixel noise with a log-normal sigma
            # (log sigma ~ N(-3, 0.5)), or a fixed sigma.
            sigma = req.image_noise_sigma
            if sigma == "sample":
                sigma = math.exp(-3.0 + 0.5 * torch.randn((), generator=generator).item())
            noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=vae_dtype)
            x = x + sigma * noise.to(self.device)
        _, _, frames, height, width = x.shape
        keeps = Tiling.for_vae(self.vae.config).keeps_size(self.vae.config.spatial_factor, height, width, decode=False)
        tiling = self._tiling(req.vae_tiling, lambda t: projected_encode_peak_bytes(
            self.vae.config, frames, height, width, vae_dtype, tiling=t), keeps)
        mean, logvar = self.vae.encode(x, tiling=tiling)
        z = self.vae.sample_posterior(mean, logvar, generator)
        return z.to(self.dtype).permute(0, 2, 1, 3, 4)

    def _initial_latents(self, req: _Request, generator: torch.Generator, latents: torch.Tensor | None):
        """(noise or noised video latents (B, F, C, h, w), image latents to concatenate or None).
        The generator is consumed in diffusers' order: the posterior draw, then the noise."""
        shape = (req.batch, *self._latent_shape(req.num_frames, req.height, req.width))
        vcfg = self.vae.config
        if req.mode == "t2v":
            return (self._randn(shape, generator) if latents is None else latents.to(self.device, self.dtype)), None
        encoded = self._encode_frames(req, generator)
        if req.mode == "i2v":
            # The image is the first latent frame; the rest of the conditioning is zeros. (1.5 models
            # pad the latent count to a multiple of their temporal patch, so no extra front padding.)
            image = encoded / vcfg.scaling_factor if vcfg.invert_scale_latents else encoded * vcfg.scaling_factor
            cond = torch.cat((image, image.new_zeros(1, shape[1] - 1, *image.shape[2:])), dim=1)
            noise = self._randn(shape, generator) if latents is None else latents.to(self.device, self.dtype)
            return noise, cond.expand(req.batch, -1, -1, -1, -1)
        clean = (encoded * vcfg.scaling_factor).expand(req.batch, -1, -1, -1, -1)
        noise = self._randn((req.batch, *clean.shape[1:]), generator)
        t0 = schedulers.timesteps(self.scheduler, req.steps)[req.start]
        return schedulers.add_noise(self.scheduler, clean, noise, int(t0)), None

    def denoise(self, latents: torch.Tensor, text: torch.Tensor, req: _Request, generator: torch.Generator,
                callback: Callable | None, progress: bool, cond: torch.Tensor | None = None,
                graphs: graph.GraphCache | None = None) -> torch.Tensor:
        """latents (B, F, C, h, w) -> denoised latents, same shape and dtype. `cond`: image latents
        concatenated on channels at every step (image-to-video). Each step is `static_step.run_step`
        over buffers allocated once for the call, or, with `graphs`, once per cached shape, whose
        step is then captured and replayed as a CUDA graph (`cvfast/sampler/graph.py`)."""
        self._use("transformer")
        plan = schedulers.make_plan(self.scheduler, req.steps, self.device, req.start)
        run_steps = len(plan.timesteps_host)
        # Dynamic CFG counts the steps that actually run (as diffusers does for video-to-video).
        scales = [dynamic_guidance(req.guidance, t, run_steps) if req.dynamic_cfg else req.guidance
                  for t in plan.timesteps_host]
        shape = static_step.StepShape.of(latents, text, cond, 2 if req.guidance > 1.0 else 1, run_steps)
        model = self.transformer if self.parallel is None else self.parallel.denoiser(self.transformer)
        allocate = functools.partial(static_step.allocate, shape, plan.kind, model, self.device, self.dtype)
        entry = graphs.entry(shape, allocate) if graphs is not None else None
        buf = allocate() if entry is None else entry.buffers
        static_step.load(buf, latents, text, cond, plan, scales, lambda: self._randn(latents.shape, generator))
        step = functools.partial(static_step.run_step, buf, model)
        run = step if entry is None else functools.partial(graphs.run_step, entry, step)
        steps = range(run_steps)
        if progress:
            from tqdm.auto import tqdm
            steps = tqdm(steps, desc="denoising", unit="step")
        for i in steps:
            run()
            if callback is not None:  # the sampler's own buffer, overwritten by the next step
                callback(i, plan.timesteps_host[i], buf.latents)
        bad_step = int(buf.first_bad)
        if bad_step >= 0:
            raise NonFiniteLatentsError(
                f"latents became NaN/Inf at denoising step {bad_step} (timestep {plan.timesteps_host[bad_step]}) "
                f"running {self.name} ({self.config.variant}) in {self.dtype}; no video was written. "
                + {torch.float16: "fp16 overflows in this model: use bfloat16 or float32.",
                   torch.bfloat16: "Try float32 to see whether it is a precision problem."}.get(
                    self.dtype, "The weights or inputs (latents, embeddings) produce non-finite values."))
        # A cached shape's buffer is refilled by its next call: hand out a copy.
        return buf.latents if entry is None else buf.latents.clone()

    def _graph_cache(self) -> graph.GraphCache:
        if self.graphs is None:
            self.graphs = graph.GraphCache(functools.partial(graph.capture_cuda, device=self.device))
        return self.graphs

    def _tiling_keeps_size(self, mode: str, num_frames: int, height: int, width: int) -> bool:
        """Whether tiling this call's decode (and encode, with an image or video) keeps its size."""
        tiling, f = Tiling.for_vae(self.vae.config), self.vae.config.spatial_factor
        _, _, lh, lw = self._latent_shape(num_frames, height, width)
        return tiling.keeps_size(f, lh, lw, decode=True) and (
            mode == "t2v" or tiling.keeps_size(f, height, width, decode=False))

    def _tiling(self, vae_tiling: bool | str, projected_peak: Callable[[Tiling | None], int],
                keeps_size: bool = True) -> Tiling | None:
        """The VAE's spatial tiling for one call: True/False as asked; "auto" tiles exactly when the
        projected peak of the untiled call does not fit in what the device has free (read after the
        other components were offloaded), and the tiles keep the output size (else it runs untiled,
        with one warning line)."""
        if vae_tiling is False:
            return None
        tiling = Tiling.for_vae(self.vae.config)
        if vae_tiling is True:
            return tiling
        if not choose_tiling(projected_peak(None), free_device_bytes(self.device)):
            return None
        if not keeps_size:
            log.warning("cvfast: the VAE would need tiling to fit in memory, but its tiles do not fit this size "
                        "exactly (they would change the output size); running untiled")
            return None
        return tiling

    def decode(self, latents: torch.Tensor, vae_tiling: bool | str = "auto") -> torch.Tensor | None:
        """(B, F, C, h, w) latents -> (B, 3, frames, H, W) video in [-1, 1] (unclamped). In a parallel
        job every rank calls it: the tiles are spread over the ranks (`cvfast.parallel.decode`) and
        rank 0 gets the video, the others None."""
        self._use("vae")
        vae_dtype = next(self.vae.parameters()).dtype
        z = (latents.permute(0, 2, 1, 3, 4) / self.vae.config.scaling_factor).to(vae_dtype)
        if self.parallel is not None:
            with self.parallel.scope():
                return self.parallel.decode(self.vae, z, vae_tiling)
        _, _, frames, h, w = z.shape
        keeps = Tiling.for_vae(self.vae.config).keeps_size(self.vae.config.spatial_factor, h, w, decode=True)
        tiling = self._tiling(vae_tiling, lambda t: projected_decode_peak_bytes(
            self.vae.config, frames, h, w, vae_dtype, tiling=t, batch=z.shape[0]), keeps)
        return self.vae.decode(z, tiling=tiling)

    # -- the public call ----------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompt=None, *, negative_prompt=None, prompt_embeds=None, negative_prompt_embeds=None,
                 image=None, image_noise_sigma: float | str | None = None, video=None, strength: float = 0.8,
                 num_frames: int | None = None, height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 6.0, use_dynamic_cfg: bool = False,
                 seed: int | None = None, generator: torch.Generator | None = None,
                 latents: torch.Tensor | None = None, max_sequence_length: int | None = None,
                 vae_tiling: bool | str = "auto", output_type: str = "np", callback: Callable | None = None,
                 progress: bool = True, allow_untrained_size: bool = False,
                 cuda_graph: bool | str | None = None) -> GenerationResult | None:
        """Generate video(s) for `prompt`.

        image: image-to-video (I2V models): a PIL image, uint8 array (H, W, 3) or float tensor
        (3, H, W) in [0, 1], resized to height x width when needed; image_noise_sigma: the SAT
        engine's first-frame noise augmentation (None: off, as diffusers; a float; "sample").
        video: video-to-video (T2V models): PIL frames or a uint8 array (F, H, W, 3); `strength` in
        (0, 1] picks how much of the schedule runs. `seed=s` gives the same video as diffusers'
        pipeline for the mode called with `generator=torch.Generator("cpu").manual_seed(s)`.
        `callback(step, timestep, latents)` runs after each step; `latents` is the sampler's buffer,
        overwritten by the next step (clone it to keep it). cuda_graph: False, True or "auto"
        (None: the pipeline's, from `load()`); True replays each step from a CUDA graph captured on
        the second call at a shape (`cvfast/sampler/graph.py`). Bad arguments raise
        `CVFastInputError` before any work starts. In a parallel job (load(parallel=...)) every rank
        calls it with the same arguments; rank 0's seed or generator state is every rank's, rank 0
        alone shows progress, runs `callback` and returns the result, the other ranks return None.
        """
        req = self._validate(prompt=prompt, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
                             negative_prompt_embeds=negative_prompt_embeds, image=image,
                             image_noise_sigma=image_noise_sigma, video=video, strength=strength,
                             num_frames=num_frames, height=height, width=width,
                             num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                             use_dynamic_cfg=use_dynamic_cfg, seed=seed, generator=generator, latents=latents,
                             max_sequence_length=max_sequence_length, vae_tiling=vae_tiling,
                             output_type=output_type, allow_untrained_size=allow_untrained_size,
                             cuda_graph=cuda_graph)
        if self.parallel is None:
            return self._generate(req, seed, generator, latents, callback, progress)
        with self.parallel.scope():
            return self._generate(req, seed, generator, latents, callback, progress)

    def _generate(self, req: _Request, seed: int | None, generator: torch.Generator | None,
                  latents: torch.Tensor | None, callback: Callable | None, progress: bool) -> GenerationResult | None:
        """The work of a validated `generate` call (on a parallel pipeline, inside its failure scope)."""
        if generator is None:
            seed = random.randrange(2 ** 63) if seed is None else int(seed)
            generator = torch.Generator("cpu").manual_seed(seed)
        main = self.parallel is None or self.parallel.is_main
        if self.parallel is not None:
            seed = self.parallel.same_randomness(seed, generator)
            progress, callback = progress and main, callback if main else None
        stages = _StageMeter(self)
        with stages("text_encoding"):
            text = self.encode_prompts(req.text)
        cond = None
        if req.mode != "t2v":
            with stages("encoding"):
                latents, cond = self._initial_latents(req, generator, latents)
        with stages("denoising"):
            if req.mode == "t2v":
                latents, _ = self._initial_latents(req, generator, latents)
            latents = self.denoise(latents, text, req, generator, callback, progress, cond,
                                   self._graph_cache() if req.cuda_graph else None)
        fps = self.defaults["fps"]
        if req.output_type == "latent":
            return GenerationResult(latents, stages.timings, fps, seed, stages.peaks) if main else None
        with stages("decoding"):
            extra = self._extra_latent_frames(req.num_frames) if req.mode != "v2v" else 0
            video = self.decode(latents[:, extra:], req.vae_tiling)
            if video is None:  # another rank of a parallel job has the video
                return None
            video = (video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)  # (B, F, 3, H, W)
            if not torch.isfinite(video).all():
                raise NonFiniteLatentsError(f"the VAE decode of {self.name} produced NaN/Inf in {self.dtype}; "
                                            "no video was written. Try float32.")
            frames = video.permute(0, 1, 3, 4, 2).cpu().numpy() if req.output_type == "np" else video
        return GenerationResult(frames, stages.timings, fps, seed, stages.peaks)


class _StageMeter:
    """Times each stage (synchronised on CUDA) and records its peak device memory."""

    def __init__(self, pipe: Pipeline):
        self.pipe, self.timings, self.peaks = pipe, {}, {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        cuda = self.pipe.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.pipe.device)
        start = time.perf_counter()
        yield
        self.pipe._sync()
        self.timings[name] = time.perf_counter() - start
        if cuda:
            self.peaks[name] = torch.cuda.max_memory_allocated(self.pipe.device) / 2 ** 30
