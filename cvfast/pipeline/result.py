"""What generate() returns, and the per-stage meter that fills its timings and peak memory."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class GenerationResult:
    """`frames`: np (batch, frames, height, width, 3) float32 in [0, 1]; pt (batch, frames, 3, height,
    width); latent (batch, latent_frames, channels, h, w). `timings`: seconds per stage;
    `peak_memory_gib`: the peak device memory allocated in each stage (CUDA only, else empty);
    `cache`: with a step cache, {"policy", "computed_steps", "skipped_steps" (0-based step indices),
    "bytes" (device memory its buffers held)}, else None."""
    frames: np.ndarray | torch.Tensor
    timings: dict[str, float] = field(default_factory=dict)
    fps: int = 8
    seed: int | None = None
    peak_memory_gib: dict[str, float] = field(default_factory=dict)
    cache: dict | None = None


class StageMeter:
    """Times each stage (synchronised on CUDA) and records its peak device memory."""

    def __init__(self, device: torch.device):
        self.device, self.timings, self.peaks = device, {}, {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        yield
        if cuda:
            torch.cuda.synchronize(self.device)
        self.timings[name] = time.perf_counter() - start
        if cuda:
            self.peaks[name] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
