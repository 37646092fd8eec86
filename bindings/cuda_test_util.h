// Numpy <-> device helpers for the glmoe._core.cuda_ops test bindings: each binding uploads its
// inputs, runs one kernel on the default stream, synchronises and returns numpy outputs.
#pragma once
#include <cuda_runtime.h>
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels.h"

namespace glmoe::cuda_test {

namespace nb = nanobind;

inline void check(cudaError_t e, const char* what) {
    if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

// A device allocation that frees itself.
template <typename T>
class DeviceArray {
public:
    explicit DeviceArray(size_t n) : n_(n) {
        check(cudaMalloc(&p_, (n ? n : 1) * sizeof(T)), "cudaMalloc");
    }
    DeviceArray(const T* host, size_t n) : DeviceArray(n) {
        check(cudaMemcpy(p_, host, n * sizeof(T), cudaMemcpyHostToDevice), "upload");
    }
    ~DeviceArray() { cudaFree(p_); }
    DeviceArray(const DeviceArray&) = delete;
    DeviceArray& operator=(const DeviceArray&) = delete;
    T* get() const { return p_; }
    size_t size() const { return n_; }
    // Fills every byte with `byte` (0xFF poisons float outputs as NaN), so unwritten outputs show.
    void fill_bytes(int byte) { check(cudaMemset(p_, byte, n_ * sizeof(T)), "cudaMemset"); }
    std::vector<T> download() const {
        std::vector<T> h(n_);
        check(cudaMemcpy(h.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost), "download");
        return h;
    }

private:
    T* p_ = nullptr;
    size_t n_;
};

// A weight matrix of `rows` raw rows of `type` (row_bytes each, `cols` elements) on the device.
inline cuda::WeightView view(const DeviceArray<uint8_t>& d, uint32_t type, size_t rows, int64_t cols, size_t row_bytes) {
    cuda::WeightView w;
    w.data = d.get();
    w.type = type;
    w.rows = static_cast<int64_t>(rows);
    w.cols = cols;
    w.row_bytes = row_bytes;
    w.matrix_bytes = rows * row_bytes;
    return w;
}

template <typename T, typename Arr>
DeviceArray<T> upload(const Arr& a) {
    return DeviceArray<T>(reinterpret_cast<const T*>(a.data()), a.size() * sizeof(*a.data()) / sizeof(T));
}

// Synchronises, surfaces any kernel error, and returns the device array as a numpy array.
template <typename T>
nb::ndarray<nb::numpy, T> to_numpy(const DeviceArray<T>& d, std::vector<size_t> shape) {
    check(cudaDeviceSynchronize(), "kernel");
    size_t n = 1;
    for (size_t s : shape) n *= s;
    if (n != d.size()) throw std::logic_error("to_numpy: shape does not match the array");
    auto* host = new std::vector<T>(d.download());
    nb::capsule owner(host, [](void* p) noexcept { delete static_cast<std::vector<T>*>(p); });
    return nb::ndarray<nb::numpy, T>(host->data(), shape.size(), shape.data(), owner);
}

}  // namespace glmoe::cuda_test
