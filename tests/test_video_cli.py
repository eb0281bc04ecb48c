"""The mp4 writer, the one-call API and the command line."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import cvfast
from cvfast import CVFastInputError


def read_mp4(path):
    import imageio_ffmpeg
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    frames = [np.frombuffer(f, np.uint8).reshape(meta["size"][1], meta["size"][0], 3) for f in reader]
    return meta, np.stack(frames)


def test_save_video_roundtrip_keeps_size_and_frame_count(tmp_path):
    rng = np.random.default_rng(0)
    # Smooth content (H.264 is lossy) at a size that is not a multiple of 16: must not be resized.
    y, x = np.mgrid[0:42, 0:70]
    frames = np.stack([np.stack([(x + 3 * t) / 100, y / 50, np.full_like(x, t / 8.0)], -1) for t in range(7)])
    frames = np.clip(frames + rng.normal(0, 0.001, frames.shape), 0, 1).astype(np.float32)
    path = cvfast.save_video(frames, tmp_path / "v.mp4", fps=12)
    meta, back = read_mp4(path)
    assert meta["size"] == (70, 42) and meta["fps"] == 12
    assert back.shape == (7, 42, 70, 3)
    assert np.abs(back.astype(float) / 255 - frames).mean() < 0.03


def test_save_video_accepts_pt_layout_and_batch_of_one(tmp_path):
    frames = torch.rand(1, 3, 3, 16, 32)
    meta, back = read_mp4(cvfast.save_video(frames, tmp_path / "v.mp4"))
    assert back.shape == (3, 16, 32, 3)


@pytest.mark.parametrize("frames,match", [
    (np.zeros((3, 15, 32, 3)), "even width and height"),
    (np.zeros((3, 16, 32)), "frames"),
    (np.full((3, 16, 32, 3), np.nan), "NaN"),
    (np.zeros((2, 3, 16, 32, 3)), "batch"),
])
def test_save_video_rejects(tmp_path, frames, match):
    with pytest.raises(CVFastInputError, match=match):
        cvfast.save_video(frames, tmp_path / "v.mp4")


def test_one_call_generate_writes_mp4(tmp_path):
    out = tmp_path / "tiny.mp4"
    result = cvfast.generate("a cat", model="tiny", out=out, seed=0, num_inference_steps=2, progress=False)
    meta, back = read_mp4(out)
    assert back.shape == (9, 64, 96, 3) and result.frames.shape == (1, 9, 64, 96, 3)
    with pytest.raises(CVFastInputError, match=r"out='x.avi' is not accepted: a path ending in .mp4, .webm, .gif"):
        cvfast.generate("a cat", out="x.avi")


def test_cli_generate(tmp_path):
    out = tmp_path / "cli.mp4"
    proc = subprocess.run([sys.executable, "-m", "cvfast", "generate", "--prompt", "a cat", "--steps", "2",
                           "--seed", "1", "--out", str(out), "--no-progress", "--fps", "24"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout and "denoising" in proc.stdout and "decoding" in proc.stdout
    assert "24 fps" in proc.stdout
    meta, frames = read_mp4(out)
    assert frames.shape == (9, 64, 96, 3) and meta["fps"] == 24


def test_fps_is_checked_before_the_model_loads(tmp_path):
    with pytest.raises(CVFastInputError, match="fps=0"):
        cvfast.generate("a cat", model=str(tmp_path / "no-such-model"), out=tmp_path / "x.mp4", fps=0)


def test_version_and_defaults_in_help(capsys):
    from cvfast.cli.main import main
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"cvfast {cvfast.__version__}"
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "denoising steps (default: 50)" in shown and "(default: video.mp4)" in shown


def test_torch_dtype_is_dtype():
    assert cvfast.load("tiny", torch_dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(CVFastInputError, match="torch_dtype"):
        cvfast.load("tiny", dtype=torch.float32, torch_dtype=torch.bfloat16)


def test_cli_bad_input_is_one_clear_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cvfast", "generate", "--prompt", "a cat", "--frames", "10",
                           "--out", str(tmp_path / "x.mp4")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "--frames 10 is not accepted" in proc.stderr and "Traceback" not in proc.stderr


def test_cogvideo_cli_demo_command_line_runs_unchanged(tmp_path):
    """CogVideo's inference/cli_demo.py flags, with no command (the program name aside)."""
    out = tmp_path / "demo.mp4"
    proc = subprocess.run([sys.executable, "-m", "cvfast", "--prompt", "a cat", "--model_path", "tiny",
                           "--output_path", str(out), "--num_inference_steps", "2", "--guidance_scale", "6.0",
                           "--num_frames", "9", "--width", "96", "--height", "64", "--fps", "8",
                           "--generate_type", "t2v", "--dtype", "float32", "--seed", "42"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}: 1 video of 9 frames at 64x96, 8 fps (seed 42)" in proc.stdout
    assert "note: no --model" not in proc.stderr
    assert read_mp4(out)[1].shape == (9, 64, 96, 3)


@pytest.mark.parametrize("args, message", [
    (["--num_frames", "10"], "--num_frames 10 is not accepted"),
    (["--generate_type", "i2v"], "--generate_type i2v is not accepted: without --image_or_video_path"),
    (["--image_or_video_path", "x.png"], "--image_or_video_path 'x.png' is not accepted: with --generate_type"),
])
def test_cli_errors_name_the_flag_as_typed(tmp_path, args, message):
    proc = cli("--out", str(tmp_path / "x.mp4"), *args)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_cli_says_when_the_tiny_model_stands_in(tmp_path):
    proc = cli("--out", str(tmp_path / "x.mp4"))
    assert proc.returncode == 0 and "note: no --model given" in proc.stderr and "noise" in proc.stderr


def cli(*args):
    return subprocess.run([sys.executable, "-m", "cvfast", "generate", "--prompt", "a cat", "--steps", "2",
                           "--seed", "1", "--no-progress", *args], capture_output=True, text=True)


def test_cli_video_to_video_and_image_to_video(tmp_path):
    from PIL import Image

    from tests.fixtures import tiny_folder
    source = tmp_path / "source.mp4"
    cvfast.save_video(np.random.default_rng(0).random((9, 64, 96, 3)), source)
    proc = cli("--video", str(source), "--strength", "0.6", "--out", str(tmp_path / "v2v.mp4"))
    assert proc.returncode == 0, proc.stderr
    assert read_mp4(tmp_path / "v2v.mp4")[1].shape == (9, 64, 96, 3) and "encoding" in proc.stdout
    Image.fromarray(np.full((64, 96, 3), 120, np.uint8)).save(tmp_path / "first.png")
    proc = cli("--model", str(tiny_folder("5b-i2v")), "--image", str(tmp_path / "first.png"),
               "--image-noise-sigma", "sample", "--out", str(tmp_path / "i2v.mp4"))
    assert proc.returncode == 0, proc.stderr
    assert read_mp4(tmp_path / "i2v.mp4")[1].shape == (9, 64, 96, 3)


@pytest.mark.parametrize("args,message", [
    (["--image", "missing.png"], "--image 'missing.png' cannot be read"),
    (["--video", "missing.mp4"], "--video 'missing.mp4' is not accepted: no such file"),
    (["--image-noise-sigma", "lots"], "--image-noise-sigma 'lots'"),
])
def test_cli_bad_condition_files(tmp_path, args, message):
    proc = cli(*args, "--out", str(tmp_path / "x.mp4"))
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_cli_cuda_graph_without_cuda_is_one_clear_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the graph would run")
    proc = cli("--cuda-graph", "on", "--out", str(tmp_path / "x.mp4"))
    assert proc.returncode == 2 and "cuda_graph=True" in proc.stderr and "Traceback" not in proc.stderr


def test_prompt_file_writes_a_video_and_sidecar_per_line_that_reproduce_alone(tmp_path):
    from cvfast.cli.main import main
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red boat\n\na cat on a sofa\na dog running\n")
    assert main(["generate", "--prompt-file", str(prompts), "--steps", "2", "--seed", "7", "--no-progress",
                 "--out", str(tmp_path / "v.mp4")]) == 0
    sidecars = [json.loads((tmp_path / f"v-{i}.mp4.json").read_text()) for i in range(3)]
    assert [s["prompt"] for s in sidecars] == ["a red boat", "a cat on a sofa", "a dog running"]
    assert [s["seed"] for s in sidecars] == [7, 8, 9] and sidecars[0]["model"] == "tiny"
    alone = tmp_path / "alone.mp4"
    assert main(["generate", "--prompt", sidecars[2]["prompt"], "--seed", str(sidecars[2]["seed"]), "--steps", "2",
                 "--no-progress", "--out", str(alone)]) == 0
    assert np.array_equal(read_mp4(alone)[1], read_mp4(tmp_path / "v-2.mp4")[1])
    assert json.loads((tmp_path / "alone.mp4.json").read_text())["seed"] == 9


def test_prompt_file_image_lines_for_image_to_video(tmp_path):
    from PIL import Image
    from cvfast.cli.main import main
    from tests.fixtures import tiny_folder
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a red boat@@{tmp_path / 'a.png'}\n")
    assert main(["generate", "--model", str(tiny_folder("5b-i2v")), "--prompt-file", str(prompts), "--steps", "1",
                 "--frames", "9", "--height", "64", "--width", "96", "--no-progress",
                 "--out", str(tmp_path / "v.mp4")]) == 0
    assert json.loads((tmp_path / "v.mp4.json").read_text())["condition"] == str(tmp_path / "a.png")


@pytest.mark.parametrize("lines, args, message", [
    (None, [], "--prompt or --prompt-file is needed, one of them: neither was given"),
    ("a cat\n", ["--prompt", "a dog"], "both were given"),
    ("\n\n", [], "holds no prompt"),
    ("a cat@@missing.png\n", [], "--prompt-file image 'missing.png' cannot be read"),
])
def test_prompt_file_errors(tmp_path, capsys, lines, args, message):
    from cvfast.cli.main import main
    file_args = []
    if lines is not None:
        (tmp_path / "p.txt").write_text(lines)
        file_args = ["--prompt-file", str(tmp_path / "p.txt")]
    assert main(["generate", *file_args, *args, "--out", str(tmp_path / "v.mp4")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "v.mp4").exists()


def test_cli_video_to_video_on_a_12_frame_24_fps_video(tmp_path):
    """A phone-like clip (12 frames, 24 fps, 320x240): it runs and says how it adapted the input."""
    clip = tmp_path / "clip.mp4"
    cvfast.save_video((np.random.default_rng(1).random((12, 240, 320, 3)) * 255).astype(np.uint8), clip, fps=24)
    proc = cli("--video", str(clip), "--out", str(tmp_path / "v2v.mp4"))
    assert proc.returncode == 0, proc.stderr
    assert "first 9 of 12 frames" in proc.stderr
    assert read_mp4(tmp_path / "v2v.mp4")[1].shape == (9, 240, 320, 3)


def test_num_videos_gives_each_video_its_own_seed(tmp_path):
    from cvfast.cli.main import main
    assert main(["generate", "--prompt", "a cat", "--num-videos", "2", "--seed", "3", "--steps", "2",
                 "--no-progress", "--out", str(tmp_path / "v.mp4")]) == 0
    seeds = [json.loads((tmp_path / f"v-{i}.mp4.json").read_text())["seed"] for i in range(2)]
    assert seeds == [3, 4] and not np.array_equal(read_mp4(tmp_path / "v-0.mp4")[1], read_mp4(tmp_path / "v-1.mp4")[1])
    assert main(["generate", "--prompt", "a cat", "--num-videos", "0", "--out", str(tmp_path / "w.mp4")]) == 2


def test_loading_and_decoding_say_what_they_do_unless_no_progress(tmp_path, capsys):
    from cvfast.cli import main
    assert main(["generate", "--prompt", "a cat", "--steps", "1", "--out", str(tmp_path / "a.mp4")]) == 0
    err = capsys.readouterr().err
    assert "cvfast: loading tiny (5b) on cpu in float32 ..." in err and "cvfast: loaded tiny in" in err
    assert "cvfast: decoding 3 latent frames into 9 frames at 64x96 ..." in err
    assert main(["generate", "--prompt", "a cat", "--steps", "1", "--no-progress", "--out", str(tmp_path / "b.mp4")]) == 0
    assert "loading" not in capsys.readouterr().err
