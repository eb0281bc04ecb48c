"""The `cvfast` command line (also `python -m cvfast`): `generate`, `convert-sat` (main.py), `export`
(export.py); every error is reported in one place (report.py)."""
from .main import main

__all__ = ["main"]
