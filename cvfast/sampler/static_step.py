"""The sampler step over static buffers.

Everything one denoising step reads or writes lives in device tensors allocated once per
`StepShape`: the latents, the transformer input, the text embeddings of both CFG branches, the
positional tables, the per-step timesteps, guidance scales (dynamic CFG precomputed) and scheduler
coefficients, the DPM scheduler's previous x0 and the noise each DPM step adds (drawn before the
first step). The step index is a device tensor that the step itself advances. A step is then a
fixed sequence of kernels: no `.item()`, no host values, no branch on device data, no host-to-device
copy, so a CUDA graph can capture it once and replay it (`graph.py`).

It is also the eager path: without a graph the pipeline calls `run_step` directly, so the graph
replays exactly the function the CPU tests compare bit for bit with the plain loop. A step cache
(`cache.py`) adds its buffers (`CacheBuffers`) and runs its own variants of the model call between
the same `step_inputs` and `step_update`.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from . import schedulers

# CogVideoX1.5-I2V's ofs conditioning: its pipelines (diffusers, SAT) always pass 2.0.
OFS = 2.0


@dataclass(frozen=True)
class StepShape:
    """What fixes the buffers, and so a captured graph: the graph cache's key."""
    latents: tuple[int, ...]   # (B, F, C, h, w)
    cond_channels: int         # image-latent channels concatenated to the input (image-to-video), else 0
    copies: int                # 2 with CFG (unconditional and conditional halves of the batch), else 1
    text: tuple[int, ...]      # (copies * B, L, D)
    steps: int                 # the denoising steps that run
    cache: str = ""            # the step cache's buffers (`CacheBuffers.KINDS`), "" without one
    kind: str = "ddim"         # the scheduler, whose update (and DPM's buffers) the step holds

    @classmethod
    def of(cls, latents: torch.Tensor, text: torch.Tensor, cond: torch.Tensor | None, copies: int,
           steps: int, cache: str = "", kind: str = "ddim") -> StepShape:
        return cls(tuple(latents.shape), 0 if cond is None else cond.shape[2], copies, tuple(text.shape), steps, cache,
                   kind)


@dataclass
class CacheBuffers:
    """A step cache's state between steps, in the transformer's stream layout (rows, n_text + video
    rows, D) and dtype. Which buffers exist depends on the kind:
    "residual" (TeaCache, MagCache): `residual` only; "first-block": also `first`, `first_residual`,
    `first_now`, `temb` and `diff`; "calibration": also `norms` and `ratios`."""
    KINDS = ("residual", "first-block", "calibration")
    residual: torch.Tensor                    # the blocks' output minus input, last computed step
    first: torch.Tensor | None = None         # the stream after block 0, this step
    first_now: torch.Tensor | None = None     # block 0's video residual, this step
    first_residual: torch.Tensor | None = None  # block 0's video residual, last computed step
    temb: torch.Tensor | None = None          # this step's conditioning, from the first part to the rest
    diff: torch.Tensor | None = None          # (1,): mean|r - r_prev| / mean|r_prev| of this step
    norms: torch.Tensor | None = None         # (rows, video rows) float32: last step's residual norms
    ratios: torch.Tensor | None = None        # (steps,) float32: each step's mean residual-norm ratio

    @classmethod
    def allocate(cls, kind: str, stream: tuple[int, int, int], n_text: int, time_dim: int, steps: int,
                 device: torch.device, dtype: torch.dtype) -> CacheBuffers:
        rows, length, dim = stream
        empty = functools.partial(torch.empty, device=device, dtype=dtype)
        video = (rows, length - n_text, dim)
        if kind == "first-block":
            return cls(empty(stream), first=empty(stream), first_now=empty(video), first_residual=empty(video),
                       temb=empty(rows, time_dim), diff=empty(1))
        if kind == "calibration":
            return cls(empty(stream), norms=empty(video[:2], dtype=torch.float32),
                       ratios=empty(steps, dtype=torch.float32))
        return cls(empty(stream))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (getattr(self, f.name) for f in fields(self))
                   if t is not None)


@dataclass
class StepBuffers:
    kind: str                           # the scheduler: "ddim" or "dpm"
    latents: torch.Tensor               # (B, F, C, h, w) pipeline dtype: the sample, updated in place
    model_in: torch.Tensor              # (copies * B, F, C + cond, h, w): the transformer input
    halves: tuple[torch.Tensor, ...]    # model_in's latent channels, one view per copy
    text: torch.Tensor                  # (copies * B, L, D) [negative; positive] with CFG
    tables: dict                        # the transformer's positional tables for this shape
    ofs: torch.Tensor | None            # (1,) for models with an ofs embedding
    timesteps: torch.Tensor             # (steps,) int64
    scales: torch.Tensor | None         # (steps,) float32 guidance scale of each step (CFG only)
    coef: torch.Tensor                  # (steps, 4 or 7) float32 scheduler coefficients (StepPlan.coef)
    noise: torch.Tensor | None          # (steps, B, F, C, h, w) pipeline dtype: the noise each DPM step adds
    prev_x0: torch.Tensor | None        # (B, F, C, h, w) float32: the DPM scheduler's previous x0
    step: torch.Tensor                  # (1,) int64: the index of the next step
    first_bad: torch.Tensor             # (1,) int64: the first step whose latents were not finite, or -1
    cache: CacheBuffers | None = None   # a step cache's state

    def nbytes(self) -> int:
        """Device bytes the buffers hold (views counted once: `halves` are views of `model_in`)."""
        tensors = [getattr(self, f.name) for f in fields(self)
                   if f.name not in ("kind", "halves", "tables", "cache")]
        tensors += [t for value in self.tables.values() for t in (value if isinstance(value, tuple) else (value,))]
        cached = self.cache.nbytes() if self.cache is not None else 0
        return cached + sum(t.numel() * t.element_size() for t in tensors if t is not None)


