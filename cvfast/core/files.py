"""The one place cvfast writes files: nothing is written in place. The content goes to a temporary file
(or directory) beside the target and is renamed over it only when complete, so a failure (an error,
Ctrl-C, a full disk, a killed process) leaves the previous file as it was, and two writers end with
one complete output. A failure to write is an `OutputError` naming the path."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import OutputError, bad_arg


def check_writable(path, argument: str = "out", *, directory: bool = False) -> Path:
    """`path` as a Path, once it is known that a file (or with `directory`, a directory) can be
    written there: call it before any work that a refusal would waste; `argument` names the path in
    the error."""
    path = Path(path).expanduser()
    if path.is_dir() and not directory:
        raise bad_arg(argument, str(path), "a file path (it is a directory)")
    if path.exists() and directory and not path.is_dir():
        raise bad_arg(argument, str(path), "a directory (it is created when missing)")
    if not path.parent.is_dir():
        raise bad_arg(argument, str(path), f"a path in an existing directory ({path.parent} does not exist)")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise bad_arg(argument, str(path), f"a path in a writable directory ({path.parent} is not writable)")
    return path


@contextlib.contextmanager
def replacing(path, *, directory: bool = False):
    """Yield a temporary path beside `path` for the caller to fill (a file, or a new directory with
    `directory=True`; the file keeps `path`'s suffix, so that a writer choosing its format by suffix
    chooses the same). When the block ends without an error the temporary path replaces `path`: a
    file by one atomic rename; a directory by moving the previous one aside, renaming the new one in,
    then deleting the previous one (`path` is never a mix of the two). On an error (or Ctrl-C) the
    temporary path is removed and `path` is as it was."""
    path = Path(path)
    try:
        if directory:
            temporary = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        else:
            handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
            os.close(handle)
            temporary = Path(name)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        yield temporary
        if directory and path.exists():
            previous = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.replace(path, previous / path.name)
            os.replace(temporary, path)
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.replace(temporary, path)
    except OutputError:
        raise
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}; the previous file is unchanged") from None
    finally:
        if temporary.is_dir():
            shutil.rmtree(temporary, ignore_errors=True)
        else:
            temporary.unlink(missing_ok=True)


def write_bytes(path, data: bytes) -> Path:
    """`data` written to `path` through `replacing`, flushed to the disk before the rename."""
    path = Path(path)
    with replacing(path) as temporary:
        with open(temporary, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return path


def write_text(path, text: str) -> Path:
    return write_bytes(path, text.encode())
