"""The Hugging Face hub and the JSON files of a model folder."""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..core.errors import CVFastInputError

COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
# What a snapshot of a hub repo needs: configs, safetensors, tokenizer files; never pickles.
MODEL_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt"]
# A hub id is "org/name": word characters, dots and dashes, the first not a dot (so "./x" is a path).
HUB_ID = re.compile(r"[\w-][\w.-]*/[\w.-]+")


def is_hub_id(model) -> bool:
    return HUB_ID.fullmatch(str(model)) is not None


def download(repo_id: str, patterns: list[str] = MODEL_PATTERNS, argument: str = "model") -> Path:
    """The local snapshot of `repo_id` (only the files matching `patterns`), fetched when needed;
    `argument`: the argument that named it, for the error."""
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # offline, unknown repo, gated repo: all end the same way for the user
        raise CVFastInputError(
            f"{argument}={repo_id!r} could not be fetched from the Hugging Face hub ({type(exc).__name__}: {exc}). "
            f"Download it elsewhere (e.g. `huggingface-cli download {repo_id} --local-dir DIR`) and pass the "
            "local folder instead.") from exc


def read_json(path: Path) -> dict:
    """A config file of a diffusers-layout folder."""
    if not path.is_file():
        raise CVFastInputError(f"{path} is missing: a diffusers-layout CogVideoX folder has model_index.json "
                               f"and {', '.join(COMPONENTS)}/ each with its config")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CVFastInputError(f"{path} is not valid JSON ({exc})") from None
