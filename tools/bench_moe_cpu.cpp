// The CPU's part of a hybrid decode step, alone: for every MoE layer of a GGUF, the routed experts
// of one token (n distinct experts drawn at random per layer and step) through the same
// matmul_many calls as the CPU backend's expert FFN (gate and up in one loop, then down), reading
// the weights where the runtime reads them: the mapped file, or the file read into memory (-lm
// none). Reports ms per step and the expert bytes read per second, to set against bench_ram's
// ceiling for the same host. Development only.
// usage: bench_moe_cpu MODEL.gguf [threads] [mmap|none] [experts per layer] [steps]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "model.h"
#include "quants.h"
#include "thread_pool.h"
#include "vec.h"

using namespace glmoe;

int main(int argc, char** argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: %s MODEL.gguf [threads] [mmap|none] [experts per layer] [steps]\n", argv[0]);
        return 2;
    }
    const int n_threads = argc > 2 ? std::atoi(argv[2]) : 4;
    const std::string mode = argc > 3 ? argv[3] : "mmap";
    if (mode != "mmap" && mode != "none") {
        std::fprintf(stderr, "load mode must be mmap or none, not %s\n", mode.c_str());
        return 2;
    }
    try {
        const auto model = Model::load(argv[1], mode == "mmap");
        const HParams& hp = model->hparams();
        const int n_used = argc > 4 ? std::atoi(argv[4]) : hp.layers.empty() ? 0 : 8;
        const int steps = argc > 5 ? std::atoi(argv[5]) : 50;
        std::vector<int> moe_layers;
        for (int i = 0; i < hp.n_layer; ++i)
            if (hp.layers[i].is_moe) moe_layers.push_back(i);
        if (moe_layers.empty() || n_used < 1 || n_used > hp.n_expert || steps < 1) {
            std::fprintf(stderr, "need MoE layers, 1 <= experts per layer <= %d and steps >= 1\n", hp.n_expert);
            return 2;
        }
        const int64_t H = hp.n_embd, F = hp.n_ff_expert;
        ThreadPool pool(n_threads);
        std::mt19937 gen(7);
        std::normal_distribution<float> nd;
        std::vector<float> h(H), gate(n_used * F), up(n_used * F), down(n_used * H);
        for (float& v : h) v = nd(gen);
        std::vector<int> experts(hp.n_expert);
        std::iota(experts.begin(), experts.end(), 0);
        const LayerWeights& l0 = model->layer(moe_layers[0]);
        const double step_bytes = static_cast<double>(moe_layers.size()) * n_used *
                                  (l0.gate_exps.matrix_bytes + l0.up_exps.matrix_bytes + l0.down_exps.matrix_bytes);
        // Every expert read once first, so that the mapped file is in the page cache.
        volatile double sink = 0;  // keeps the reads and the results live
        for (int li : moe_layers)
            for (const Weight* w : {&model->layer(li).gate_exps, &model->layer(li).up_exps, &model->layer(li).down_exps})
                for (size_t i = 0; i < w->matrix_bytes * hp.n_expert; i += 4096) sink = sink + w->data[i];
        std::vector<double> ms;
        std::vector<MatmulCall> calls;
        for (int s = 0; s < steps + 3; ++s) {
            const auto t0 = std::chrono::steady_clock::now();
            for (int li : moe_layers) {
                const LayerWeights& l = model->layer(li);
                std::shuffle(experts.begin(), experts.end(), gen);
                calls.clear();
                for (int i = 0; i < n_used; ++i) {
                    calls.push_back({l.gate_exps.type, l.gate_exps.matrix(experts[i]), F, H, h.data(), H, 1, gate.data() + i * F, F});
                    calls.push_back({l.up_exps.type, l.up_exps.matrix(experts[i]), F, H, h.data(), H, 1, up.data() + i * F, F});
                }
                matmul_many(pool, calls);
                for (size_t i = 0; i < gate.size(); ++i) gate[i] = silu(gate[i]) * up[i];
                calls.clear();
                for (int i = 0; i < n_used; ++i)
                    calls.push_back({l.down_exps.type, l.down_exps.matrix(experts[i]), H, F, gate.data() + i * F, F, 1, down.data() + i * H, H});
                matmul_many(pool, calls);
                sink = sink + down[0];
            }
            const double t = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
            if (s >= 3) ms.push_back(t);  // the first steps warm the pool and the caches
        }
        std::sort(ms.begin(), ms.end());
        const double median = ms[ms.size() / 2];
        std::printf("%s, load %s, %d threads, %zu MoE layers x %d experts (%s/%s): %.1f MB a step\n", argv[1],
                    mode.c_str(), n_threads, moe_layers.size(), n_used, type_name(l0.gate_exps.type).c_str(),
                    type_name(l0.down_exps.type).c_str(), step_bytes / 1e6);
        std::printf("median %.3f ms a step (min %.3f): %.1f GB/s (best %.1f)\n", median, ms.front(),
                    step_bytes / median / 1e6, step_bytes / ms.front() / 1e6);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "bench_moe_cpu: %s\n", e.what());
        return 1;
    }
}
