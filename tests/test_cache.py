"""Step caching (cvfast/sampler/cache.py) against its oracles, fp32 on the CPU:
- FirstBlockCache and MagCache: diffusers' pipeline with the same cache config (`enable_cache`), same
  folder, prompt and seed: the same computed steps and frames within 5e-5 relative L2, for a 2B-like
  DDIM model, a 5B-like DPM model with dynamic CFG, and image-to-video models; MagCache's calibration
  against diffusers' calibration mode.
- TeaCache: the schedule equals the published rule computed here from diffusers' time embedding of
  the same weights, and the frames equal diffusers' model run with that schedule applied by the test.
Thresholds are chosen so that each run computes some steps and skips others (the random tiny models'
residuals move much more than a trained model's, hence thresholds near 1)."""
import ast
import json

import numpy as np
import pytest
import torch

import cvfast
from cvfast import CVFastInputError, FirstBlockCache, MagCache, TeaCache
from cvfast.sampler import cache as step_cache
from cvfast.sampler import graph
from tests.fixtures import tiny_folder
from tests.numerics import rel_l2
from tests.test_graph import stand_in_capture
from tests.test_image_video import pil, smooth_frame
from tests.test_pipeline import PROMPT
from tests.extras import require

diffusers = require("diffusers")
from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig  # noqa: E402

STEPS = 10
SIZE = dict(num_frames=9, height=64, width=96)
# (variant, scheduler, dynamic CFG, image-to-video)
CASES = [("2b", "ddim", False, False), ("5b", "dpm", True, False), ("5b-i2v", "ddim", False, True),
         ("1.5-i2v", "dpm", False, True)]


def inputs(variant: str, i2v: bool) -> dict:
    image = dict(image=pil(smooth_frame(64, 96))) if i2v else {}
    return dict(**image, **SIZE, max_sequence_length=16)


def cvfast_run(folder, cache, dynamic, i2v, variant, **kwargs):
    pipe = cvfast.load(folder, device="cpu", dtype=torch.float32, backend="reference")
    return pipe.generate(PROMPT, num_inference_steps=STEPS, seed=3, progress=False, use_dynamic_cfg=dynamic,
                         cache=cache, allow_untrained_size=True, **inputs(variant, i2v), **kwargs)


def diffusers_run(folder, config, dynamic, i2v, variant, prepare=None):
    """diffusers' frames and the steps at which its last block ran (with `config` as its cache)."""
    cls = diffusers.CogVideoXImageToVideoPipeline if i2v else diffusers.CogVideoXPipeline
    pipe = cls.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    if config is not None:
        pipe.transformer.enable_cache(config)
    if prepare is not None:
        prepare(pipe.transformer)
    calls, seen = [], []
    pipe.transformer.transformer_blocks[-1].attn1.register_forward_hook(lambda *args: calls.append(1))
    frames = pipe(prompt=PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(3),
                  use_dynamic_cfg=dynamic, output_type="np", **inputs(variant, i2v),
                  callback_on_step_end=lambda p, i, t, kw: seen.append(len(calls)) or {}).frames
    return frames, [i for i, n in enumerate(seen) if n > (seen[i - 1] if i else 0)]


def assert_same_run(ours, frames, computed):
    assert ours.cache["computed_steps"] == computed
    assert 0 < len(computed) < STEPS  # a mix: the cache really skipped, and really computed
    assert sorted(ours.cache["computed_steps"] + ours.cache["skipped_steps"]) == list(range(STEPS))
    assert rel_l2(ours.frames, frames) <= 5e-5


@pytest.mark.parametrize("variant,scheduler,dynamic,i2v", CASES)
def test_first_block_cache_equals_diffusers(variant, scheduler, dynamic, i2v):
    folder = tiny_folder(variant, scheduler)
    ours = cvfast_run(folder, FirstBlockCache(1.0), dynamic, i2v, variant)
    frames, computed = diffusers_run(folder, FirstBlockCacheConfig(threshold=1.0), dynamic, i2v, variant)
    assert_same_run(ours, frames, computed)
    uncached = cvfast_run(folder, None, dynamic, i2v, variant)
    assert uncached.cache is None and rel_l2(ours.frames, uncached.frames) > 1e-3


def diffusers_calibration(folder, dynamic, i2v, variant, capsys) -> list[float]:
    config = MagCacheConfig(calibrate=True, num_inference_steps=STEPS)
    capsys.readouterr()
    diffusers_run(folder, config, dynamic, i2v, variant)
    return ast.literal_eval(capsys.readouterr().out.strip().splitlines()[-1])  # the list it prints last


