"""Model sources, each read into a `Checkpoint` for the assembler: diffusers-layout folders and hub ids
(`diffusers.py`, `hub.py`), a diffusers pipeline in memory (`in_memory.py`), SAT directories (`sat.py`, `sat_names.py`; `convert.py` writes them as
diffusers folders), the embedded `tiny` model (`tiny.py`); LoRA adapters in every format (`lora.py`)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..core.errors import bad_arg
from ..models.config import TransformerConfig
from .checkpoint import Checkpoint, Tensors, load_into
from .diffusers import open_folder
from .hub import download, is_hub_id
from .in_memory import is_pipeline, open_pipeline
from .sat import is_sat_dir, open_sat
from .tiny import tiny_checkpoint

__all__ = ["Checkpoint", "Tensors", "load_into", "open_checkpoint"]


def open_checkpoint(model, check: Callable[[TransformerConfig], None], *, base=None, trust_pickle: bool = False,
                    transformer_weights: bool = True) -> Checkpoint:
    """The Checkpoint of `model`: a SAT directory (with `base`), "tiny", a diffusers-layout folder, a
    hub id or a diffusers CogVideoX pipeline object. `check` sees the transformer config before
    anything heavy is read or fetched. transformer_weights=False (a TensorRT engine holds the
    transformer): folders and hub ids only."""
    if is_pipeline(model):
        if not transformer_weights or base is not None:
            raise bad_arg("model", type(model).__name__, "a folder or hub id with backend='tensorrt' or base= (an "
                          "in-memory pipeline brings its own transformer, text encoder and scheduler)")
        return open_pipeline(model, check)
    if not isinstance(model, (str, Path)):
        raise bad_arg("model", model, "a folder path, a hub id like 'THUDM/CogVideoX-5b', 'tiny', or a diffusers "
                      "CogVideoX pipeline")
    path = Path(model).expanduser()
    if not transformer_weights and (str(model) == "tiny" or (path.is_dir() and is_sat_dir(path))):
        raise bad_arg("model", str(model), "a diffusers-layout folder or hub id with backend='tensorrt' (the engine "
                      "replaces its transformer)")
    if path.is_dir() and is_sat_dir(path):
        return open_sat(path, base, trust_pickle, check)
    if base is not None:
        raise bad_arg("base", base, "None unless model is a SAT checkpoint directory (other models have their own "
                      "text encoder and scheduler)")
    if str(model) == "tiny":
        return tiny_checkpoint(check)
    if path.is_dir():
        return open_folder(path, check, transformer_weights=transformer_weights)
    if is_hub_id(model):
        return open_folder(download(str(model)), check, name=str(model), transformer_weights=transformer_weights)
    raise bad_arg("model", str(model), "an existing folder, a hub id 'org/name', or 'tiny'")
