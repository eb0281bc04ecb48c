"""`graph` part of the gpu suite: the denoising step with and without the CUDA graph
(`generate(cuda_graph=...)`), at one model and size per call.

Per mode, through `generate()` and its per-step callback (the pipeline's own loop):
- step ms: the loop's time per step as it runs in production (host and device overlapped), from a
  call synchronised only after its first and last steps: (end of last - end of first) / (steps - 1);
- host ms per step: from a call synchronised after every step, the time from the previous step's
  end until this step's launches returned (for the graph: one replay; eagerly: the Python and the
  hundreds of kernel launches of a forward). Host time near step time means the host is the
  bottleneck, which is where the graph helps;
- the extra memory the graph holds: its cache's buffers plus what the captures added to the reserved
  memory (`GraphCache.held_bytes`), and the denoising stage's peak allocated memory per mode (a
  replay allocates nothing: its activations live in the graph's pool, counted in held_bytes, so
  the graph row's peak leaves them out).
The graph's final latents are checked against the eager ones (same seed): `latents_equal_eager`.
Without CUDA only the eager mode is measured and the graph is recorded as skipped.
"""
from __future__ import annotations

import statistics
import time

import torch

from .harness import Row, sync
from .models import build

PROMPT = "a red panda eating bamboo in a misty forest, cinematic lighting"


class StepClock:
    """A generate() callback recording, per step, when its launches had returned (`issued`) and,
    where it synchronises, when the device had finished it (`done`)."""

    def __init__(self, device: torch.device, steps: int, every_step: bool):
        self.device, self.last, self.every_step = device, steps - 1, every_step
        self.issued: list[float] = []
        self.done: list[float] = []

    def __call__(self, i: int, timestep: int, latents: torch.Tensor) -> None:
        self.issued.append(time.perf_counter())
        if self.every_step or i in (0, self.last):
            sync(self.device)
        self.done.append(time.perf_counter())

    def loop_ms_per_step(self) -> float:
        return (self.done[-1] - self.done[0]) / self.last * 1e3

    def host_ms_per_step(self) -> float:
        """Median over the steps after the first (the first includes the loop's setup)."""
        return statistics.median(issued - done for issued, done in zip(self.issued[1:], self.done)) * 1e3


def _timed_call(pipe, kw: dict, steps: int, graphed: bool, every_step: bool):
    clock = StepClock(pipe.device, steps, every_step)
    result = pipe.generate(cuda_graph=graphed, callback=clock, **kw)
    return clock, result


def _mode_row(pipe, kw: dict, model: str, steps: int, graphed: bool, case_size: str) -> tuple[Row, torch.Tensor]:
    # A shape's first graphed call runs eagerly and its second captures: both are warm-up here.
    for _ in range(2 if graphed else 1):
        pipe.generate(cuda_graph=graphed, **kw)
    loop, result = _timed_call(pipe, kw, steps, graphed, every_step=False)
    host, _ = _timed_call(pipe, kw, steps, graphed, every_step=True)
    peak = result.peak_memory_gib.get("denoising")
    row = Row("graph", f"{model} step", "cuda graph" if graphed else "eager", median_ms=loop.loop_ms_per_step(),
              peak_gib=peak, extra={"size": case_size, "host_ms_per_step": host.host_ms_per_step(),
                                     "host_share_of_step": host.host_ms_per_step() / loop.loop_ms_per_step()})
    return row, result.frames


def run_graph(model: str, device: torch.device, dtype: torch.dtype, *, frames: int, height: int, width: int,
              steps: int, seed: int = 0) -> list[Row]:
    if steps < 2:
        raise ValueError(f"steps={steps}: the per-step times need at least 2 steps")
    pipe = build(model, device, dtype, "auto")
    embeds = pipe.encode_text(PROMPT)
    kw = {"prompt_embeds": embeds[1:], "negative_prompt_embeds": embeds[:1], "num_frames": frames, "height": height,
          "width": width, "num_inference_steps": steps, "seed": seed, "progress": False, "output_type": "latent"}
    case_size = f"{frames}x{height}x{width}, {steps} steps, CFG"
    eager, eager_latents = _mode_row(pipe, kw, model, steps, False, case_size)
    if device.type != "cuda":
        return [eager, Row("graph", f"{model} step", "cuda graph", extra={"skipped": "no CUDA device"})]
    graphed, graph_latents = _mode_row(pipe, kw, model, steps, True, case_size)
    graphed.extra.update(speedup_vs_eager=eager.median_ms / graphed.median_ms,
                         graph_held_mib=pipe.graphs.held_bytes() / 2 ** 20,
                         latents_equal_eager=bool(torch.equal(graph_latents, eager_latents)))
    return [eager, graphed]
