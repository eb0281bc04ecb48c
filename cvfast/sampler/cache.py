"""Step caching: on steps where the transformer's output barely changes, skip its blocks and reuse
the residual (the blocks' output minus their input) of the last step that ran them.

Three rules decide which steps compute, each exactly as its published implementation does:
- `TeaCache` (TeaCache's CogVideoX code): the relative L1 change of the conditioning vector (time
  embedding, plus ofs on 1.5-I2V) between consecutive steps, rescaled by a per-variant polynomial, is
  accumulated; a step computes when the sum reaches the threshold (then it restarts at 0), and the
  first and last steps always compute. The embedding depends only on the timestep, so the schedule is
  known before the loop. The residual covers both streams (video and text).
- `FirstBlockCache` (diffusers' `FirstBlockCacheConfig`): block 0 always runs; the rest run when its
  video residual moved by more than the threshold (mean |r - r_prev| / mean |r_prev|, r_prev from
  the last computed step), else the stream after block 0 gets the stored residual. Decided per step
  from the data: the loop reads one number per step.
- `MagCache` (diffusers' `MagCacheConfig`): per-step magnitude ratios of the residual, calibrated
  once per model (`Pipeline.calibrate_cache`); after the retention steps the ratio product's error
  is accumulated and a step is skipped while it stays under the threshold, at most `max_skip_steps` in
  a row. Known before the loop. On a skip the video stream gets the residual, the text stream passes.

The cache lives in the sampler step, over static buffers (`static_step.CacheBuffers`): the step
variants below are ordinary step functions, which the graph cache captures one by one.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from ..core.checks import is_number
from ..core.errors import CVFastInputError, bad_arg
from .static_step import CacheBuffers, StepBuffers, step_inputs, step_update

# TeaCache's rescaling polynomials for CogVideoX (np.poly1d, highest power first), from its
# TeaCache4CogVideoX1.5/teacache_sample_video.py; 5B-I2V shares 5B's. The 5B and 2B ones are negative
# near 0 and are not clamped: the published rule lets the sum fall.
TEACACHE_COEFFICIENTS = {
    "2b": (-3.10658903e+01, 2.54732368e+01, -5.92380459e+00, 1.75769064e+00, -3.61568434e-03),
    "5b": (-1.53880483e+03, 8.43202495e+02, -1.34363087e+02, 7.97131516e+00, -5.23162339e-02),
    "5b-i2v": (-1.53880483e+03, 8.43202495e+02, -1.34363087e+02, 7.97131516e+00, -5.23162339e-02),
    "1.5": (2.50210439e+02, -1.65061612e+02, 3.57804877e+01, -7.81551492e-01, 3.58559703e-02),
    "1.5-i2v": (1.22842302e+02, -1.04088754e+02, 2.62981677e+01, -3.06009921e-01, 3.71213220e-02),
}
SPEC_FORMAT = ("None, 'teacache', 'fbcache' or 'magcache' (optionally ':THRESHOLD', e.g. 'teacache:0.2'), or a "
               "cvfast.TeaCache / FirstBlockCache / MagCache")


def check_threshold(value) -> float:
    if not is_number(value) or value < 0:
        raise bad_arg("cache", f"threshold={value!r}", "a threshold that is a finite number >= 0")
    return float(value)


@dataclass(frozen=True)
class TeaCache:
    """threshold: the accumulated rescaled change that makes a step compute (TeaCache's CogVideoX
    settings: 0.1 slow, 0.2 fast, 0.3 faster); coefficients: the rescaling polynomial, default the
    model variant's (`TEACACHE_COEFFICIENTS`)."""
    threshold: float = 0.2
    coefficients: tuple[float, ...] | None = None
    name: ClassVar[str] = "teacache"
    buffers: ClassVar[str] = "residual"

    def checked(self, variant: str) -> TeaCache:
        check_threshold(self.threshold)
        coefficients = TEACACHE_COEFFICIENTS[variant] if self.coefficients is None else self.coefficients
        if not isinstance(coefficients, (list, tuple)) or not coefficients or not all(map(is_number, coefficients)):
            raise bad_arg("cache", f"coefficients={self.coefficients!r}", "a non-empty sequence of finite numbers "
                          "(a polynomial, highest power first)")
        return TeaCache(float(self.threshold), tuple(float(c) for c in coefficients))

    def schedule(self, embeddings: list[torch.Tensor]) -> list[bool]:
        """Whether each step computes, from the conditioning vector of each step's whole batch."""
        rescale = np.poly1d(self.coefficients)
        computes, accumulated, last = [], 0.0, len(embeddings) - 1
        for i, emb in enumerate(embeddings):
            compute = True
            if 0 < i < last:
                change = ((emb - embeddings[i - 1]).abs().mean() / embeddings[i - 1].abs().mean()).item()
                accumulated += rescale(change)
                compute = accumulated >= self.threshold
            if compute:
                accumulated = 0.0
            computes.append(compute)
        return computes


