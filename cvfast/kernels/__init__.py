"""Triton kernels (and only Triton kernels). Importing this package imports triton and every kernel
module; the ops layer (`cvfast/ops/<op>.py`, through `cvfast.ops.triton_backend`) wraps each
launcher in a `torch.library` custom op.

With TRITON_INTERPRET=1 in the environment *before* the first import, the kernels run on CPU
tensors through Triton's interpreter (slow; used by the tests on machines without a GPU).
"""
from . import attention, causal_conv3d, common, gelu, group_norm, norms, quantized_attention, spatial_norm  # noqa: F401
