"""Regional compilation of the denoiser (`cvfast.load(compile=...)`): each transformer block is
wrapped by `torch.compile`, and since the blocks are one class with the same code, Dynamo compiles
that code once (twice: the first block receives no pending feed-forward) and every block reuses it,
its parameters passed in as inputs (`torch._dynamo.config.inline_inbuilt_nn_modules`, on by default
since PyTorch 2.5). Compiling the whole transformer instead would trace the 30-42 blocks unrolled,
taking that many times longer for the same kernels. cvfast's Triton kernels are `torch.library`
custom ops with fake implementations, so Inductor sees each as one opaque node; what it fuses is
the plain-PyTorch code between them (the modulation linears, the reference ops).

The compile happens on the first call with a new shape; a CUDA-graph capture (`cuda_graph=`)
follows an eager warm-up step, so it records the compiled kernels and never the compilation."""
from __future__ import annotations

import torch

from ..core.errors import bad_arg

# compile= value -> torch.compile mode. "max-autotune" without Inductor's own CUDA graphs: cvfast's
# sampler captures the whole step itself (`cuda_graph=`), and graphs nested in a capture fail.
MODES = {True: "default", "max-autotune": "max-autotune-no-cudagraphs"}
ACCEPTED = "False, True or 'max-autotune'"


def check_compile(compile, *, engine: bool, parallel: bool, offload: str = "none"):
    """The validated compile= setting (False when off)."""
    if compile is False or compile is None:
        return False
    if compile is not True and compile != "max-autotune":  # `is`: 1 == True, yet 1 is no setting
        raise bad_arg("compile", compile, ACCEPTED)
    if engine:
        raise bad_arg("compile", compile, "False with backend='tensorrt' (the engine is already compiled)")
    if parallel:
        raise bad_arg("compile", compile, "False in a parallel job (its blocks' all-to-all are not traced yet)")
    if offload == "sequential":
        raise bad_arg("compile", compile, "False with offload='sequential' (its hooks move each block's weights "
                      "around the block's call)")
    return compile


def compile_blocks(blocks: torch.nn.ModuleList, compile) -> None:
    """Wrap each block's call in torch.compile (`compile`: a key of MODES)."""
    mode = MODES[compile]
    for block in blocks:
        block.compile(mode=mode)
