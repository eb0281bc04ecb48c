// The one place of cvfast._C's op schemas (m.def) and its Python module. The ops are torch.library
// ops in the `cvfast` namespace (the Triton backend adds its own ops to the same namespace from
// Python, hence a FRAGMENT); each device's implementation registers itself next to its kernels
// (TORCH_LIBRARY_IMPL in group_norm_cpu.cpp, group_norm_cuda.cu). Tensors cross into Python through
// the dispatcher (torch.ops.cvfast.*), so the pybind11 module needs neither tensor casters nor
// libtorch_python: importing it loads the library, which registers the ops.
#include <pybind11/pybind11.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(cvfast, m) {
  m.def("native_group_norm(Tensor x, Tensor weight, Tensor bias, int groups, float eps, Tensor? scale, "
        "Tensor? shift, bool silu) -> Tensor");
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "cvfast's native ops, registered as torch.ops.cvfast.* when this module is imported";
#ifdef CVFAST_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
