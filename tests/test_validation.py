"""Every bad input of the issue gives CVFastInputError naming the argument, before heavy work."""
import pytest
import torch

import cvfast
from cvfast import CVFastInputError
from tests.fixtures import tiny_folder


@pytest.fixture(scope="module")
def pipe():
    return cvfast.load("tiny")


def fails_fast(pipe, match, **kwargs):
    """The error must come before the text encoder or the transformer run."""
    calls = []
    pipe.text_encoder.encode = lambda *a, **k: calls.append("text") or (_ for _ in ()).throw(AssertionError)
    try:
        with pytest.raises(CVFastInputError, match=match):
            pipe.generate(**{"prompt": "a cat", "progress": False, **kwargs})
    finally:
        del pipe.text_encoder.encode
    assert calls == []


def test_request_checks_generate_arguments_alone(pipe):
    """pipe.request(...): generate()'s checks and defaults, with the same error, and no work done."""
    pipe.text_encoder.encode = lambda *a, **k: pytest.fail("text encoded")
    try:
        req = pipe.request("a cat", guidance_scale=1.0)
        with pytest.raises(CVFastInputError, match="num_frames=10 is not accepted"):
            pipe.request("a cat", num_frames=10)
    finally:
        del pipe.text_encoder.encode
    assert (req.num_frames, req.height, req.width, req.steps, req.mode) == (9, 64, 96, 50, "t2v")
    assert req.text.prompts == ["a cat"] and req.guidance == 1.0 and req.output_type == "np"


@pytest.mark.parametrize("frames", [0, 4, 6, 13, 48])
def test_frame_count(pipe, frames):
    fails_fast(pipe, r"num_frames=\d+ .*divisible by 8" if frames else "num_frames=0", num_frames=frames)


@pytest.mark.parametrize("arg,value", [("height", 60), ("width", 100), ("height", 8), ("width", 0)])
def test_spatial_multiple_of_16(pipe, arg, value):
    fails_fast(pipe, f"{arg}={value}", **{arg: value})


@pytest.mark.parametrize("steps", [0, -1, 2.5, True])
def test_steps(pipe, steps):
    fails_fast(pipe, "num_inference_steps", num_inference_steps=steps)


def test_prompt_and_embeddings_both_given(pipe):
    fails_fast(pipe, "prompt_embeds", prompt_embeds=torch.zeros(1, 32, 32))


def test_no_prompt(pipe):
    fails_fast(pipe, "prompt=None", prompt=None)


@pytest.mark.parametrize("kwargs,match", [
    (dict(output_type="pil"), "output_type='pil'"),
    (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(seed=-1), "seed=-1"),
    (dict(seed=1, generator=torch.Generator()), "seed=1"),
    (dict(latents=torch.zeros(1, 3, 4, 7, 12)), "latents"),
    (dict(prompt=["a", 3]), "prompt"),
    (dict(negative_prompt=["a", "b"]), "negative_prompt"),
    (dict(max_sequence_length=0), "max_sequence_length=0"),
])
def test_other_arguments(pipe, kwargs, match):
    fails_fast(pipe, match, **kwargs)


def test_learned_positional_variant_only_at_its_table_size():
    pipe = cvfast.load(tiny_folder("5b-i2v"), device="cpu")
    image = torch.rand(3, 64, 96)
    fails_fast(pipe, r"num_frames/height/width=\(9, 48, 96\).*9 frames at 64x96", num_frames=9, height=48, width=96,
               image=image)
    fails_fast(pipe, r"num_frames/height/width=\(17, 64, 96\)", num_frames=17, image=image)


def test_fp16_refused_for_5b_and_15_unless_allowed():
    for variant in ("5b", "1.5"):
        with pytest.raises(CVFastInputError, match="dtype='float16'.*allow_fp16=True"):
            cvfast.load(tiny_folder(variant), device="cpu", dtype=torch.float16)
    pipe = cvfast.load(tiny_folder("5b"), device="cpu", dtype=torch.float16, allow_fp16=True)
    assert pipe.dtype == torch.float16
    assert cvfast.load(tiny_folder("2b"), device="cpu", dtype="fp16").dtype == torch.float16


@pytest.mark.parametrize("kwargs,match", [
    (dict(dtype="int8"), "dtype='int8'"),
    (dict(device="tpu"), "device='tpu'"),
    (dict(backend="fastest"), "backend='fastest'.*auto"),
])
def test_load_arguments(kwargs, match):
    with pytest.raises(CVFastInputError, match=match):
        cvfast.load("tiny", **kwargs)


def test_cuda_requested_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(CVFastInputError, match="device='cuda'"):
        cvfast.load("tiny", device="cuda")


def test_model_that_is_neither_folder_nor_hub_id(tmp_path):
    with pytest.raises(CVFastInputError, match="model="):
        cvfast.load(str(tmp_path / "no" / "such" / "folder"))


def test_unreachable_hub_names_id_and_local_alternative(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CVFastInputError, match=r"THUDM/CogVideoX-not-here.*local folder"):
        cvfast.load("THUDM/CogVideoX-not-here")


def test_folder_without_model_index(tmp_path):
    with pytest.raises(CVFastInputError, match="model_index.json"):
        cvfast.load(tmp_path)


def test_pickle_weights_are_refused(tmp_path):
    import shutil
    folder = tmp_path / "m"
    shutil.copytree(tiny_folder("2b"), folder)
    for f in (folder / "transformer").glob("*.safetensors"):
        f.unlink()
    torch.save({}, folder / "transformer" / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match=r"no \*.safetensors.*diffusion_pytorch_model.bin.*pickle"):
        cvfast.load(folder, device="cpu")


def test_non_finite_latents_name_the_step(pipe, monkeypatch):
    from cvfast import NonFiniteLatentsError
    forward, calls = pipe.transformer.forward, []

    def overflows_on_the_second_step(*args, **kwargs):
        calls.append(1)
        out = forward(*args, **kwargs)
        return out * float("inf") if len(calls) == 2 else out

    monkeypatch.setattr(pipe.transformer, "forward", overflows_on_the_second_step)
    with pytest.raises(NonFiniteLatentsError, match=r"step 1 .*tiny.*torch.float32"):
        pipe.generate("a cat", num_inference_steps=3, seed=0, progress=False)


def test_long_prompt_is_truncated_with_a_warning_showing_the_dropped_text(pipe, caplog):
    prompt = "a cat " * 40 + "TAILWORDS"
    pipe.generate(prompt, num_inference_steps=1, seed=0, progress=False, output_type="latent")
    assert any("dropped" in r.message and "TAILWORDS" in r.message for r in caplog.records)
    caplog.clear()
    pipe.generate("a cat", num_inference_steps=1, seed=0, progress=False, output_type="latent")
    assert not caplog.records
