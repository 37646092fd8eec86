// Result printers: llama-bench's rows in llama.cpp's markdown, csv, json and jsonl layouts (same field
// names and order, so that results of both runtimes go in one table), and llama-sweep-bench's rows
// in ik_llama.cpp's layouts.
#pragma once
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "bench_args.h"

namespace glmoe::bench {

struct ModelInfo {
    std::string filename;
    std::string type;
    uint64_t size = 0;  // bytes of tensor data
    uint64_t n_params = 0;
};

struct TestResult {
    TestInstance test;
    ModelInfo model;
    int n_threads = 0;  // the threads used: test.n_threads may be 0, "all"
    int n_gpu_layers_used = 0;  // layers whose attention ran on the GPU
    std::string gpu_info;       // the GPU's name when any tensor was on it (empty: CPU only)
    std::string type_k = "f32", type_v = "f32";  // the KV cache's types as the context stored them
    std::string test_time;
    std::vector<uint64_t> samples_ns;  // one per repetition

    // Tokens per second of each repetition: every prompt and generated token over its time.
    std::vector<double> samples_ts() const;
};

// "pp512", "tg128", "pp512+tg128", with " @ d4096" when the cache held tokens before the test.
std::string test_name(int n_prompt, int n_gen, int n_depth);

class Printer {
public:
    explicit Printer(FILE* out) : out_(out) {}
    virtual ~Printer() = default;
    virtual void header() {}
    virtual void row(const TestResult& r) = 0;
    virtual void footer() {}

protected:
    FILE* out_;
};

std::unique_ptr<Printer> make_printer(OutputFormat format, FILE* out, const BenchParams& params);

struct SweepSettings {
    int n_kv_max, n_batch, n_ubatch, flash_attn, n_gpu_layers, n_threads;
    std::string model_filename;
};

// One sweep step: pp prompt tokens and tg generated tokens timed at depth n_kv.
struct SweepStep {
    int pp, tg, n_kv;
    double t_pp_s, t_tg_s;
    double speed_pp() const { return pp / t_pp_s; }
    double speed_tg() const { return tg / t_tg_s; }
};

void print_sweep_header(FILE* out, OutputFormat format, const SweepSettings& s);
void print_sweep_step(FILE* out, OutputFormat format, const SweepSettings& s, const SweepStep& step);

}  // namespace glmoe::bench
