// What both benchmarks time: prompt chunks and single-token generation on sequence 0 of a context,
// with random tokens (speed does not depend on which tokens they are).
#pragma once
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "bench_output.h"
#include "context.h"
#include "model.h"

namespace glmoe::bench {

class TokenSource {
public:
    explicit TokenSource(int n_vocab, uint32_t seed = 42) : rng_(seed), dist_(0, n_vocab - 1) {}
    int32_t next() { return dist_(rng_); }

private:
    std::mt19937 rng_;
    std::uniform_int_distribution<int32_t> dist_;
};

// Decodes n prompt tokens at positions pos0.. in chunks of `chunk` tokens, logits of the last only.
void decode_prompt(Context& ctx, int n, int pos0, int chunk, TokenSource& tokens, std::vector<float>& logits);
// Decodes n tokens one at a time at positions pos0.., as generation does.
void decode_generation(Context& ctx, int n, int pos0, TokenSource& tokens, std::vector<float>& logits);

uint64_t now_ns();
// RFC 3339 UTC time, as llama.cpp's test_time.
std::string utc_now();
// The CPU's model name, from /proc/cpuinfo.
std::string cpu_name();
// "glmoe-<git commit>": tells a reader which runtime wrote the results.
std::string build_commit();
// File name, "glm4moe <layers>L <type of most weight bytes>" (llama.cpp's model_type names the
// architecture, size and weight type), tensor bytes and parameters.
ModelInfo model_info(const Model& model, const std::string& path);
// Says once, on stderr, when GPU offload was asked for (-ngl, or -ot sending tensors to CUDA0) but
// there is no GPU to use.
void note_cpu_only(int n_gpu_layers, bool overrides_ask_for_gpu = false);
// Sleeps for whole seconds (--delay).
void sleep_s(int seconds);

}  // namespace glmoe::bench
