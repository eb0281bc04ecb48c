"""The exception types say what happened (a bad argument, a computation that went non-finite, a failed
export check, another rank's failure) and the CLI turns each into its own exit status."""
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import cvfast
from cvfast.cli import main
from cvfast.cli.report import EXIT_FAILED, EXIT_INPUT, EXIT_NUMERICS, run
from tests.fixtures import tiny_folder


def test_bad_arguments_are_value_errors_and_failed_computations_runtime_errors():
    for kind in (cvfast.CVFastInputError, cvfast.WeightError, cvfast.LoRAError, cvfast.UnsafePickleError,
                 cvfast.EngineMismatchError):
        assert issubclass(kind, ValueError) and issubclass(kind, cvfast.CVFastError)
    for kind in (cvfast.NonFiniteLatentsError, cvfast.ONNXCheckError, cvfast.ONNXExportError, cvfast.RankFailedError):
        assert issubclass(kind, RuntimeError) and issubclass(kind, cvfast.CVFastError)
        assert not issubclass(kind, (ValueError, AssertionError))


@pytest.mark.parametrize("error,status", [
    (cvfast.CVFastInputError("steps=0 is not accepted"), EXIT_INPUT),
    (cvfast.WeightError("missing tensors"), EXIT_INPUT),
    (cvfast.NonFiniteLatentsError("latents became NaN/Inf"), EXIT_NUMERICS),
    (cvfast.ONNXCheckError("relative L2 error 0.5 > bound"), EXIT_FAILED),
    (cvfast.RankFailedError("rank 1: RuntimeError: out of memory"), EXIT_FAILED),
])
def test_each_error_type_has_its_exit_status_and_one_line(capsys, error, status):
    def command():
        raise error
    assert run(command) == status
    assert capsys.readouterr().err == f"cvfast: error: {error}\n"


def test_an_unexpected_error_is_not_hidden():
    def command():
        raise KeyError("a bug")
    with pytest.raises(KeyError):
        run(command)


def test_nan_weights_end_the_cli_with_the_numerics_status_and_no_video(tmp_path, capsys):
    folder = tmp_path / "nan-model"
    shutil.copytree(tiny_folder("2b"), folder)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors["proj_out.weight"] = torch.full_like(tensors["proj_out.weight"], float("nan"))
    save_file(tensors, weights)
    out = tmp_path / "v.mp4"
    status = main(["generate", "--model", str(folder), "--prompt", "a cat", "--steps", "2", "--frames", "9",
                   "--height", "64", "--width", "96", "--out", str(out), "--no-progress"])
    assert status == EXIT_NUMERICS
    assert "NaN/Inf at denoising step 0" in capsys.readouterr().err and not out.exists()


def test_a_nan_decode_is_a_numerics_error(monkeypatch):
    pipe = cvfast.load("tiny", device="cpu")
    monkeypatch.setattr(pipe.vae, "decode", lambda z, **kw: torch.full((1, 3, 9, 64, 96), float("nan")))
    with pytest.raises(cvfast.NonFiniteLatentsError, match="VAE decode of tiny produced NaN/Inf"):
        pipe.generate("a cat", num_inference_steps=1, seed=0, progress=False)
    latents = pipe.generate("a cat", num_inference_steps=1, seed=0, progress=False, output_type="latent").frames
    assert np.isfinite(latents.numpy()).all()
