"""Writing files so that nothing is lost: the content goes to a temporary file beside the target and
is renamed over it only when complete, so a failure (an error, Ctrl-C, a full disk) leaves the
previous file as it was, and two writers end with one complete file."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import bad_arg


def check_writable(path, argument: str = "out") -> Path:
    """`path` as a Path, once it is known that a file can be written there (before any work that
    would be lost); `argument` names it in the error."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise bad_arg(argument, str(path), "a file path (it is a directory)")
    if not path.parent.is_dir():
        raise bad_arg(argument, str(path), f"a path in an existing directory ({path.parent} does not exist)")
    if not os.access(path.parent, os.W_OK):
        raise bad_arg(argument, str(path), f"a path in a writable directory ({path.parent} is not)")
    return path


def write_text_atomic(path, text: str, *, argument: str = "out") -> Path:
    """Write `text` to `path` through a temporary file in its directory."""
    path = check_writable(path, argument)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
