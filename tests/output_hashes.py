"""Hashes of the frames and latents of every test model in every mode (text-, image- and video-to-video;
DDIM and DPM; CFG, no CFG, dynamic CFG; prompt embeddings, caller latents; LoRA, SAT, offload, bf16,
the SDPA and Triton backends; tiled VAE runs), so that a change meant to keep behaviour is checked bit
for bit on the CPU:

    python -m tests.output_hashes FIXTURES_DIR before.json      # the tree before the change
    python -m tests.output_hashes FIXTURES_DIR after.json       # after it, with the same FIXTURES_DIR
    python -m tests.output_hashes --compare before.json after.json

FIXTURES_DIR keeps the tiny model folders, the SAT directory and the LoRA file between the two runs
(they are written on the first). To hash another checkout, put it first on PYTHONPATH. About a
minute on 2 cores.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import cvfast  # noqa: E402
from tests.fixtures import make_tiny_folder  # noqa: E402
from tests.test_sat import write_sat  # noqa: E402

PROMPT = "a small red boat drifts on a calm lake at sunrise"
STEPS = dict(num_inference_steps=3, seed=11, progress=False)
SMALL = dict(num_frames=17, height=48, width=80)      # 5 latent frames: two VAE chunks
TABLE = dict(num_frames=9, height=64, width=96, allow_untrained_size=True)  # the I2V fixtures' table size


def digest(x) -> str:
    """shape, dtype and the first 16 hex digits of the SHA-256 of the bytes."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().contiguous()
        data = (x.view(torch.uint8) if x.dtype == torch.bfloat16 else x).numpy().tobytes()
        return f"{tuple(x.shape)}:{x.dtype}:" + hashlib.sha256(data).hexdigest()[:16]
    x = np.ascontiguousarray(x)
    return f"{x.shape}:{x.dtype}:" + hashlib.sha256(x.tobytes()).hexdigest()[:16]


