"""The built parts of a pipeline, as the assembler hands them over."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..models.text_encoder import TextEncoder
from ..models.transformer import CogVideoXTransformer
from ..models.vae import CogVideoXVAE
from ..ops import OpSet
from ..runtime.tensorrt import TensorRTTransformer
from ..sampler.schedulers import SchedulerConfig


class Adapters(Protocol):
    """The LoRAs merged into the transformer (`cvfast.checkpoints.lora.LoRAs`)."""

    def load(self, path, scale: float, trust_pickle: bool = False) -> list[str]: ...

    def merge(self, layers: dict[str, dict], scale: float, source: str) -> list[str]: ...

    def unload(self) -> None: ...


@dataclass(frozen=True)
class Components:
    """transformer: the PyTorch denoiser, or a TensorRT engine that replaces it (whose config it
    carries); ops: what the models were built with; loras: the adapters merged into the PyTorch
    transformer (None with an engine)."""
    name: str
    transformer: CogVideoXTransformer | TensorRTTransformer
    vae: CogVideoXVAE
    text_encoder: TextEncoder
    scheduler: SchedulerConfig
    ops: OpSet
    defaults: dict
    loras: Adapters | None = None