@pytest.mark.parametrize("variant,scheduler,dynamic,i2v", CASES[:3])
def test_mag_cache_and_its_calibration_equal_diffusers(tmp_path, capsys, variant, scheduler, dynamic, i2v):
    folder = tiny_folder(variant, scheduler)
    pipe = cvfast.load(folder, device="cpu", dtype=torch.float32, backend="reference")
    path = tmp_path / "ratios.json"
    ratios = pipe.calibrate_cache(PROMPT, out=path, num_inference_steps=STEPS, seed=3, progress=False,
                                  use_dynamic_cfg=dynamic, allow_untrained_size=True, **inputs(variant, i2v))
    theirs = diffusers_calibration(folder, dynamic, i2v, variant, capsys)
    assert len(ratios) == STEPS and ratios[0] == 1.0
    assert np.allclose(ratios, theirs, rtol=1e-4, atol=0)
    config = dict(threshold=0.2, max_skip_steps=2, retention_ratio=0.2)
    ours = cvfast_run(folder, MagCache(ratios=str(path), **config), dynamic, i2v, variant)
    frames, computed = diffusers_run(folder, MagCacheConfig(mag_ratios=ratios, num_inference_steps=STEPS, **config),
                                     dynamic, i2v, variant)
    assert_same_run(ours, frames, computed)
    assert rel_l2(ours.frames, cvfast_run(folder, None, dynamic, i2v, variant).frames) > 1e-3


def teacache_reference(transformer, schedule):
    """diffusers' transformer with `schedule` applied the way TeaCache applies its decisions: on a
    computed step the block stack runs and its residual (video and text streams) is kept; on a skipped
    step every block passes its input through and the last one adds the kept residual."""
    blocks, state = transformer.transformer_blocks, {"step": 0}

    def wrap(index, block):
        forward = block.forward

        def run(hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, attention_kwargs=None):
            compute = schedule[state["step"]]
            if index == 0:
                state["inputs"] = (hidden_states, encoder_hidden_states)
            h, e = (forward(hidden_states, encoder_hidden_states, temb, image_rotary_emb, attention_kwargs)
                    if compute else (hidden_states, encoder_hidden_states))
            if index == len(blocks) - 1:
                h_in, e_in = state["inputs"]
                if compute:
                    state["residual"] = (h - h_in, e - e_in)
                else:
                    h, e = h_in + state["residual"][0], e_in + state["residual"][1]
                state["step"] += 1
            return h, e
        block.forward = run
    for index, block in enumerate(blocks):
        wrap(index, block)


def teacache_schedule(folder, threshold, coefficients, rows, ofs) -> list[bool]:
    """The published rule, from diffusers' time embedding of the folder's weights at each timestep."""
    model = diffusers.CogVideoXTransformer3DModel.from_pretrained(folder, subfolder="transformer")
    scheduler = diffusers.CogVideoXDDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    scheduler.set_timesteps(STEPS)
    rescale, computes, accumulated, previous = np.poly1d(coefficients), [], 0.0, None
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            emb = model.time_embedding(model.time_proj(t.expand(rows)).float())
            if ofs:
                emb = emb + model.ofs_embedding(model.ofs_proj(torch.full((rows,), 2.0)).float())
            compute = i in (0, STEPS - 1)
            if not compute:
                accumulated += rescale(((emb - previous).abs().mean() / previous.abs().mean()).item())
                compute = accumulated >= threshold
            accumulated = 0.0 if compute else accumulated
            computes.append(compute)
            previous = emb
    return computes


# Thresholds that mix computed and skipped steps (the random tiny models' time embeddings change by
# 0.4-1.7 between steps; the 2B polynomial is negative there: everything between the first and the
# last step is skipped, which is still a mix).
@pytest.mark.parametrize("variant,scheduler,dynamic,i2v,coefficients,threshold", [
    ("2b", "ddim", False, False, None, 0.05),
    ("5b", "dpm", True, False, (0.0, 0.0, 0.0, 1.0, 0.0), 1.0),   # the change itself, unscaled
    ("1.5-i2v", "ddim", False, True, None, 5.0),
])
def test_teacache_schedule_is_the_published_rule_and_frames_follow_it(variant, scheduler, dynamic, i2v,
                                                                        coefficients, threshold):
    folder = tiny_folder(variant, scheduler)
    policy = TeaCache(threshold, coefficients)
    ours = cvfast_run(folder, policy, dynamic, i2v, variant)
    expected = teacache_schedule(folder, threshold, coefficients or step_cache.TEACACHE_COEFFICIENTS[variant], 2,
                                 variant == "1.5-i2v")
    assert ours.cache["computed_steps"] == [i for i, c in enumerate(expected) if c]
    frames, computed = diffusers_run(folder, None, dynamic, i2v, variant,
                                     prepare=lambda model: teacache_reference(model, expected))
    assert_same_run(ours, frames, computed)
    assert rel_l2(ours.frames, cvfast_run(folder, None, dynamic, i2v, variant).frames) > 1e-3


