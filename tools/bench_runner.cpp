#include "bench_runner.h"

#include <algorithm>
#include <chrono>
#include <ctime>
#include <cstdio>
#include <fstream>
#include <map>
#include <thread>

#include "devices.h"
#include "ggml_types.h"

#ifndef GLMOE_BUILD_COMMIT
#define GLMOE_BUILD_COMMIT "unknown"
#endif

namespace glmoe::bench {

void decode_prompt(Context& ctx, int n, int pos0, int chunk, TokenSource& tokens, std::vector<float>& logits) {
    for (int start = 0; start < n; start += chunk) {
        const int len = std::min(chunk, n - start);
        Batch b;
        for (int i = 0; i < len; ++i) {
            b.token.push_back(tokens.next());
            b.pos.push_back(pos0 + start + i);
            b.seq.push_back(0);
            b.want_logits.push_back(start + i + 1 == n);
        }
        ctx.decode(b, logits);
    }
}

void decode_generation(Context& ctx, int n, int pos0, TokenSource& tokens, std::vector<float>& logits) {
    // With the output head on the GPU a step picks its token there (greedy) and hands back only the
    // id, as generation does; otherwise the logits come to the host.
    std::vector<int32_t> ids;
    const std::vector<float> no_draws;
    for (int i = 0; i < n; ++i) {
        const Batch b{{tokens.next()}, {pos0 + i}, {0}, {1}};
        if (ctx.samples_on_gpu())
            ctx.decode_sample(b, DeviceSampling{}, no_draws, ids);
        else
            ctx.decode(b, logits);
    }
}

uint64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
}

std::string utc_now() {
    const std::time_t t = std::time(nullptr);
    char buf[32];
    std::strftime(buf, sizeof(buf), "%FT%TZ", std::gmtime(&t));
    return buf;
}

std::string cpu_name() {
    std::ifstream in("/proc/cpuinfo");
    for (std::string line; std::getline(in, line);) {
        if (line.rfind("model name", 0) != 0) continue;
        const size_t colon = line.find(':');
        if (colon == std::string::npos) break;
        const size_t start = line.find_first_not_of(' ', colon + 1);
        return start == std::string::npos ? "" : line.substr(start);
    }
    return "";
}

std::string build_commit() { return std::string("glmoe-") + GLMOE_BUILD_COMMIT; }

ModelInfo model_info(const Model& model, const std::string& path) {
    std::map<uint32_t, uint64_t> bytes_by_type;
    for (const GGUFTensorInfo& t : model.file().tensors()) bytes_by_type[t.type] += t.n_bytes;
    uint32_t main_type = 0;
    uint64_t most = 0;
    for (const auto& [type, bytes] : bytes_by_type)
        if (bytes > most) main_type = type, most = bytes;
    return {path, "glm4moe " + std::to_string(model.hparams().n_layer) + "L " + type_name(main_type), model.n_bytes(),
            model.n_params()};
}

void note_cpu_only(int n_gpu_layers, bool overrides_ask_for_gpu) {
    static bool said = false;
    if ((n_gpu_layers == 0 && !overrides_ask_for_gpu) || said || cuda_device_count() > 0) return;
    said = true;
    std::string what = n_gpu_layers ? "-ngl " + std::to_string(n_gpu_layers) : "";
    if (overrides_ask_for_gpu) what += what.empty() ? "-ot ...=CUDA0" : " and -ot ...=CUDA0";
    std::fprintf(stderr, "note: %s: %s is reported, and the test runs on the CPU\n",
                 built_with_cuda() ? "no CUDA device was found" : "this build has no CUDA backend", what.c_str());
}

void sleep_s(int seconds) { std::this_thread::sleep_for(std::chrono::seconds(seconds)); }

}  // namespace glmoe::bench
