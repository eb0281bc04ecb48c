"""Compiles every csrc/*.cu for sm_90 with nvcc against the installed PyTorch's headers (a CPU build
of PyTorch is enough), so CUDA sources are checked on machines without a GPU. Fails on the first
source that does not compile; ptxas's resource report (registers, spills, shared memory per kernel)
goes to build/nvcc/ptxas.log. Run by `make test` when nvcc is on the PATH."""
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch.utils.cpp_extension import include_paths

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "build" / "nvcc"


def flags() -> list[str]:
    out = ["-std=c++20", "-O2", "-arch=sm_90", "-Xptxas", "-v", "--expt-relaxed-constexpr", f"-I{ROOT / 'csrc'}",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    out += [f"-I{p}" for p in include_paths()]
    # A CPU build of PyTorch ships c10/cuda's headers without the file CMake generates for them
    # (it only defines the Windows export macro); CUDA builds have it.
    if not any(Path(p, "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in include_paths()):
        out.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return out


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    log = OUT / "ptxas.log"
    with log.open("w") as out:
        for source in sorted((ROOT / "csrc").glob("*.cu")):
            cmd = ["nvcc", *flags(), "-c", str(source), "-o", str(OUT / (source.stem + ".o"))]
            out.write(f"$ {' '.join(cmd)}\n")
            out.flush()
            result = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT)
            if result.returncode:
                print(log.read_text()[-6000:], file=sys.stderr)
                print(f"nvcc_check: {source.name} does not compile for sm_90 (log: {log})", file=sys.stderr)
                return 1
            print(f"nvcc_check: {source.name} compiles for sm_90 (ptxas report: {log})")
    return 0


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