@pytest.mark.parametrize("cache", [FirstBlockCache(1.0), TeaCache(1.0, (0.0, 0.0, 0.0, 1.0, 0.0))])
def test_video_to_video_caches_over_the_steps_that_run(cache):
    """strength 0.6 of 10 steps runs the last 6: the cache's steps are those 6 (0-based), some skipped."""
    pipe = cvfast.load(tiny_folder("5b", "ddim"), device="cpu", dtype=torch.float32)
    video = [pil(smooth_frame(48, 80, t=0.3 * i)) for i in range(9)]
    kw = dict(video=video, strength=0.6, num_inference_steps=10, seed=2, progress=False)
    cached, uncached = pipe.generate(PROMPT, cache=cache, **kw), pipe.generate(PROMPT, **kw)
    assert sorted(cached.cache["computed_steps"] + cached.cache["skipped_steps"]) == list(range(6))
    assert cached.cache["skipped_steps"] and rel_l2(cached.frames, uncached.frames) > 1e-4


def test_teacache_presets_cover_every_variant():
    for variant in ("2b", "5b", "5b-i2v", "1.5", "1.5-i2v"):
        policy = step_cache.parse("teacache", variant)
        assert policy.coefficients == step_cache.TEACACHE_COEFFICIENTS[variant] and policy.threshold == 0.2
    assert step_cache.TEACACHE_COEFFICIENTS["5b"] == step_cache.TEACACHE_COEFFICIENTS["5b-i2v"]
    assert step_cache.parse("teacache:0.1", "2b").threshold == 0.1
    assert step_cache.parse("fbcache", "2b") == FirstBlockCache(0.05)
    assert step_cache.parse(None, "2b") is None and step_cache.parse(False, "2b") is None


@pytest.mark.parametrize("spec,match", [
    ("fastcache", "cache='fastcache' is not accepted"),
    ("teacache:fast", "'fast' is not a number"),
    ("teacache:0.1:x.json", "only magcache takes a ratios file"),
    (TeaCache(-1.0), "threshold=-1.0"),
    (TeaCache(0.1, coefficients=("a",)), "coefficients="),
    (TeaCache(0.1, coefficients=5), "coefficients=5"),
    ("magcache", "calibrate-cache"),
    (MagCache(ratios=[1.0, -2.0]), "positive numbers"),
    (MagCache(ratios="missing.json"), "ratios JSON written by calibrate_cache"),
    (MagCache(ratios=[1.0], max_skip_steps=-1), "max_skip_steps=-1"),
    (7, "cache=7 is not accepted"),
])
def test_bad_cache_specs_are_refused_before_any_work(spec, match):
    pipe = cvfast.load("tiny", device="cpu")
    pipe.text_encoder.encode = lambda *a, **k: pytest.fail("work started")
    with pytest.raises(CVFastInputError, match=match):
        pipe.generate("a cat", cache=spec, progress=False)
    with pytest.raises(CVFastInputError, match=match):
        cvfast.load("tiny", device="cpu", cache=spec)


def test_magcache_schedule_follows_diffusers_arithmetic():
    """Retention steps compute; after them skips run while the ratio error stays under the threshold,
    at most max_skip_steps in a row; ratios of another length are resampled to the steps."""
    policy = MagCache(0.1, ratios=[1.0, 0.99, 0.98, 0.97, 0.9, 1.0, 1.0, 1.0, 1.0, 1.0], max_skip_steps=2,
                      retention_ratio=0.2).checked("5b")
    # Retention int(0.2 * 10 + 0.5) = 2 steps. Step 2: error |1 - 0.98| = 0.02, skip; step 3: product
    # 0.9506, error 0.0694, skip; step 4: product 0.8555, error 0.214 > 0.1: compute and restart; steps 5
    # and 6: error 0, skip; step 7: a third skip in a row is one too many: compute; steps 8, 9 skip.
    assert policy.schedule(10) == [True, True, False, False, True, False, False, True, False, False]
    # indices round(i * 2 / 4) = round(0, 0.5, 1, 1.5, 2), halves to even as torch.round: 0, 0, 1, 2, 2
    assert step_cache.resample(torch.tensor([1.0, 2.0, 3.0]), 5).tolist() == [1.0, 1.0, 2.0, 3.0, 3.0]
    assert step_cache.resample(torch.tensor([1.0, 2.0, 3.0]), 1).tolist() == [3.0]


