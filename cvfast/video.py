"""Writing frames to an H.264 mp4, never resizing them."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from .core.errors import bad_arg


def _to_uint8_frames(frames) -> np.ndarray:
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
    """Write H.264 (yuv420p, playable everywhere) through imageio-ffmpeg, else PyAV. `frames` may also
    be a `GenerationResult` (its fps is used when `fps` is None). Height and width must be even
    (yuv420p): frames are never resized to fit."""
    if hasattr(frames, "frames") and hasattr(frames, "fps"):
        fps = fps or frames.fps
        frames = frames.frames
    fps = 8 if fps is None else fps
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
        raise bad_arg("fps", fps, "a positive number")
    video = _to_uint8_frames(frames)
    _, height, width, _ = video.shape
    if height % 2 or width % 2:
        raise bad_arg("frames", f"{width}x{height}", "even width and height (H.264 yuv420p); cvfast never "
                      "resizes silently: crop or pad the frames first")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import imageio_ffmpeg
    except ImportError:
        _write_pyav(video, path, fps)
        return path
    # macro_block_size=1: imageio-ffmpeg would otherwise rescale to a multiple of 16.
    writer = imageio_ffmpeg.write_frames(str(path), (width, height), fps=fps, codec="libx264",
                                         pix_fmt_out="yuv420p", macro_block_size=1, quality=8)
    writer.send(None)
    for frame in video:
        writer.send(frame)
    writer.close()
    return path


def _write_pyav(video: np.ndarray, path: Path, fps) -> None:
    try:
        import av
    except ImportError:
        raise RuntimeError("writing mp4 needs imageio-ffmpeg or PyAV: pip install imageio-ffmpeg") from None
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = video.shape[2], video.shape[1], "yuv420p"
        for frame in video:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
