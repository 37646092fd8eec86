// Small steps of a layer whose routed experts are in RAM: the GPU runs its share of the step's
// experts (expert_split.h) while the CPU threads run the rest, so that the copy engine's path from
// RAM adds its bandwidth to the CPU's. The copy engine reads pinned host memory without any host
// thread: the memory the file was read into, pinned where it is (any expert can then cross, and
// RAM holds no second copy), or for a mapped file a copy of experts [0, n_slot) made at load.
// Per step only the experts the GPU takes cross, into one device slot.
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
    // Bytes of the device slot: n_slot experts of the widest layer; offset (if given) gets where
    // each matrix kind starts in it.
    static size_t slot_layout(const std::vector<Layer>& layers, int n_slot, size_t offset[kMatrices] = nullptr);
    // in_place: pins the pages of the layers' n_expert experts where they are (read-only); else
    // copies experts [0, n_slot) of each layer into pinned memory, with the pool's threads. Throws
    // GpuError when the host refuses either.
    ExpertStreamer(const std::vector<Layer>& layers, int n_slot, int n_expert, bool in_place, uint8_t* slot,
                   ThreadPool& pool);
    ~ExpertStreamer();
    ExpertStreamer(const ExpertStreamer&) = delete;
    ExpertStreamer& operator=(const ExpertStreamer&) = delete;

    int fetchable() const { return fetchable_; }  // experts [0, fetchable) can be staged
    size_t pinned_copy_bytes() const { return copy_ ? pinned_bytes_ : 0; }
    size_t pinned_in_place_bytes() const { return registered_ ? pinned_bytes_ : 0; }
    // Enqueues the copy of experts `ids` (distinct, at most n_slot, each < fetchable) of layer il
    // into the slot, ids[j] at place j, after the slot's last reader; `compute` waits for it on the
    // device. stacks[m]: where place j's matrix m lands is stacks[m] + j * matrix_bytes[m].
    void stage(int il, const std::vector<int>& ids, cudaStream_t compute, const uint8_t* stacks[kMatrices]);
    // Work enqueued on `compute` so far is the last to read the slot.
    void release(cudaStream_t compute);

private:
    void acquire(const std::vector<Layer>& layers, int n_expert, bool in_place, ThreadPool& pool);
    void release_all();
    struct Pinned {
        const uint8_t* stack[kMatrices];
        size_t matrix_bytes[kMatrices];
    };
    int n_slot_, fetchable_;
    uint8_t* slot_;
    size_t slot_offset_[kMatrices] = {};
    std::vector<int> layer_index_;  // by il: index into pinned_, or -1
    std::vector<Pinned> pinned_;    // where each layer's experts are read from
    uint8_t* copy_ = nullptr;       // the pinned copy, or
    void* registered_ = nullptr;    // the start of the pages pinned in place
    size_t pinned_bytes_ = 0;
    cudaStream_t stream_ = nullptr;
    cudaEvent_t landed_ = nullptr, free_ = nullptr;
};

}  // namespace cuda
}  // namespace glmoe
