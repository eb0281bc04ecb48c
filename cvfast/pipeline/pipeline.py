"""Generation: validate, encode text (and the image or video), denoise, decode.

Three modes share one path: text-to-video; image-to-video (an I2V model: the image's latent is
concatenated to the noise on channels); video-to-video (a T2V model: the video's latent, noised to
the timestep `strength` selects, replaces the initial noise). Latents keep the sampler's layout
(batch, latent_frames, channels, h, w), scaled as the transformer sees them, from the VAE's encoder
to its decoder.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
from typing import Callable

import torch

from ..core.errors import CVFastInputError, NonFiniteLatentsError, bad_arg
from ..core.files import check_writable, write_text
from ..core.progress import progress as log_progress
from ..models.config import TransformerConfig
from ..models.geometry import latent_shape, padding_frames
from ..models.vae_tiling import decide
from ..runtime import Runtime
from ..sampler import cache as step_cache
from ..sampler import graph, loop, schedulers
from ..sampler.static_step import OFS
from .call import StepEnd, call_output, call_size, check_call, per_video
from .components import Components
from .media import to_vae_input
from .request import Request, Text, validate, validate_text
from .result import GenerationResult, StageMeter


class Pipeline:
    """A loaded CogVideoX model. Build with `cvfast.load()`: its one assembler (`cvfast.build`) hands
    over the built components and how they run; nothing is swapped in afterwards."""

    def __init__(self, components: Components, runtime: Runtime):
        self.components, self.runtime = components, runtime
        self.name, self.transformer, self.vae = components.name, components.transformer, components.vae
        self.text_encoder, self.scheduler, self.ops = components.text_encoder, components.scheduler, components.ops
        self.defaults = components.defaults
        self.device, self.dtype, self.cuda_graph = runtime.device, runtime.dtype, runtime.cuda_graph
        self.offload, self.parallel = runtime.offload.mode, runtime.parallel
        # What the sampler step calls: the transformer, or a CFG-parallel rank's share of it.
        self.denoiser = self.transformer if self.parallel is None else self.parallel.denoiser(self.transformer)
        self.graphs: graph.GraphCache | None = None  # the step graphs, made on first use (cuda_graph)
        # diffusers' interrupt flag: a callback_on_step_end sets it to end the call's loop; each call clears it.
        self._interrupt = False

    @property
    def interrupt(self) -> bool:
        """Whether a callback asked the running call to stop after its step (diffusers' `interrupt`)."""
        return self._interrupt

    @property
    def config(self) -> TransformerConfig:
        """The transformer's config."""
        return self.transformer.cfg

    def backends(self) -> dict[str, str]:
        """Which backend each op got, e.g. {'attention': 'sdpa', 'rope': 'reference', ...}."""
        return self.ops.names()

    def __repr__(self) -> str:
        return (f"Pipeline({self.name!r}, variant={self.config.variant}, device={self.device}, "
                f"dtype={self.dtype}, scheduler={self.scheduler.kind}, offload={self.offload})")

    # -- LoRA -------------------------------------------------------------------------------------

    def load_lora(self, path, scale: float = 1.0, *, weight_name: str | None = None, adapter_name: str | None = None,
                  trust_pickle: bool = False) -> list[str]:
        """Merge a LoRA into the transformer's weights: W += scale * alpha / r * B @ A. path: a
        diffusers/PEFT-format .safetensors, a folder holding one (diffusers' file name
        `pytorch_lora_weights.safetensors` among several, or `weight_name`), a hub id (fetched: that
        file, else its safetensors), or SAT matrix_A/matrix_B adapters (a SAT checkpoint directory,
        its .pt, or a .safetensors with SAT names; see `cvfast.checkpoints.lora.read_adapter`).
        adapter_name: default `default_<n>`; trust_pickle: as in `cvfast.load`. Several LoRAs stack;
        `set_adapters` changes which are active and their weights, `unload_lora` removes them (the
        base weights come back bit for bit). Returns the parameters it changed."""
        return self._adapters(str(path)).load(path, scale, trust_pickle, adapter_name=adapter_name,
                                              weight_name=weight_name)

    def set_adapters(self, adapter_names, adapter_weights=None) -> None:
        """Make exactly these loaded adapters active (a name or a list), with these weights (a number,
        a list, or None: 1.0 each), as diffusers' `set_adapters`; the others stay loaded, inactive."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        weights = adapter_weights if isinstance(adapter_weights, (list, tuple)) else \
            [1.0 if adapter_weights is None else adapter_weights] * len(names)
        if len(weights) != len(names):
            raise bad_arg("adapter_weights", adapter_weights, f"one weight per adapter name ({len(names)})")
        self._adapters("set_adapters").set_active(dict(zip(names, weights)))

    def active_adapters(self) -> dict[str, float]:
        """{adapter name: weight} of the LoRAs merged now."""
        return {} if self.components.loras is None else self.components.loras.active()

    def unload_lora(self, adapter_name: str | None = None) -> None:
        """Remove one adapter (or all, the default) and put back the weights without it (the base
        weights bit for bit when none is left)."""
        if self.components.loras is not None:
            self.components.loras.unload(adapter_name)

    def _adapters(self, source: str):
        if self.components.loras is None and self.runtime.precision != "bf16":
            raise CVFastInputError(f"{source}: a LoRA cannot be merged into FP8 weights (precision="
                                   f"{self.runtime.precision!r}); load with precision='bf16' or 'fp8-attention' "
                                   "to use LoRAs")
        if self.components.loras is None:
            raise CVFastInputError(f"{source}: a LoRA cannot be merged into a TensorRT engine; merge it into the "
                                   "model (load_lora on a PyTorch pipeline), then build the engine from that")
        return self.components.loras

    # -- placement (offload="model") ----------------------------------------------------------

    def modules(self) -> dict[str, torch.nn.Module]:
        """The components' modules by name, as offloading moves them."""
        return {"text_encoder": self.text_encoder.model, "transformer": self.transformer, "vae": self.vae}

    def placement(self) -> dict[str, str]:
        """Where each component's weights are now, e.g. {'transformer': 'cpu', 'vae': 'cuda:0', ...}."""
        return {name: str(next(m.parameters()).device) for name, m in self.modules().items()}

    def _use(self, name: str) -> None:
        self.runtime.offload.use(self.modules(), name)

    # -- stages -------------------------------------------------------------------------------

    def request(self, prompt=None, **arguments) -> Request:
        """The validated Request of a generate() call with these arguments (generate()'s names and
        defaults), without running it; CVFastInputError names the first argument it cannot take."""
        return validate(self.components, self.runtime, prompt=prompt, **arguments)

    def encode_prompts(self, text: Text) -> torch.Tensor:
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
        return self.encode_prompts(validate_text(self.components, prompt, negative_prompt, None, None,
                                                 guidance_scale, max_sequence_length))

    def randn(self, shape, generator: torch.Generator | list[torch.Generator]) -> torch.Tensor:
        """Gaussian noise drawn on the generator's device in the pipeline dtype, then moved: what
        diffusers' randn_tensor does, so a CPU generator gives the same numbers on every device. A
        list of generators draws one batch element from each, in order (as randn_tensor does)."""
        if isinstance(generator, list):
            return torch.cat([self.randn((1, *shape[1:]), g) for g in generator])
        return torch.randn(shape, generator=generator, device=generator.device, dtype=self.dtype).to(self.device)

    def encode_frames(self, req: Request, generator: torch.Generator | list[torch.Generator]) -> torch.Tensor:
        """The conditioning frames through the VAE encoder and a posterior draw, as the sampler's
        latents (1, latent_frames, C, h, w) in the pipeline dtype (`CogVideoXVAE.encode_latents`);
        with a list of generators one draw (and batch element) per generator."""
        self._use("vae")
        x = to_vae_input("image" if req.mode == "i2v" else "video", req.frames, req.height, req.width,
                         self.device, self.vae.dtype, req.fit)
        generators = generator if isinstance(generator, list) else [generator]
        return torch.cat([self.encode_draw(x, req, g) for g in generators])

    def encode_draw(self, x: torch.Tensor, req: Request, generator: torch.Generator) -> torch.Tensor:
        """One posterior draw of the VAE input x (1, 3, F, H, W) with `generator` (after the SAT
        first-frame noise when asked): (1, latent_frames, C, h, w) in the pipeline dtype."""
        if req.image_noise_sigma is not None:
            # The SAT engine's first-frame augmentation: Gaussian pixel noise with a log-normal sigma
            # (log sigma ~ N(-3, 0.5)), or a fixed sigma.
            sigma = req.image_noise_sigma
            if sigma == "sample":
                sigma = math.exp(-3.0 + 0.5 * torch.randn((), generator=generator).item())
            noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=self.vae.dtype)
            x = x + sigma * noise.to(self.device)
        batch, _, frames, height, width = x.shape
        tiling = decide(self.vae.config, req.vae_tiling, decode=False, batch=batch, frames=frames, height=height,
                        width=width, dtype=self.vae.dtype, device=self.device)
        return self.vae.encode_latents(x, generator, tiling=tiling, as_image=req.mode == "i2v").to(self.dtype)

    def initial_latents(self, req: Request, generator: torch.Generator, latents: torch.Tensor | None = None,
                        encoded: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the latents the sampler starts from (B, F, C, h, w), image latents to concatenate on
        channels or None). latents: the caller's noise (text- and image-to-video); encoded: the
        conditioning frames' latents (`encode_frames`). The generator is consumed in diffusers' order:
        the posterior draw (in encode_frames), then the noise."""
        if req.mode == "v2v":
            clean = encoded.expand(req.batch, -1, -1, -1, -1)
            sampler = req.scheduler or self.scheduler
            t0 = schedulers.timesteps(sampler, req.steps)[req.start]
            return schedulers.add_noise(sampler, clean, self.randn(clean.shape, generator), int(t0)), None
        shape = (req.batch, *latent_shape(self.config, self.vae.config, req.num_frames, req.height, req.width))
        noise = self.randn(shape, generator) if latents is None else latents.to(self.device, self.dtype)
        if req.mode == "t2v":
            return noise, None
        # The image is the first latent frame; the rest of the conditioning is zeros. (1.5 models pad
        # the latent count to a multiple of their temporal patch, so no extra front padding.)
        cond = torch.cat((encoded, encoded.new_zeros(encoded.shape[0], shape[1] - 1, *encoded.shape[2:])), dim=1)
        return noise, cond.expand(req.batch, -1, -1, -1, -1)

    def denoise(self, latents: torch.Tensor, text: torch.Tensor, req: Request, generator,
                on_step: Callable | None, progress: bool, cond: torch.Tensor | None = None,
                graphs: graph.GraphCache | None = None, cache: step_cache.CacheRun | None = None) -> torch.Tensor:
        """latents (B, F, C, h, w) -> denoised latents, same shape and dtype, through `sampler.loop`.
        cond: image latents concatenated on channels at every step (image-to-video); graphs: the
        CUDA-graph cache to replay the step from (`cvfast/sampler/graph.py`), or None (eager); cache:
        a step cache's run (`cvfast/sampler/cache.py`), its schedule set here and its record filled;
        on_step: as `sampler.loop.denoise` takes it."""
        self._use("transformer")
        plan = schedulers.make_plan(req.scheduler or self.scheduler, req.steps, self.device, req.start)
        if cache is not None:
            cache.schedule = self.cache_schedule(cache.policy, plan, text.shape[0])
        return loop.denoise(self.denoiser, latents, text, cond, plan, req.guidance, req.dynamic_cfg,
                            lambda: self.randn(latents.shape, generator), graphs=graphs, on_step=on_step,
                            progress=progress, label=f"{self.name} ({self.config.variant})", cache=cache)

    def cache_schedule(self, policy, plan: schedulers.StepPlan, rows: int) -> list[bool] | None:
        """Whether each step computes, for the policies that know before the loop (None for
        FirstBlockCache). TeaCache's comes from the conditioning vector each step's batch of `rows`
        gets, computed as the step computes it."""
        if isinstance(policy, step_cache.FirstBlockCache):
            return None
        if not isinstance(policy, step_cache.TeaCache):
            return policy.schedule(len(plan.timesteps_host))
        ofs = torch.full((1,), OFS, device=self.device, dtype=self.dtype) if self.config.ofs_embed_dim else None
        return policy.schedule([self.transformer.conditioning(plan.timesteps[i:i + 1].expand(rows), self.dtype, ofs)
                                for i in range(len(plan.timesteps_host))])

    def decode(self, latents: torch.Tensor, vae_tiling: bool | str = "auto") -> torch.Tensor | None:
        """(B, F, C, h, w) latents -> (B, 3, frames, H, W) video in [-1, 1] (unclamped), tiled as
        `vae_tiling.decide` says. In a parallel job every rank calls it: the tiles are spread over the
        ranks and rank 0 gets the video, the others None."""
        self._use("vae")
        if self.parallel is not None:
            with self.parallel.scope():
                return self.parallel.decode(self.vae, latents, vae_tiling)
        batch, frames, _, height, width = latents.shape
        tiling = decide(self.vae.config, vae_tiling, decode=True, batch=batch, frames=frames, height=height,
                        width=width, dtype=self.vae.dtype, device=self.device)
        return self.vae.decode_latents(latents, tiling=tiling)

    def calibrate_cache(self, prompt=None, *, out=None, **arguments) -> list[float]:
        """MagCache's per-step ratios for this model: one uncached generation (generate()'s arguments;
        the latents are not decoded) that records at each step the mean ratio of the blocks' video
        residual norms to the previous step's (diffusers' MagCache calibration). out: also write them
        as JSON there, for MagCache(ratios=PATH) (command line: --cache magcache:THRESHOLD:PATH)."""
        if self.parallel is not None:
            raise bad_arg("parallel", str(self.parallel.config), "a single process for calibrate_cache (each rank "
                          "holds only a share of the residual)")
        if "cache" in arguments or "output_type" in arguments:
            raise bad_arg("cache" if "cache" in arguments else "output_type", "given",
                          "left out: calibrate_cache runs uncached and keeps the latents")
        path = check_writable(out) if out is not None else None
        result = self.generate(prompt, cache=step_cache.Calibration(), output_type="latent", **arguments)
        ratios = result.cache["ratios"] if result is not None else []
        if path is not None:
            write_text(path, json.dumps({"model": self.name, "variant": self.config.variant,
                                                "scheduler": arguments.get("scheduler") or self.scheduler.kind,
                                                "steps": len(ratios),
                                                "ratios": ratios}, indent=1) + "\n")
        return ratios

    def graph_cache(self) -> graph.GraphCache:
        """The pipeline's CUDA-graph cache of the sampler step, made on first use."""
        if self.graphs is None:
            self.graphs = graph.GraphCache(lambda step: graph.capture_cuda(step, self.device))
        return self.graphs

    # -- the public calls ---------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, prompt=None, negative_prompt=None, height: int | None = None, width: int | None = None,
                 num_frames: int | None = None, num_inference_steps: int = 50, timesteps=None,
                 guidance_scale: float = 6.0, use_dynamic_cfg: bool = False, num_videos_per_prompt: int = 1,
                 eta: float = 0.0, generator=None, latents: torch.Tensor | None = None,
                 prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                 output_type: str = "pil", return_dict: bool = True, attention_kwargs: dict | None = None,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",),
                 max_sequence_length: int = 226, *, image=None, video=None, strength: float = 0.8):
        """diffusers' CogVideoX pipelines' call, with their names, defaults and outputs
        (`cvfast/pipeline/call.py` says where it differs): `PipelineOutput(frames)`, or `(frames,)`
        with return_dict=False. image: image-to-video models; video, strength: video-to-video.
        `generate()` is cvfast's own call (seeds, timings, caches, CUDA graphs); both run `run`."""
        videos, lora_scale = check_call(timesteps, eta, num_videos_per_prompt, output_type, attention_kwargs,
                                        return_dict)
        mode = "i2v" if image is not None else "v2v" if video is not None else "t2v"
        num_frames, height, width = call_size(self.config, self.vae.config, mode, num_frames, height, width)
        req = self.request(per_video(prompt, videos), negative_prompt=per_video(negative_prompt, videos),
                           prompt_embeds=per_video(prompt_embeds, videos),
                           negative_prompt_embeds=per_video(negative_prompt_embeds, videos), image=image, video=video,
                           strength=strength, num_frames=num_frames, height=height, width=width,
                           num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                           use_dynamic_cfg=use_dynamic_cfg, generator=generator, latents=latents,
                           max_sequence_length=max_sequence_length, output_type="np" if output_type == "pil" else
                           output_type, fit="stretch")
        on_step = None
        if callback_on_step_end is not None:
            if self.parallel is not None:
                raise bad_arg("callback_on_step_end", "a callback", "None in a parallel job (each rank holds its "
                              "own latents: an edit on one rank would split them)")
            on_step = StepEnd(self, callback_on_step_end, callback_on_step_end_tensor_inputs, req.batch,
                              req.guidance > 1.0)
        self._interrupt = False
        with self.loras_scaled(lora_scale):
            result = self.run(req, None, generator, latents, on_step, progress=True)
        return None if result is None else call_output(result.frames, output_type, return_dict)

    @contextlib.contextmanager
    def loras_scaled(self, factor: float):
        """Within the block, every active LoRA's weight times `factor` (diffusers' attention_kwargs
        scale); after it, the weights exactly as before. Without LoRAs there is nothing to scale."""
        active = self.active_adapters()
        if factor == 1.0 or not active:
            yield
            return
        self.components.loras.set_active({name: weight * factor for name, weight in active.items()})
        try:
            yield
        finally:
            self.components.loras.set_active(active)

    @torch.no_grad()
    def generate(self, prompt=None, *, negative_prompt=None, prompt_embeds=None, negative_prompt_embeds=None,
                 image=None, image_noise_sigma: float | str | None = None, video=None, strength: float = 0.8,
                 num_frames: int | None = None, height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 6.0, use_dynamic_cfg: bool = False,
                 seed: int | None = None, generator: torch.Generator | None = None,
                 latents: torch.Tensor | None = None, max_sequence_length: int | None = None,
                 vae_tiling: bool | str = "auto", output_type: str = "np", callback: Callable | None = None,
                 progress: bool = True, allow_untrained_size: bool = False,
                 cuda_graph: bool | str | None = None, cache=None, fit: str = "crop",
                 scheduler: str | None = None) -> GenerationResult | None:
        """Generate video(s) for `prompt`.

        image: image-to-video (I2V models): a PIL image, uint8 array (H, W, 3) or float tensor
        (3, H, W) in [0, 1], resized to height x width when needed; image_noise_sigma: the SAT
        engine's first-frame noise augmentation (None: off, as diffusers; a float; "sample").
        video: video-to-video (T2V models): PIL frames or a uint8 array (F, H, W, 3); `strength` in
        (0, 1] picks how much of the schedule runs; its first num_frames frames are used (default: as
        many as the model takes), at its own size rounded down to what the model takes unless
        height/width are given (a warning line says what was adapted). fit: how an image or video of
        another aspect than height x width is fitted: "crop" (its centre), "pad" (black borders) or
        "stretch" (resized as it is, as diffusers does). `seed=s` gives the same video as diffusers'
        pipeline for the mode called with `generator=torch.Generator("cpu").manual_seed(s)`.
        `callback(step, timestep, latents)` runs after each step; `latents` is the sampler's buffer,
        overwritten by the next step (clone it to keep it). cuda_graph: False, True or "auto"
        (None: the pipeline's, from `load()`); True replays each step from a CUDA graph captured on
        the second call at a shape (`cvfast/sampler/graph.py`). cache: a step cache that skips the
        transformer's blocks on some steps (None: the pipeline's, from `load()`; False: none; a spec
        such as "teacache:0.2", "fbcache:0.05", "magcache" with ratios, or a cvfast.TeaCache /
        FirstBlockCache / MagCache: `cvfast/sampler/cache.py`); result.cache says which steps ran.
        scheduler: None (the pipeline's) or "ddim" / "dpm" for this call, with the model's scheduler
        settings. Bad arguments raise
        `CVFastInputError` before any work starts (`request()` checks them alone). In a parallel job
        (load(parallel=...)) every rank calls it with the same arguments; rank 0's seed or generator state is every rank's, rank 0
        alone shows progress, runs `callback` and returns the result, the other ranks return None.
        """
        req = self.request(prompt, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
                           negative_prompt_embeds=negative_prompt_embeds, image=image,
                           image_noise_sigma=image_noise_sigma, video=video, strength=strength,
                           num_frames=num_frames, height=height, width=width,
                           num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                           use_dynamic_cfg=use_dynamic_cfg, seed=seed, generator=generator, latents=latents,
                           max_sequence_length=max_sequence_length, vae_tiling=vae_tiling,
                           output_type=output_type, allow_untrained_size=allow_untrained_size,
                           cuda_graph=cuda_graph, cache=cache, fit=fit, scheduler=scheduler)
        on_step = None if callback is None else (lambda i, t, buf: callback(i, t, buf.latents))
        return self.run(req, seed, generator, latents, on_step, progress)

    def run(self, req: Request, seed: int | None, generator, latents: torch.Tensor | None, on_step: Callable | None,
            progress: bool) -> GenerationResult | None:
        """A validated request's generation (`generate` and the diffusers-style call share it; on a
        parallel pipeline inside its failure scope). generator: one, a list (one per video), or None
        (from `seed`, or a random seed); on_step: as `sampler.loop.denoise` takes it."""
        if self.parallel is None:
            return self._generate(req, seed, generator, latents, on_step, progress)
        with self.parallel.scope():
            return self._generate(req, seed, generator, latents, on_step, progress)

    def _generate(self, req: Request, seed: int | None, generator, latents: torch.Tensor | None,
                  on_step: Callable | None, progress: bool) -> GenerationResult | None:
        if generator is None:
            seed = random.randrange(2 ** 63) if seed is None else int(seed)
            generator = torch.Generator("cpu").manual_seed(seed)
        main = self.parallel is None or self.parallel.is_main
        if self.parallel is not None:
            seed = self.parallel.same_randomness(seed, generator)
            progress, on_step = progress and main, on_step if main else None
        stages = StageMeter(self.device)
        with stages("text_encoding"):
            text = self.encode_prompts(req.text)
        encoded = None
        if req.mode != "t2v":
            with stages("encoding"):
                encoded = self.encode_frames(req, generator)
        cache = step_cache.CacheRun(req.cache) if req.cache is not None else None
        with stages("denoising"):
            latents, cond = self.initial_latents(req, generator, latents, encoded)
            latents = self.denoise(latents, text, req, generator, on_step, progress, cond,
                                   self.graph_cache() if req.cuda_graph else None, cache)
        fps, report = self.defaults["fps"], cache.report() if cache is not None else None
        if req.output_type == "latent":
            return GenerationResult(latents, stages.timings, fps, seed, stages.peaks, report) if main else None
        with stages("decoding"):
            padding = padding_frames(self.config, self.vae.config, req.num_frames) if req.mode != "v2v" else 0
            if progress:
                log_progress.info("decoding %d latent frames into %d frames at %dx%d ...", latents.shape[1] - padding,
                                  req.num_frames, req.height, req.width)
            video = self.decode(latents[:, padding:], req.vae_tiling)
            if video is None:  # another rank of a parallel job has the video
                return None
            frames = to_frames(video, req.output_type, f"the VAE decode of {self.name} produced NaN/Inf in "
                               f"{self.dtype}; no video was written. Try float32.")
        return GenerationResult(frames, stages.timings, fps, seed, stages.peaks, report)


def to_frames(video: torch.Tensor, output_type: str, nonfinite: str):
    """The VAE's (B, 3, F, H, W) video in [-1, 1] -> "np" (B, F, H, W, 3) float32 in [0, 1] on the host
    or "pt" (B, F, 3, H, W); NonFiniteLatentsError(`nonfinite`) instead of a black video."""
    video = (video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)  # (B, F, 3, H, W)
    if not torch.isfinite(video).all():
        raise NonFiniteLatentsError(nonfinite)
    return video.permute(0, 1, 3, 4, 2).cpu().numpy() if output_type == "np" else video
