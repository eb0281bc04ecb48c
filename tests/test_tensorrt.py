"""The TensorRT path's checks that need no GPU: the engine's spec file, refusing an engine built for
another model, size or precision, and load()'s argument checks. Building and running engines is in
tests/test_cuda.py (needs CUDA and the tensorrt package)."""
import argparse
import dataclasses
import json

import pytest
import torch

import cvfast
from cvfast import CVFastInputError, EngineMismatchError
from cvfast.cli.export import requested_sizes
from cvfast.export.tensorrt_build import engine_spec
from cvfast.models.geometry import latent_shape
from cvfast.runtime.tensorrt import TensorRTTransformer, check_model, check_size, config_hash, read_spec
from tests.fixtures import tiny_folder


@pytest.fixture(scope="module")
def pipe():
    return cvfast.load("tiny", device="cpu")


def fake_engine(tmp_path, spec: dict):
    """An engine file with its spec beside it, as build_engines writes them (the bytes are never read
    without TensorRT)."""
    plan = tmp_path / "9x64x96.plan"
    plan.write_bytes(b"not an engine")
    plan.with_name(plan.name + ".json").write_text(json.dumps(dict(spec, plan_bytes=13)))
    return plan


def test_an_engine_and_a_spec_from_different_builds_are_refused(pipe, tmp_path):
    plan = fake_engine(tmp_path, engine_spec(pipe, 9, 64, 96, 1, torch.bfloat16, 226, "10.15"))
    read_spec(plan)
    plan.write_bytes(b"a longer engine from another build")
    with pytest.raises(EngineMismatchError, match="different builds"):
        read_spec(plan)
    spec = json.loads(plan.with_name(plan.name + ".json").read_text())
    plan.with_name(plan.name + ".json").write_text(json.dumps(dict(spec, format=1)))
    with pytest.raises(EngineMismatchError, match="engine format 1, this cvfast reads 2"):
        read_spec(plan)


def test_spec_names_the_model_size_and_precision(pipe):
    spec = engine_spec(pipe, 9, 64, 96, 1, torch.bfloat16, 226, "10.15")
    assert spec["variant"] == pipe.config.variant and spec["config_hash"] == config_hash(pipe.config)
    assert spec["latent"] == [3, pipe.config.in_channels, 8, 12] and spec["batch"] == [1, 2]
    assert spec["dtype"] == "bfloat16"


def test_an_engine_for_another_model_or_precision_is_refused(pipe, tmp_path):
    spec = read_spec(fake_engine(tmp_path, engine_spec(pipe, 9, 64, 96, 1, torch.bfloat16, 226, "10.15")))
    check_model(spec, pipe.config, torch.bfloat16, "e.plan")  # the same model: accepted
    other = cvfast.load(tiny_folder("2b"), device="cpu").config
    with pytest.raises(EngineMismatchError, match=r"built for a 5b model .* not this 2b model"):
        check_model(spec, other, torch.bfloat16, "e.plan")
    with pytest.raises(EngineMismatchError, match="runs in bfloat16, not float32"):
        check_model(spec, pipe.config, torch.float32, "e.plan")


def test_an_engine_for_another_size_or_batch_is_refused_before_any_work(pipe):
    spec = engine_spec(pipe, 9, 64, 96, 1, torch.float32, 226, "10.15")
    check_size(spec, latent_shape(pipe.config, pipe.vae.config, 9, 64, 96), 226, 2, "e.plan")
    with pytest.raises(EngineMismatchError, match="built for 9 frames at 64x96"):
        check_size(spec, latent_shape(pipe.config, pipe.vae.config, 17, 64, 96), 226, 2, "e.plan")
    with pytest.raises(EngineMismatchError, match="batch of 1 to 2, this call needs 4"):
        check_size(spec, latent_shape(pipe.config, pipe.vae.config, 9, 64, 96), 226, 4, "e.plan")
    # Through generate(): a pipeline with an engine asks it before encoding any text. (The engine is
    # made without TensorRT: its checks read only the spec.)
    engine = TensorRTTransformer.__new__(TensorRTTransformer)
    torch.nn.Module.__init__(engine)
    engine.cfg, engine.spec, engine.engine_path = pipe.config, spec, "e.plan"
    with_engine = cvfast.Pipeline(dataclasses.replace(pipe.components, transformer=engine, loras=None), pipe.runtime)
    with_engine.encode_prompts = lambda *args: pytest.fail("work started")
    with pytest.raises(EngineMismatchError, match="built for 9 frames at 64x96"):
        with_engine.generate("a cat", num_frames=9, height=32, width=48, progress=False)
    with pytest.raises(CVFastInputError, match="cache='teacache' is not accepted: None with backend='tensorrt'"):
        with_engine.generate("a cat", num_frames=9, height=64, width=96, progress=False, cache="teacache")


def test_load_arguments_for_an_engine(pipe, tmp_path):
    with pytest.raises(CVFastInputError, match="engine=None"):
        cvfast.load("tiny", backend="tensorrt")
    plan = fake_engine(tmp_path, engine_spec(pipe, 9, 64, 96, 1, torch.bfloat16, 226, "10.15"))
    with pytest.raises(CVFastInputError, match="engine=.* needs backend='tensorrt'"):
        cvfast.load("tiny", engine=plan)
    with pytest.raises(CVFastInputError, match="cache='fbcache' is not accepted: None with backend='tensorrt'"):
        cvfast.load("tiny", backend="tensorrt", engine=plan, cache="fbcache")
    with pytest.raises(CVFastInputError, match="an existing engine file"):
        cvfast.load("tiny", backend="tensorrt", engine=tmp_path / "missing.plan")
    plan.with_name(plan.name + ".json").unlink()
    with pytest.raises(CVFastInputError, match="9x64x96.plan.json beside it"):
        cvfast.load("tiny", backend="tensorrt", engine=plan)
    plan = fake_engine(tmp_path, engine_spec(pipe, 9, 64, 96, 1, torch.bfloat16, 226, "10.15"))
    if not torch.cuda.is_available():
        with pytest.raises(CVFastInputError, match="device='cpu'.*CUDA device"):
            cvfast.load("tiny", backend="tensorrt", engine=plan)


@pytest.mark.parametrize("sizes,match", [(["49,480"], "--size='49,480'"), (["a,b,c"], "--size='a,b,c'")])
def test_export_sizes_are_parsed_with_clear_errors(sizes, match):
    args = argparse.Namespace(size=sizes, frames=None, height=None, width=None)
    with pytest.raises(CVFastInputError, match=match):
        requested_sizes(args, {"num_frames": 9, "height": 64, "width": 96})
    args.size = ["49,480,720", "81,768,1360"]
    assert requested_sizes(args, {}) == [(49, 480, 720), (81, 768, 1360)]
    args.size = []
    assert requested_sizes(args, {"num_frames": 9, "height": 64, "width": 96}) == [(9, 64, 96)]
