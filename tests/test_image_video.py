"""Image-to-video and video-to-video against diffusers' pipelines (same folder, prompt and seed,
fp32 on the CPU; the bar is a relative L2 error of 5e-5), and their input validation."""
import dataclasses
import logging

import numpy as np
import pytest
import torch

import cvfast
from cvfast import CVFastInputError
from cvfast.runtime import Offload
from tests.fixtures import tiny_folder
from tests.test_pipeline import PROMPT
from tests.numerics import rel_l2
from tests.extras import require

diffusers = require("diffusers")
from PIL import Image  # noqa: E402  (diffusers depends on Pillow)


def smooth_frame(height, width, t=0, seed=0):
    """A smooth picture with some texture: a VAE-friendly input whose encoding is not trivial."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    rgb = np.stack([0.5 + 0.4 * np.sin(6 * x + t), 0.5 + 0.4 * np.cos(5 * y - t), 0.5 + 0.3 * np.sin(4 * (x + y))], -1)
    return np.clip(rgb + rng.normal(0, 0.02, rgb.shape), 0, 1)


def pil(arr):
    return Image.fromarray((arr * 255).round().astype(np.uint8))


def run_diffusers(cls_name, folder, seed, **kw):
    pipe = getattr(diffusers, cls_name).from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=PROMPT, generator=torch.Generator("cpu").manual_seed(seed), output_type="np", max_sequence_length=16,
                **kw).frames


@pytest.mark.parametrize("variant,size,scheduler,dynamic", [
    ("5b-i2v", dict(num_frames=9, height=64, width=96), "dpm", True),    # learned positions: its table size
    ("1.5-i2v", dict(num_frames=9, height=64, width=96), "ddim", False),  # ofs + temporal patching
    ("1.5-i2v", dict(num_frames=17, height=48, width=80), "dpm", False),
])
def test_image_to_video_matches_diffusers(variant, size, scheduler, dynamic):
    folder = tiny_folder(variant, scheduler)
    image = pil(smooth_frame(size["height"], size["width"]))
    kw = dict(num_inference_steps=3, guidance_scale=6.0, use_dynamic_cfg=dynamic, **size)
    pipe = cvfast.load(folder, device="cpu", dtype=torch.float32, backend="reference")
    ours = pipe.generate(PROMPT, image=image, seed=21, progress=False, allow_untrained_size=True, **kw).frames
    expected = run_diffusers("CogVideoXImageToVideoPipeline", folder, 21, image=image, **kw)
    assert ours.shape == expected.shape == (1, size["num_frames"], size["height"], size["width"], 3)
    assert np.isfinite(ours).all() and ours.std() > 1e-3
    assert rel_l2(ours, expected) <= 5e-5


@pytest.mark.parametrize("strength,scheduler,guidance", [(0.7, "ddim", 6.0), (1.0, "dpm", 6.0), (0.5, "dpm", 1.0)])
def test_video_to_video_matches_diffusers(strength, scheduler, guidance):
    folder = tiny_folder("5b", scheduler)
    video = [pil(smooth_frame(48, 80, t=0.3 * i)) for i in range(17)]
    kw = dict(num_inference_steps=4, guidance_scale=guidance, strength=strength)
    pipe = cvfast.load(folder, device="cpu", dtype=torch.float32, backend="reference")
    ours = pipe.generate(PROMPT, video=video, seed=5, progress=False, **kw).frames
    expected = run_diffusers("CogVideoXVideoToVideoPipeline", folder, 5, video=video, height=48, width=80, **kw)
    assert ours.shape == expected.shape == (1, 17, 48, 80, 3)
    assert rel_l2(ours, expected) <= 5e-5


def test_image_inputs_of_every_type_agree_and_are_resized():
    pipe = cvfast.load(tiny_folder("5b-i2v", "ddim"), device="cpu")
    arr = smooth_frame(64, 96)
    u8 = (arr * 255).round().astype(np.uint8)
    kw = dict(num_inference_steps=1, seed=0, progress=False, output_type="latent")
    from_pil = pipe.generate("a cat", image=pil(arr), **kw).frames
    from_u8 = pipe.generate("a cat", image=u8, **kw).frames
    from_tensor = pipe.generate("a cat", image=torch.from_numpy(u8).permute(2, 0, 1).float() / 255, **kw).frames
    assert torch.equal(from_pil, from_u8) and torch.allclose(from_pil, from_tensor, atol=1e-6)
    bigger = pil(smooth_frame(128, 192))  # resized (Lanczos) to 64x96
    assert torch.isfinite(pipe.generate("a cat", image=bigger, **kw).frames).all()


def test_image_noise_augmentation_is_off_by_default_and_changes_the_video_when_on():
    pipe = cvfast.load(tiny_folder("5b-i2v", "ddim"), device="cpu")
    image = pil(smooth_frame(64, 96))
    kw = dict(num_inference_steps=1, seed=0, progress=False, output_type="latent")
    off = pipe.generate("a cat", image=image, **kw).frames
    assert torch.equal(off, pipe.generate("a cat", image=image, image_noise_sigma=None, **kw).frames)
    fixed = pipe.generate("a cat", image=image, image_noise_sigma=0.05, **kw).frames
    sampled = pipe.generate("a cat", image=image, image_noise_sigma="sample", **kw).frames
    assert not torch.equal(off, fixed) and not torch.equal(off, sampled) and not torch.equal(fixed, sampled)
    assert torch.equal(sampled, pipe.generate("a cat", image=image, image_noise_sigma="sample", **kw).frames)


@pytest.mark.parametrize("variant,kwargs,match", [
    ("5b-i2v", dict(), r"image=None.*image-to-video"),
    ("5b", dict(image=np.zeros((48, 80, 3), np.uint8)), r"image=.*text-to-video"),
    ("5b-i2v", dict(image=np.zeros((64, 96, 3), np.uint8), video=[np.zeros((64, 96, 3), np.uint8)]), "video="),
    ("5b", dict(video=[]), "video=.*at least one frame"),
    ("5b", dict(video=np.zeros((17, 48, 80, 3), np.uint8), strength=0.0), r"strength=0.0 .*\(0, 1\]"),
    ("5b", dict(video=np.zeros((17, 48, 80, 3), np.uint8), strength=1.5), r"strength=1.5"),
    ("5b", dict(video=np.zeros((17, 48, 80, 3), np.uint8), strength=0.1, num_inference_steps=5), "no denoising step"),
    ("1.5", dict(video=np.zeros((17, 48, 80, 3), np.uint8)), "video=.*1.5"),
    ("5b-i2v", dict(image=np.zeros((64, 96, 3), np.uint8), image_noise_sigma=-1), "image_noise_sigma=-1"),
    ("5b-i2v", dict(image=np.zeros((64, 96, 4), np.uint8)), r"image='array\(64, 96, 4\)'"),
    ("5b-i2v", dict(image=np.full((64, 96, 3), 2.0)), "image='float frames in"),
    ("5b", dict(vae_tiling="yes"), "vae_tiling='yes'"),
])
def test_conditioning_inputs_are_validated(variant, kwargs, match):
    pipe = cvfast.load(tiny_folder(variant, "ddim"), device="cpu")
    with pytest.raises(CVFastInputError, match=match):
        pipe.generate("a cat", progress=False, **{"num_inference_steps": 2, **kwargs})


def test_an_untrained_15_i2v_size_runs_with_one_warning(caplog):
    """CogVideoX1.5-I2V was trained at 768 x 768..1360; another size (a fine-tune's, a small model's)
    runs as in diffusers, with one warning line; allow_untrained_size=True says it is intended."""
    pipe = cvfast.load(tiny_folder("1.5-i2v", "ddim"), device="cpu")
    kw = dict(image=np.zeros((64, 96, 3), np.uint8), num_frames=9, height=64, width=96, num_inference_steps=1,
              progress=False, output_type="latent", max_sequence_length=16)
    with caplog.at_level(logging.WARNING, logger="cvfast"):
        assert pipe.generate("a cat", **kw).frames.shape[0] == 1
    warned = [r for r in caplog.records if "not a size CogVideoX1.5-I2V was trained at" in r.getMessage()]
    assert len(warned) == 1 and "9 frames at 64x96" in warned[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cvfast"):
        pipe.generate("a cat", allow_untrained_size=True, **kw)
    assert not [r for r in caplog.records if "trained at" in r.getMessage()]


def test_offload_schedule_keeps_one_component_on_the_device(monkeypatch):
    """On a CPU-only machine the compute device and the CPU home are the same, so the home is replaced
    by a stand-in ("meta") and moves are recorded instead of made: each component must be brought to
    the device right before its stage with the others sent home, and while the VAE decodes, the
    transformer and the text encoder must be at home."""
    loaded = cvfast.load("tiny", offload="model")
    where = {name: "cpu" for name in loaded.modules()}
    brought = []

    class Recorded(Offload):
        def move(self, module, device):
            name = next(n for n, m in loaded.modules().items() if m is module)
            where[name] = device.type
            if device.type == "cpu":
                brought.append((name, sorted(n for n, w in where.items() if w == "cpu")))

    offload = Recorded("model", loaded.device)
    offload.home = torch.device("meta")
    pipe = cvfast.Pipeline(loaded.components, dataclasses.replace(loaded.runtime, offload=offload))
    during_decode = {}
    real_decode = pipe.vae.decode
    monkeypatch.setattr(pipe.vae, "decode", lambda z, **kw: during_decode.update(where) or real_decode(z, **kw))
    pipe.generate("a cat", num_inference_steps=1, seed=0, progress=False)
    assert brought == [("text_encoder", ["text_encoder"]), ("transformer", ["transformer"]), ("vae", ["vae"])]
    assert during_decode == {"text_encoder": "meta", "transformer": "meta", "vae": "cpu"}
    with pytest.raises(CVFastInputError, match="offload='disk'"):
        cvfast.load("tiny", offload="disk")


def test_auto_tiling_follows_the_memory_projection(monkeypatch, caplog):
    """vae_tiling="auto" tiles exactly when the projected untiled peak exceeds 0.9 x the free memory."""
    from cvfast.models import vae_tiling
    pipe = cvfast.load("tiny")
    latents = pipe.generate("a cat", num_inference_steps=1, seed=0, progress=False, output_type="latent").frames
    z_shape = (latents.shape[1], latents.shape[3], latents.shape[4])
    projected = vae_tiling.projected_decode_peak_bytes(pipe.vae.config, *z_shape, torch.float32)
    seen = []
    real_decode = pipe.vae.decode
    monkeypatch.setattr(pipe.vae, "decode", lambda z, tiling=None, **kw: seen.append(tiling) or real_decode(z, tiling=None))
    # The tiny VAE's tiles never fit exactly; pretend they do to see the memory rule alone.
    monkeypatch.setattr(vae_tiling.Tiling, "keeps_size", lambda *args, **kwargs: True)
    for free, tiled in ((int(projected / 0.9) + 2, False), (int(projected / 0.9) - 2, True)):
        monkeypatch.setattr(vae_tiling, "free_device_bytes", lambda device, free=free: free)
        pipe.decode(latents, "auto")
        assert (seen[-1] is not None) == tiled
    pipe.decode(latents, False)
    pipe.decode(latents, True)
    assert seen[-2] is None and seen[-1] is not None
    # With tiles that would change the size, "auto" runs untiled and says so in one line.
    monkeypatch.undo()
    monkeypatch.setattr(pipe.vae, "decode", lambda z, tiling=None, **kw: seen.append(tiling) or real_decode(z, tiling=None))
    monkeypatch.setattr(vae_tiling, "free_device_bytes", lambda device: int(projected / 0.9) - 2)
    with caplog.at_level(logging.WARNING, logger="cvfast"):
        pipe.decode(latents, "auto")
    assert seen[-1] is None and len(caplog.records) == 1 and "running untiled" in caplog.records[0].getMessage()


def test_tiling_that_would_change_the_size_is_refused_before_any_work():
    """The tiny VAE's default tiles (32x48 px) do not fit 64x96 exactly: a tiled encode would return a
    latent of the wrong size (diffusers' quirk), so vae_tiling=True is refused up front."""
    pipe = cvfast.load(tiny_folder("5b-i2v"), device="cpu")
    with pytest.raises(cvfast.CVFastInputError, match="vae_tiling=True.*64x96"):
        pipe.generate("a cat", image=pil(smooth_frame(64, 96)), num_frames=9, height=64, width=96,
                      vae_tiling=True, progress=False, max_sequence_length=16)


def test_fit_crops_pads_or_stretches_to_the_target_aspect():
    from cvfast.pipeline.media import fitted
    frame = np.zeros((60, 180, 3), np.float32)
    frame[:, :60, 0] = frame[:, 60:120, 1] = frame[:, 120:, 2] = 1.0  # red, green, blue thirds
    crop, pad, stretch = (fitted(frame, 48, 48, fit) for fit in ("crop", "pad", "stretch"))
    assert crop.shape == pad.shape == stretch.shape == (48, 48, 3)
    assert crop[:, :, 1].mean() > 0.95                              # the centre third only
    assert pad[:12].max() == 0 and pad[-12:].max() == 0              # black above and below (Lanczos rings
                                                                     # into the 4 rows next to the picture)
    assert stretch[:, :8, 0].mean() > 0.95 and stretch[:, -8:, 2].mean() > 0.95  # all three, squeezed


def test_video_to_video_adapts_a_video_the_model_does_not_take(caplog):
    """12 frames at 250x333: the first 9 frames (4k + 1 with an odd latent count), 240x320 (multiples
    of 16), said in one warning line; num_frames picks fewer, never more."""
    pipe = cvfast.load(tiny_folder("5b", "ddim"), device="cpu")
    video = (np.random.default_rng(0).random((12, 250, 333, 3)) * 255).astype(np.uint8)
    kw = dict(num_inference_steps=2, seed=0, progress=False, output_type="latent")
    with caplog.at_level(logging.WARNING, logger="cvfast"):
        latents = pipe.generate("a cat", video=video, **kw).frames
    assert latents.shape[1] == 3 and latents.shape[3:] == (240 // 8, 320 // 8)
    said = [r.message for r in caplog.records if "video-to-video" in r.message]
    assert len(said) == 1 and "first 9 of 12 frames" in said[0] and "240x320 from its 250x333" in said[0]
    assert pipe.generate("a cat", video=video, num_frames=9, height=64, width=96, **kw).frames.shape[1] == 3
    with pytest.raises(CVFastInputError, match="num_frames=17"):
        pipe.generate("a cat", video=video, num_frames=17, **kw)


def test_sequential_offload_brings_one_block_at_a_time(monkeypatch):
    """offload="sequential": the transformer's and T5's blocks each arrive right before their forward
    and leave right after it, so no two are on the device at once; the video is the resident
    pipeline's (on a CPU-only machine the moves are recorded; tests/test_cuda.py measures them)."""
    kw = dict(num_inference_steps=2, seed=0, progress=False, output_type="latent")
    pipe = cvfast.load("tiny", offload="sequential")
    offload, events = pipe.runtime.offload, []
    blocks = {id(b): f"transformer {i}" for i, b in enumerate(pipe.transformer.blocks)}
    blocks.update({id(b): f"t5 {i}" for i, b in enumerate(pipe.text_encoder.blocks())})
    monkeypatch.setattr(offload, "arrive", lambda block: events.append(("in", blocks[id(block)])))
    monkeypatch.setattr(offload, "leave", lambda block: events.append(("out", blocks[id(block)])))
    frames = pipe.generate("a cat", **kw).frames
    assert torch.equal(frames, cvfast.load("tiny").generate("a cat", **kw).frames)
    assert [e[0] for e in events] == ["in", "out"] * (len(events) // 2)  # never two blocks at once
    assert all(a[1] == b[1] for a, b in zip(events[::2], events[1::2]))
    arrivals = [name for kind, name in events if kind == "in"]
    assert arrivals == ["t5 0", "t5 1"] + ["transformer 0", "transformer 1"] * 2  # 2 steps
    with pytest.raises(CVFastInputError, match="compile=True is not accepted: False with offload='sequential'"):
        cvfast.load("tiny", offload="sequential", compile=True)
    from cvfast.sampler import graph
    with pytest.raises(CVFastInputError, match="cuda_graph=True is not accepted: False or 'auto' with "
                                               "offload='sequential'"):
        graph.check_setting(True, torch.device("cuda"), "sequential")
