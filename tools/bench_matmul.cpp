// Micro benchmark of matmul per weight type: GFLOP/s (2 * rows * k * tokens per second) and, for
// one token, the weight bytes streamed per second.
// usage: bench_matmul [n_threads] [k] [seconds per case] [type name, e.g. Q4_K]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "ggml_types.h"
#include "quants.h"
#include "thread_pool.h"

using namespace glmoe;

namespace {

// Random payload bytes with every f16 scale field set to a small positive value (0x2000 ~ 0.0078).
std::vector<uint8_t> random_weights(uint32_t type, int64_t n_rows, int64_t k, std::mt19937& gen) {
    const TypeTraits& tr = type_traits(type);
    const size_t rb = row_bytes(type, k);
    std::vector<uint8_t> w(rb * n_rows);
    for (auto& b : w) b = static_cast<uint8_t>(gen());
    if (type == GGML_TYPE_F32 || type == GGML_TYPE_F16 || type == GGML_TYPE_BF16) {
        std::normal_distribution<float> nd;
        for (int64_t i = 0; i < n_rows * k; ++i) {
            const float v = nd(gen);
            uint32_t bits;
            std::memcpy(&bits, &v, 4);
            if (type == GGML_TYPE_F32) std::memcpy(&w[4 * i], &v, 4);
            else if (type == GGML_TYPE_BF16) { const uint16_t h = bits >> 16; std::memcpy(&w[2 * i], &h, 2); }
            else { const uint16_t h = 0x3000 | (bits & 0x83FF); std::memcpy(&w[2 * i], &h, 2); }
        }
        return w;
    }
    const int scale_offset = type == GGML_TYPE_Q6_K ? 208 : 0;
    const int n_scales = (type == GGML_TYPE_Q4_K || type == GGML_TYPE_Q5_K) ? 2 : 1;
    for (size_t blk = 0; blk < w.size() / tr.type_size; ++blk)
        for (int s = 0; s < n_scales; ++s) {
            const uint16_t h = 0x2000;
            std::memcpy(&w[blk * tr.type_size + scale_offset + 2 * s], &h, 2);
        }
    return w;
}

}  // namespace

int main(int argc, char** argv) {
    const int n_threads = argc > 1 ? std::atoi(argv[1]) : 2;
    const int64_t k = argc > 2 ? std::atoll(argv[2]) : 4096;
    const double seconds = argc > 3 ? std::atof(argv[3]) : 0.3;
    const char* only = argc > 4 ? argv[4] : nullptr;
    const uint32_t types[] = {GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_BF16, GGML_TYPE_Q8_0, GGML_TYPE_Q4_0,
                              GGML_TYPE_Q5_0, GGML_TYPE_Q4_K, GGML_TYPE_Q5_K, GGML_TYPE_Q6_K};
    ThreadPool pool(n_threads);
    std::mt19937 gen(42);
    std::printf("threads %d, k %lld\n%-5s %6s %5s %10s %9s %8s\n", n_threads, static_cast<long long>(k), "type",
                "rows", "tok", "us/call", "GFLOP/s", "GB/s(W)");
    for (uint32_t type : types) {
        if (only && type_name(type) != only) continue;
        for (int64_t n_rows : {1408, 4096}) {
            const std::vector<uint8_t> w = random_weights(type, n_rows, k, gen);
            for (int64_t n_tok : {1, 128}) {
                std::vector<float> x(n_tok * k), y(n_tok * n_rows);
                std::normal_distribution<float> nd;
                for (auto& v : x) v = nd(gen);
                matmul(pool, type, w.data(), n_rows, k, x.data(), k, n_tok, y.data(), n_rows);  // warm-up
                // Best of five rounds: the machine is shared, the minimum is the kernel's speed.
                double per_call = 1e30;
                for (int round = 0; round < 5; ++round) {
                    int calls = 0;
                    const auto start = std::chrono::steady_clock::now();
                    double elapsed = 0;
                    do {
                        matmul(pool, type, w.data(), n_rows, k, x.data(), k, n_tok, y.data(), n_rows);
                        ++calls;
                        elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
                    } while (elapsed < seconds / 5);
                    per_call = std::min(per_call, elapsed / calls);
                }
                std::printf("%-5s %6lld %5lld %10.1f %9.1f %8.1f\n", type_name(type).c_str(),
                            static_cast<long long>(n_rows), static_cast<long long>(n_tok), per_call * 1e6,
                            2.0 * n_rows * k * n_tok / per_call * 1e-9, w.size() / per_call * 1e-9);
            }
        }
    }
}
