"""Session setup shared by every test module."""
import os

import torch

# Without a GPU the Triton kernels run under Triton's interpreter; the flag must be set before
# triton (through cvfast.kernels) is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_runtest_logreport(report):
    """With CVFAST_FAILURE_LOG set (the gpu suite sets it), each failure's report is appended to that
    file as it happens: a run its time budget stops still says why its tests failed."""
    path = os.environ.get("CVFAST_FAILURE_LOG")
    if path and report.failed:
        with open(path, "a") as log:
            log.write(f"== {report.nodeid} ({report.when})\n{report.longreprtext}\n")