@dataclass(frozen=True)
class FirstBlockCache:
    """threshold: how far block 0's residual may move (relative mean absolute change) before the
    remaining blocks run again (diffusers' default 0.05)."""
    threshold: float = 0.05
    name: ClassVar[str] = "fbcache"
    buffers: ClassVar[str] = "first-block"

    def checked(self, variant: str) -> FirstBlockCache:
        return FirstBlockCache(check_threshold(self.threshold))

    def computes(self, change: float | None) -> bool:
        """`change`: this step's block-0 residual change, None before any step computed (a NaN change,
        as in diffusers, does not exceed the threshold)."""
        return change is None or change > self.threshold


@dataclass(frozen=True)
class MagCache:
    """threshold: the accumulated magnitude-ratio error a run of skips may reach (diffusers' default
    0.06); ratios: the model's per-step ratios (a list, or the JSON file `calibrate_cache` writes),
    resampled to the steps that run; max_skip_steps: the longest run of skips; retention_ratio: the
    share of first steps that always compute."""
    threshold: float = 0.06
    ratios: tuple[float, ...] | str | Path | None = None
    max_skip_steps: int = 3
    retention_ratio: float = 0.2
    name: ClassVar[str] = "magcache"
    buffers: ClassVar[str] = "residual"

    def checked(self, variant: str) -> MagCache:
        check_threshold(self.threshold)
        if isinstance(self.max_skip_steps, bool) or not isinstance(self.max_skip_steps, int) or self.max_skip_steps < 0:
            raise bad_arg("cache", f"max_skip_steps={self.max_skip_steps!r}", "an integer >= 0")
        if not is_number(self.retention_ratio) or not 0 <= self.retention_ratio <= 1:
            raise bad_arg("cache", f"retention_ratio={self.retention_ratio!r}", "a number in [0, 1]")
        return MagCache(float(self.threshold), read_ratios(self.ratios), self.max_skip_steps,
                        float(self.retention_ratio))

    def schedule(self, steps: int) -> list[bool]:
        """Whether each of `steps` steps computes. The arithmetic is diffusers' (its running product
        and error are float32 tensors), so the same ratios give the same steps."""
        ratios = resample(torch.tensor(self.ratios), steps)
        retention = int(self.retention_ratio * steps + 0.5)
        product, error, run = 1.0, 0.0, 0
        computes, residual = [], False
        for i in range(steps):
            compute = True
            if i >= retention:
                product, run = product * ratios[i], run + 1
                error = error + abs(1.0 - product)
                if residual and error <= self.threshold and run <= self.max_skip_steps:
                    compute = False
                else:
                    product, error, run = 1.0, 0.0, 0
            residual |= compute
            computes.append(compute)
        return computes


