// Which accelerators this build can use.
#pragma once
#include <string>

namespace glmoe {

bool built_with_cuda();
// Number of usable CUDA devices (0 without the CUDA backend or without a GPU).
int cuda_device_count();
// The first device's name ("" when there is none).
std::string cuda_device_name();
// One line per device, for logs ("" when there is none).
std::string cuda_device_summary();

}  // namespace glmoe
