"""Progress lines for the stages without a progress bar (loading a model, decoding a video), at INFO
on the `cvfast.progress` logger: silent unless logging shows it, as the command line does unless
--no-progress is given. (The denoising steps have their own tqdm bar.)"""
from __future__ import annotations

import logging

progress = logging.getLogger("cvfast.progress")