@dataclass(frozen=True)
class Calibration:
    """Not a cache: every step computes and records the mean ratio of its video residual's norms to
    the previous step's (MagCache's calibration)."""
    name: ClassVar[str] = "calibration"
    buffers: ClassVar[str] = "calibration"

    def checked(self, variant: str) -> Calibration:
        return self

    def schedule(self, steps: int) -> list[bool]:
        return [True] * steps


POLICIES = {cls.name: cls for cls in (TeaCache, FirstBlockCache, MagCache)}


@dataclass
class CacheRun:
    """One denoising loop's cache: the checked policy, whether each step computes when that is known
    before the loop (None: decided per step), and what happened: the steps that computed and were
    skipped (0-based), the device bytes its buffers held, the calibration's ratios."""
    policy: TeaCache | FirstBlockCache | MagCache | Calibration
    schedule: list[bool] | None = None
    computed_steps: list[int] = field(default_factory=list)
    skipped_steps: list[int] = field(default_factory=list)
    nbytes: int = 0
    ratios: list[float] | None = None

    def record(self, step: int, computed: bool) -> None:
        (self.computed_steps if computed else self.skipped_steps).append(step)

    def finish(self, buffers: CacheBuffers) -> None:
        self.nbytes = buffers.nbytes()
        if buffers.ratios is not None:
            self.ratios = buffers.ratios.tolist()

    def report(self) -> dict:
        """What `GenerationResult.cache` holds."""
        report = {"policy": self.policy.name, "computed_steps": self.computed_steps,
                  "skipped_steps": self.skipped_steps, "bytes": self.nbytes}
        return report if self.ratios is None else {**report, "ratios": self.ratios}


def resample(ratios: torch.Tensor, steps: int) -> torch.Tensor:
    """Per-step ratios calibrated at another step count, nearest-resampled to `steps` (diffusers'
    rule: index round(i * (n - 1) / (steps - 1)), the last ratio alone for one step)."""
    if steps == 1:
        return ratios[-1:]
    scale = (len(ratios) - 1) / (steps - 1)
    return ratios[torch.round(torch.arange(steps, dtype=torch.float32) * scale).long()]


