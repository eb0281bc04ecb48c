"""CUDA-graph replay of the sampler step (`static_step.run_step`), cached per shape.

`cuda_graph` on `load()` (the pipeline's default) and `generate()` (an override):
- False: every step runs eagerly.
- True: the step of a `StepShape` runs eagerly on the shape's first use; on its second use the
  first step runs as the capture's warm-up and is captured, and the other steps replay the graph;
  later uses replay every step. Needs a CUDA pipeline without offload (else `CVFastInputError`).
- "auto" (the default): eager, until the `gpu` benchmark suite has measured a gain on a device and
  size (README, "CUDA graphs"). Not measured yet: no GPU was lent when this was written, so
  "auto" captures nothing today rather than guessing a threshold.

The cache keeps at most `MAX_GRAPHS` shapes, least recently used out first. All graphs of a device
capture into one memory pool: a step writes every result into its `StepBuffers` (allocated outside
the pool), so what a graph holds in the pool is only its own intermediates, which no other graph
reads; graphs replayed one after another can then reuse each other's pool memory, and the pool
holds about one step's activations however many graphs there are.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..core.errors import bad_arg
from .static_step import StepBuffers, StepShape

# Two shapes: an application alternating between two sizes (or CFG on and off) replays both;
# each entry holds its StepBuffers (for DPM at 50 steps the pre-drawn noise dominates: 50 latents).
MAX_GRAPHS = 2
_POOLS: dict[int, tuple] = {}  # device index -> graph memory pool handle


def check_setting(value, device: torch.device, offload: str) -> bool:
    """Validate a `cuda_graph` argument for a pipeline on `device`; True when it asks for a graph."""
    if not (value is True or value is False or value == "auto"):
        raise bad_arg("cuda_graph", value, "False, True or 'auto'")
    if value is True and device.type != "cuda":
        raise bad_arg("cuda_graph", value, f"False or 'auto' for a pipeline on {device}: CUDA graphs need "
                      "load(..., device='cuda') on a machine with a CUDA device")
    if value is True and offload != "none":
        raise bad_arg("cuda_graph", value, f"False or 'auto' with offload={offload!r}: offloading moves the "
                      "transformer's weights every call, and a graph replays the addresses it captured")
    return value is True  # "auto": eager until measured (module docstring)


class CapturedStep:
    """One step captured in a CUDA graph; `held_bytes` is how much the device's reserved memory grew
    while capturing (the pool blocks the graph added; near 0 when it reuses another graph's)."""

    def __init__(self, graph: torch.cuda.CUDAGraph, held_bytes: int):
        self.graph, self.held_bytes = graph, held_bytes

    def replay(self) -> None:
        self.graph.replay()


def capture_cuda(step: Callable[[], None], device: torch.device) -> CapturedStep:
    """Run `step` once eagerly as the warm-up (it is a real step of the run: lazy initialisation,
    cuBLAS workspaces and autotuning happen outside the capture), then capture it, on one side
    stream, into the device's shared pool. Capturing records kernels without running them, so the
    buffers are as the warm-up left them."""
    with torch.cuda.device(device):
        index = torch.cuda.current_device()
        if index not in _POOLS:
            _POOLS[index] = torch.cuda.graph_pool_handle()
        before = torch.cuda.memory_reserved(index)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=_POOLS[index], stream=side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        return CapturedStep(graph, torch.cuda.memory_reserved(index) - before)


@dataclass
class Entry:
    """A shape's buffers and its captured steps: one per step variant (`part`: the plain step, or a
    step cache's compute and reuse variants, each captured on its own)."""
    buffers: StepBuffers
    graphs: dict[str, CapturedStep] = field(default_factory=dict)
    uses: int = 0


class GraphCache:
    """Per-shape step buffers and graphs, at most `max_graphs` shapes, least recently used out first.
    `capture(step) -> CapturedStep` runs the step once and returns what replays it (`capture_cuda`
    on a GPU; tests pass a stand-in to check the cache on a CPU)."""

    def __init__(self, capture: Callable[[Callable[[], None]], CapturedStep], max_graphs: int = MAX_GRAPHS):
        self.capture, self.max_graphs = capture, max_graphs
        self.entries: OrderedDict[StepShape, Entry] = OrderedDict()

    def entry(self, shape: StepShape, allocate: Callable[[], StepBuffers]) -> Entry:
        """The entry of `shape` for one more use (new: buffers allocated, no graph yet), now the most
        recently used; the least recently used beyond `max_graphs` are dropped with their graphs."""
        entry = self.entries.pop(shape, None) or Entry(allocate())
        self.entries[shape] = entry
        while len(self.entries) > self.max_graphs:
            self.entries.popitem(last=False)
        entry.uses += 1
        return entry

    def run_step(self, entry: Entry, step: Callable[[], None], part: str = "step") -> None:
        """One step (or step variant `part`) of `entry`'s run: replayed when captured; captured
        (running it once) from the shape's second use on; eager on the first use."""
        graph = entry.graphs.get(part)
        if graph is not None:
            graph.replay()
        elif entry.uses >= 2:
            entry.graphs[part] = self.capture(step)
        else:
            step()

    def held_bytes(self) -> int:
        """Device bytes the cached buffers hold, plus what each capture added to reserved memory."""
        return sum(e.buffers.nbytes() + sum(g.held_bytes for g in e.graphs.values()) for e in self.entries.values())
