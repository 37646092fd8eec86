// Each weight type's decode matrix-vector kernels at one token, in isolation, against the card's
// copy bandwidth (issue: decode at the memory floor; its goal is 85% of copy bandwidth per kernel).
// For every type: the dense kernel (mmv) on GLM-4.5-Air's qkv (14336 x 4096) and attention output
// (4096 x 12288) shapes, and the routed-expert kernels on its expert shapes (128 experts of 1408 x
// 4096, 8 routed + 1 shared of the same type a token): fused gate+up (mmv_swiglu) and down
// (mmv_experts; K-quant down matrices take llama.cpp's fallback type, as 1408 holds no whole
// super-block). Weights rotate over copies (dense) or fresh expert choices (experts) so that no
// launch finds its weights in L2. GB/s: weight bytes a launch reads / its time; copy: bytes read
// and written by a 1 GiB device-to-device copy / its time. Development only.
// usage: bench_mmv_types [types, comma list]   (default Q4_0,Q5_0,Q8_0,Q4_K,Q5_K,Q6_K,F16,BF16)
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "gpu_bench_util.h"

using namespace glmoe;
using namespace glmoe::cuda;
using namespace glmoe::gpu_bench;

namespace {

constexpr int64_t kH = 4096, kQkv = 14336, kNq = 12288, kFf = 1408, kExperts = 128, kUsed = 8;
constexpr int kRotations = 16;  // launches per timing, each on other weights
constexpr size_t kL2Defeat = 256u << 20;  // bytes the copies of a dense matrix span at least

double copy_gbs() {
    const size_t bytes = size_t{1} << 30;
    uint8_t* a = device<uint8_t>(bytes);
    uint8_t* b = device<uint8_t>(bytes);
    const double us = time_us([&] { ck(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice), "copy"); }, 10);
    ck(cudaFree(a), "free");
    ck(cudaFree(b), "free");
    return 2.0 * bytes / us / 1e3;
}

// One launch's GB/s: `launch(i)` for i < kRotations, timed together.
double gbs(double bytes_per_launch, const std::function<void(int)>& launch) {
    const double us = time_us([&] {
        for (int i = 0; i < kRotations; ++i) launch(i);
    });
    return bytes_per_launch * kRotations / us / 1e3;
}

// mmv on `copies` back-to-back copies of a rows x cols matrix, one token.
double dense_gbs(uint32_t type, int64_t rows, int64_t cols, const float* x, const BlockQ8* xq, float* y) {
    const size_t one = row_bytes(type, cols) * rows;
    const int copies = static_cast<int>(std::max<size_t>(2, (kL2Defeat + one - 1) / one));
    WeightView w = weights(type, rows, cols, copies);
    const uint8_t* base = static_cast<const uint8_t*>(w.data);
    const double r = gbs(static_cast<double>(one), [&](int i) {
        WeightView c = w;
        c.data = base + static_cast<size_t>(i % copies) * one;
        mmv(c, x, xq, 1, y, rows, false, nullptr);
    });
    ck(cudaFree(const_cast<void*>(w.data)), "free");
    return r;
}

ExpertSet expert_set(uint32_t type, int64_t rows, int64_t cols) {
    ExpertSet s;
    s.routed = weights(type, rows, cols, kExperts);
    s.shared = weights(type, rows, cols, 1);
    s.n_routed = static_cast<int>(kExperts);
    return s;
}

void free_set(const ExpertSet& s) {
    ck(cudaFree(const_cast<void*>(s.routed.data)), "free");
    ck(cudaFree(const_cast<void*>(s.shared.data)), "free");
}

}  // namespace

int main(int argc, char** argv) try {
    std::string list = argc > 1 ? argv[1] : "Q4_0,Q5_0,Q8_0,Q4_K,Q5_K,Q6_K,F16,BF16";
    std::vector<uint32_t> types;
    std::stringstream ss(list);
    for (std::string item; std::getline(ss, item, ',');) types.push_back(type_by_name(item));

    const double copy = copy_gbs();
    float* x = device<float>(kNq);
    float* act = device<float>((kUsed + 1) * kFf);
    float* y = device<float>((kUsed + 1) * std::max(kH, kQkv));
    BlockQ8* xq = device<BlockQ8>(kNq / 32);
    BlockQ8* aq = device<BlockQ8>((kUsed + 1) * kFf / 32);
    quantize_q8(x, 1, kNq, kNq, xq, nullptr);
    quantize_q8(act, kUsed + 1, kFf, kFf, aq, nullptr);
    // kRotations expert choices: kUsed distinct routed experts, then the shared one.
    std::mt19937 gen(7);
    std::vector<int32_t> all(kExperts), h_ids;
    for (int e = 0; e < kExperts; ++e) all[e] = e;
    for (int i = 0; i < kRotations; ++i) {
        std::shuffle(all.begin(), all.end(), gen);
        h_ids.insert(h_ids.end(), all.begin(), all.begin() + kUsed);
        h_ids.push_back(static_cast<int32_t>(kExperts));
    }
    int32_t* ids = device<int32_t>(h_ids.size());
    ck(cudaMemcpy(ids, h_ids.data(), h_ids.size() * sizeof(int32_t), cudaMemcpyHostToDevice), "ids");
    ck(cudaDeviceSynchronize(), "setup");

    std::printf("copy bandwidth %.0f GB/s (read + write of a 1 GiB device-to-device copy)\n", copy);
    std::printf("| type | qkv mmv | attn out mmv | experts gate+up | experts down (type) |\n|---|---:|---:|---:|---:|\n");
    auto cell = [&](double v) { return std::to_string(static_cast<int>(v)) + " (" +
                                       std::to_string(static_cast<int>(100.0 * v / copy + 0.5)) + "%)"; };
    for (const uint32_t t : types) {
        const bool quant = mmv_wants_q8(t);
        const double qkv = dense_gbs(t, kQkv, kH, x, quant ? xq : nullptr, y);
        const double wo = dense_gbs(t, kH, kNq, x, quant ? xq : nullptr, y);
        const ExpertSet gate = expert_set(t, kFf, kH), up = expert_set(t, kFf, kH);
        const uint32_t td = fitting(t, kFf);
        const ExpertSet down = expert_set(td, kH, kFf);
        const int slots = static_cast<int>(kUsed + 1);
        const double pair_gu = 2.0 * gate.routed.matrix_bytes * slots, pair_d = 1.0 * down.routed.matrix_bytes * slots;
        const double gu = gbs(pair_gu, [&](int i) {
            mmv_swiglu(gate, up, x, quant ? xq : nullptr, ids + i * slots, 1, slots, act, nullptr);
        });
        const double dn = gbs(pair_d, [&](int i) {
            mmv_experts(down, act, mmv_wants_q8(td) ? aq : nullptr, true, ids + i * slots, 1, slots, y, nullptr);
        });
        std::printf("| %s | %s | %s | %s | %s (%s) |\n", type_name(t).c_str(), cell(qkv).c_str(), cell(wo).c_str(),
                    cell(gu).c_str(), cell(dn).c_str(), type_name(td).c_str());
        for (const ExpertSet* s : {&gate, &up, &down}) free_set(*s);
    }
    return 0;
} catch (const std::exception& e) {
    std::fprintf(stderr, "bench_mmv_types: %s\n", e.what());
    return 1;
}
