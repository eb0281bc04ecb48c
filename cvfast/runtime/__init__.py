"""How and where a pipeline runs: the device and dtype, component placement (`offload.py`), CUDA-graph
replay of the sampler step (its default), a TensorRT engine in place of the transformer
(`tensorrt.py`), and a place in a multi-GPU job (`parallel/`)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .offload import Offload
from .parallel import ParallelContext

__all__ = ["Runtime", "Offload"]


@dataclass(frozen=True)
class Runtime:
    """What the assembler decided about running a pipeline; fixed for the pipeline's life.
    cuda_graph, cache: generate()'s defaults (`cvfast.load`); parallel: this rank's place in a
    parallel job, or None; precision: "bf16" (unquantized, in `dtype`), or the 8-bit parts of the
    denoiser (`cvfast.ops.quantized.PRECISIONS`); compile: the transformer blocks' torch.compile
    setting (`compile.py`), False when they run eagerly."""
    device: torch.device
    dtype: torch.dtype
    offload: Offload
    cuda_graph: bool | str = "auto"
    parallel: ParallelContext | None = None
    cache: object = None
    precision: str = "bf16"
    compile: bool | str = False
