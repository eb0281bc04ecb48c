"""`pipe(...)`: the call of diffusers' CogVideoX pipelines (`CogVideoXPipeline`,
`CogVideoXImageToVideoPipeline`, `CogVideoXVideoToVideoPipeline`, diffusers 0.42) on cvfast's one
generation (`Pipeline.run`): the same argument names, defaults and meaning, and what diffusers returns.

Where diffusers differs from `generate()` (checked against diffusers 0.42.1):
- sizes default to the transformer config's sample size (`sample_height` x 8, `sample_width` x 8)
  and `sample_frames` frames (image-to-video: 49; video-to-video: the video's length), not the
  per-variant table `generate()` uses;
- `output_type` defaults to "pil": per video a list of RGB PIL images;
- `num_videos_per_prompt` is honoured (diffusers' CogVideoX pipelines force it to 1): prompt-major,
  video k drawn from generator k when a list is given;
- `eta` is accepted and has no effect (neither CogVideoX scheduler uses it); `timesteps` is refused;
- `callback_on_step_end(pipe, step, timestep, callback_kwargs) -> dict` sees clones of the tensors it
  asks for; tensors it returns replace the sampler's; `pipe.interrupt` set (`pipe._interrupt = True`,
  diffusers' idiom) ends the loop after that step and decodes its latents.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..core.checks import is_number, positive_int
from ..core.errors import bad_arg
from ..models.config import TransformerConfig, VAEConfig

CALL_OUTPUT_TYPES = ("pil", "np", "pt", "latent")
CALLBACK_TENSORS = ("latents", "prompt_embeds", "negative_prompt_embeds")
I2V_FRAMES = 49  # diffusers' CogVideoXImageToVideoPipeline default


@dataclass
class PipelineOutput:
    """What diffusers' CogVideoXPipelineOutput holds: `frames` ("pil": a list per video of PIL images;
    "np": (B, F, H, W, 3) float32 in [0, 1]; "pt": (B, F, 3, H, W); "latent": the denoised latents).
    `output[0]` and `output["frames"]` also give the frames, as diffusers' outputs do."""
    frames: object

    def __getitem__(self, key):
        if key in (0, "frames"):
            return self.frames
        raise KeyError(key)

    def to_tuple(self) -> tuple:
        return (self.frames,)


def call_size(cfg: TransformerConfig, vae: VAEConfig, mode: str, num_frames, height, width) -> tuple:
    """diffusers' defaults: (num_frames, height, width); video-to-video takes the video's frame count
    (None here: the request counts it)."""
    height = height or cfg.sample_height * vae.spatial_factor
    width = width or cfg.sample_width * vae.spatial_factor
    if mode == "v2v":
        return num_frames, height, width
    return num_frames or (I2V_FRAMES if mode == "i2v" else cfg.sample_frames), height, width


def per_video(value, copies: int):
    """A prompt (list) or embeddings repeated for num_videos_per_prompt, prompt-major."""
    if value is None or copies == 1:
        return value
    if isinstance(value, torch.Tensor):
        return value.repeat_interleave(copies, dim=0)
    return [prompt for prompt in ([value] if isinstance(value, str) else value) for _ in range(copies)]


def check_call(timesteps, eta, num_videos_per_prompt, output_type, attention_kwargs,
               return_dict) -> tuple[int, float]:
    """The arguments only the diffusers-style call has; returns num_videos_per_prompt and the LoRA
    scale of `attention_kwargs` (1.0 when absent)."""
    if timesteps is not None:
        raise bad_arg("timesteps", timesteps, "None: CogVideoX's schedulers take no custom schedule "
                      "(num_inference_steps sets it)")
    if not is_number(eta):
        raise bad_arg("eta", eta, "a number (it has no effect on CogVideoX's schedulers, as in diffusers)")
    if output_type not in CALL_OUTPUT_TYPES:
        raise bad_arg("output_type", output_type, f"one of {CALL_OUTPUT_TYPES}")
    if not isinstance(return_dict, bool):
        raise bad_arg("return_dict", return_dict, "True or False")
    attention_kwargs = attention_kwargs or {}
    if not isinstance(attention_kwargs, dict) or set(attention_kwargs) - {"scale"} \
            or not is_number(attention_kwargs.get("scale", 1.0)):
        raise bad_arg("attention_kwargs", attention_kwargs, "None or {'scale': a number}: the LoRA scale of this "
                      "call, as in diffusers (CogVideoX's attention takes no other keyword)")
    return positive_int("num_videos_per_prompt", num_videos_per_prompt), float(attention_kwargs.get("scale", 1.0))


class StepEnd:
    """diffusers' callback_on_step_end as the sampler loop's on_step: the callback gets clones of the
    tensors it names, what it returns is copied into the loop's buffers before the next step, and the
    loop ends when the pipeline's `interrupt` flag is set."""

    def __init__(self, pipe, callback, names, videos: int, guided: bool):
        names = getattr(callback, "tensor_inputs", names)  # diffusers' PipelineCallback objects carry theirs
        unknown = [name for name in names if name not in CALLBACK_TENSORS]
        if unknown:
            raise bad_arg("callback_on_step_end_tensor_inputs", list(names), f"names from {list(CALLBACK_TENSORS)}")
        self.pipe, self.callback, self.names, self.videos, self.guided = pipe, callback, list(names), videos, guided

    def tensors(self, buf) -> dict:
        negative = buf.text[:self.videos].clone() if self.guided else None
        available = {"latents": lambda: buf.latents.clone(), "prompt_embeds": lambda: buf.text.clone(),
                     "negative_prompt_embeds": lambda: negative}
        return {name: available[name]() for name in self.names}

    def __call__(self, step: int, timestep: int, buf) -> bool:
        returned = self.callback(self.pipe, step, torch.tensor(timestep, device=buf.latents.device),
                                 self.tensors(buf)) or {}
        if "latents" in returned:
            buf.latents.copy_(returned["latents"])
        if "prompt_embeds" in returned:  # the CFG batch, negative then positive, as diffusers passes it
            buf.text.copy_(returned["prompt_embeds"])
        return self.pipe.interrupt


def call_output(frames, output_type: str, return_dict: bool):
    """generate()'s frames ("np" for "pil") as diffusers returns them."""
    if output_type == "pil":
        frames = [[Image.fromarray(frame) for frame in (video * 255).round().astype(np.uint8)] for video in frames]
    return PipelineOutput(frames) if return_dict else (frames,)