def allocate(shape: StepShape, kind: str, transformer, device: torch.device, dtype: torch.dtype) -> StepBuffers:
    """Uninitialised buffers for `shape` (`fill` fills them), and the positional tables."""
    b, f, c, h, w = shape.latents
    empty = functools.partial(torch.empty, device=device, dtype=dtype)
    model_in = empty(shape.copies * b, f, c + shape.cond_channels, h, w)
    dpm = kind == "dpm"
    return StepBuffers(
        kind=kind, latents=empty(shape.latents), model_in=model_in,
        halves=model_in[:, :, :c].chunk(shape.copies), text=empty(shape.text),
        tables=transformer.position_tables(f, h, w, device),
        ofs=torch.full((1,), OFS, device=device, dtype=dtype) if transformer.cfg.ofs_embed_dim else None,
        timesteps=empty(shape.steps, dtype=torch.int64),
        scales=empty(shape.steps, dtype=torch.float32) if shape.copies == 2 else None,
        coef=empty(shape.steps, 7 if dpm else 4, dtype=torch.float32),
        noise=empty(shape.steps, *shape.latents) if dpm else None,
        prev_x0=empty(shape.latents, dtype=torch.float32) if dpm else None,
        step=empty(1, dtype=torch.int64), first_bad=empty(1, dtype=torch.int64),
        cache=CacheBuffers.allocate(shape.cache, transformer.stream_shape(shape.copies * b, (f, h, w), shape.text[1]),
                                    shape.text[1], transformer.cfg.time_embed_dim, shape.steps, device, dtype)
        if shape.cache else None)


def fill(buf: StepBuffers, latents: torch.Tensor, text: torch.Tensor, cond: torch.Tensor | None,
         plan: schedulers.StepPlan, scales: list[float], draw: Callable[[], torch.Tensor]) -> None:
    """Fill the buffers for one run, all by copy_ (a captured graph keeps reading the same memory).
    `draw()` returns one Gaussian draw of the latents' shape; the DPM steps' draws are all taken
    here, in the order the step-by-step loop took them (one per step, two once the scheduler has
    history, the step adding the last), so a seed gives diffusers' video. Nothing else may draw
    from the generator during the loop, and nothing does."""
    buf.latents.copy_(latents)
    buf.text.copy_(text)
    if cond is not None:
        channels = latents.shape[2]
        for part in buf.model_in[:, :, channels:].chunk(len(buf.halves)):
            part.copy_(cond)
    buf.timesteps.copy_(plan.timesteps)
    buf.coef.copy_(plan.coef)
    if buf.scales is not None:
        # float32, as the step's `scale * x` rounds a Python float scale to the tensor's float32.
        buf.scales.copy_(torch.tensor(scales, dtype=torch.float32))
    if buf.noise is not None:
        for i, count in enumerate(plan.noise_draws):
            buf.noise[i].copy_([draw() for _ in range(count)][-1])
        buf.prev_x0.zero_()  # its coefficient is 0 on the first step; zeros keep 0 * x0_prev exact
    buf.step.zero_()
    buf.first_bad.fill_(-1)


def step_inputs(buf: StepBuffers) -> torch.Tensor:
    """The first half of every step: the latents copied into each CFG copy of the transformer input;
    returns the step's timestep for the whole batch."""
    for half in buf.halves:
        half.copy_(buf.latents)
    return buf.timesteps.index_select(0, buf.step).expand(buf.model_in.shape[0])


def step_update(buf: StepBuffers, out: torch.Tensor) -> None:
    """The second half: guidance on the model output (float32), the scheduler update, the non-finite
    check, and the step index advanced. Every result lands in `buf` (a graph's outputs must live
    outside its memory pool)."""
    i = buf.step
    if buf.scales is not None:
        uncond, cond = out.chunk(2)
        out = uncond + buf.scales.index_select(0, i) * (cond - uncond)
    noise = buf.noise.index_select(0, i)[0] if buf.noise is not None else None
    new, x0 = schedulers.step(buf.kind, buf.coef.index_select(0, i)[0], out, buf.latents, buf.prev_x0, noise)
    buf.latents.copy_(new)  # rounds to the pipeline dtype, as .to(dtype) does
    if buf.prev_x0 is not None:
        buf.prev_x0.copy_(x0)
    # The first non-finite step is recorded on the device; the pipeline reads it once, after the loop.
    bad = ~torch.isfinite(buf.latents).all()
    buf.first_bad.copy_(torch.where(bad & (buf.first_bad < 0), i, buf.first_bad))
    i.add_(1)


def run_step(buf: StepBuffers, transformer) -> None:
    """One denoising step, in place on `buf`: the transformer on both CFG halves, then `step_update`."""
    t = step_inputs(buf)
    step_update(buf, transformer(buf.model_in, buf.text, t, buf.tables, ofs=buf.ofs).float())
