"""Where a pipeline's components live between their stages: `offload="model"` keeps them on the CPU
and brings each to the compute device only while it runs (text encoder, transformer, VAE), so the
device never holds two of them."""
from __future__ import annotations

import torch

from ..core.errors import bad_arg

OFFLOAD_CHOICES = ("none", "model")


class Offload:
    """The placement policy of one pipeline. `home`: where components wait (the CPU with "model")."""

    def __init__(self, mode: str, device: torch.device):
        if mode not in OFFLOAD_CHOICES:
            raise bad_arg("offload", mode, f"one of {OFFLOAD_CHOICES}")
        self.mode, self.device = mode, device
        self.home = torch.device("cpu") if mode == "model" else device

    def use(self, components: dict[str, torch.nn.Module], name: str) -> None:
        """Bring `name` to the compute device, sending the others home first; without offload,
        nothing moves."""
        if self.mode != "model":
            return
        for other, module in components.items():
            if other != name:
                self.move(module, self.home)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # give what the others held back before the next one arrives
        self.move(components[name], self.device)

    def move(self, module: torch.nn.Module, device: torch.device) -> None:
        if next(module.parameters()).device != device:
            module.to(device)
