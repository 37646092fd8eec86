#include "expert_stager.cuh"

#include <algorithm>
#include <cstring>
#include <string>

#include "cuda_backend.h"
#include "thread_pool.h"

namespace glmoe::cuda {

namespace {

void check(cudaError_t e, const char* what) {
    if (e != cudaSuccess) throw GpuError(std::string(what) + ": " + cudaGetErrorString(e));
}

}  // namespace

ExpertStager::ExpertStager(uint8_t* const slots[kSlots], ThreadPool& pool) : pool_(pool) {
    std::copy(slots, slots + kSlots, slot_);
    check(cudaStreamCreateWithFlags(&copy_, cudaStreamNonBlocking), "creating the expert copy stream");
    check(cudaMallocHost(&ring_, kChunks * kChunkBytes), "allocating pinned staging memory");
    for (int s = 0; s < kSlots; ++s) {
        check(cudaEventCreateWithFlags(&landed_[s], cudaEventDisableTiming), "creating an event");
        check(cudaEventCreateWithFlags(&free_[s], cudaEventDisableTiming), "creating an event");
    }
    for (cudaEvent_t& e : chunk_done_) check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "creating an event");
}

ExpertStager::~ExpertStager() {
    if (copy_) cudaStreamSynchronize(copy_);
    for (cudaEvent_t e : chunk_done_) cudaEventDestroy(e);
    for (int s = 0; s < kSlots; ++s) {
        cudaEventDestroy(landed_[s]);
        cudaEventDestroy(free_[s]);
    }
    cudaFreeHost(ring_);
    if (copy_) cudaStreamDestroy(copy_);
}

void ExpertStager::copy_into_chunk(int chunk, const uint8_t* src, size_t bytes) {
    uint8_t* dst = ring_ + chunk * kChunkBytes;
    // Pieces of at least 256 KiB: the pool's hand-off costs about as much as copying less.
    constexpr size_t kPiece = size_t{256} << 10;
    const int64_t n_pieces = static_cast<int64_t>((bytes + kPiece - 1) / kPiece);
    pool_.parallel_for(n_pieces, [&](int64_t begin, int64_t end, int) {
        const size_t lo = begin * kPiece, hi = std::min(bytes, static_cast<size_t>(end) * kPiece);
        std::memcpy(dst + lo, src + lo, hi - lo);
    });
}

int ExpertStager::stage(int tag, const std::vector<Piece>& pieces) {
    for (int s = 0; s < kSlots; ++s)
        if (tag_[s] == tag) return s;
    const int s = (last_used_ + 1) % kSlots;
    tag_[s] = -1;  // until the whole layer is enqueued
    // The slot's previous layer may still be running: its copy waits for that on the device.
    check(cudaStreamWaitEvent(copy_, free_[s], 0), "ordering the expert copy");
    size_t offset = 0;
    for (const Piece& p : pieces) {
        const uint8_t* src = static_cast<const uint8_t*>(p.host);
        for (size_t done = 0; done < p.bytes;) {
            const size_t n = std::min(kChunkBytes, p.bytes - done);
            const int c = next_chunk_;
            next_chunk_ = (next_chunk_ + 1) % kChunks;
            check(cudaEventSynchronize(chunk_done_[c]), "waiting for a staging chunk");
            copy_into_chunk(c, src + done, n);
            check(cudaMemcpyAsync(slot_[s] + offset, ring_ + c * kChunkBytes, n, cudaMemcpyHostToDevice, copy_),
                  "copying experts to the GPU");
            check(cudaEventRecord(chunk_done_[c], copy_), "recording a staging chunk");
            done += n;
            offset += n;
        }
    }
    check(cudaEventRecord(landed_[s], copy_), "recording the expert copy");
    tag_[s] = tag;
    return s;
}

const uint8_t* ExpertStager::use(int s, cudaStream_t compute) {
    check(cudaStreamWaitEvent(compute, landed_[s], 0), "waiting for the expert copy");
    last_used_ = s;
    return slot_[s];
}

void ExpertStager::release(int s, cudaStream_t compute) {
    check(cudaEventRecord(free_[s], compute), "recording the experts' last use");
}

}  // namespace glmoe::cuda
