#include "expert_streamer.cuh"

#include <algorithm>
#include <cstdint>
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

// The slot holds matrix m of n_slot experts at offset[m], room for the widest layer's.
size_t ExpertStreamer::slot_layout(const std::vector<Layer>& layers, int n_slot, size_t offset[kMatrices]) {
    size_t total = 0;
    for (int m = 0; m < kMatrices; ++m) {
        size_t widest = 0;
        for (const Layer& l : layers) widest = std::max(widest, l.matrix_bytes[m]);
        if (offset) offset[m] = total;
        total += widest * n_slot;
    }
    return total;
}

ExpertStreamer::ExpertStreamer(const std::vector<Layer>& layers, int n_slot, int n_expert, bool in_place,
                               uint8_t* slot, ThreadPool& pool)
    : n_slot_(n_slot), fetchable_(in_place ? n_expert : n_slot), slot_(slot) {
    try {
        acquire(layers, n_expert, in_place, pool);
    } catch (...) {
        release_all();
        throw;
    }
}

void ExpertStreamer::acquire(const std::vector<Layer>& layers, int n_expert, bool in_place, ThreadPool& pool) {
    slot_layout(layers, n_slot_, slot_offset_);
    for (const Layer& l : layers) {
        if (l.il >= static_cast<int>(layer_index_.size())) layer_index_.resize(l.il + 1, -1);
        layer_index_[l.il] = static_cast<int>(pinned_.size());
        Pinned p;
        for (int m = 0; m < kMatrices; ++m) {
            p.stack[m] = static_cast<const uint8_t*>(l.stack[m]);
            p.matrix_bytes[m] = l.matrix_bytes[m];
        }
        pinned_.push_back(p);
    }
    if (in_place) {
        // One range over every layer's stacks, whole pages (registering a page twice fails); the
        // memory the file was read into is read-only.
        constexpr uintptr_t kPage = 4096;
        uintptr_t lo = UINTPTR_MAX, hi = 0;
        for (const Pinned& p : pinned_)
            for (int m = 0; m < kMatrices; ++m) {
                lo = std::min(lo, reinterpret_cast<uintptr_t>(p.stack[m]));
                hi = std::max(hi, reinterpret_cast<uintptr_t>(p.stack[m]) + p.matrix_bytes[m] * n_expert);
            }
        lo &= ~(kPage - 1);
        hi = (hi + kPage - 1) & ~(kPage - 1);
        check(cudaHostRegister(reinterpret_cast<void*>(lo), hi - lo, cudaHostRegisterReadOnly),
              "pinning the model's expert pages in place");
        registered_ = reinterpret_cast<void*>(lo);
        pinned_bytes_ = hi - lo;
    } else {
        for (const Pinned& p : pinned_)
            for (int m = 0; m < kMatrices; ++m) pinned_bytes_ += p.matrix_bytes[m] * n_slot_;
        check(cudaHostAlloc(&copy_, pinned_bytes_, cudaHostAllocDefault), "allocating pinned memory for streamed experts");
        // Experts [0, n_slot) are the first n_slot matrices of each stack: one contiguous copy.
        struct Piece {
            const uint8_t* src;
            uint8_t* dst;
            size_t bytes;
        };
        std::vector<Piece> pieces;
        uint8_t* dst = copy_;
        for (Pinned& p : pinned_)
            for (int m = 0; m < kMatrices; ++m) {
                const size_t bytes = p.matrix_bytes[m] * n_slot_;
                constexpr size_t kPiece = size_t{4} << 20;
                for (size_t done = 0; done < bytes; done += kPiece)
                    pieces.push_back({p.stack[m] + done, dst + done, std::min(kPiece, bytes - done)});
                p.stack[m] = dst;
                dst += bytes;
            }
        pool.parallel_for(static_cast<int64_t>(pieces.size()), [&](int64_t begin, int64_t end, int) {
            for (int64_t i = begin; i < end; ++i) std::memcpy(pieces[i].dst, pieces[i].src, pieces[i].bytes);
        });
    }
    check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "creating the expert copy stream");
    check(cudaEventCreateWithFlags(&landed_, cudaEventDisableTiming), "creating an event");
    check(cudaEventCreateWithFlags(&free_, cudaEventDisableTiming), "creating an event");
}

ExpertStreamer::~ExpertStreamer() { release_all(); }

void ExpertStreamer::release_all() {
    if (stream_) cudaStreamSynchronize(stream_);
    if (landed_) cudaEventDestroy(landed_);
    if (free_) cudaEventDestroy(free_);
    if (stream_) cudaStreamDestroy(stream_);
    if (copy_) cudaFreeHost(copy_);
    if (registered_) cudaHostUnregister(registered_);
}

void ExpertStreamer::stage(int il, const std::vector<int>& ids, cudaStream_t compute, const uint8_t* stacks[kMatrices]) {
    const Pinned& p = pinned_.at(layer_index_.at(il));
    if (static_cast<int>(ids.size()) > n_slot_) throw GpuError("staging more experts than the slot holds");
    // The slot's previous contents may still be read by the step before.
    check(cudaStreamWaitEvent(stream_, free_, 0), "ordering the expert copy");
    for (size_t j = 0; j < ids.size(); ++j) {
        if (ids[j] < 0 || ids[j] >= fetchable_) throw GpuError("staging an expert that is not in pinned memory");
        for (int m = 0; m < kMatrices; ++m) {
            const size_t mb = p.matrix_bytes[m];
            check(cudaMemcpyAsync(slot_ + slot_offset_[m] + j * mb, p.stack[m] + ids[j] * mb, mb, cudaMemcpyHostToDevice,
                                  stream_),
                  "copying experts to the GPU");
        }
    }
    check(cudaEventRecord(landed_, stream_), "recording the expert copy");
    check(cudaStreamWaitEvent(compute, landed_, 0), "waiting for the expert copy");
    for (int m = 0; m < kMatrices; ++m) stacks[m] = slot_ + slot_offset_[m];
}

void ExpertStreamer::release(cudaStream_t compute) {
    check(cudaEventRecord(free_, compute), "recording the experts' last use");
}

}  // namespace glmoe::cuda
