"""cvfast, with the optional native extension cvfast._C (csrc/, built by CMakeLists.txt).

The extension is built by CMake against the PyTorch installed where the build runs, so install with
`pip install --no-build-isolation -e .` (the Makefile does). CVFAST_BUILD_EXT=0 skips it. The package
installs and works without it: when the build fails, the install still succeeds with a warning, and
`cvfast/_C_build_error.txt` (next to where the module would be) says why, which is what the native
backend reports as its reason for being unavailable. The full CMake log is build/native/build.log.
"""
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
BUILD_DIR = ROOT / "build" / "native"  # kept between builds: a reinstall recompiles nothing that is unchanged
ERROR_FILE = "_C_build_error.txt"



def _replace(source: Path, dest: Path) -> None:
    """Copy into place by renaming a complete copy over `dest`: a process that has the old module
    loaded keeps its (unlinked) file, where copying over it in place would crash that process."""
    partial = dest.with_name(dest.name + ".partial")
    shutil.copyfile(source, partial)
    os.replace(partial, dest)

class CMakeBuild(build_ext):
    """Builds cvfast._C with CMake; a failure (or CVFAST_BUILD_EXT=0) leaves a pure-Python install."""

    def build_extension(self, ext: Extension) -> None:
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        error_file = target.parent / ERROR_FILE
        if os.environ.get("CVFAST_BUILD_EXT", "1") == "0":
            error_file.write_text("cvfast._C was not built (CVFAST_BUILD_EXT=0)\n")
            return
        log = BUILD_DIR / "build.log"
        try:
            built = _cmake_build(log)
        except Exception as exc:  # any failure: the install goes on without the extension
            reason = f"cvfast._C failed to build ({type(exc).__name__}: {exc}); full log: {log}"
            warnings.warn(reason)
            print(f"WARNING: {reason}", file=sys.stderr)
            error_file.write_text(reason + "\n")
            target.unlink(missing_ok=True)
            return
        _replace(built, target)
        error_file.unlink(missing_ok=True)

    def copy_extensions_to_source(self) -> None:
        """--inplace and editable installs: the module, or the reason there is none, into the source
        package (setuptools' own copy would fail on a module that was not built)."""
        for ext in self.extensions:
            built = Path(self.build_lib) / self.get_ext_filename(self.get_ext_fullname(ext.name))
            package_dir = Path(self.get_finalized_command("build_py").get_package_dir("cvfast"))
            for name in (built.name, ERROR_FILE):
                source, dest = built.parent / name, package_dir / name
                if source.exists():
                    _replace(source, dest)
                else:
                    dest.unlink(missing_ok=True)


def _cmake_build(log: Path) -> Path:
    """Configures and builds the CMake project into BUILD_DIR, output appended to `log`; returns the module."""
    try:
        import torch.utils
    except ImportError as exc:
        raise RuntimeError("torch is not importable where the build runs (pip's build isolation? install "
                           "with --no-build-isolation)") from exc
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    configure = ["cmake", "-S", str(ROOT), "-B", str(BUILD_DIR), "-DCMAKE_BUILD_TYPE=Release",
                 f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", f"-DPython3_EXECUTABLE={sys.executable}"]
    if shutil.which("ninja") and not (BUILD_DIR / "Makefile").exists():
        configure += ["-G", "Ninja"]
    with log.open("w") as out:
        for cmd in (configure, ["cmake", "--build", str(BUILD_DIR), "-j", str(os.cpu_count() or 1)]):
            out.write("$ " + " ".join(cmd) + "\n")
            out.flush()
            if subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT) != 0:
                raise RuntimeError(f"`{' '.join(cmd[:2])}` failed: {_first_error(log)}")
    return BUILD_DIR / "_C.so"  # CMakeLists.txt: OUTPUT_NAME _C, no prefix


def _first_error(log: Path) -> str:
    """The log's first line that mentions an error, else its last line."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return next((line for line in lines if "error" in line.lower()), lines[-1] if lines else "(empty log)")


setup(
    name="cvfast",
    version="0.1.0",
    description="A fast, validated inference engine for CogVideoX video diffusion transformers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["cvfast", "cvfast.*"]),
    package_data={"cvfast.export": ["tensorrt_onnx_ops.json"]},
    install_requires=[
        "torch>=2.4",
        # The Triton kernels (cvfast/kernels); CUDA builds of torch bring it, CPU builds do not
        # (there it serves the tests, under TRITON_INTERPRET=1).
        "triton>=3.2; platform_system == 'Linux'",
        "numpy>=1.24",
        "safetensors>=0.4",
        "transformers>=4.44",
        "tokenizers>=0.19",
        "sentencepiece>=0.2",
        "protobuf>=4",  # transformers needs it to read a spiece.model-only T5 tokenizer (the real folders)
        "huggingface_hub>=0.24",
        "tqdm>=4.66",
        "imageio>=2.34",
        "imageio-ffmpeg>=0.5",
        "pillow>=10",
        "pyyaml>=6",  # the yaml configs of SAT checkpoints
    ],
    extras_require={
        # diffusers is the independent oracle of the tests, never a run-time dependency.
        "test": ["pytest>=8", "diffusers>=0.32", "peft>=0.12", "matplotlib>=3.8",
                 "onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.2", "onnx-ir>=0.1",
                 "import-linter>=2.1",  # the layer contract (.importlinter), run by `make test`
                 "fastapi>=0.110", "uvicorn>=0.29", "python-multipart>=0.0.9",  # `cvfast serve`, tested end to end
                 "selenium>=4.20"],  # drives Debian's chromium through the served page
        # `cvfast serve`: the HTTP job API and its page.
        "serve": ["fastapi>=0.110", "uvicorn>=0.29", "python-multipart>=0.0.9"],  # multipart: uploaded files
        "bench": ["matplotlib>=3.8"],
        # cvfast.export_onnx: torch's dynamo exporter (onnxscript, onnx-ir) and the onnxruntime check.
        "onnx": ["onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.2", "onnx-ir>=0.1"],
    },
    entry_points={"console_scripts": ["cvfast=cvfast.cli:main"]},
    ext_modules=[Extension("cvfast._C", sources=sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.c*")))],
    cmdclass={"build_ext": CMakeBuild},
)
