"""The denoising loop: the static step (`static_step.run_step`) run once per step, eagerly or replayed
from a CUDA graph cached per shape (`graph.py`), with CFG and its dynamic schedule, and optionally a
step cache (`cache.py`) that skips the transformer's blocks on some steps."""
from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from ..core.errors import NonFiniteLatentsError
from . import graph, schedulers, static_step
from .cache import CacheRun, MagCache, run_after_first_block, run_first_block, run_residual_step

# What a non-finite step most likely means, per latent dtype.
NONFINITE_HINTS = {torch.float16: "fp16 overflows in this model: use bfloat16 or float32.",
                   torch.bfloat16: "Try float32 to see whether it is a precision problem."}


def dynamic_guidance(scale: float, timestep: int, num_steps: int) -> float:
    """CogVideoX's dynamic CFG: the scale ramps up as timesteps fall, as its pipelines compute it."""
    return 1 + scale * ((1 - math.cos(math.pi * ((num_steps - timestep) / num_steps) ** 5.0)) / 2)


def guidance_scales(plan: schedulers.StepPlan, guidance: float, dynamic: bool) -> list[float]:
    """The guidance scale of each step that runs; dynamic CFG counts the steps that actually run (as
    diffusers does for video-to-video)."""
    run_steps = len(plan.timesteps_host)
    return [dynamic_guidance(guidance, t, run_steps) if dynamic else guidance for t in plan.timesteps_host]


def denoise(denoiser, latents: torch.Tensor, text: torch.Tensor, cond: torch.Tensor | None,
            plan: schedulers.StepPlan, guidance: float, dynamic: bool, draw: Callable[[], torch.Tensor], *,
            graphs: graph.GraphCache | None = None, on_step: Callable | None = None, progress: bool = False,
            label: str = "the model", cache: CacheRun | None = None) -> torch.Tensor:
    """latents (B, F, C, h, w) -> denoised latents, same shape and dtype.

    denoiser: the transformer's call contract (`CogVideoXTransformer`, a TensorRT engine, a parallel
    wrapper); text: (copies * B, L, D) embeddings, [negative; positive] with CFG (guidance > 1); cond:
    image latents concatenated on channels at every step (image-to-video), or None; draw(): one
    Gaussian draw of the latents' shape (the DPM noise, all drawn before the first step). Each step
    runs over buffers allocated once for the call, or with `graphs` once per cached shape, whose step
    (each variant of it, with a cache) is then captured and replayed. cache: a step cache's run
    (`cache.py`), which records the steps that computed. on_step(step, timestep, buffers) after each step may
    read and overwrite the buffers (`static_step.StepBuffers`: the latents, the text embeddings)
    before the next step runs; when it returns True the loop ends there. Raises NonFiniteLatentsError
    (naming `label`) when the latents became NaN/Inf, after the loop (one device read)."""
    copies = 2 if guidance > 1.0 else 1
    shape = static_step.StepShape.of(latents, text, cond, copies, len(plan.timesteps_host),
                                     cache.policy.buffers if cache is not None else "", plan.kind)
    allocate = functools.partial(static_step.allocate, shape, plan.kind, denoiser, latents.device, latents.dtype)
    entry = graphs.entry(shape, allocate) if graphs is not None else None
    buf = allocate() if entry is None else entry.buffers

    def run(step: Callable[[], None], part: str = "step") -> None:
        if entry is None:
            step()
        else:
            graphs.run_step(entry, step, part)

    static_step.fill(buf, latents, text, cond, plan, guidance_scales(plan, guidance, dynamic), draw)
    steps = range(len(plan.timesteps_host))
    for i in tqdm(steps, desc="denoising", unit="step") if progress else steps:
        if cache is None:
            run(functools.partial(static_step.run_step, buf, denoiser))
        else:
            cache.record(i, cached_step(buf, denoiser, cache, i, run))
        if on_step is not None and on_step(i, plan.timesteps_host[i], buf):
            break
    bad_step = int(buf.first_bad)
    if bad_step >= 0:
        raise NonFiniteLatentsError(
            f"latents became NaN/Inf at denoising step {bad_step} (timestep {plan.timesteps_host[bad_step]}) "
            f"running {label} in {latents.dtype}; no video was written. "
            + NONFINITE_HINTS.get(latents.dtype, "The weights or inputs (latents, embeddings) produce non-finite "
                                                 "values."))
    if cache is not None:
        cache.finish(buf.cache)
    # A cached shape's buffer is refilled by its next call: hand out a copy.
    return buf.latents if entry is None else buf.latents.clone()


def cached_step(buf: static_step.StepBuffers, denoiser, cache: CacheRun, i: int, run) -> bool:
    """Step i with the cache, its variants run through `run(step, part)`; whether it computed. A
    scheduled cache knows before the loop; FirstBlockCache reads block 0's residual change (one
    number, one device sync per step) between its two parts."""
    if cache.schedule is not None:
        compute = cache.schedule[i]
        run(functools.partial(run_residual_step, buf, denoiser, not compute, isinstance(cache.policy, MagCache)),
            "compute" if compute else "reuse")
        return compute
    run(functools.partial(run_first_block, buf, denoiser), "first-block")
    compute = cache.policy.computes(float(buf.cache.diff) if cache.computed_steps else None)
    run(functools.partial(run_after_first_block, buf, denoiser, not compute), "compute" if compute else "reuse")
    return compute
