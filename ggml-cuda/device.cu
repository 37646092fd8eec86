// CUDA device discovery. A CUDA build on a machine without a GPU (or without a driver) must
// still run on the CPU, so every failure here means "no device", never an error.
#include <cuda_runtime.h>

#include <string>

#include "devices.h"

namespace glmoe {

int cuda_device_count() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();  // clear the sticky error so later calls are not poisoned
        return 0;
    }
    return n;
}

std::string cuda_device_name() {
    cudaDeviceProp p;
    if (cuda_device_count() == 0 || cudaGetDeviceProperties(&p, 0) != cudaSuccess) return "";
    return p.name;
}

std::string cuda_device_summary() {
    std::string out;
    const int n = cuda_device_count();
    for (int i = 0; i < n; ++i) {
        cudaDeviceProp p;
        if (cudaGetDeviceProperties(&p, i) != cudaSuccess) continue;
        out += "CUDA" + std::to_string(i) + ": " + p.name + ", compute " + std::to_string(p.major) + "." +
               std::to_string(p.minor) + ", " + std::to_string(p.totalGlobalMem >> 20) + " MiB\n";
    }
    return out;
}

}  // namespace glmoe
