"""Session setup shared by every test module."""
import os

import torch

# Without a GPU the Triton kernels run under Triton's interpreter; the flag must be set before
# triton (through cvfast.kernels) is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
