"""Third-party packages the tests need: the oracles (diffusers, peft), the ONNX stack, and what `make
test` installs beside them. `require(name)` imports one; where it is missing the test is skipped,
except under `make test` (CVFAST_REQUIRE_TEST_EXTRAS=1), which installed them all: there a missing
package is a broken environment, and the test fails instead of hiding it as a skip."""
import importlib
import os

import pytest

REQUIRED = os.environ.get("CVFAST_REQUIRE_TEST_EXTRAS") == "1"


def require(name: str):
    """The imported module `name`, or a skip (a failure under `make test`) when it cannot be imported."""
    if REQUIRED:
        return importlib.import_module(name)
    return pytest.importorskip(name, reason=f"{name} is not installed (pip install -e '.[test]')")
