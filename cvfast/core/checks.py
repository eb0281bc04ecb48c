"""Argument checks shared by every layer: each raises `CVFastInputError` naming the argument, its value
and what is accepted."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from .errors import bad_arg

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise bad_arg(name, value, "an integer >= 1")
    return int(value)


def is_number(value) -> bool:
    """A finite int or float (bools are not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def pick(value, default):
    """`value`, or `default` when it is None (0 is a value, not "unset")."""
    return default if value is None else value


def known_fields(cls, d: dict) -> dict:
    """The entries of a config dict that name fields of the dataclass `cls` (the rest is ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


def resolve_device(device) -> torch.device:
    """None: CUDA when present, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise bad_arg("device", device, "'cpu', 'cuda', 'cuda:N' or a torch.device") from None
    if dev.type not in ("cpu", "cuda"):
        raise bad_arg("device", device, "'cpu' or 'cuda[:N]'")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise bad_arg("device", device, "'cpu' on this machine: torch sees no CUDA device")
    return dev


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """None: bf16 on CUDA, fp32 on the CPU; a torch dtype or one of the names in `DTYPES`."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if dtype in (torch.float32, torch.bfloat16, torch.float16):
        return dtype
    raise bad_arg("dtype", dtype, "torch.float32, torch.bfloat16, torch.float16 or one of " + ", ".join(DTYPES))


def check_fp16(dtype: torch.dtype, variant: str, allow_fp16: bool) -> None:
    """The fp16 policy: CogVideoX-5B and 1.5 overflow fp16 activations and decode to black frames
    (their model cards ask for bf16); 2B was trained in fp16."""
    if dtype == torch.float16 and variant != "2b" and not allow_fp16:
        raise bad_arg("dtype", "float16", f"bfloat16 or float32 for a {variant} model: it overflows in fp16 "
                      "and produces black frames (pass allow_fp16=True to try anyway)")
