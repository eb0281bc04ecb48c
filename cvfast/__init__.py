"""cvfast: a fast, validated inference engine for the CogVideoX family of video diffusion transformers."""
from __future__ import annotations

from .api import from_diffusers, generate, load
from .checkpoints.convert import convert_sat
from .core.errors import (CVFastError, CVFastInputError, EngineMismatchError, LoRAError, NonFiniteLatentsError,
                          NumericsError, ONNXCheckError, ONNXExportError, OutputError, RankFailedError,
                          UnsafePickleError, WeightError)
from .export import export_onnx
from .pipeline import GenerationResult, Pipeline
from .runtime.parallel import ParallelConfig
from .sampler.cache import FirstBlockCache, MagCache, TeaCache
from .video import save_video

__version__ = "0.1.0"
__all__ = ["load", "from_diffusers", "generate", "save_video", "export_onnx", "convert_sat", "Pipeline", "GenerationResult",
           "ParallelConfig", "TeaCache", "FirstBlockCache", "MagCache", "CVFastError", "CVFastInputError", "WeightError",
           "LoRAError", "UnsafePickleError", "EngineMismatchError", "NumericsError", "NonFiniteLatentsError", "ONNXExportError", "ONNXCheckError",
           "RankFailedError", "OutputError", "__version__"]
