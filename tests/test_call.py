"""`pipe(...)`, diffusers' call (cvfast/pipeline/call.py), against diffusers' own pipelines on the same
folder, prompts and generators (fp32 on the CPU; frames within 5e-5 relative L2, the bar of every
whole-pipeline comparison; the same types and shapes)."""
import numpy as np
import pytest
import torch

import cvfast
from cvfast import CVFastInputError
from tests.extras import require
from tests.fixtures import MAX_TEXT_SEQ_LEN, TINY_FRAMES, TINY_HEIGHT, TINY_WIDTH, tiny_folder
from tests.numerics import rel_l2
from tests.test_image_video import pil, smooth_frame

diffusers = require("diffusers")

SIZE = dict(num_frames=TINY_FRAMES, height=TINY_HEIGHT, width=TINY_WIDTH)
RUN = dict(num_inference_steps=3, max_sequence_length=MAX_TEXT_SEQ_LEN)


def generators(*seeds):
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def both(variant="2b", scheduler="ddim", cls="CogVideoXPipeline"):
    folder = tiny_folder(variant, scheduler)
    theirs = getattr(diffusers, cls).from_pretrained(folder, torch_dtype=torch.float32)
    theirs.set_progress_bar_config(disable=True)
    return cvfast.load(folder, dtype=torch.float32), theirs


def test_videos_per_prompt_with_a_generator_each():
    """Two prompts, two videos each, four generators: video k is diffusers' video for its prompt and
    generator k (diffusers' CogVideoX pipelines force one video per prompt, so it runs four times)."""
    ours, theirs = both()
    got = ours(["a red boat", "a cat"], num_videos_per_prompt=2, generator=generators(1, 2, 3, 4), output_type="np",
               **SIZE, **RUN).frames
    expected = np.concatenate([theirs(prompt, generator=g, output_type="np", **SIZE, **RUN).frames
                               for prompt, g in zip(["a red boat", "a red boat", "a cat", "a cat"], generators(1, 2, 3, 4))])
    assert got.shape == expected.shape == (4, TINY_FRAMES, TINY_HEIGHT, TINY_WIDTH, 3)
    assert rel_l2(got, expected) <= 5e-5
    assert rel_l2(got[0], got[1]) > 0.01  # the generators, not the prompt, set the noise


def test_defaults_give_diffusers_pil_video():
    """No size, output type or guidance given: the config's sample size, "pil" frames, guidance 6."""
    ours, theirs = both("5b", "dpm")
    got = ours("a red boat", generator=generators(7)[0], use_dynamic_cfg=True, **RUN)
    expected = theirs("a red boat", generator=generators(7)[0], use_dynamic_cfg=True, **RUN)
    assert type(got.frames) is type(expected.frames) is list and len(got.frames) == len(expected.frames) == 1
    assert got[0] is got["frames"] is got.to_tuple()[0] is got.frames  # diffusers' output access
    assert len(got.frames[0]) == len(expected.frames[0]) and got.frames[0][0].size == expected.frames[0][0].size
    got_u8, expected_u8 = (np.stack([np.asarray(f) for f in out.frames[0]]).astype(int) for out in (got, expected))
    # Frames within 5e-5 relative L2 round to the same byte except where a value sits at a rounding edge.
    assert np.abs(got_u8 - expected_u8).max() <= 1 and (got_u8 != expected_u8).mean() < 1e-3


@pytest.mark.parametrize("output_type", ["pt", "latent"])
def test_tensor_outputs_and_return_dict_false(output_type):
    ours, theirs = both("1.5")
    got = ours("a cat", generator=generators(3)[0], output_type=output_type, return_dict=False, **SIZE, **RUN)
    expected = theirs("a cat", generator=generators(3)[0], output_type=output_type, return_dict=False, **SIZE, **RUN)
    assert isinstance(got, tuple) and len(got) == 1 and isinstance(got[0], torch.Tensor)
    assert got[0].shape == expected[0].shape
    assert rel_l2(got[0], expected[0]) <= 5e-5


