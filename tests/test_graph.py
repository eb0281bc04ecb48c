"""The static-buffer sampler step (`cvfast/sampler/static_step.py`, the function a CUDA graph
captures) against the plain denoising loop it replaced, bit for bit, and the graph cache's logic.

The plain loop below is cvfast's loop before the static step (Python-float guidance scales, the
DPM noise drawn step by step from the generator, the DPM history as a host branch, timesteps and
coefficients indexed by a Python int). The pipeline's frames must equal its frames exactly
(torch.equal, fp32 on the CPU) for DDIM and DPM, with and without CFG, with dynamic CFG, for
text-, image- and video-to-video. diffusers stays the independent oracle of both
(tests/test_pipeline.py, tests/test_image_video.py).

Without a GPU the cache is checked with a stand-in capturer whose "graph" replays by calling the
step function again on the same buffers: what a CUDA graph does, minus the launch savings. So the
buffer refills between calls, the second-use capture and the LRU bound are tested here; that a real
replay equals the eager step bit for bit is tests/test_cuda.py's job.
"""
import types

import pytest
import torch

import cvfast
from cvfast import CVFastInputError
from cvfast.sampler import graph, loop, schedulers
from cvfast.sampler.static_step import StepShape
from tests.fixtures import tiny_folder
from tests.test_image_video import pil, smooth_frame
from tests.test_pipeline import PROMPT, SIZE
from tests.extras import require

require("diffusers")  # the tiny folders are written with diffusers


def plain_denoise(self, latents, text, req, generator, callback, progress, cond=None, graphs=None, cache=None):
    """cvfast's denoising loop before the static step, kept verbatim as the oracle."""
    assert graphs is None and cache is None
    plan = schedulers.make_plan(self.scheduler, req.steps, self.device, req.start)
    run_steps = len(plan.timesteps_host)
    cfg_on = req.guidance > 1.0
    scales = [loop.dynamic_guidance(req.guidance, t, run_steps) if req.dynamic_cfg else req.guidance
              for t in plan.timesteps_host]
    tables = self.transformer.position_tables(latents.shape[1], latents.shape[3], latents.shape[4], self.device)
    ofs = torch.full((1,), 2.0, device=self.device, dtype=self.dtype) if self.config.ofs_embed_dim else None
    copies, channels = (2 if cfg_on else 1), latents.shape[2]
    model_in = latents.new_empty(copies * latents.shape[0], latents.shape[1],
                                 channels + (cond.shape[2] if cond is not None else 0), *latents.shape[3:])
    if cond is not None:
        model_in[:, :, channels:] = cond.repeat(copies, 1, 1, 1, 1)
    halves = model_in[:, :, :channels].chunk(copies)
    prev_x0 = None
    for i in range(run_steps):
        for half in halves:
            half.copy_(latents)
        t = plan.timesteps[i].expand(model_in.shape[0])
        out = self.transformer(model_in, text, t, tables, ofs=ofs).float()
        if cfg_on:
            uncond, cond_out = out.chunk(2)
            out = uncond + scales[i] * (cond_out - uncond)
        noise = [self.randn(latents.shape, generator) for _ in range(plan.noise_draws[i])]
        c, x = plan.coef[i], latents.float()
        x0 = c[0] * x - c[1] * out
        if plan.kind == "ddim":
            new = c[2] * x + c[3] * x0
        else:
            history = plan.noise_draws[i] == 2  # a step with history draws twice, as diffusers' does
            d = c[4] * x0 - c[5] * prev_x0 if history else x0
            new = c[2] * x - c[3] * d + c[6] * noise[-1]
        prev_x0, latents = x0, new.to(self.dtype)
    return latents


def frames_both_ways(pipe, monkeypatch, **kwargs):
    """(the pipeline's frames, the plain loop's frames) for one call, same seed."""
    kw = {"prompt": PROMPT, "num_inference_steps": 4, "seed": 11, "progress": False, "output_type": "pt"} | kwargs
    ours = pipe.generate(**kw).frames
    with monkeypatch.context() as patch:
        patch.setattr(pipe, "denoise", types.MethodType(plain_denoise, pipe))
        plain = pipe.generate(**kw).frames
    return ours, plain


