"""Config and checkpoint mistakes are loud: a missing key that would silently change the model is an
error naming the file and the key (or, for the scheduler's class, follows model_index.json as diffusers
does), sizes are bounded before anything is built, malformed JSON and damaged weights name their
file, a missing tensor is named as the checkpoint names it; and other bad inputs end in a one-line
error, not a traceback."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import cvfast
from cvfast import CVFastInputError, WeightError
from cvfast.cli import main
from tests.extras import require
from tests.fixtures import tiny_folder

require("diffusers")  # the tiny folders are written with diffusers
KW = dict(num_inference_steps=3, seed=0, progress=False, output_type="latent", max_sequence_length=16)


def copy_of(tmp_path, variant="2b", scheduler="ddim"):
    folder = tmp_path / "model"
    shutil.copytree(tiny_folder(variant, scheduler), folder)
    return folder


def edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_a_scheduler_config_without_its_class_follows_model_index(tmp_path):
    folder = copy_of(tmp_path, scheduler="dpm")
    edit_json(folder / "scheduler" / "scheduler_config.json", lambda d: d.pop("_class_name"))
    pipe = cvfast.load(folder, device="cpu")
    assert pipe.scheduler.kind == "dpm"
    full = cvfast.load(tiny_folder("2b", "dpm"), device="cpu")
    assert torch.equal(pipe.generate("a cat", **KW).frames, full.generate("a cat", **KW).frames)
    edit_json(folder / "model_index.json", lambda d: d.pop("scheduler"))
    with pytest.raises(CVFastInputError, match=r"scheduler_config.json: lacks _class_name"):
        cvfast.load(folder, device="cpu")


@pytest.mark.parametrize("change,match", [
    (lambda d: d.pop("num_layers"), r"transformer/config.json: lacks \['num_layers'\]"),
    (lambda d: d.update(num_layers=1_000_000), r"transformer/config.json: num_layers=1000000: more than the 1024"),
    (lambda d: d.update(num_attention_heads=4800, attention_head_dim=64), r"num_attention_heads=4800, "
     r"attention_head_dim=64 make a transformer of about 2.27e\+03B parameters, more than the 20B"),
    (lambda d: d.update(num_attention_heads=0), r"num_attention_heads=0: must be an integer >= 1"),
    (lambda d: d.update(activation_fn="relu"), r"transformer/config.json: unsupported activations"),
])
def test_transformer_config_mistakes_name_the_file_and_key(tmp_path, monkeypatch, change, match):
    folder = copy_of(tmp_path)
    edit_json(folder / "transformer" / "config.json", change)
    monkeypatch.setattr(cvfast.checkpoints.diffusers, "read_tensors", lambda *a: pytest.fail("weights were read"))
    with pytest.raises(CVFastInputError, match=match):
        cvfast.load(folder, device="cpu")


def test_a_vae_config_without_its_size_names_the_key(tmp_path):
    folder = copy_of(tmp_path)
    edit_json(folder / "vae" / "config.json", lambda d: d.pop("latent_channels"))
    with pytest.raises(CVFastInputError, match=r"vae/config.json: lacks \['latent_channels'\]"):
        cvfast.load(folder, device="cpu")


def test_malformed_json_names_the_file(tmp_path):
    folder = copy_of(tmp_path)
    (folder / "model_index.json").write_text('{"_class_name": "CogVideoXPipeline",')
    with pytest.raises(CVFastInputError, match=r"model_index.json is not valid JSON"):
        cvfast.load(folder, device="cpu")


def test_a_truncated_weights_file_names_the_file(tmp_path):
    folder = copy_of(tmp_path)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(WeightError, match=r"diffusion_pytorch_model.safetensors cannot be read as safetensors"):
        cvfast.load(folder, device="cpu")


def test_a_missing_tensor_is_named_as_the_checkpoint_names_it(tmp_path):
    folder = copy_of(tmp_path)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    del tensors["transformer_blocks.0.attn1.norm_k.bias"]
    save_file(tensors, weights)
    with pytest.raises(WeightError, match=r"lacks 1 tensors, e\.g\. transformer_blocks\.0\.attn1\.norm_k\.bias \(16,\)"):
        cvfast.load(folder, device="cpu")


@pytest.mark.parametrize("kwargs,match", [
    (dict(seed=2 ** 64), r"seed=18446744073709551616 is not accepted: an integer from 0 to 2\*\*64 - 1"),
    (dict(prompt="a cat \udcff on a mat"), r"prompt=.* valid Unicode \(character 6 is an undecodable byte"),
    (dict(negative_prompt=["ok", "\udc80"], prompt=["a", "b"]), r"negative_prompt=.* valid Unicode"),
])
def test_bad_values_are_errors_not_tracebacks(kwargs, match):
    pipe = cvfast.load("tiny", device="cpu")
    with pytest.raises(CVFastInputError, match=match):
        pipe.generate(**{"prompt": "a cat", **kwargs, "progress": False})


def test_the_command_refuses_a_seed_out_of_range_before_loading(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(cvfast.api, "load", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(SystemExit) as exited:
        main(["generate", "--prompt", "a cat", "--out", str(tmp_path / "v.mp4"), "--seed", str(2 ** 64)])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "--seed: 18446744073709551616 is not an integer from 0 to 2**64 - 1" in err


def test_the_command_refuses_a_missing_video_in_one_line_before_loading(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(cvfast.api, "load", lambda *a, **k: pytest.fail("the model loaded"))
    assert main(["generate", "--prompt", "a cat", "--out", str(tmp_path / "v.mp4"), "--video", "nothere.mp4"]) == 2
    err = capsys.readouterr().err
    assert err == "cvfast: error: --video 'nothere.mp4' is not accepted: no such file\n"
