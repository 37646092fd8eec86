// Command lines of llama-bench and llama-sweep-bench, spelled like llama.cpp's and ik_llama.cpp's
// so that a user's command runs on either runtime.
#pragma once
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "kv_types.h"
#include "placement.h"

namespace glmoe::bench {

// A bad command line: the tools print the message and their usage and exit with status 2.
struct UsageError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

enum class OutputFormat { None, Markdown, Csv, Json, Jsonl };

// llama.cpp's flash-attention setting, as it reports it: -1 auto, 0 off, 1 on.
constexpr int kFlashAttnAuto = -1;
// llama.cpp reports "none" when no tensor override is given.
inline const char* const kNoOverrides = "none";

// Every list flag sweeps: the tests are every combination of the lists' values.
struct BenchParams {
    std::vector<std::string> models;
    std::vector<int> n_prompt{512};
    std::vector<int> n_gen{128};
    std::vector<std::pair<int, int>> n_pg;  // -pg: prompt then generation, timed together
    std::vector<int> n_depth{0};
    std::vector<int> n_batch{2048};
    std::vector<int> n_ubatch{512};
    std::vector<int> n_threads{0};  // 0: every hardware thread
    std::vector<int> n_gpu_layers{0};
    std::vector<int> n_cpu_moe{0};  // -ncmoe: the experts of the first N layers on the CPU
    std::vector<int> flash_attn{kFlashAttnAuto};
    // -ctk/-ctv: KV cache types (GGML ids); kKVTypeDefault: each device's own (f32 CPU, f16 GPU).
    std::vector<int> type_k{kKVTypeDefault};
    // glmoe's own: ContextParams::gpu_expert_share (< 0: the default).
    std::vector<double> gpu_expert_share{-1.0};
    std::vector<int> type_v{kKVTypeDefault};
    // -ot groups, kept as written: "PAT=BUF;PAT=BUF" (';' joins the overrides of one test, ','
    // separates tests, as llama.cpp's llama-bench), or kNoOverrides.
    std::vector<std::string> tensor_overrides{kNoOverrides};
    // -lm: llama.cpp's load modes (auto, mmap, mmap+mlock map the file; none, mlock, dio read it
    // into memory; mlock, mmap+mlock also lock its bytes in RAM).
    std::vector<std::string> load_mode{"auto"};
    int reps = 5;
    int delay_s = 0;
    bool verbose = false;
    bool progress = false;
    bool no_warmup = false;
    bool help = false;
    OutputFormat output = OutputFormat::Markdown;
    OutputFormat output_err = OutputFormat::None;
};

// One test: a single value of every list.
struct TestInstance {
    std::string model;
    int n_prompt = 0, n_gen = 0, n_depth = 0;
    int n_batch = 0, n_ubatch = 0, n_threads = 0, n_gpu_layers = 0, flash_attn = kFlashAttnAuto;
    std::string tensor_overrides = kNoOverrides;
    int n_cpu_moe = 0;
    int type_k = kKVTypeDefault, type_v = kKVTypeDefault;
    double gpu_expert_share = -1.0;
    std::string load_mode = "auto";
};

struct SweepParams {
    std::string model;
    int n_ctx = 4096;
    int n_batch = 2048;
    int n_ubatch = 512;   // the prompt chunk and the step between depths
    int n_gen = -1;       // < 0: n_ubatch / 4, as ik_llama.cpp
    int n_threads = 0;
    int n_gpu_layers = 0;
    int flash_attn = kFlashAttnAuto;
    // As ik_llama.cpp's common flags: -ot values ("PAT=BUF[,PAT=BUF]", repeatable), -cmoe, -ncmoe N.
    std::vector<std::string> tensor_overrides;
    bool cpu_moe = false;
    int n_cpu_moe = 0;
    int type_k = kKVTypeDefault, type_v = kKVTypeDefault;  // -ctk/-ctv
    bool use_mmap = true;    // --no-mmap: the file read into memory
    bool use_mlock = false;  // --mlock: the file's bytes (mapped or read) locked in RAM
    int reps = 1;
    bool warmup = true;
    bool verbose = false;
    bool help = false;
    OutputFormat output = OutputFormat::Markdown;
};

// llama.cpp's integer list syntax: comma-separated items, each `first`, `first-last`,
// `first-last+step` or `first-last*factor`. Throws UsageError.
std::vector<int> parse_int_range(const std::string& s, bool allow_negative = false);

BenchParams parse_bench_args(int argc, char** argv);
SweepParams parse_sweep_args(int argc, char** argv);

// The placement entries of one test: its -ot group's overrides, then its -ncmoe entries (as
// llama.cpp's llama-bench merges them). Throws PlacementError (placement.h).
std::vector<TensorOverride> test_overrides(const TestInstance& t);
// Whether any of these -ot values (groups or plain values) sends a tensor to the GPU.
bool overrides_ask_for_gpu(const std::vector<std::string>& values);

// Tests in llama.cpp's order (it keeps the model loaded across neighbouring tests): for each
// combination of settings, the -p tests, then the -n tests, then the -pg tests; zeros are skipped.
std::vector<TestInstance> expand_tests(const BenchParams& p);

extern const char* const kBenchUsage;
extern const char* const kSweepUsage;

}  // namespace glmoe::bench