def test_embeddings_and_given_latents_leave_the_callers_tensor_alone():
    ours, theirs = both()
    positive, negative = theirs.encode_prompt("a red boat", "blurry", max_sequence_length=MAX_TEXT_SEQ_LEN)
    latents = torch.randn(1, 3, 4, TINY_HEIGHT // 8, TINY_WIDTH // 8, generator=generators(5)[0])
    kept = latents.clone()
    kw = dict(prompt_embeds=positive, negative_prompt_embeds=negative, latents=latents, output_type="np", **SIZE, **RUN)
    got = ours(**kw).frames
    assert torch.equal(latents, kept)
    assert rel_l2(got, theirs(**kw).frames) <= 5e-5


def edit_latents(pipe, step, timestep, tensors):
    return {"latents": tensors["latents"] * 0.9} if step == 1 else {}


def edit_prompt(pipe, step, timestep, tensors):
    return {"prompt_embeds": tensors["prompt_embeds"] * 0.5} if step == 0 else {}


def interrupt(pipe, step, timestep, tensors):
    if step == 1:
        pipe._interrupt = True  # diffusers' idiom
    return {}


@pytest.mark.parametrize("callback,inputs", [(edit_latents, ["latents"]), (edit_prompt, ["prompt_embeds"]),
                                             (interrupt, ["latents", "negative_prompt_embeds"])])
def test_callback_on_step_end_edits_and_interrupts_as_in_diffusers(callback, inputs):
    ours, theirs = both("5b", "dpm")
    kw = dict(output_type="np", callback_on_step_end=callback, callback_on_step_end_tensor_inputs=inputs, **SIZE, **RUN)
    got = ours("a red boat", generator=generators(9)[0], **kw).frames
    assert rel_l2(got, theirs("a red boat", generator=generators(9)[0], **kw).frames) <= 5e-5
    plain = ours("a red boat", generator=generators(9)[0], output_type="np", **SIZE, **RUN).frames
    assert rel_l2(got, plain) > 1e-3  # the callback changed the video; the next call ran whole
    assert not ours.interrupt


def test_image_to_video_call():
    ours, theirs = both("5b-i2v", "ddim", "CogVideoXImageToVideoPipeline")
    image = pil(smooth_frame(TINY_HEIGHT, TINY_WIDTH))
    kw = dict(image=image, output_type="np", **SIZE, **RUN)
    got = ours("a red boat", generator=generators(4)[0], **kw).frames
    assert rel_l2(got, theirs(prompt="a red boat", generator=generators(4)[0], **kw).frames) <= 5e-5


def test_video_to_video_call():
    ours, theirs = both("5b", "dpm", "CogVideoXVideoToVideoPipeline")
    video = [pil(smooth_frame(48, 80, t=0.3 * i)) for i in range(TINY_FRAMES)]
    kw = dict(video=video, strength=0.7, output_type="np", **RUN)  # resized to the sample size, as diffusers does
    got = ours("a red boat", generator=generators(6)[0], **kw).frames
    expected = theirs(prompt="a red boat", generator=generators(6)[0], **kw).frames
    assert got.shape == expected.shape == (1, TINY_FRAMES, TINY_HEIGHT, TINY_WIDTH, 3)
    assert rel_l2(got, expected) <= 5e-5


def test_eta_has_no_effect():
    ours, _ = both()
    frames = [ours("a cat", generator=generators(2)[0], eta=eta, output_type="np", **SIZE, **RUN).frames
              for eta in (0.0, 1.0)]
    assert np.array_equal(*frames)


@pytest.mark.parametrize("arguments, named", [
    (dict(timesteps=[999, 500]), "timesteps"),
    (dict(generator=generators(1, 2, 3)), "generator"),
    (dict(num_videos_per_prompt=2, generator=generators(1, 2, 3)), "generator"),
    (dict(num_videos_per_prompt=0), "num_videos_per_prompt"),
    (dict(output_type="mp4"), "output_type"),
    (dict(callback_on_step_end=edit_latents, callback_on_step_end_tensor_inputs=["noise_pred"]),
     "callback_on_step_end_tensor_inputs"),
    (dict(attention_kwargs={"scale": 0.5, "mask": None}), "attention_kwargs"),
    (dict(attention_kwargs={"scale": "half"}), "attention_kwargs"),
])
def test_bad_call_arguments_are_value_errors_naming_them(arguments, named):
    ours = cvfast.load(tiny_folder("2b"))
    with pytest.raises(ValueError, match=named) as error:
        ours("a cat", **SIZE, **RUN, **arguments)
    assert isinstance(error.value, CVFastInputError)


# -- cvfast.from_diffusers: a diffusers pipeline in memory ------------------------------------------

def test_from_diffusers_equals_loading_the_folder():
    folder = tiny_folder("5b", "dpm")
    theirs = diffusers.CogVideoXPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    kw = dict(generator=generators(3)[0], output_type="np", **SIZE, **RUN)
    converted = cvfast.from_diffusers(theirs, dtype=torch.float32)
    assert converted.scheduler.kind == "dpm"
    assert np.array_equal(converted("a red boat", **kw).frames,
                          cvfast.load(folder, dtype=torch.float32)("a red boat", **{**kw, "generator": generators(3)[0]}).frames)


def test_from_diffusers_follows_what_was_changed_in_memory():
    """A swapped scheduler and an edited weight are what the converted pipeline runs, as diffusers'
    own pipeline does; the diffusers pipeline's weights are copied, not taken over."""
    ours_before, theirs = both()
    theirs.scheduler = diffusers.CogVideoXDPMScheduler.from_config(theirs.scheduler.config)
    with torch.no_grad():
        theirs.transformer.proj_out.bias += 0.05
    bias_before = theirs.transformer.proj_out.bias.clone()
    converted = cvfast.from_diffusers(theirs, dtype=torch.float32)
    assert converted.scheduler.kind == "dpm"
    kw = dict(output_type="np", **SIZE, **RUN)
    got = converted("a red boat", generator=generators(5)[0], **kw).frames
    assert rel_l2(got, theirs("a red boat", generator=generators(5)[0], **kw).frames) <= 5e-5
    assert rel_l2(got, ours_before("a red boat", generator=generators(5)[0], **kw).frames) > 1e-3
    converted.transformer.proj_out.bias.data += 1.0  # cvfast's copy, not diffusers' tensor
    assert torch.equal(theirs.transformer.proj_out.bias, bias_before)


def test_from_diffusers_image_to_video():
    folder = tiny_folder("5b-i2v")
    theirs = diffusers.CogVideoXImageToVideoPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    theirs.set_progress_bar_config(disable=True)
    kw = dict(image=pil(smooth_frame(TINY_HEIGHT, TINY_WIDTH)), output_type="np", **SIZE, **RUN)
    got = cvfast.from_diffusers(theirs, dtype=torch.float32)("a red boat", generator=generators(4)[0], **kw).frames
    assert rel_l2(got, theirs(prompt="a red boat", generator=generators(4)[0], **kw).frames) <= 5e-5


def test_from_diffusers_refuses_an_incomplete_pipeline_and_a_base():
    _, theirs = both()
    with pytest.raises(CVFastInputError, match="brings its own transformer, text encoder and scheduler"):
        cvfast.from_diffusers(theirs, base="THUDM/CogVideoX-2b")
    theirs.text_encoder = None
    with pytest.raises(CVFastInputError, match=r"pipeline='CogVideoXPipeline' is not accepted: .*missing: text_encoder"):
        cvfast.from_diffusers(theirs)
