"""The denoising loop: the static step (`static_step.run_step`) run once per step, eagerly or replayed
from a CUDA graph cached per shape (`graph.py`), with CFG and its dynamic schedule."""
from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from ..core.errors import NonFiniteLatentsError
from . import graph, schedulers, static_step

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
            graphs: graph.GraphCache | None = None, callback: Callable | None = None, progress: bool = False,
            label: str = "the model") -> torch.Tensor:
    """latents (B, F, C, h, w) -> denoised latents, same shape and dtype.

    denoiser: the transformer's call contract (`CogVideoXTransformer`, a TensorRT engine, a parallel
    wrapper); text: (copies * B, L, D) embeddings, [negative; positive] with CFG (guidance > 1); cond:
    image latents concatenated on channels at every step (image-to-video), or None; draw(): one
    Gaussian draw of the latents' shape (the DPM noise, all drawn before the first step). Each step
    runs over buffers allocated once for the call, or with `graphs` once per cached shape, whose step
    is then captured and replayed. callback(step, timestep, latents) after each step, latents being
    the loop's buffer (overwritten by the next step). Raises NonFiniteLatentsError (naming `label`)
    when the latents became NaN/Inf, after the loop (one device read)."""
    copies = 2 if guidance > 1.0 else 1
    shape = static_step.StepShape.of(latents, text, cond, copies, len(plan.timesteps_host))
    allocate = functools.partial(static_step.allocate, shape, plan.kind, denoiser, latents.device, latents.dtype)
    entry = graphs.entry(shape, allocate) if graphs is not None else None
    buf = allocate() if entry is None else entry.buffers
    static_step.fill(buf, latents, text, cond, plan, guidance_scales(plan, guidance, dynamic), draw)
    step = functools.partial(static_step.run_step, buf, denoiser)
    run = step if entry is None else functools.partial(graphs.run_step, entry, step)
    steps = range(len(plan.timesteps_host))
    for i in tqdm(steps, desc="denoising", unit="step") if progress else steps:
        run()
        if callback is not None:
            callback(i, plan.timesteps_host[i], buf.latents)
    bad_step = int(buf.first_bad)
    if bad_step >= 0:
        raise NonFiniteLatentsError(
            f"latents became NaN/Inf at denoising step {bad_step} (timestep {plan.timesteps_host[bad_step]}) "
            f"running {label} in {latents.dtype}; no video was written. "
            + NONFINITE_HINTS.get(latents.dtype, "The weights or inputs (latents, embeddings) produce non-finite "
                                                 "values."))
    # A cached shape's buffer is refilled by its next call: hand out a copy.
    return buf.latents if entry is None else buf.latents.clone()
