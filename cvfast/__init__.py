"""cvfast: a fast, validated inference engine for the CogVideoX family of video diffusion transformers."""
from __future__ import annotations

from pathlib import Path

from .errors import CVFastInputError, NonFiniteLatentsError
from .export import export_onnx
from .loading import load
from .pipeline import GenerationResult, Pipeline
from .sat_io import convert_sat
from .video import save_video

__version__ = "0.1.0"
__all__ = ["load", "generate", "save_video", "export_onnx", "convert_sat", "Pipeline", "GenerationResult",
           "CVFastInputError", "NonFiniteLatentsError", "__version__"]


def generate(prompt, *, model: str | Path = "tiny", out: str | Path | None = "video.mp4", device=None, dtype=None,
             backend: str = "auto", allow_fp16: bool = False, offload: str = "none", loras=(),
             base=None, trust_pickle: bool = False, parallel=None, engine=None,
             **kwargs) -> GenerationResult | None:
    """One call: load `model`, generate for `prompt` (keyword arguments as `Pipeline.generate`) and,
    when `out` is not None, write the first video to `out` as mp4. parallel: as in `load`; then
    rank 0 writes the video and returns the result, the other ranks return None."""
    if out is not None and Path(out).suffix.lower() != ".mp4":
        raise CVFastInputError(f"out={str(out)!r} is not accepted: a path ending in .mp4 (or None)")
    if out is not None and kwargs.get("output_type", "np") == "latent":
        raise CVFastInputError("output_type='latent' is not accepted with out=...: latents are not a video")
    pipe = load(model, device=device, dtype=dtype, backend=backend, allow_fp16=allow_fp16, offload=offload,
                base=base, trust_pickle=trust_pickle, parallel=parallel, engine=engine)
    for path, scale in loras:  # (path, scale) pairs merged into the transformer before generating
        pipe.load_lora(path, scale, trust_pickle=trust_pickle)
    result = pipe.generate(prompt, **kwargs)
    if out is not None and result is not None:
        save_video(result.frames[0], out, fps=result.fps)
    return result
