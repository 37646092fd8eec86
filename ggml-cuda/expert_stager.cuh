// Streams a layer's routed experts from RAM (the mapped GGUF file) to the GPU for a big step, so
// that the step runs them there instead of sending its tokens to the CPU. Pageable copies of the
// mapped file crawl (the driver stages them one small piece at a time) and pinning the file itself
// stalls for minutes, so the host threads copy the file into a ring of pinned chunks while the copy
// engine moves the chunk before, on a stream of its own. Two device slots: the next layer's experts
// arrive while this layer's run.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <vector>

namespace glmoe {

class ThreadPool;

namespace cuda {

class ExpertStager {
public:
    static constexpr int kSlots = 2;
    // slots: kSlots device buffers, each large enough for any staged layer.
    ExpertStager(uint8_t* const slots[kSlots], ThreadPool& pool);
    ~ExpertStager();
    ExpertStager(const ExpertStager&) = delete;
    ExpertStager& operator=(const ExpertStager&) = delete;

    struct Piece {
        const void* host;
        size_t bytes;
    };
    // Enqueues the copy of `pieces` (back to back) for layer `tag` into the slot not used last,
    // unless that layer is already there or on its way (weights never change, so a layer stays
    // valid across steps); returns the slot. The copy waits on the device for the slot's last
    // reader (release); the host waits only for pinned chunks still in flight.
    int stage(int tag, const std::vector<Piece>& pieces);
    // The device address of slot s; `compute` waits (on the device) for slot s's copy to land.
    const uint8_t* use(int s, cudaStream_t compute);
    // Work enqueued on `compute` so far is the last to read slot s: its next copy waits for it.
    void release(int s, cudaStream_t compute);

private:
    void copy_into_chunk(int chunk, const uint8_t* src, size_t bytes);

    static constexpr int kChunks = 6;
    static constexpr size_t kChunkBytes = size_t{16} << 20;
    ThreadPool& pool_;
    cudaStream_t copy_ = nullptr;
    uint8_t* slot_[kSlots] = {};
    int tag_[kSlots] = {-1, -1};
    cudaEvent_t landed_[kSlots] = {}, free_[kSlots] = {};
    int last_used_ = kSlots - 1;
    uint8_t* ring_ = nullptr;  // pinned: kChunks x kChunkBytes
    cudaEvent_t chunk_done_[kChunks] = {};
    int next_chunk_ = 0;
};

}  // namespace cuda
}  // namespace glmoe
