"""Where a pipeline's components live between their stages.

`offload="model"` keeps them on the CPU and brings each to the compute device only while it runs
(text encoder, transformer, VAE), so the device never holds two of them. `offload="sequential"`
goes further for the two large ones: of the transformer and of the T5 encoder only the parts around
their blocks come to the device with the stage, and each block comes to it just before its forward
and goes back just after (`stream`), so the device holds one block's weights at a time — 0.26 GB of
the 5B transformer's 11 GB (42 blocks) and 0.4 GB of T5-XXL's 9.5 GB (24 blocks) in bf16 — plus the
activations. The price is copying every block's weights over PCIe at every step (about 11 GB per 5B
step: roughly half a second at 25 GB/s), which is what makes a 16 GB card able to run it at all.
"""
from __future__ import annotations

import torch
from torch import nn

from ..core.errors import bad_arg

OFFLOAD_CHOICES = ("none", "model", "sequential")


class Offload:
    """The placement policy of one pipeline. `home`: where components wait (the CPU when offloading)."""

    def __init__(self, mode: str, device: torch.device):
        if mode not in OFFLOAD_CHOICES:
            raise bad_arg("offload", mode, f"one of {OFFLOAD_CHOICES}")
        self.mode, self.device = mode, device
        self.home = torch.device("cpu") if mode != "none" else device
        self.streamed: set[nn.Module] = set()  # the blocks `stream` moves one at a time

    def use(self, components: dict[str, nn.Module], name: str) -> None:
        """Bring `name` to the compute device, sending the others home first; without offload,
        nothing moves. Streamed blocks stay home: they travel with their own forward."""
        if self.mode == "none":
            return
        for other, module in components.items():
            if other != name:
                self.move(module, self.home)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # give what the others held back before the next one arrives
        self.move(components[name], self.device)

    def move(self, module: nn.Module, device: torch.device) -> None:
        """Every parameter and buffer of `module` on `device`, except those of streamed blocks."""
        for sub in module.modules():
            if sub in self.streamed:
                continue
            for tensor in [*sub.parameters(recurse=False), *sub.buffers(recurse=False)]:
                if tensor.device != device:
                    tensor.data = tensor.data.to(device)  # the same tensor object, now holding device memory

    def stream(self, blocks: nn.ModuleList) -> None:
        """With "sequential": each block of `blocks` on the device only during its forward (hooks
        registered once, at build)."""
        if self.mode != "sequential":
            return
        for block in blocks:
            self.streamed.add(block)
            block.register_forward_pre_hook(lambda module, args: self.arrive(module))
            block.register_forward_hook(lambda module, args, output: self.leave(module))

    def arrive(self, block: nn.Module) -> None:
        block.to(self.device)

    def leave(self, block: nn.Module) -> None:
        block.to(self.home)
