"""Nothing is lost: every file cvfast writes goes to a temporary file beside the target and replaces it
only when complete, so a failure (a writer that fails, a killed process, Ctrl-C) leaves the previous
file byte for byte, ends with an error (exit status 4 for an output the command could not write), and
the output path is checked before any model work."""
import json
import subprocess
import sys
import threading

import numpy as np
import pytest

import cvfast
from cvfast import CVFastInputError, OutputError
from cvfast import video as video_module
from cvfast.cli import main
from cvfast.core.files import write_text
from tests.test_video_cli import read_mp4

FRAMES = np.linspace(0, 1, 5 * 32 * 48 * 3, dtype=np.float32).reshape(5, 32, 48, 3)


def leftovers(folder) -> list[str]:
    """Temporary files or directories left beside the outputs (cvfast's start with a dot)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".gif"])
def test_each_format_reads_back_with_its_size_and_frame_count(tmp_path, suffix):
    meta, back = read_mp4(cvfast.save_video(FRAMES, tmp_path / f"v{suffix}", fps=10))
    assert meta["size"] == (48, 32) and back.shape == (5, 32, 48, 3)
    assert np.abs(back / 255 - FRAMES).mean() < 0.05  # lossy, but the same picture


def test_a_failing_writer_leaves_the_previous_video(tmp_path, monkeypatch):
    target = tmp_path / "v.mp4"
    cvfast.save_video(FRAMES, target)
    before = target.read_bytes()
    monkeypatch.setitem(video_module.VIDEO_FORMATS, ".mp4", ["-c:v", "no_such_encoder"])
    with pytest.raises(OutputError, match="ffmpeg could not write the video"):
        cvfast.save_video(FRAMES[::-1], target)
    assert target.read_bytes() == before and leftovers(tmp_path) == []


def test_ctrl_c_while_writing_leaves_the_previous_video(tmp_path, monkeypatch):
    target = tmp_path / "v.mp4"
    cvfast.save_video(FRAMES, target)
    before = target.read_bytes()

    def interrupted(video, path, fps):
        path.write_bytes(b"half a video")
        raise KeyboardInterrupt
    monkeypatch.setattr(video_module, "encode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cvfast.save_video(FRAMES, target)
    assert target.read_bytes() == before and leftovers(tmp_path) == []


def test_a_writer_killed_by_a_full_disk_leaves_the_previous_video(tmp_path):
    """A file-size limit (RLIMIT_FSIZE, inherited by ffmpeg) stands in for a full disk: ffmpeg dies
    writing, the command reports it with exit status 4, and the previous video is untouched."""
    target = tmp_path / "v.mp4"
    cvfast.save_video(FRAMES, target)
    before = target.read_bytes()
    script = ("import resource, sys, numpy as np, cvfast\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
              "from cvfast.cli.report import run\n"
              "frames = np.random.default_rng(0).random((30, 64, 96, 3), dtype=np.float32)\n"
              f"sys.exit(run(lambda: cvfast.save_video(frames, {str(target)!r}) and 0))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 4 and "ffmpeg could not write the video" in done.stderr
    assert target.read_bytes() == before


def test_two_writers_leave_one_complete_video(tmp_path):
    target, errors = tmp_path / "v.mp4", []
    contents = [FRAMES, 1 - FRAMES]

    def write(frames):
        try:
            cvfast.save_video(frames, target)
        except Exception as exc:  # noqa: BLE001 (the assertion below reports it)
            errors.append(exc)
    threads = [threading.Thread(target=write, args=(f,)) for f in contents]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _, back = read_mp4(target)
    assert errors == [] and leftovers(tmp_path) == []
    assert min(np.abs(back / 255 - f).mean() for f in contents) < 0.05


@pytest.mark.parametrize("out,match", [
    ("{tmp}", "a file path .it is a directory."),
    ("{tmp}/missing/v.mp4", "does not exist"),
    ("{tmp}/v.avi", "a path ending in .mp4, .webm, .gif"),
])
def test_the_output_path_is_checked_before_the_model_loads(tmp_path, monkeypatch, out, match):
    monkeypatch.setattr(cvfast.api, "load", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(CVFastInputError, match=match):
        cvfast.generate("a cat", out=out.format(tmp=tmp_path))
    assert main(["generate", "--prompt", "a cat", "--out", out.format(tmp=tmp_path)]) == 2


def test_a_missing_lora_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(cvfast.api, "load", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(CVFastInputError, match="lora=.*nothere.safetensors"):
        cvfast.generate("a cat", out=tmp_path / "v.mp4", loras=[(tmp_path / "nothere.safetensors", 1.0)])


def test_the_command_exits_4_when_the_video_cannot_be_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(video_module.VIDEO_FORMATS, ".mp4", ["-c:v", "no_such_encoder"])
    out = tmp_path / "v.mp4"
    assert main(["generate", "--prompt", "a cat", "--steps", "1", "--no-progress", "--out", str(out)]) == 4
    err = capsys.readouterr()
    assert "cvfast: error: ffmpeg could not write the video" in err.err and "wrote" not in err.out
    assert not out.exists() and leftovers(tmp_path) == []


def test_several_prompts_write_one_video_each(tmp_path):
    result = cvfast.generate(["a cat", "a dog"], out=tmp_path / "v.webm", num_inference_steps=1, seed=0,
                             progress=False)
    assert result.frames.shape[0] == 2
    for i in range(2):
        _, back = read_mp4(tmp_path / f"v-{i}.webm")
        assert back.shape == (9, 64, 96, 3)
    assert not (tmp_path / "v.webm").exists()


def test_a_text_file_that_fails_to_write_leaves_the_previous_one(tmp_path, monkeypatch):
    target = tmp_path / "ratios.json"
    write_text(target, json.dumps({"ratios": [1.0]}))

    def full_disk(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("os.fsync", full_disk)
    with pytest.raises(OutputError, match="cannot write .*ratios.json: No space left on device"):
        write_text(target, json.dumps({"ratios": [2.0]}))
    assert json.loads(target.read_text()) == {"ratios": [1.0]} and leftovers(tmp_path) == []


def test_a_failed_onnx_export_leaves_the_previous_export_and_foreign_files_are_refused(tmp_path, monkeypatch):
    from tests.extras import require
    for name in ("onnx", "onnxruntime", "onnxscript", "onnx_ir"):
        require(name)
    import cvfast.export.onnx as onnx_export
    pipe = cvfast.load("tiny", device="cpu", backend="reference")
    out = tmp_path / "export"
    path = cvfast.export_onnx(pipe, out, frames=9, height=64, width=96)
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise cvfast.ONNXExportError("the written model is not the expected one")
    monkeypatch.setattr(onnx_export, "verify_signature", broken)
    with pytest.raises(cvfast.ONNXExportError):
        cvfast.export_onnx(pipe, out, frames=9, height=64, width=96, batch=2)
    assert sorted(p.name for p in out.iterdir()) == ["transformer.onnx"] and path.read_bytes() == before
    assert leftovers(tmp_path) == []
    monkeypatch.setattr(onnx_export, "build_export_module", lambda *a: pytest.fail("export work started"))
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CVFastInputError, match=r"out_dir=.* it holds \['notes.txt'\]"):
        cvfast.export_onnx(pipe, out, frames=9, height=64, width=96)
    (out / "notes.txt").unlink()
    path.unlink()
    path.mkdir()
    with pytest.raises(CVFastInputError, match=r"it holds \['transformer.onnx'\]"):
        cvfast.export_onnx(pipe, out, frames=9, height=64, width=96)


def test_the_export_command_checks_its_directory_before_loading(tmp_path, monkeypatch, capsys):
    import cvfast.cli.export as export_cli
    monkeypatch.setattr(export_cli, "load", lambda *a, **k: pytest.fail("the model loaded"))
    taken = tmp_path / "export"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    assert main(["export", "onnx", "--model", "tiny", "--out", str(taken)]) == 2
    assert "it holds ['notes.txt']" in capsys.readouterr().err and (taken / "notes.txt").read_text() == "mine"


def test_a_path_without_suffix_is_a_folder_of_png_frames(tmp_path):
    from PIL import Image
    folder = cvfast.save_video(FRAMES, tmp_path / "frames")
    names = sorted(p.name for p in folder.iterdir())
    assert names == [f"frame_{i:04d}.png" for i in range(5)]
    first = np.asarray(Image.open(folder / names[0]))
    assert first.shape == (32, 48, 3) and np.array_equal(first, video_module.uint8_frames(FRAMES)[0])
    cvfast.save_video(FRAMES[:2], folder)  # an earlier frames output is replaced whole
    assert sorted(p.name for p in folder.iterdir()) == ["frame_0000.png", "frame_0001.png"]
    assert leftovers(tmp_path) == []


def test_a_frames_folder_never_replaces_a_folder_of_other_files(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(CVFastInputError, match="a folder of PNG frames must not exist yet, or hold only"):
        cvfast.save_video(FRAMES, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_a_failing_frame_writer_leaves_the_previous_frames(tmp_path, monkeypatch):
    folder = cvfast.save_video(FRAMES, tmp_path / "frames")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def broken(video, into):
        (into / "frame_0000.png").write_bytes(b"half")
        raise OutputError("disk full")
    monkeypatch.setattr(video_module, "write_frames", broken)
    with pytest.raises(OutputError, match="disk full"):
        cvfast.save_video(FRAMES[:1], folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert leftovers(tmp_path) == []


def test_cli_writes_png_frames_and_their_sidecar(tmp_path):
    out = tmp_path / "frames"
    assert main(["generate", "--prompt", "a cat", "--steps", "1", "--no-progress", "--out", str(out)]) == 0
    assert len(list(out.glob("frame_*.png"))) > 1
    assert json.loads((tmp_path / "frames.json").read_text())["prompt"] == "a cat"
