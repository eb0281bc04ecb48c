"""The accuracy gate of a quantized denoiser (`cvfast check-precision`): the same model loaded at a
candidate precision against its unquantized self, on the same inputs.

Two comparisons, each as cosine similarity and relative L2 (`agreement`):
- one transformer forward on seeded random latents at the middle of the noise schedule, after every
  block (each model carrying its own stream, so the numbers show how the error grows with depth)
  and at the output;
- a short generation from the same noise: what the N steps changed in the latents (the final latents
  minus the shared starting noise, so the noise both runs start from cannot inflate the agreement).
It also reports how much the quantization alone moves block 0's residual, in FirstBlockCache's
measure (relative mean absolute change): a FirstBlockCache threshold near it sees quantization
error as change between steps; keep the threshold at least twice it (README, "8-bit precision").

The verdict passes when the forward's output has cosine >= STEP_COSINE (the issue's criterion for
one forward) and the generation's change has cosine >= LATENT_COSINE. The latent bound is looser
because sampling compounds each step's error over the run; both are choices, printed with the verdict.
"""
from __future__ import annotations

import torch

from ..core.errors import bad_arg
from ..models.fp8 import weight_bytes
from ..models.geometry import latent_shape
from ..sampler.static_step import OFS
from .pipeline import Pipeline

STEP_COSINE = 0.99
LATENT_COSINE = 0.98
# The forward's timestep: the middle of the 1,000 training timesteps, input half signal, half noise.
MID_TIMESTEP = 500


def agreement(candidate: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """{"cosine": cos(candidate, reference), "rel_l2": |candidate - reference| / |reference|}, in fp64."""
    c, r = candidate.double().flatten(), reference.double().flatten()
    return {"cosine": float(torch.nn.functional.cosine_similarity(c, r, dim=0)),
            "rel_l2": float((c - r).norm() / r.norm().clamp(min=1e-300))}


def forward_by_block(pipe: Pipeline, latents: torch.Tensor, text: torch.Tensor, tables: dict) -> list[torch.Tensor]:
    """The transformer's input stream, its stream after each block (pending feed-forward added), then
    its output."""
    model, n_text = pipe.transformer, text.shape[1]
    batch = latents.shape[0]
    timestep = torch.full((batch,), MID_TIMESTEP, device=pipe.device)
    ofs = torch.full((batch,), OFS, device=pipe.device, dtype=pipe.dtype) if pipe.config.ofs_embed_dim else None
    temb = model.conditioning(timestep, pipe.dtype, ofs)
    stream, pending = model.tokens(latents, text, tables), None
    outputs = [stream]
    for index in range(len(model.blocks)):
        stream, pending = model.run_blocks(stream, pending, temb, tables, n_text, index, index + 1)
        outputs.append(model.settle(stream, pending, n_text))
    outputs.append(model.head(outputs[-1], temb, n_text, latents.shape))
    return outputs


@torch.no_grad()
def compare(reference: Pipeline, candidate: Pipeline, prompt: str, *, seed: int = 0, **arguments) -> dict:
    """The agreement of `candidate` (a quantized load of the model) with `reference` (unquantized):
    {"precision", "weights": bytes of each transformer, "blocks": [agreement per block], "output",
    "latents", "thresholds", "passed"}. arguments: generate()'s (size, steps, image, ...) for the
    short generation; the forward runs at that size too."""
    for pipe in (reference, candidate):
        if pipe.parallel is not None:
            raise bad_arg("parallel", str(pipe.parallel.config), "a single process for check-precision")
    req = reference.request(prompt, **arguments)
    shape = latent_shape(reference.config, reference.vae.config, req.num_frames, req.height, req.width)
    generator = torch.Generator("cpu").manual_seed(seed)
    # The forward: the model's full input channels (an I2V model's image latents included) drawn at random.
    latents = reference.randn((1, shape[0], reference.config.in_channels, *shape[2:]), generator)
    text = reference.encode_text(prompt, guidance_scale=1.0)
    tables = reference.transformer.position_tables(shape[0], shape[2], shape[3], reference.device)
    runs = []
    for pipe in (reference, candidate):
        pipe.runtime.offload.use(pipe.modules(), "transformer")
        runs.append(forward_by_block(pipe, latents, text, tables))
    per_block = [agreement(c, r) for c, r in zip(runs[1][1:], runs[0][1:])]
    # FirstBlockCache compares block 0's residual between steps (relative mean absolute change): the
    # quantization's own change of that residual is the floor below which its threshold sees noise.
    residuals = [run[1] - run[0] for run in runs]
    floor = float((residuals[1] - residuals[0]).abs().mean() / residuals[0].abs().mean())
    # The short generation, both from the same noise.
    noise = reference.randn((req.batch, *shape), generator)
    finals = [pipe.generate(prompt, seed=seed, latents=noise.clone(), output_type="latent", progress=False,
                            **arguments).frames for pipe in (reference, candidate)]
    output, moved = per_block[-1], agreement(finals[1] - noise, finals[0] - noise)
    return {"precision": candidate.runtime.precision,
            "weights": {"reference_bytes": weight_bytes(reference.transformer),
                        "candidate_bytes": weight_bytes(candidate.transformer)},
            "blocks": per_block[:-1], "output": output, "latents": moved, "steps": req.steps,
            "first_block_residual_change": floor,
            "thresholds": {"output_cosine": STEP_COSINE, "latents_cosine": LATENT_COSINE},
            "passed": output["cosine"] >= STEP_COSINE and moved["cosine"] >= LATENT_COSINE}
