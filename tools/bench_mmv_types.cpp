// Each weight type's decode matrix-vector kernels at one token, in isolation, against the card's
// copy bandwidth (issue: decode at the memory floor; its goal is 85% of copy bandwidth per kernel).
// For every type: the dense kernel (mmv) on GLM-4.5-Air's qkv (14336 x 4096) and attention output
// (4096 x 12288) shapes, and the routed-expert kernels on its expert shapes (128 experts of 1408 x
// 4096, 8 routed + 1 shared of the same type a token): fused gate+up (mmv_swiglu) and down
// (mmv_experts; K-quant down matrices take llama.cpp's fallback type, as 1408 holds no whole
// super-block). Weights rotate over copies (dense) or fresh expert choices (experts) so that no
// launch finds its weights in L2. GB/s: weight bytes a launch reads / its time; copy: bytes read
// and written by a 1 GiB device-to-device copy / its time. Before timing a type, the dense kernel's
// output on random weights is checked against the CPU's dequantization (max error relative to the
// largest output, two shapes with a partial row group and chunk). Development only.
// usage: bench_mmv_types [types, comma list]   (default Q4_0,Q5_0,Q8_0,Q4_K,Q5_K,Q6_K,F16,BF16)
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdio>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "gpu_bench_util.h"
#include "quantize_row.h"
#include "quants.h"

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

// Offsets of each block's f16 scale fields (the rest of a random block is any bits).
std::vector<int> half_fields(uint32_t type) {
    switch (type) {
        case GGML_TYPE_Q8_0:
        case GGML_TYPE_Q4_0:
        case GGML_TYPE_Q5_0: return {0};
        case GGML_TYPE_Q4_K:
        case GGML_TYPE_Q5_K: return {0, 2};
        case GGML_TYPE_Q6_K: return {208};
        default: return {};
    }
}

// The dense kernel (one token) against float64 dots of the CPU's dequantized rows: max |error| /
// max |reference|. x goes through the kernel's q8 rounding, so agreement is ~1e-3, a decoding
// mistake ~1. Random weight bytes with small positive f16 scales (f16 / bf16: random values).
double check_dense(uint32_t type, int64_t rows, int64_t cols) {
    const std::vector<int> halves = half_fields(type);
    const size_t block_bytes = type_traits(type).type_size;
    const size_t rb = row_bytes(type, cols), bytes = rb * rows;
    std::mt19937 gen(static_cast<uint32_t>(type * 7919 + rows + cols));
    std::vector<uint8_t> w(bytes);
    for (auto& b : w) b = static_cast<uint8_t>(gen());
    std::uniform_real_distribution<float> scale(0.001f, 0.01f), unit(-1.0f, 1.0f);
    if (type == GGML_TYPE_F16 || type == GGML_TYPE_BF16)
        for (size_t o = 0; o + 2 <= bytes; o += 2) {
            const uint16_t h = type == GGML_TYPE_F16 ? f32_to_half(unit(gen)) : f32_to_bf16(unit(gen));
            std::memcpy(&w[o], &h, 2);
        }
    if (!halves.empty())
        for (size_t o = 0; o + block_bytes <= bytes; o += block_bytes)
            for (const int f : halves) {
                const uint16_t h = f32_to_half(scale(gen));
                std::memcpy(&w[o + f], &h, 2);
            }
    std::vector<float> x(cols), y(rows), row(cols);
    for (auto& v : x) v = unit(gen);
    const WeightView wv = weights(type, rows, cols, 1);
    void* dw = const_cast<void*>(wv.data);
    float* dx = device<float>(cols);
    float* dy = device<float>(rows);
    BlockQ8* dq = device<BlockQ8>(cols / 32);
    ck(cudaMemcpy(dw, w.data(), bytes, cudaMemcpyHostToDevice), "w");
    ck(cudaMemcpy(dx, x.data(), cols * sizeof(float), cudaMemcpyHostToDevice), "x");
    const bool quant = mmv_wants_q8(type);
    if (quant) quantize_q8(dx, 1, cols, cols, dq, nullptr);
    mmv(wv, dx, quant ? dq : nullptr, 1, dy, rows, false, nullptr);
    ck(cudaMemcpy(y.data(), dy, rows * sizeof(float), cudaMemcpyDeviceToHost), "y");
    double err = 0.0, top = 0.0;
    for (int64_t r = 0; r < rows; ++r) {
        dequantize_row(type, w.data() + r * rb, row.data(), cols);
        double ref = 0.0;
        for (int64_t c = 0; c < cols; ++c) ref += static_cast<double>(row[c]) * x[c];
        err = std::max(err, std::abs(ref - y[r]));
        top = std::max(top, std::abs(ref));
    }
    for (void* p : {dw, static_cast<void*>(dx), static_cast<void*>(dy), static_cast<void*>(dq)})
        ck(cudaFree(p), "free");
    return std::isfinite(err) && top > 0.0 ? err / top : 1.0;
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
        for (const auto& [rows, cols] : {std::pair<int64_t, int64_t>{333, 4096}, {333, 2816}}) {
            const double e = check_dense(t, rows, cols);
            std::printf("check %s %lld x %lld: max error / max output %.2e%s\n", type_name(t).c_str(),
                        static_cast<long long>(rows), static_cast<long long>(cols), e, e < 1e-2 ? "" : "  WRONG");
        }
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
