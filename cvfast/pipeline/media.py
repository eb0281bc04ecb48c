"""Conditioning inputs (an image for image-to-video, frames for video-to-video) as VAE input.

Accepted: PIL images; uint8 numpy arrays (H, W, 3) / (F, H, W, 3); float numpy arrays or tensors in
[0, 1], numpy (H, W, 3) / (F, H, W, 3), tensors (3, H, W) / (F, 3, H, W). A frame of another size is
resized with Lanczos through PIL (diffusers does the same for PIL input, so PIL images keep the
seed compatibility with diffusers; arrays and tensors are resized the same way rather than by
diffusers' nearest-neighbour interpolation), after a centre crop or black padding to the target's
aspect unless stretched (`fitted`).
"""
from __future__ import annotations

import numpy as np
import torch

from ..core.errors import bad_arg


def _frame_to_array(name: str, frame) -> np.ndarray:
    """One frame -> float32 (H, W, 3) in [0, 1]."""
    try:
        from PIL import Image
    except ImportError:  # PIL is optional: arrays and tensors work without it
        Image = None
    if Image is not None and isinstance(frame, Image.Image):
        return np.asarray(frame.convert("RGB"), dtype=np.float32) / 255.0
    if isinstance(frame, torch.Tensor):
        if frame.dim() != 3 or frame.shape[0] != 3 or not frame.is_floating_point():
            raise bad_arg(name, f"tensor{tuple(frame.shape)} {frame.dtype}", "a float tensor (3, height, width) in [0, 1]")
        frame = frame.detach().float().cpu().permute(1, 2, 0).numpy()
    arr = np.asarray(frame)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise bad_arg(name, f"array{arr.shape}", "(height, width, 3) RGB frames")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if not np.issubdtype(arr.dtype, np.floating):
        raise bad_arg(name, f"array of {arr.dtype}", "uint8 or float frames")
    if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
        raise bad_arg(name, f"float frames in [{np.nanmin(arr):.3g}, {np.nanmax(arr):.3g}]", "finite values in [0, 1]")
    return arr.astype(np.float32)


FITS = ("crop", "pad", "stretch")


def _resize(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    if frame.shape[:2] == (height, width):
        return frame
    from PIL import Image
    # Through 8-bit PIL, as diffusers resizes a PIL input: Lanczos, then back to [0, 1].
    img = Image.fromarray((frame * 255).round().astype(np.uint8)).resize((width, height), Image.LANCZOS)
    return np.asarray(img, dtype=np.float32) / 255.0


def fitted(frame: np.ndarray, height: int, width: int, fit: str) -> np.ndarray:
    """A frame brought to height x width: "stretch" resizes it whatever its aspect (diffusers' way);
    "crop" first cuts the centre of the target's aspect out of it, "pad" first adds black borders
    around it to that aspect, so nothing is distorted."""
    rows, cols = frame.shape[:2]
    if fit == "stretch" or rows * width == cols * height:
        return _resize(frame, height, width)
    # Rows and columns the frame would have at the target's aspect, keeping its width (or height).
    target_rows, target_cols = round(cols * height / width), round(rows * width / height)
    if fit == "crop":
        top, left = max(rows - target_rows, 0) // 2, max(cols - target_cols, 0) // 2
        frame = frame[top:top + min(rows, target_rows), left:left + min(cols, target_cols)]
    else:
        pad_rows, pad_cols = max(target_rows - rows, 0), max(target_cols - cols, 0)
        frame = np.pad(frame, ((pad_rows // 2, pad_rows - pad_rows // 2), (pad_cols // 2, pad_cols - pad_cols // 2),
                               (0, 0)))
    return _resize(frame, height, width)


def frame_size(frame) -> tuple[int, int]:
    """(height, width) of one conditioning frame, whatever its type."""
    if hasattr(frame, "size") and not callable(frame.size) and not isinstance(frame, np.ndarray):
        width, height = frame.size  # PIL
        return height, width
    shape = tuple(frame.shape)
    return (shape[1], shape[2]) if isinstance(frame, torch.Tensor) else (shape[0], shape[1])


def frames_list(name: str, value) -> list:
    """Split a video argument into frames (an image argument is one frame)."""
    if isinstance(value, (list, tuple)):
        frames = list(value)
    elif isinstance(value, torch.Tensor) and value.dim() == 4:
        frames = list(value.unbind(0))
    elif isinstance(value, np.ndarray) and value.ndim == 4:
        frames = list(value)
    else:
        frames = [value]
    if not frames:
        raise bad_arg(name, value, "at least one frame")
    return frames


def to_vae_input(name: str, frames: list, height: int, width: int, device, dtype, fit: str = "stretch") -> torch.Tensor:
    """Frames -> (1, 3, F, height, width) in [-1, 1], the VAE's input, each fitted (`fitted`)."""
    arrays = [fitted(_frame_to_array(name, f), height, width, fit) for f in frames]
    video = torch.from_numpy(np.stack(arrays)).permute(3, 0, 1, 2)[None]
    return (video * 2 - 1).to(device=device, dtype=dtype)