def smooth_frame(height: int, width: int, t: float = 0.0) -> np.ndarray:
    """A smooth uint8 RGB picture with some texture (a VAE-friendly input)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    rgb = np.stack([0.5 + 0.4 * np.sin(6 * x + t), 0.5 + 0.4 * np.cos(5 * y - t), 0.5 + 0.3 * np.sin(4 * (x + y))], -1)
    return (np.clip(rgb + rng.normal(0, 0.02, rgb.shape), 0, 1) * 255).round().astype(np.uint8)


class Fixtures:
    """The model folders, SAT directory and LoRA file, written once under `root`."""

    def __init__(self, root: Path):
        self.root = root

    def folder(self, variant: str, scheduler: str = "ddim") -> Path:
        path = self.root / f"{variant}-{scheduler}"
        if not path.exists():
            make_tiny_folder(self.root, variant, scheduler, name=path.name)
        return path

    def sat(self) -> Path:
        path = self.root / "sat-2b"
        if not path.exists():
            write_sat(self.root, "2b")
        return path

    def lora(self) -> Path:
        path = self.root / "lora" / "pytorch_lora_weights.safetensors"
        if not path.exists():
            import diffusers
            from peft import LoraConfig
            from peft.utils import get_peft_model_state_dict
            pipe = diffusers.CogVideoXPipeline.from_pretrained(self.folder("5b"))
            torch.manual_seed(7)
            config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "proj_out"])
            pipe.transformer.add_adapter(config)
            diffusers.CogVideoXPipeline.save_lora_weights(
                path.parent, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer),
                transformer_lora_adapter_metadata=config.to_dict())
        return path


def load(model, **kwargs) -> cvfast.Pipeline:
    return cvfast.load(model, **{"device": "cpu", "backend": "reference", **kwargs})


def tiny_cases(out: dict) -> None:
    tiny = load("tiny")
    out["tiny/np"] = tiny.generate(PROMPT, **STEPS)
    out["tiny/latent"] = tiny.generate(PROMPT, output_type="latent", **STEPS)
    out["tiny/pt"] = tiny.generate(PROMPT, output_type="pt", **STEPS)
    out["tiny/dynamic"] = tiny.generate(PROMPT, use_dynamic_cfg=True, negative_prompt="blurry", **STEPS)
    out["tiny/no-cfg"] = tiny.generate([PROMPT, "a cat"], guidance_scale=1.0, **STEPS)
    out["tiny/batch"] = tiny.generate([PROMPT, "a cat"], negative_prompt=["x", "y"], **STEPS)
    out["tiny/17f"] = tiny.generate(PROMPT, **SMALL, **STEPS)
    out["tiny/generator"] = tiny.generate(PROMPT, generator=torch.Generator().manual_seed(3), num_inference_steps=3,
                                          progress=False)
    embeds = tiny.encode_text(PROMPT, negative_prompt="neg")
    out["tiny/encode_text"] = embeds
    out["tiny/embeds"] = tiny.generate(prompt_embeds=embeds[1:], negative_prompt_embeds=embeds[:1], **STEPS)
    latents = torch.randn((1, 3, 4, 8, 12), generator=torch.Generator().manual_seed(5))
    out["tiny/latents"] = tiny.generate(PROMPT, latents=latents, **STEPS)
    out["tiny/offload"] = load("tiny", offload="model").generate(PROMPT, **STEPS)
    out["tiny/sdpa"] = load("tiny", backend="sdpa").generate(PROMPT, **STEPS)
    out["tiny/auto"] = load("tiny", backend="auto").generate(PROMPT, **STEPS)
    out["tiny/triton"] = load("tiny", backend="triton").generate(PROMPT, num_inference_steps=2, seed=1, progress=False,
                                                                 output_type="latent")


def text_and_video_cases(out: dict, fixtures: Fixtures) -> None:
    video = [smooth_frame(48, 80, 0.3 * i) for i in range(17)]
    for variant in ("2b", "5b", "1.5"):
        for scheduler in ("ddim", "dpm"):
            pipe, name = load(fixtures.folder(variant, scheduler)), f"{variant}/{scheduler}"
            for guidance, dynamic in ((6.0, False), (1.0, False), (6.0, True)):
                out[f"{name}/t2v/g{guidance}/dynamic={dynamic}"] = pipe.generate(
                    PROMPT, guidance_scale=guidance, use_dynamic_cfg=dynamic, max_sequence_length=16, **SMALL, **STEPS)
            out[f"{name}/t2v/latent"] = pipe.generate(PROMPT, output_type="latent", max_sequence_length=16,
                                                      **TABLE, **STEPS)
            if variant == "1.5":  # no video-to-video on 1.5 models
                continue
            for strength in (0.5, 1.0):
                out[f"{name}/v2v/{strength}"] = pipe.generate(PROMPT, video=video, strength=strength,
                                                              num_inference_steps=4, seed=5, progress=False)
            out[f"{name}/v2v/array"] = pipe.generate(PROMPT, video=np.stack(video), strength=0.7, guidance_scale=1.0,
                                                     **STEPS)


def image_cases(out: dict, fixtures: Fixtures) -> None:
    image = Image.fromarray(smooth_frame(64, 96))
    for variant in ("5b-i2v", "1.5-i2v"):
        for scheduler in ("ddim", "dpm"):
            pipe, name = load(fixtures.folder(variant, scheduler)), f"{variant}/{scheduler}/i2v"
            out[name] = pipe.generate(PROMPT, image=image, **TABLE, **STEPS)
            out[f"{name}/sigma"] = pipe.generate(PROMPT, image=image, image_noise_sigma=0.02, **TABLE, **STEPS)
            out[f"{name}/sample"] = pipe.generate(PROMPT, image=smooth_frame(70, 100), image_noise_sigma="sample",
                                                  guidance_scale=1.0, **TABLE, **STEPS)
            out[f"{name}/latent"] = pipe.generate(PROMPT, image=image, output_type="latent", use_dynamic_cfg=True,
                                                  **TABLE, **STEPS)
    out["1.5-i2v/dpm/i2v/17f"] = pipe.generate(PROMPT, image=image, allow_untrained_size=True, **SMALL, **STEPS)


def weights_cases(out: dict, fixtures: Fixtures) -> None:
    pipe = load(fixtures.folder("5b"))
    pipe.load_lora(fixtures.lora(), 0.7)
    out["5b/lora"] = pipe.generate(PROMPT, **SMALL, **STEPS)
    pipe.unload_lora()
    out["5b/lora-unloaded"] = pipe.generate(PROMPT, **SMALL, **STEPS)
    out["sat-2b"] = load(fixtures.sat(), base=fixtures.folder("2b")).generate(PROMPT, **SMALL, **STEPS)
    out["2b/bf16"] = load(fixtures.folder("2b"), dtype="bfloat16").generate(PROMPT, output_type="latent", **SMALL,
                                                                            **STEPS)


def vae_cases(out: dict, fixtures: Fixtures) -> None:
    """Tiled runs at a size whose tiles do not fit exactly (diffusers' quirk: larger output)."""
    from cvfast.models.vae_tiling import Tiling
    vae, tiling = load(fixtures.folder("2b")).vae, Tiling(64, 96)
    z = torch.randn((1, 4, 5, 16, 24), generator=torch.Generator().manual_seed(2))
    out["vae/decode"], out["vae/tiled-decode"] = vae.decode(z), vae.decode(z, tiling=tiling)
    x = torch.rand((1, 3, 17, 128, 192), generator=torch.Generator().manual_seed(2)) * 2 - 1
    out["vae/tiled-encode"] = torch.cat(vae.encode(x, tiling=tiling))


def hashes(fixtures_dir: Path) -> dict[str, str]:
    fixtures, out = Fixtures(fixtures_dir), {}
    tiny_cases(out)
    for cases in (text_and_video_cases, image_cases, weights_cases, vae_cases):
        cases(out, fixtures)
    return {name: digest(value.frames) + f" seed={value.seed} fps={value.fps}"
            if isinstance(value, cvfast.GenerationResult) else digest(value) for name, value in out.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.output_hashes", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs=2, help="FIXTURES_DIR OUT.json, or with --compare BEFORE.json AFTER.json")
    parser.add_argument("--compare", action="store_true")
    args = parser.parse_args(argv)
    if args.compare:
        before, after = (json.loads(Path(p).read_text()) for p in args.paths)
        differ = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        print(f"{len(before)} cases, {len(differ)} differ" + "".join(f"\n  {k}" for k in differ))
        return 1 if differ else 0
    Path(args.paths[1]).write_text(json.dumps(hashes(Path(args.paths[0])), indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.paths[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
