// Small steps of a layer whose routed experts are in RAM: the GPU runs a fixed share of them
// (experts [0, n_streamed)) while the CPU threads run the rest, so that the copy engine's path
// from RAM adds its bandwidth to the CPU's. The share's weights are copied at load into pinned
// host memory, which the copy engine reads without any host thread: per step only the experts
// the step routes to cross, into one device slot.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <vector>

namespace glmoe {

class ThreadPool;

namespace cuda {

class ExpertStreamer {
public:
    static constexpr int kMatrices = 3;  // gate, up, down
    struct Layer {
        int il = -1;
        const void* stack[kMatrices] = {};     // the mapped file's expert stacks
        size_t matrix_bytes[kMatrices] = {};  // one expert's matrix
    };
    // Bytes of the device slot: n_streamed experts of the widest layer; offset (if given) gets
    // where each matrix kind starts in it.
    static size_t slot_layout(const std::vector<Layer>& layers, int n_streamed, size_t offset[kMatrices] = nullptr);
    // Pinned copies of experts [0, n_streamed) of each layer, made by the pool's threads. Throws
    // GpuError when the pinned memory cannot be had.
    ExpertStreamer(const std::vector<Layer>& layers, int n_streamed, uint8_t* slot, ThreadPool& pool);
    ~ExpertStreamer();
    ExpertStreamer(const ExpertStreamer&) = delete;
    ExpertStreamer& operator=(const ExpertStreamer&) = delete;

    int n_streamed() const { return n_streamed_; }
    size_t pinned_bytes() const { return pinned_bytes_; }
    // Enqueues the copy of experts `ids` (distinct, each < n_streamed) of layer il into the slot,
    // after the slot's last reader; `compute` waits for it on the device. stacks[m]: where expert
    // e's matrix m lands is stacks[m] + e * matrix_bytes[m].
    void stage(int il, const std::vector<int>& ids, cudaStream_t compute, const uint8_t* stacks[kMatrices]);
    // Work enqueued on `compute` so far is the last to read the slot.
    void release(cudaStream_t compute);

private:
    struct Pinned {
        const uint8_t* stack[kMatrices];
        size_t matrix_bytes[kMatrices];
    };
    int n_streamed_;
    uint8_t* slot_;
    size_t slot_offset_[kMatrices] = {};
    std::vector<int> layer_index_;  // by il: index into pinned_, or -1
    std::vector<Pinned> pinned_;
    uint8_t* host_ = nullptr;
    size_t pinned_bytes_ = 0;
    cudaStream_t copy_ = nullptr;
    cudaEvent_t landed_ = nullptr, free_ = nullptr;
};

}  // namespace cuda
}  // namespace glmoe
