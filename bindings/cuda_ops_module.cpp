// glmoe._core.cuda_ops: the CUDA kernels on numpy arrays, for the tests marked `cuda`.
#include <nanobind/nanobind.h>

namespace nb = nanobind;

void bind_cuda_mmv(nb::module_& m);
void bind_cuda_mm(nb::module_& m);
void bind_cuda_attention(nb::module_& m);
void bind_cuda_misc(nb::module_& m);

void bind_cuda_ops(nb::module_& parent) {
    nb::module_ m = parent.def_submodule("cuda_ops", "CUDA kernels on numpy arrays (tests)");
    bind_cuda_mmv(m);
    bind_cuda_mm(m);
    bind_cuda_attention(m);
    bind_cuda_misc(m);
}