def denoise_with(pipe, graphs, seed, cache, **kwargs):
    """generate()'s stages up to the denoised latents, with the graph cache `graphs` (or eager)."""
    req = pipe.request(PROMPT, num_inference_steps=6, cache=cache, **SIZE, **kwargs)
    generator = torch.Generator().manual_seed(seed)
    text = pipe.encode_prompts(req.text)
    encoded = pipe.encode_frames(req, generator) if req.mode != "t2v" else None
    latents, cond = pipe.initial_latents(req, generator, None, encoded)
    run = step_cache.CacheRun(req.cache)
    return pipe.denoise(latents, text, req, generator, None, False, cond, graphs, run), run.report()


@pytest.mark.parametrize("cache,kwargs", [
    (FirstBlockCache(1.2), {}),
    (TeaCache(2.0, (0.0, 0.0, 0.0, 1.0, 0.0)), {}),
    (MagCache(0.3, ratios=[1.0, 0.9, 1.1, 1.0, 0.8, 1.2], max_skip_steps=2), dict(image=torch.rand(3, 64, 96))),
])
def test_graph_replays_of_the_cached_step_equal_eager_runs(cache, kwargs):
    """The cache's step variants through the graph cache (a CPU stand-in capture that replays by
    calling the step again, as in tests/test_graph.py) give the eager cached run's latents bit for
    bit: the first use of the shape runs eagerly, the second captures each variant on its first step,
    the third replays them all."""
    pipe = cvfast.load(tiny_folder("5b-i2v" if kwargs else "5b", "dpm"), device="cpu", dtype=torch.float32)
    eager = {seed: denoise_with(pipe, None, seed, cache, **kwargs) for seed in (1, 2)}
    log = []
    graphs = graph.GraphCache(stand_in_capture(log))
    for seed in (1, 2, 1):
        latents, report = denoise_with(pipe, graphs, seed, cache, **kwargs)
        assert torch.equal(latents, eager[seed][0]) and report == eager[seed][1]
    assert 0 < len(eager[1][1]["skipped_steps"]) < 6
    (entry,) = graphs.entries.values()
    assert log.count("capture") == len(entry.graphs) >= 2 and "replay" in log


def test_cli_calibrates_and_generates_with_a_cache(tmp_path, capsys):
    from cvfast.cli import main
    ratios = tmp_path / "ratios.json"
    assert main(["calibrate-cache", "tiny", "--out", str(ratios), "--steps", "8", "--seed", "0", "--no-progress"]) == 0
    assert len(json.loads(ratios.read_text())["ratios"]) == 8
    out = tmp_path / "v.mp4"
    assert main(["generate", "--prompt", "a cat", "--steps", "8", "--seed", "0", "--no-progress", "--out", str(out),
                 "--cache", f"magcache:0.3:{ratios}"]) == 0
    printed = capsys.readouterr().out
    assert "magcache:" in printed and "of 8 steps computed" in printed and out.stat().st_size > 0
    assert main(["generate", "--prompt", "a cat", "--out", str(out), "--cache", "magcache"]) == 2
    assert "calibrate-cache MODEL" in capsys.readouterr().err


def test_calibration_takes_no_cache_and_keeps_the_latents(tmp_path):
    pipe = cvfast.load("tiny", device="cpu")
    for extra in (dict(cache="teacache"), dict(output_type="np")):
        with pytest.raises(CVFastInputError, match="left out"):
            pipe.calibrate_cache("a cat", num_inference_steps=2, **extra)
    with pytest.raises(CVFastInputError, match="out=.* a file path"):
        pipe.calibrate_cache("a cat", out=tmp_path, num_inference_steps=2)
    ratios = pipe.calibrate_cache("a cat", num_inference_steps=3, seed=0, progress=False)
    assert len(ratios) == 3 and ratios[0] == 1.0 and all(r > 0 for r in ratios)
