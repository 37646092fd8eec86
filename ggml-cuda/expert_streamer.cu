#include "expert_streamer.cuh"

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

// The slot holds matrix m of experts [0, n_streamed) at offset[m], room for the widest layer's.
size_t ExpertStreamer::slot_layout(const std::vector<Layer>& layers, int n_streamed, size_t offset[kMatrices]) {
    size_t total = 0;
    for (int m = 0; m < kMatrices; ++m) {
        size_t widest = 0;
        for (const Layer& l : layers) widest = std::max(widest, l.matrix_bytes[m]);
        if (offset) offset[m] = total;
        total += widest * n_streamed;
    }
    return total;
}

ExpertStreamer::ExpertStreamer(const std::vector<Layer>& layers, int n_streamed, uint8_t* slot, ThreadPool& pool)
    : n_streamed_(n_streamed), slot_(slot) {
    slot_layout(layers, n_streamed, slot_offset_);
    for (const Layer& l : layers)
        for (int m = 0; m < kMatrices; ++m) pinned_bytes_ += l.matrix_bytes[m] * n_streamed;
    check(cudaHostAlloc(&host_, pinned_bytes_, cudaHostAllocDefault), "allocating pinned memory for streamed experts");
    check(cudaStreamCreateWithFlags(&copy_, cudaStreamNonBlocking), "creating the expert copy stream");
    check(cudaEventCreateWithFlags(&landed_, cudaEventDisableTiming), "creating an event");
    check(cudaEventCreateWithFlags(&free_, cudaEventDisableTiming), "creating an event");
    // Experts [0, n_streamed) are the first n_streamed matrices of each stack: one contiguous copy.
    struct Piece {
        const uint8_t* src;
        uint8_t* dst;
        size_t bytes;
    };
    std::vector<Piece> pieces;
    uint8_t* dst = host_;
    for (const Layer& l : layers) {
        if (l.il >= static_cast<int>(layer_index_.size())) layer_index_.resize(l.il + 1, -1);
        layer_index_[l.il] = static_cast<int>(pinned_.size());
        Pinned p;
        for (int m = 0; m < kMatrices; ++m) {
            const size_t bytes = l.matrix_bytes[m] * n_streamed;
            constexpr size_t kPiece = size_t{4} << 20;
            for (size_t done = 0; done < bytes; done += kPiece)
                pieces.push_back({static_cast<const uint8_t*>(l.stack[m]) + done, dst + done, std::min(kPiece, bytes - done)});
            p.stack[m] = dst;
            p.matrix_bytes[m] = l.matrix_bytes[m];
            dst += bytes;
        }
        pinned_.push_back(p);
    }
    pool.parallel_for(static_cast<int64_t>(pieces.size()), [&](int64_t begin, int64_t end, int) {
        for (int64_t i = begin; i < end; ++i) std::memcpy(pieces[i].dst, pieces[i].src, pieces[i].bytes);
    });
}

ExpertStreamer::~ExpertStreamer() {
    if (copy_) cudaStreamSynchronize(copy_);
    if (landed_) cudaEventDestroy(landed_);
    if (free_) cudaEventDestroy(free_);
    if (copy_) cudaStreamDestroy(copy_);
    if (host_) cudaFreeHost(host_);
}

void ExpertStreamer::stage(int il, const std::vector<int>& ids, cudaStream_t compute, const uint8_t* stacks[kMatrices]) {
    const Pinned& p = pinned_.at(layer_index_.at(il));
    // The slot's previous contents may still be read by the step before.
    check(cudaStreamWaitEvent(copy_, free_, 0), "ordering the expert copy");
    for (int e : ids)
        for (int m = 0; m < kMatrices; ++m) {
            const size_t mb = p.matrix_bytes[m];
            check(cudaMemcpyAsync(slot_ + slot_offset_[m] + e * mb, p.stack[m] + e * mb, mb, cudaMemcpyHostToDevice, copy_),
                  "copying experts to the GPU");
        }
    check(cudaEventRecord(landed_, copy_), "recording the expert copy");
    check(cudaStreamWaitEvent(compute, landed_, 0), "waiting for the expert copy");
    for (int m = 0; m < kMatrices; ++m) stacks[m] = slot_ + slot_offset_[m];
}

void ExpertStreamer::release(cudaStream_t compute) {
    check(cudaEventRecord(free_, compute), "recording the experts' last use");
}

}  // namespace glmoe::cuda
