"""The one place the `cvfast` command turns an error into a message and an exit status."""
from __future__ import annotations

import sys
from collections.abc import Callable

from ..core.errors import CVFastInputError, ExportError, NumericsError, OutputError, RankFailedError

EXIT_FAILED = 1    # the work failed: another rank's error, an export that fails its check
EXIT_INPUT = 2     # an argument, file or model cvfast cannot take (argparse's status for a bad command line)
EXIT_NUMERICS = 3  # the computation produced NaN/Inf: no video was written
EXIT_OUTPUT = 4    # a file could not be written (the previous one at that path is unchanged)

EXIT_CODES = ((CVFastInputError, EXIT_INPUT), (NumericsError, EXIT_NUMERICS), (OutputError, EXIT_OUTPUT),
              (RankFailedError, EXIT_FAILED), (ExportError, EXIT_FAILED))


def error(message: str) -> None:
    print(f"cvfast: error: {message}", file=sys.stderr)


def run(command: Callable[..., int], *args) -> int:
    """command(*args)'s exit status; an error of a type in EXIT_CODES becomes one line on stderr and
    that type's status (another rank's error: that rank prints its own traceback)."""
    try:
        return command(*args)
    except tuple(kind for kind, _ in EXIT_CODES) as exc:
        error(str(exc))
        return next(code for kind, code in EXIT_CODES if isinstance(exc, kind))
