"""The native extension cvfast._C: that `make test`'s install built and imports it, the argument
checks at its C++ boundary, the dispatch around it, and setup.py's fallback to a pure-Python install.
Its ops' numerics are in test_vae_norm.py."""
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cvfast import ops
from cvfast.core.errors import CVFastInputError
from cvfast.ops import group_norm
from cvfast.ops.registry import placeholder

ROOT = Path(__file__).resolve().parent.parent

if os.environ.get("CVFAST_BUILD_EXT") == "0":
    pytest.skip("CVFAST_BUILD_EXT=0: a pure-Python install", allow_module_level=True)


def test_extension_imports():
    assert group_norm.NATIVE_IMPORT_ERROR is None and group_norm.NATIVE_CUDA in (True, False)
    (native,) = [impl for impl in ops.alternatives("group_norm") if impl.backend == "native"]
    assert native.unavailable is None and native.fn is group_norm.native_group_norm


def _args(**change):
    x = torch.randn(1, 6, 2, 3, 5)
    args = dict(x=x, weight=torch.ones(6), bias=torch.zeros(6), groups=3, eps=1e-6, scale=torch.ones_like(x),
                shift=torch.zeros_like(x), silu=True)
    args.update(change)
    return args


@pytest.mark.parametrize("change,message", [
    (dict(x=torch.randn(1, 6, 2, 3, 5, dtype=torch.float64)), "x must be float32, bfloat16 or float16, got Double"),
    (dict(x=torch.randn(6, 2, 3, 5)), "x must be 5-D"),
    (dict(x=torch.randn(1, 6, 2, 5, 3).transpose(-1, -2)), "x must be contiguous or channels_last_3d"),
    (dict(groups=4), "groups=4 must be positive and divide x's 6 channels"),
    (dict(eps=-1.0), "eps=-1 must be >= 0"),
    (dict(weight=torch.ones(5)), "weight must be a contiguous 1-D tensor of x's 6 channels, got shape [5]"),
    (dict(bias=torch.zeros(6, dtype=torch.bfloat16)), "bias must have x's dtype Float, got BFloat16"),
    (dict(shift=None), "scale and shift must both be given or both be None"),
    (dict(scale=torch.ones(1, 6, 2, 3, 4)), "scale must have x's shape [1, 6, 2, 3, 5], got [1, 6, 2, 3, 4]"),
    (dict(shift=torch.zeros(1, 6, 2, 3, 5).contiguous(memory_format=torch.channels_last_3d)),
     "shift must have x's memory layout"),
])
def test_bad_arguments_are_named(change, message):
    """The C++ op itself (no Python wrapper) refuses each bad argument, naming it and its value."""
    args = _args(**change)
    with pytest.raises(RuntimeError, match="cvfast::native_group_norm: ") as info:
        torch.ops.cvfast.native_group_norm(*args.values())
    assert message in str(info.value)


def test_fake_impl_gives_shape_and_layout():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(2, 8, 3, 5, 7).contiguous(memory_format=torch.channels_last_3d)
        out = torch.ops.cvfast.native_group_norm(x, torch.empty(8), torch.empty(8), 4, 1e-6, None, None, True)
    assert out.shape == x.shape and out.is_contiguous(memory_format=torch.channels_last_3d)


def test_backend_native_runs_group_norm_and_references_the_rest():
    opset = ops.resolve("native", "cpu")
    x = torch.randn(1, 8, 1, 3, 5)
    opset.group_norm(x, torch.ones(8), torch.zeros(8), 4, 1e-6, silu=True)
    names = opset.names()
    assert names["group_norm"] == "native" and names["attention"] == "reference"
    with pytest.raises(CVFastInputError, match="native.*weight/bias dtype"):
        opset.group_norm(x, torch.ones(8, dtype=torch.bfloat16), torch.zeros(8, dtype=torch.bfloat16), 4, 1e-6)


def test_a_missing_extension_is_one_line_reason(monkeypatch):
    """With cvfast._C unimportable the backend is unavailable with a one-line reason (the build's,
    when setup.py left one), and asking for it raises that reason."""
    import cvfast
    monkeypatch.setitem(sys.modules, "cvfast._C", None)
    monkeypatch.delattr(cvfast, "_C", raising=False)
    with pytest.raises(ImportError) as info:
        importlib.import_module("cvfast._C")
    impl = placeholder("native", group_norm.extension_error(info.value))
    assert impl.unavailable.startswith("native is unavailable (ImportError: cvfast._C cannot be imported")
    assert "\n" not in impl.unavailable
    with pytest.raises(RuntimeError, match="cvfast._C cannot be imported"):
        impl.fn()


def _run_build_ext(tmp_path, **env):
    """setup.py build_ext in a copy of the project's build files (so build/native is not touched)."""
    for name in ("setup.py", "README.md", "CMakeLists.txt"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    result = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", "lib"], cwd=tmp_path,
                            env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result, tmp_path / "lib" / "cvfast"


def test_build_ext_0_is_a_pure_python_install(tmp_path):
    _, package = _run_build_ext(tmp_path, CVFAST_BUILD_EXT="0")
    assert not list(package.glob("_C*.so"))
    assert (package / "_C_build_error.txt").read_text().strip() == "cvfast._C was not built (CVFAST_BUILD_EXT=0)"


def test_a_failed_build_warns_and_still_installs(tmp_path):
    """No cmake on the PATH: the build fails, the install goes on, the reason is kept."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(sys.executable, bin_dir / "python")
    result, package = _run_build_ext(tmp_path, PATH=str(bin_dir))
    reason = (package / "_C_build_error.txt").read_text()
    assert reason.startswith("cvfast._C failed to build (FileNotFoundError") and "build.log" in reason
    assert "WARNING: cvfast._C failed to build" in result.stderr
    assert not list(package.glob("_C*.so"))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_nvcc_check_fails_on_a_cuda_source_that_does_not_compile(tmp_path):
    """csrc/nvcc_check.py (run by `make test`) on a project whose one .cu has a type error."""
    (tmp_path / "csrc").mkdir()
    shutil.copy(ROOT / "csrc" / "nvcc_check.py", tmp_path / "csrc")
    (tmp_path / "csrc" / "broken.cu").write_text("__global__ void k(float* x) { x[0] = undeclared; }\n")
    result = subprocess.run([sys.executable, "csrc/nvcc_check.py"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1
    assert "broken.cu does not compile for sm_90" in result.stderr and "undeclared" in result.stderr
