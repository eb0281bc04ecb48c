"""The T5 text encoder, through `transformers`, with the model folder's own tokenizer."""
from __future__ import annotations

import logging

import torch

logger = logging.getLogger("cvfast")


class TextEncoder:
    """Tokenizer + T5 encoder. `encode` pads every prompt to `max_length` tokens, as CogVideoX was
    trained (the transformer sees a fixed-length text prefix)."""

    def __init__(self, tokenizer, model: torch.nn.Module):
        self.tokenizer, self.model = tokenizer, model

    def blocks(self) -> torch.nn.ModuleList | None:
        """The T5 encoder's blocks (what sequential offload streams), or None for another model."""
        return getattr(getattr(self.model, "encoder", None), "block", None)

    def warn_if_truncated(self, prompts: list[str], max_length: int) -> None:
        for prompt in prompts:
            ids = self.tokenizer(prompt, add_special_tokens=True).input_ids
            if len(ids) > max_length:
                # The last kept position holds the end-of-sequence token, so the cut starts one earlier.
                dropped = self.tokenizer.decode(ids[max_length - 1:-1])
                logger.warning("prompt is longer than max_sequence_length=%d tokens (%d); this part was "
                               "dropped: %r", max_length, len(ids), dropped)

    @torch.no_grad()
    def encode(self, prompts: list[str], max_length: int, device, dtype) -> torch.Tensor:
        """prompts -> (len(prompts), max_length, d_model) in dtype on device."""
        self.warn_if_truncated(prompts, max_length)
        ids = self.tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                             add_special_tokens=True, return_tensors="pt").input_ids
        param = next(self.model.parameters())
        hidden = self.model(ids.to(param.device))[0]
        return hidden.to(device=device, dtype=dtype)