def read_ratios(ratios) -> tuple[float, ...]:
    """MagCache's ratios from a list or from the JSON file `calibrate_cache` wrote."""
    if ratios is None:
        raise CVFastInputError("cache='magcache' is not accepted without the model's ratios: they come from one "
                               "uncached run, pipe.calibrate_cache(prompt, out='ratios.json') or `cvfast "
                               "calibrate-cache MODEL --out ratios.json`; then MagCache(ratios='ratios.json') "
                               "(command line: --cache magcache:0.06:ratios.json)")
    if isinstance(ratios, (str, Path)):
        path = Path(ratios).expanduser()
        try:
            ratios = json.loads(path.read_text())["ratios"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise bad_arg("cache", f"ratios={str(path)!r}", f"a ratios JSON written by calibrate_cache "
                          f"({type(exc).__name__}: {exc})") from None
    values = tuple(ratios) if isinstance(ratios, (list, tuple)) else ()
    if not values or not all(is_number(r) and r > 0 for r in values):
        raise bad_arg("cache", f"ratios={ratios!r}", "a non-empty list of positive numbers")
    return tuple(float(r) for r in values)


def parse(spec, variant: str):
    """A cache spec (see SPEC_FORMAT; "magcache:T:PATH" also names the ratios file) -> a checked
    policy with the variant's presets, or None."""
    if spec is None or spec is False or spec == "none":
        return None
    if isinstance(spec, str):
        name, *rest = spec.split(":", 2)
        if name not in POLICIES:
            raise bad_arg("cache", spec, SPEC_FORMAT)
        arguments = {}
        if rest:
            try:
                arguments["threshold"] = float(rest[0])
            except ValueError:
                raise bad_arg("cache", spec, f"{SPEC_FORMAT}; {rest[0]!r} is not a number") from None
        if len(rest) == 2:
            if name != "magcache":
                raise bad_arg("cache", spec, f"{SPEC_FORMAT} (only magcache takes a ratios file after its threshold)")
            arguments["ratios"] = rest[1]
        spec = POLICIES[name](**arguments)
    if not isinstance(spec, (*POLICIES.values(), Calibration)):
        raise bad_arg("cache", spec, SPEC_FORMAT)
    return spec.checked(variant)


# -- the step variants ------------------------------------------------------------------------------
# `model` is the denoiser's staged contract (`CogVideoXTransformer`, or a parallel wrapper of it):
# conditioning, tokens, run_blocks, settle, head, mean_abs.

def run_residual_step(buf: StepBuffers, model, reuse: bool, video_only: bool) -> None:
    """A step of TeaCache or MagCache (or the calibration): compute stores the blocks' residual;
    reuse adds it to the blocks' input instead of running them (`video_only`: MagCache leaves the
    text rows as they came in)."""
    t, n_text, cache = step_inputs(buf), buf.text.shape[1], buf.cache
    temb = model.conditioning(t, buf.model_in.dtype, buf.ofs)
    stream = model.tokens(buf.model_in, buf.text, buf.tables)
    if reuse:
        residual = cache.residual[:, n_text:] if video_only else cache.residual
        rows = stream[:, n_text:] if video_only else stream
        out = torch.cat((stream[:, :n_text], rows + residual), 1) if video_only else rows + residual
    else:
        out = model.settle(*model.run_blocks(stream, None, temb, buf.tables, n_text), n_text)
        cache.residual.copy_(out - stream)
        if cache.ratios is not None:
            record_ratio(buf, cache.residual[:, n_text:])
    step_update(buf, model.head(out, temb, n_text, buf.model_in.shape).float())


def record_ratio(buf: StepBuffers, video_residual: torch.Tensor) -> None:
    """MagCache's calibration: mean over rows and tokens of |residual| / (|previous residual| + 1e-8)
    (norms over channels, float32); 1 on the first step."""
    cache, norms = buf.cache, torch.linalg.norm(video_residual.float(), dim=-1)
    ratio = (norms / (cache.norms + 1e-8)).mean()
    cache.ratios.index_copy_(0, buf.step, torch.where(buf.step == 0, torch.ones_like(ratio), ratio).reshape(1))
    cache.norms.copy_(norms)


def run_first_block(buf: StepBuffers, model) -> None:
    """FirstBlockCache's first part: the conditioning, block 0, and how far its video residual moved
    from the last computed step's (`cache.diff`: meaningless before any step computed)."""
    t, n_text, cache = step_inputs(buf), buf.text.shape[1], buf.cache
    cache.temb.copy_(model.conditioning(t, buf.model_in.dtype, buf.ofs))
    stream = model.tokens(buf.model_in, buf.text, buf.tables)
    cache.first.copy_(model.settle(*model.run_blocks(stream, None, cache.temb, buf.tables, n_text, stop=1), n_text))
    cache.first_now.copy_(cache.first[:, n_text:] - stream[:, n_text:])
    moved = model.mean_abs(cache.first_now - cache.first_residual)
    cache.diff.copy_((moved / model.mean_abs(cache.first_residual)).reshape(1))


def run_after_first_block(buf: StepBuffers, model, reuse: bool) -> None:
    """FirstBlockCache's second part: the remaining blocks (storing their residual and this step's
    block-0 residual), or the stored residual added to the stream after block 0."""
    n_text, cache = buf.text.shape[1], buf.cache
    if reuse:
        out = cache.first + cache.residual
    else:
        out = model.settle(*model.run_blocks(cache.first, None, cache.temb, buf.tables, n_text, start=1), n_text)
        cache.residual.copy_(out - cache.first)
        cache.first_residual.copy_(cache.first_now)
    step_update(buf, model.head(out, cache.temb, n_text, buf.model_in.shape).float())
