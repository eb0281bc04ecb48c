"""Writing frames as a video file, never resizing them and never in place: mp4 (H.264), webm (VP9)
or gif, chosen by the path's suffix, encoded by the ffmpeg that imageio-ffmpeg ships into a temporary
file beside the target, which replaces the target only once ffmpeg reported success; or, for a path
without a suffix, a folder of PNG frames (frame_0000.png, ...) written into a temporary folder that
replaces it whole."""
from __future__ import annotations

import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from .core.errors import CVFastInputError, OutputError, bad_arg
from .core.files import check_writable, replacing

# ffmpeg's output options per suffix. mp4: H.264 at CRF 10 (what imageio's quality 8 gives), yuv420p,
# playable everywhere; webm: VP9 at CRF 32 in constant-quality mode (-b:v 0); gif: one palette made
# from the whole video (palettegen/paletteuse), far truer than the fixed 256-colour default.
VIDEO_FORMATS = {
    ".mp4": ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "10"],
    ".webm": ["-c:v", "libvpx-vp9", "-pix_fmt", "yuv420p", "-crf", "32", "-b:v", "0"],
    ".gif": ["-filter_complex", "split[a][b];[a]palettegen[p];[b][p]paletteuse", "-loop", "0"],
}
# yuv420p stores chroma at half resolution: these formats need an even height and width.
EVEN_SIZE = (".mp4", ".webm")


FRAME_NAME = "frame_{:04d}.png"  # the files of a frames folder, in order


def is_frames_folder(path: Path) -> bool:
    """Whether `path` names a folder of PNG frames rather than a video file: it has no suffix."""
    return path.suffix == ""


def is_frames_output(folder: Path) -> bool:
    """Whether an existing folder is an earlier frames output: PNG frames and nothing else (an empty
    folder is not: `--out outputs/` is more likely a mistake than a request for frames)."""
    files = list(folder.iterdir())
    return bool(files) and all(f.name.startswith("frame_") and f.suffix == ".png" for f in files)


def check_video_path(path, argument: str = "out") -> Path:
    """A path a video can be written to, with a suffix of VIDEO_FORMATS or none (a folder of PNG
    frames that does not exist yet, or an earlier frames output: it is replaced whole), checked
    before any work."""
    path = Path(path).expanduser()
    if is_frames_folder(path):
        path = check_writable(path, argument, directory=True)
        if path.is_dir() and not is_frames_output(path):
            raise bad_arg(argument, str(path), "a file path (it is a directory: a folder of PNG frames must not exist "
                          "yet, or hold only an earlier output's frame_*.png files, since it is replaced whole)")
        return path
    path = check_writable(path, argument)
    if path.suffix.lower() not in VIDEO_FORMATS:
        raise bad_arg(argument, str(path), f"a path ending in {', '.join(VIDEO_FORMATS)}, or a folder name without "
                      "a suffix (PNG frames)")
    return path


def video_paths(out, count: int) -> list[Path]:
    """Where `count` videos for one `out` go: `out` itself for one; v-0.mp4, v-1.mp4, ... beside it
    for several."""
    out = Path(out)
    return [out] if count == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


def uint8_frames(frames) -> np.ndarray:
    """Accepts (F, H, W, 3) or (1, F, H, W, 3) numpy (float in [0, 1] or uint8), or a torch tensor in
    cvfast's "pt" layout (F, 3, H, W) / (1, F, 3, H, W). Returns (F, H, W, 3) uint8."""
    if isinstance(frames, torch.Tensor):
        arr = frames.detach().float().cpu()
        if arr.dim() == 5 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.dim() != 4 or arr.shape[1] != 3:
            raise bad_arg("frames", f"tensor{tuple(frames.shape)}", "a tensor (frames, 3, height, width)")
        arr = arr.permute(0, 2, 3, 1).numpy()
    else:
        arr = np.asarray(frames)
        if arr.ndim == 5 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise bad_arg("frames", f"array{arr.shape}", "an array (frames, height, width, 3); "
                          "for a batch, save each video separately")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if not np.isfinite(arr).all():
        raise bad_arg("frames", "array with NaN/Inf", "finite values in [0, 1]")
    return np.ascontiguousarray((np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8))


def save_video(frames, path: str | Path, fps: int | float | None = None) -> Path:
    """Write `frames` to `path` (.mp4, .webm, .gif, or a folder of PNG frames for a path without a
    suffix) and return the path. `frames` may also be a
    `GenerationResult` (its first video; its fps is used when `fps` is None). mp4 and webm need an
    even height and width: frames are never resized to fit. The file is complete or absent: a failed
    write raises OutputError and leaves a previous file at `path` unchanged."""
    if hasattr(frames, "frames") and hasattr(frames, "fps"):
        fps = fps or frames.fps
        frames = frames.frames
    fps = 8 if fps is None else fps
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
        raise bad_arg("fps", fps, "a positive number")
    path = check_video_path(path, "path")
    video = uint8_frames(frames)
    if is_frames_folder(path):
        with replacing(path, directory=True) as temporary:
            write_frames(video, temporary)
        return path
    _, height, width, _ = video.shape
    if path.suffix.lower() in EVEN_SIZE and (height % 2 or width % 2):
        raise bad_arg("frames", f"{width}x{height}", f"even width and height for {path.suffix} (yuv420p); cvfast "
                      "never resizes silently: crop or pad the frames first (or write a .gif)")
    with replacing(path) as temporary:
        encode(video, temporary, fps)
    return path


def write_frames(video: np.ndarray, folder: Path) -> None:
    """Each frame of `video` (F, H, W, 3) uint8 as `FRAME_NAME` in `folder`."""
    from PIL import Image
    for index, frame in enumerate(video):
        try:
            Image.fromarray(frame).save(folder / FRAME_NAME.format(index))
        except OSError as exc:
            raise OutputError(f"cannot write frame {index} into {folder}: {exc}") from None


def encode(video: np.ndarray, path: Path, fps) -> None:
    """ffmpeg from raw RGB frames on stdin to `path`; OutputError with ffmpeg's own last words when it
    fails (a full disk, say)."""
    import imageio_ffmpeg
    height, width = video.shape[1:3]
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
               "-s", f"{width}x{height}", "-r", str(Fraction(fps).limit_denominator(1000)), "-i", "-",
               *VIDEO_FORMATS[path.suffix.lower()], str(path)]
    done = subprocess.run(command, input=video.tobytes(), capture_output=True)
    if done.returncode != 0:
        said = done.stderr.decode(errors="replace").strip().splitlines()
        raise OutputError(f"ffmpeg could not write the video (exit status {done.returncode}): "
                          f"{said[-1] if said else 'no message'}")


def read_video(path, argument: str = "video") -> np.ndarray:
    """A video file's frames (F, H, W, 3) uint8, decoded by imageio-ffmpeg's ffmpeg; CVFastInputError
    naming `argument` (a Python argument or the flag typed) when there is no such file or it does not
    decode."""
    import imageio_ffmpeg
    if not Path(path).is_file():
        raise CVFastInputError(f"{argument} {str(path)!r} is not accepted: no such file")
    try:
        reader = imageio_ffmpeg.read_frames(str(path))
        width, height = next(reader)["size"]
        return np.stack([np.frombuffer(f, np.uint8).reshape(height, width, 3) for f in reader])
    except (OSError, RuntimeError, StopIteration, ValueError) as exc:
        said = str(exc).strip().splitlines()  # ffmpeg's banner first, its complaint last
        raise CVFastInputError(f"{argument} {str(path)!r} cannot be read as a video: "
                               f"{said[-1] if said else type(exc).__name__}") from None
