"""Triton kernels (and only Triton kernels). Importing this package imports triton; the ops layer
(`cvfast.ops.triton_ops`) wraps each launcher in a `torch.library` custom op.

With TRITON_INTERPRET=1 in the environment *before* the first import, the kernels run on CPU
tensors through Triton's interpreter (slow; used by the tests on machines without a GPU).
"""
