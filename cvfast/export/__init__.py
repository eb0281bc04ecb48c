"""Export for serving: the transformer to ONNX, its checks, a Triton model repository.

    export_onnx(pipe, out_dir, *, frames, height, width, batch=1, dtype=None) -> Path
    check_onnx(pipe, onnx_path, *, batch_sizes=(1, 2), seed=0) -> dict
    unsupported_ops(onnx_path) -> list[str]              # vs TensorRT's ONNX parser
    write_serving_repo(onnx_path, repo_dir, *, name=..., engine_file="model.plan") -> Path

onnx, onnxscript and onnxruntime are optional (`pip install 'cvfast[onnx]'`) and imported only
when one of these runs. See `onnx.py` for the exported signature, exporter and opset, and
`tensorrt_build.py` for the engines (`cvfast export tensorrt`).
"""
from ..core.errors import ONNXCheckError, ONNXExportError
from .onnx import EXPORTER, OPSET, export_onnx
from .serving import write_serving_repo
from .tensorrt_build import build_engines
from .validate import REL_L2_BOUNDS, check_onnx, tensorrt_ops, unsupported_ops

__all__ = ["export_onnx", "check_onnx", "unsupported_ops", "write_serving_repo", "tensorrt_ops", "build_engines",
           "ONNXExportError", "ONNXCheckError", "REL_L2_BOUNDS", "EXPORTER", "OPSET"]
