#include "devices.h"

namespace glmoe {

bool built_with_cuda() {
#ifdef GLMOE_CUDA
    return true;
#else
    return false;
#endif
}

#ifndef GLMOE_CUDA
// Without the CUDA backend (ggml-cuda/device.cu provides these otherwise).
int cuda_device_count() { return 0; }
std::string cuda_device_name() { return ""; }
std::string cuda_device_summary() { return ""; }
#endif

}  // namespace glmoe
