"""cvfast: pure-Python package today; the native extension (csrc/, CMakeLists.txt) joins with the
native-extension issue, and the package must always install and work without it."""
from setuptools import find_packages, setup

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
                 "onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.2", "onnx-ir>=0.1"],
        "bench": ["matplotlib>=3.8"],
        # cvfast.export_onnx: torch's dynamo exporter (onnxscript, onnx-ir) and the onnxruntime check.
        "onnx": ["onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.2", "onnx-ir>=0.1"],
    },
    entry_points={"console_scripts": ["cvfast=cvfast.cli:main"]},
)
