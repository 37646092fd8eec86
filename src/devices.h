// What this process can use: the accelerators of this build, host memory.
#pragma once
#include <cstdint>
#include <string>

namespace glmoe {

bool built_with_cuda();
// Number of usable CUDA devices (0 without the CUDA backend or without a GPU).
int cuda_device_count();
// The first device's name ("" when there is none).
std::string cuda_device_name();
// One line per device, for logs ("" when there is none).
std::string cuda_device_summary();
// Host memory this process can still fill: MemAvailable, within its cgroup's limit (v2, else v1);
// UINT64_MAX when the system does not say.
uint64_t host_memory_available();
// "12.34 MiB", as llama.cpp's load log writes sizes.
std::string mib(uint64_t bytes);

}  // namespace glmoe
