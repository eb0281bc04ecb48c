"""A loaded model's generation: `Pipeline` (pipeline.py) over `Components` and a `Runtime`, every
argument check of generate() (request.py), conditioning frames in (media.py), the result (result.py)."""
from .components import Components
from .pipeline import Pipeline
from .request import OUTPUT_TYPES, Request, Text
from .result import GenerationResult

__all__ = ["Pipeline", "Components", "GenerationResult", "Request", "Text", "OUTPUT_TYPES"]