# 4 steps: the DPM runs a first step without history, steps with it, and a last step without it.
@pytest.mark.parametrize("variant,scheduler,guidance,dynamic", [
    ("5b", "ddim", 6.0, False),
    ("5b", "ddim", 1.0, False),
    ("5b", "dpm", 6.0, False),
    ("5b", "dpm", 6.0, True),
    ("5b", "dpm", 1.0, False),
    ("1.5", "ddim", 6.0, True),
    ("1.5", "dpm", 6.0, False),
    ("1.5", "dpm", 1.0, False),
    ("2b", "dpm", 6.0, True),
])
def test_text_to_video_equals_the_plain_loop(variant, scheduler, guidance, dynamic, monkeypatch):
    pipe = cvfast.load(tiny_folder(variant, scheduler), device="cpu", dtype=torch.float32)
    ours, plain = frames_both_ways(pipe, monkeypatch, guidance_scale=guidance, use_dynamic_cfg=dynamic, **SIZE)
    assert ours.std() > 1e-3 and torch.equal(ours, plain)


@pytest.mark.parametrize("variant,scheduler,dynamic", [("5b-i2v", "dpm", True), ("1.5-i2v", "ddim", False)])
def test_image_to_video_equals_the_plain_loop(variant, scheduler, dynamic, monkeypatch):
    pipe = cvfast.load(tiny_folder(variant, scheduler), device="cpu", dtype=torch.float32)
    ours, plain = frames_both_ways(pipe, monkeypatch, image=pil(smooth_frame(64, 96)), use_dynamic_cfg=dynamic,
                                   num_frames=9, height=64, width=96, allow_untrained_size=True)
    assert ours.std() > 1e-3 and torch.equal(ours, plain)


def test_video_to_video_equals_the_plain_loop(monkeypatch):
    pipe = cvfast.load(tiny_folder("5b", "dpm"), device="cpu", dtype=torch.float32)
    video = [pil(smooth_frame(48, 80, t=0.3 * i)) for i in range(17)]
    ours, plain = frames_both_ways(pipe, monkeypatch, video=video, strength=0.6, num_inference_steps=6)
    assert ours.std() > 1e-3 and torch.equal(ours, plain)


class StandInGraph:
    """What `graph.capture_cuda` returns, on a CPU: replay calls the captured step again."""

    def __init__(self, step, log):
        self.step, self.log, self.held_bytes = step, log, 1000

    def replay(self):
        self.log.append("replay")
        self.step()


def stand_in_capture(log):
    def capture(step):
        log.append("capture")
        step()  # the warm-up is the run's first step, as in capture_cuda
        return StandInGraph(step, log)
    return capture


