// Micro benchmark of the batched-decode GPU kernels, per number of tokens in the step: the routed
// expert FFN by each path the CUDA backend can take (per-pair matrix-vector, tensor-core
// mm_experts), the f32 router (mmv chunks, mm_float) and the dense projections and output head
// (mmv in chunks of kMaxMmvTokens, mm; the attention output also mm_split).
// Prints time per call and the weight bytes the call must read (experts the step routes to, once)
// per second, to choose the backend's crossover points by measurement. Development only.
// usage: bench_moe_gpu [tokens, comma list] [expert type] [shared / dense type]
//   defaults: 1,2,4,8,16,32,64,128 Q4_K Q8_0 (GLM-4.5-Air's shapes: 4096 wide, 128 experts of 1408,
//   8 routed + 1 shared per token, attention 96 x 128 q heads, 8 kv heads).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "gpu_bench_util.h"

using namespace glmoe;
using namespace glmoe::cuda;
using namespace glmoe::gpu_bench;

namespace {

void row(const char* what, int n, double us, double bytes) {
    std::printf("| %-22s | %4d | %9.1f | %7.0f |\n", what, n, us, bytes / us / 1e3);
}

}  // namespace

int main(int argc, char** argv) try {
    std::vector<int> tokens = {1, 2, 4, 8, 16, 32, 64, 128};
    if (argc > 1) {
        tokens.clear();
        std::stringstream ss(argv[1]);
        for (std::string item; std::getline(ss, item, ',');) tokens.push_back(std::atoi(item.c_str()));
    }
    const uint32_t t_exp = type_by_name(argc > 2 ? argv[2] : "Q4_K");
    const uint32_t t_dense = type_by_name(argc > 3 ? argv[3] : "Q8_0");
    const int64_t H = 4096, F = 1408, E = 128, K = 8, S = K + 1, NQ = 96 * 128, QKV = NQ + 2 * 8 * 128, V = 151552;
    const int64_t kLogitRows = 32;  // the backend's output-head rows per pass
    const int n_max = *std::max_element(tokens.begin(), tokens.end());
    const int64_t pairs_max = static_cast<int64_t>(n_max) * S;

    ExpertSet gate, up, down;
    gate.routed = weights(t_exp, F, H, E);
    up.routed = weights(t_exp, F, H, E);
    down.routed = weights(fitting(t_exp, F), H, F, E);
    gate.shared = weights(t_dense, F, H, 1);
    up.shared = weights(t_dense, F, H, 1);
    down.shared = weights(fitting(t_dense, F), H, F, 1);
    gate.n_routed = up.n_routed = down.n_routed = static_cast<int>(E);
    const WeightView qkv = weights(t_dense, QKV, H, 1), wo = weights(t_dense, H, NQ, 1);
    const WeightView output = weights(t_dense, V, H, 1);
    const WeightView router = weights(GGML_TYPE_F32, E, H, 1);  // 0x11111111: a finite float

    float* x = device<float>(n_max * std::max(H, NQ));
    float* g = device<float>(pairs_max * F);
    float* u = device<float>(pairs_max * F);
    float* act = device<float>(pairs_max * F);
    float* y = device<float>(std::max(pairs_max * std::max(H, QKV), kLogitRows * V));
    BlockQ8* xq = device<BlockQ8>(pairs_max * (std::max(H, NQ) / 32));
    BlockQ8* aq = device<BlockQ8>(pairs_max * (F / 32));
    float* split = device<float>(16 * n_max * H);  // mm_split's partials, up to 16 slices
    int32_t* ids = device<int32_t>(pairs_max);
    int32_t* counts = device<int32_t>(E + 1);
    int32_t* offsets = device<int32_t>(E + 2);
    int32_t* src = device<int32_t>(pairs_max);
    int32_t* dst = device<int32_t>(pairs_max);

    std::printf("experts %s (down %s; shared %s), dense %s; GB/s: weight bytes the call needs once / time\n",
                type_name(t_exp).c_str(), type_name(down.routed.type).c_str(), type_name(t_dense).c_str(),
                type_name(t_dense).c_str());
    std::printf("| kernel path            | tok  | us / call | GB/s    |\n|---|---:|---:|---:|\n");
    std::mt19937 gen(7);
    const double exp_bytes = 2.0 * gate.routed.matrix_bytes + down.routed.matrix_bytes;
    const double shared_bytes = 2.0 * gate.shared.matrix_bytes + down.shared.matrix_bytes;
    for (const int n : tokens) {
        // Each token routes to K distinct experts, uniformly, then the shared expert.
        std::vector<int32_t> h_ids(static_cast<size_t>(n) * S);
        std::set<int> used;
        std::vector<int> all(E);
        for (int e = 0; e < E; ++e) all[e] = e;
        for (int t = 0; t < n; ++t) {
            std::shuffle(all.begin(), all.end(), gen);
            for (int j = 0; j < K; ++j) h_ids[t * S + j] = all[j], used.insert(all[j]);
            h_ids[t * S + K] = static_cast<int32_t>(E);
        }
        ck(cudaMemcpy(ids, h_ids.data(), h_ids.size() * sizeof(int32_t), cudaMemcpyHostToDevice), "ids");
        const double bytes = used.size() * exp_bytes + shared_bytes;
        const int64_t n_pairs = static_cast<int64_t>(n) * S;
        if (n <= kMaxMmvTokens) {
            row("experts per pair", n, time_us([&] {
                    quantize_q8(x, n, H, H, xq, nullptr);
                    mmv_swiglu(gate, up, x, xq, ids, n, S, act, nullptr);
                    quantize_q8(act, n_pairs, F, F, aq, nullptr);
                    mmv_experts(down, act, aq, true, ids, n, S, y, nullptr);
                }), bytes);
        }
        row("experts mm_experts", n, time_us([&] {
                moe_group(ids, n, S, E + 1, counts, offsets, src, dst, nullptr);
                mm_experts(gate, x, offsets, src, dst, n, g, nullptr);
                mm_experts(up, x, offsets, src, dst, n, u, nullptr);
                swiglu(g, u, n_pairs * F, act, nullptr);
                mm_experts(down, act, offsets, dst, dst, n, y, nullptr);
            }), bytes);
        // The f32 router: matrix-vector passes (x in f32) against mm_float.
        row(n <= kMaxMmvTokens ? "router mmv" : "router mmv chunks", n, time_us([&] {
                for (int t0 = 0; t0 < n; t0 += kMaxMmvTokens)
                    mmv(router, x + t0 * H, nullptr, std::min(kMaxMmvTokens, n - t0), y + t0 * E, E, false, nullptr);
            }), static_cast<double>(router.matrix_bytes));
        row("router mm_float", n, time_us([&] { mm_float(router, x, n, y, E, false, nullptr); }),
            static_cast<double>(router.matrix_bytes));
        for (const auto& [name, w] : {std::pair<const char*, const WeightView*>{"qkv", &qkv}, {"wo", &wo},
                                      {"output", &output}}) {
            if (w == &output && n > kLogitRows) continue;
            const double wb = static_cast<double>(w->matrix_bytes);
            const int chunk = kMaxMmvTokens;
            const std::string label = std::string(name) + (n <= chunk ? " mmv" : " mmv chunks");
            row(label.c_str(), n, time_us([&] {
                    for (int t0 = 0; t0 < n; t0 += chunk) {
                        const int nt = std::min(chunk, n - t0);
                        quantize_q8(x + t0 * w->cols, nt, w->cols, w->cols, xq, nullptr);
                        mmv(*w, x + t0 * w->cols, xq, nt, y + t0 * w->rows, w->rows, false, nullptr);
                    }
                }), wb);
            row((std::string(name) + " mm").c_str(), n, time_us([&] { mm(*w, x, n, y, w->rows, false, nullptr); }), wb);
        }
        for (const int slices : {4, 8, 16}) {
            const std::string what = "wo mm_split " + std::to_string(slices);
            row(what.c_str(), n, time_us([&] { mm_split(wo, x, n, y, wo.rows, false, slices, split, nullptr); }),
                static_cast<double>(wo.matrix_bytes));
        }
    }
    return 0;
} catch (const std::exception& e) {
    std::fprintf(stderr, "bench_moe_gpu: %s\n", e.what());
    return 1;
}
