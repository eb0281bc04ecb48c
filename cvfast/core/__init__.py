"""The bottom layer: cvfast's exception types, the argument checks every layer above shares, the one
place files are written (`files.py`) and the progress logger (`progress.py`)."""