def denoise_through(pipe, cache, seed, callback=None, **kwargs):
    """generate()'s text and latent stages, then its denoising with the graph cache `cache`."""
    req = pipe.request(prompt=PROMPT, num_inference_steps=3, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    text = pipe.encode_prompts(req.text)
    encoded = pipe.encode_frames(req, gen) if req.mode != "t2v" else None
    latents, cond = pipe.initial_latents(req, gen, None, encoded)
    return pipe.denoise(latents, text, req, gen, callback, False, cond, cache)


@pytest.mark.parametrize("variant,scheduler,kwargs", [
    ("5b", "dpm", {"use_dynamic_cfg": True, **SIZE}),
    ("5b-i2v", "ddim", {"image": torch.rand(3, 64, 96)}),
])
def test_cached_buffers_and_replays_equal_eager_runs(variant, scheduler, kwargs):
    pipe = cvfast.load(tiny_folder(variant, scheduler), device="cpu", dtype=torch.float32)
    eager = {s: pipe.generate(PROMPT, num_inference_steps=3, seed=s, progress=False, output_type="latent",
                              **kwargs).frames for s in (1, 2)}
    log, seen = [], []
    cache = graph.GraphCache(stand_in_capture(log))
    first = denoise_through(pipe, cache, 1, **kwargs)
    assert log == []  # a shape's first use runs eagerly
    second = denoise_through(pipe, cache, 2, callback=lambda i, t, lat: seen.append(i), **kwargs)
    assert log == ["capture", "replay", "replay"] and seen == [0, 1, 2]
    third = denoise_through(pipe, cache, 1, **kwargs)
    assert log[3:] == ["replay"] * 3
    # Every input (latents, text, image latents, noise, DPM history, step index) was refilled.
    assert torch.equal(first, eager[1]) and torch.equal(second, eager[2]) and torch.equal(third, eager[1])
    assert first.data_ptr() != third.data_ptr()  # what was handed out is not the cached buffer
    assert len(cache.entries) == 1


def shape(frames):
    return StepShape((1, frames, 4, 6, 10), 0, 2, (2, 16, 32), 3)


class Buffers:
    def nbytes(self):
        return 24


def run(cache, key, log, steps=3):
    entry = cache.entry(key, Buffers)
    for _ in range(steps):
        cache.run_step(entry, lambda: log.append("eager"))
    return entry


def test_cache_captures_on_second_use_and_keeps_the_two_most_recent_shapes():
    log = []
    cache = graph.GraphCache(stand_in_capture(log), max_graphs=2)
    a, b, c = shape(3), shape(5), shape(7)
    run(cache, a, log)
    assert log == ["eager"] * 3 and cache.entries[a].graphs == {}
    log.clear()
    run(cache, a, log)
    assert log == ["capture", "eager", "replay", "eager", "replay", "eager"]
    log.clear()
    run(cache, b, log)
    run(cache, a, log)  # a is now the most recently used
    assert log == ["eager"] * 3 + ["replay", "eager"] * 3
    assert cache.held_bytes() == 24 + 1000 + 24
    run(cache, c, log)  # evicts b, the least recently used
    assert list(cache.entries) == [a, c]
    log.clear()
    entry = run(cache, b, log)  # b is new again: eager, its graph not yet captured
    assert log == ["eager"] * 3 and entry.uses == 1 and list(cache.entries) == [c, b]


def test_cuda_graph_argument_is_checked():
    with pytest.raises(CVFastInputError, match=r"cuda_graph=True .*CUDA graphs need"):
        cvfast.load("tiny", device="cpu", cuda_graph=True)
    for bad in ("yes", 1, None):
        with pytest.raises(CVFastInputError, match=r"cuda_graph=.*False, True or 'auto'"):
            cvfast.load("tiny", device="cpu", cuda_graph=bad)
    cuda = torch.device("cuda")  # the rule itself, without needing a device
    assert graph.check_setting(True, cuda, "none") is True
    assert graph.check_setting("auto", cuda, "none") is False
    with pytest.raises(CVFastInputError, match=r"cuda_graph=True .*offload='model'"):
        graph.check_setting(True, cuda, "model")


def test_generate_refuses_a_graph_on_the_cpu_and_auto_runs_eagerly():
    pipe = cvfast.load("tiny", device="cpu")
    assert pipe.cuda_graph == "auto"
    with pytest.raises(CVFastInputError, match=r"cuda_graph=True .*cpu"):
        pipe.generate("a cat", num_inference_steps=2, progress=False, cuda_graph=True)
    kw = {"num_inference_steps": 2, "seed": 0, "progress": False, "output_type": "latent"}
    auto = pipe.generate("a cat", cuda_graph="auto", **kw).frames
    assert torch.equal(auto, pipe.generate("a cat", cuda_graph=False, **kw).frames) and pipe.graphs is None


def test_a_call_with_another_scheduler_has_its_own_graph():
    """generate(scheduler=...) for one call: the step of a DDIM call is never replayed for a DPM one
    (the scheduler is part of the cache's key), and the DPM call equals a DPM pipeline's."""
    pipe = cvfast.load(tiny_folder("5b", "ddim"), device="cpu", dtype=torch.float32)
    dpm_pipe = cvfast.load(tiny_folder("5b", "ddim"), device="cpu", dtype=torch.float32, scheduler="dpm")
    kw = dict(num_inference_steps=3, seed=1, progress=False, output_type="latent", use_dynamic_cfg=True, **SIZE)
    expected = dpm_pipe.generate(PROMPT, **kw).frames
    assert torch.equal(pipe.generate(PROMPT, scheduler="dpm", **kw).frames, expected)
    assert not torch.equal(pipe.generate(PROMPT, **kw).frames, expected)  # the pipeline's own DDIM
    log = []
    cache = graph.GraphCache(stand_in_capture(log))
    denoise_through(pipe, cache, 1, **SIZE)
    denoise_through(pipe, cache, 1, **SIZE)  # DDIM captured
    got = denoise_through(pipe, cache, 1, scheduler="dpm", use_dynamic_cfg=True, **SIZE)
    assert sorted(key.kind for key in cache.entries) == ["ddim", "dpm"]
    assert torch.equal(got, expected)
    with pytest.raises(CVFastInputError, match=r"scheduler='euler' is not accepted: None \(the pipeline's\) or one of"):
        pipe.generate(PROMPT, scheduler="euler", **SIZE)
