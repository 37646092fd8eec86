#include "bench_args.h"

#include <algorithm>
#include <cctype>
#include <set>
#include <stdexcept>

#include "gguf.h"

namespace glmoe::bench {

const char* const kBenchUsage =
    "usage: llama-bench -m MODEL.gguf [options]\n"
    "\n"
    "Every list option takes comma-separated values and ranges (first-last, first-last+step,\n"
    "first-last*factor); may be repeated; the tests are every combination.\n"
    "\n"
    "  -h, --help\n"
    "  -m, --model FILE[,FILE..]            model file(s) (required)\n"
    "  -p, --n-prompt N[,N..]               prompt tokens (default: 512)\n"
    "  -n, --n-gen N[,N..]                  generated tokens (default: 128)\n"
    "  -pg PP,TG                            prompt then generation, timed as one test (repeatable)\n"
    "  -d, --n-depth N[,N..]                tokens in the KV cache before each test (default: 0)\n"
    "  -b, --batch-size N[,N..]             logical batch (default: 2048)\n"
    "  -ub, --ubatch-size N[,N..]           physical batch: prompt chunk per decode (default: 512)\n"
    "  -t, --threads N[,N..]                threads, 0: all (default: 0)\n"
    "  -ngl, --n-gpu-layers N[,N..]         on the GPU, as llama.cpp: the output head and the last N-1\n"
    "                                       layers (-1, or more than the layers: all; default: 0)\n"
    "  -ncmoe, --n-cpu-moe N[,N..]          keep the MoE experts of the first N layers on the CPU (default: 0)\n"
    "  -ot, --override-tensor PAT=BUF;..[,..]\n"
    "                                       tensors whose name matches regex PAT go to BUF (CPU or CUDA0);\n"
    "                                       ';' joins overrides, ',' separates tests (default: none)\n"
    "  -fa, --flash-attn on|off|auto[,..]   accepted and reported (default: auto)\n"
    "  -ctk, --cache-type-k T[,T..]         KV cache type of K: f32, f16, bf16, q8_0, q4_0 (default: f32 on\n"
    "                                       the CPU, f16 on the GPU, whose layers take f16, bf16, q8_0,\n"
    "                                       q4_0)\n"
    "  -ctv, --cache-type-v T[,T..]         KV cache type of V, as -ctk\n"
    "  -lm, --load-mode M[,M..]             auto, mmap, mmap+mlock: map the file; none, mlock, dio: read it\n"
    "                                       whole into memory; mlock, mmap+mlock also lock it in RAM (a\n"
    "                                       warning where mlock fails; default: auto)\n"
    "  --gpu-expert-share F[,F..]           glmoe: of each small step's routed experts in RAM, the fraction\n"
    "                                       the GPU runs, copied from pinned memory (default: 0.4)\n"
    "  -r, --repetitions N                  timed runs per test (default: 5)\n"
    "  --delay SECONDS                      pause before each test (default: 0)\n"
    "  -o, --output md|csv|json|jsonl       stdout format (default: md)\n"
    "  -oe, --output-err md|csv|json|jsonl  also print this format on stderr\n"
    "  --no-warmup                          skip the untimed warm-up run\n"
    "  --progress                           report every phase on stderr\n"
    "  -v, --verbose                        model and context details on stderr\n";

const char* const kSweepUsage =
    "usage: llama-sweep-bench -m MODEL.gguf [options]\n"
    "\n"
    "Fills the context one prompt chunk (-ub tokens) at a time; at each depth N_KV times\n"
    "generating -n tokens and processing -ub prompt tokens.\n"
    "\n"
    "  -h, --help\n"
    "  -m, --model FILE                     model file (required)\n"
    "  -c, --ctx-size N                     context size: the sweep stops there (default: 4096)\n"
    "  -b, --batch-size N                   logical batch (default: 2048)\n"
    "  -ub, --ubatch-size N                 prompt chunk and depth step (default: 512)\n"
    "  -n, --n-predict N                    generated tokens per step (default: ubatch/4)\n"
    "  -t, --threads N                      threads, 0: all (default: 0)\n"
    "  -nrep, --n-repetitions N             timed runs per step, averaged (default: 1)\n"
    "  -ngl, --n-gpu-layers N               on the GPU, as llama.cpp: the output head and the last N-1\n"
    "                                       layers (-1, or more than the layers: all; default: 0)\n"
    "  -ot, --override-tensor PAT=BUF[,..]  tensors whose name matches regex PAT go to BUF (CPU or CUDA0);\n"
    "                                       repeatable\n"
    "  -cmoe, --cpu-moe                     keep every MoE expert tensor on the CPU\n"
    "  -ncmoe, --n-cpu-moe N                keep the MoE experts of the first N layers on the CPU\n"
    "  -fa, --flash-attn [on|off|auto]      accepted and reported\n"
    "  -ctk, --cache-type-k T               KV cache type of K: f32, f16, bf16, q8_0, q4_0 (default: f32 on\n"
    "                                       the CPU, f16 on the GPU, whose layers take f16, bf16, q8_0,\n"
    "                                       q4_0)\n"
    "  -ctv, --cache-type-v T               KV cache type of V, as -ctk\n"
    "  --no-warmup                          skip the untimed warm-up token\n"
    "  --no-mmap                            read the model file into memory instead of mapping it\n"
    "  --mlock                              lock the model file's bytes in RAM (a warning where mlock fails)\n"
    "  -o, --output-format md|table|jsonl   stdout format (default: md)\n"
    "  -v, --verbose                        model and context details on stderr\n";

namespace {

// Reads digits at s[i..]; false if there are none or too many for an int.
bool read_digits(const std::string& s, size_t& i, long long& value) {
    const size_t start = i;
    while (i < s.size() && std::isdigit(static_cast<unsigned char>(s[i]))) ++i;
    if (i == start || i - start > 9) return false;
    value = std::stoll(s.substr(start, i - start));
    return true;
}

std::vector<std::string> split(const std::string& s, char delim) {
    std::vector<std::string> out;
    size_t start = 0;
    for (;;) {
        const size_t end = s.find(delim, start);
        out.push_back(s.substr(start, end - start));
        if (end == std::string::npos) return out;
        start = end + 1;
    }
}

int flash_attn_from_str(const std::string& v) {
    if (v == "on" || v == "enabled" || v == "true" || v == "1") return 1;
    if (v == "off" || v == "disabled" || v == "false" || v == "0") return 0;
    if (v == "auto" || v == "-1") return kFlashAttnAuto;
    throw UsageError("expected on|off|auto, got '" + v + "'");
}

// One -ot group: `pattern=buffer` pairs joined by ';'. An empty group means no override (as
// llama.cpp's llama-bench); every pair is checked as placement will read it.
std::string check_override_group(const std::string& group) {
    if (group.empty() || group == kNoOverrides) return kNoOverrides;
    for (const std::string& item : split(group, ';')) {
        try {
            parse_tensor_overrides(item);
        } catch (const PlacementError& e) {
            throw UsageError(e.what());
        }
    }
    return group;
}

OutputFormat output_from_str(const std::string& v, bool sweep) {
    if (v == "md" || (sweep && v == "table")) return OutputFormat::Markdown;
    if (v == "jsonl") return OutputFormat::Jsonl;
    if (!sweep && v == "csv") return OutputFormat::Csv;
    if (!sweep && v == "json") return OutputFormat::Json;
    throw UsageError(sweep ? "expected md|jsonl, got '" + v + "'" : "expected md|csv|json|jsonl, got '" + v + "'");
}

// Walks argv. Long flags may use '_' for '-', as llama.cpp allows.
class ArgReader {
public:
    ArgReader(int argc, char** argv) : argc_(argc), argv_(argv) {}

    bool next() {
        if (++i_ >= argc_) return false;
        flag_ = argv_[i_];
        if (flag_.rfind("--", 0) == 0) std::replace(flag_.begin(), flag_.end(), '_', '-');
        return true;
    }
    bool is(const char* a, const char* b = nullptr, const char* c = nullptr) const {
        return flag_ == a || (b && flag_ == b) || (c && flag_ == c);
    }
    const std::string& flag() const { return flag_; }
    bool has_value() const { return i_ + 1 < argc_; }
    const char* peek() const { return argv_[i_ + 1]; }

    std::string value() {
        if (!has_value()) throw UsageError("missing value for " + flag_);
        return argv_[++i_];
    }
    // Parses the value with `parse`, naming the flag in any error.
    template <class F>
    auto parsed(F parse) -> decltype(parse(std::string())) {
        const std::string v = value();
        try {
            return parse(v);
        } catch (const UsageError& e) {
            throw UsageError("invalid value for " + flag_ + " '" + v + "': " + e.what());
        }
    }
    std::vector<int> ints(int min_value, bool allow_negative = false) {
        return parsed([&](const std::string& v) {
            std::vector<int> out = parse_int_range(v, allow_negative);
            for (int x : out)
                if (x < min_value) throw UsageError("values must be at least " + std::to_string(min_value));
            return out;
        });
    }
    int one_int(int min_value, bool allow_negative = false) {
        const std::vector<int> v = ints(min_value, allow_negative);
        if (v.size() != 1) throw UsageError(flag_ + " takes a single value");
        return v[0];
    }
    std::vector<int> flash_attn() {
        return parsed([](const std::string& v) {
            std::vector<int> out;
            for (const std::string& item : split(v, ',')) out.push_back(flash_attn_from_str(item));
            return out;
        });
    }
    // KV cache type names, comma-separated, as their GGML ids.
    std::vector<double> fractions() {
        return parsed([](const std::string& v) {
            std::vector<double> out;
            for (const std::string& item : split(v, ',')) {
                size_t used = 0;
                double f = -1;
                try {
                    f = std::stod(item, &used);
                } catch (const std::exception&) {
                }
                if (used != item.size() || !(f >= 0 && f <= 1)) throw UsageError("expected fractions in [0, 1], got '" + item + "'");
                out.push_back(f);
            }
            return out;
        });
    }
    std::vector<int> kv_types() {
        const std::string flag = flag_;
        return parsed([&flag](const std::string& v) {
            std::vector<int> out;
            for (const std::string& item : split(v, ',')) {
                try {
                    out.push_back(static_cast<int>(kv_type_from_name(item, flag)));
                } catch (const std::invalid_argument&) {
                    throw UsageError("glmoe's KV cache types are " + kv_type_names());
                }
            }
            return out;
        });
    }
    std::vector<std::string> overrides() {
        return parsed([](const std::string& v) {
            std::vector<std::string> out;
            for (const std::string& group : split(v, ',')) out.push_back(check_override_group(group));
            return out;
        });
    }
    [[noreturn]] void unknown() const { throw UsageError("unknown argument: " + flag_); }

private:
    int argc_;
    char** argv_;
    int i_ = 0;
    std::string flag_;
};

// The first use of a list flag replaces its default; later uses append, as in llama.cpp.
class ListSetter {
public:
    template <class T>
    void add(std::vector<T>& list, const std::vector<T>& values) {
        if (replaced_.insert(&list).second) list.clear();
        list.insert(list.end(), values.begin(), values.end());
    }

private:
    std::set<const void*> replaced_;
};

}  // namespace

std::vector<int> parse_int_range(const std::string& s, bool allow_negative) {
    std::vector<int> out;
    for (const std::string& item : split(s, ',')) {
        size_t i = 0;
        const bool negative = allow_negative && !item.empty() && item[0] == '-';
        if (negative) ++i;
        long long first = 0, last = 0, step = 1;
        char op = '+';
        if (!read_digits(item, i, first)) throw UsageError("expected a number, got '" + item + "'");
        if (negative) first = -first;
        last = first;
        if (i < item.size()) {
            if (item[i++] != '-' || !read_digits(item, i, last))
                throw UsageError("expected FIRST-LAST, got '" + item + "'");
            if (i < item.size()) {
                op = item[i++];
                if ((op != '+' && op != '*') || !read_digits(item, i, step) || i != item.size())
                    throw UsageError("expected FIRST-LAST+STEP or FIRST-LAST*FACTOR, got '" + item + "'");
            }
        }
        if (last < first) throw UsageError("range '" + item + "' is empty");
        for (long long v = first; v <= last;) {
            out.push_back(static_cast<int>(v));
            const long long next = op == '+' ? v + step : v * step;
            if (next <= v) throw UsageError("range '" + item + "' does not advance");
            v = next;
        }
    }
    return out;
}

BenchParams parse_bench_args(int argc, char** argv) {
    BenchParams p;
    ListSetter lists;
    ArgReader a(argc, argv);
    while (a.next()) {
        if (a.is("-h", "--help")) p.help = true;
        else if (a.is("-m", "--model")) lists.add(p.models, a.parsed([](const std::string& v) { return split(v, ','); }));
        else if (a.is("-p", "--n-prompt")) lists.add(p.n_prompt, a.ints(0));
        else if (a.is("-n", "--n-gen")) lists.add(p.n_gen, a.ints(0));
        else if (a.is("-pg")) {
            const auto pg = a.parsed([](const std::string& v) {
                const std::vector<int> n = parse_int_range(v);
                if (n.size() != 2 || v.find('-') != std::string::npos) throw UsageError("expected PP,TG");
                return std::make_pair(n[0], n[1]);
            });
            lists.add(p.n_pg, {pg});
        }
        else if (a.is("-d", "--n-depth")) lists.add(p.n_depth, a.ints(0));
        else if (a.is("-b", "--batch-size")) lists.add(p.n_batch, a.ints(1));
        else if (a.is("-ub", "--ubatch-size")) lists.add(p.n_ubatch, a.ints(1));
        else if (a.is("-t", "--threads")) lists.add(p.n_threads, a.ints(0));
        else if (a.is("-ngl", "--n-gpu-layers")) lists.add(p.n_gpu_layers, a.ints(-1, true));
        else if (a.is("-ncmoe", "--n-cpu-moe")) lists.add(p.n_cpu_moe, a.ints(0));
        else if (a.is("-fa", "--flash-attn")) lists.add(p.flash_attn, a.flash_attn());
        else if (a.is("-ot", "--override-tensor")) lists.add(p.tensor_overrides, a.overrides());
        else if (a.is("-ctk", "--cache-type-k")) lists.add(p.type_k, a.kv_types());
        else if (a.is("--gpu-expert-share")) lists.add(p.gpu_expert_share, a.fractions());
        else if (a.is("-ctv", "--cache-type-v")) lists.add(p.type_v, a.kv_types());
        else if (a.is("-lm", "--load-mode"))
            lists.add(p.load_mode, a.parsed([](const std::string& v) {
                const std::vector<std::string> modes = split(v, ',');
                for (const std::string& m : modes) {
                    try {
                        load_mode_maps(m);
                    } catch (const std::invalid_argument& e) {
                        throw UsageError(e.what());
                    }
                }
                return modes;
            }));
        else if (a.is("-r", "--repetitions")) p.reps = a.one_int(1);
        else if (a.is("--delay")) p.delay_s = a.one_int(0);
        else if (a.is("-o", "--output")) p.output = a.parsed([](const std::string& v) { return output_from_str(v, false); });
        else if (a.is("-oe", "--output-err")) p.output_err = a.parsed([](const std::string& v) { return output_from_str(v, false); });
        else if (a.is("--no-warmup")) p.no_warmup = true;
        else if (a.is("--progress")) p.progress = true;
        else if (a.is("-v", "--verbose")) p.verbose = true;
        else a.unknown();
    }
    if (!p.help && p.models.empty()) throw UsageError("-m MODEL is required");
    return p;
}

SweepParams parse_sweep_args(int argc, char** argv) {
    SweepParams p;
    ArgReader a(argc, argv);
    while (a.next()) {
        if (a.is("-h", "--help")) p.help = true;
        else if (a.is("-m", "--model")) p.model = a.value();
        else if (a.is("-c", "--ctx-size")) p.n_ctx = a.one_int(1);
        else if (a.is("-b", "--batch-size")) p.n_batch = a.one_int(1);
        else if (a.is("-ub", "--ubatch-size")) p.n_ubatch = a.one_int(1);
        else if (a.is("-n", "--n-predict", "--predict")) p.n_gen = a.one_int(0);
        else if (a.is("-t", "--threads")) p.n_threads = a.one_int(0);
        else if (a.is("-nrep", "--n-repetitions")) p.reps = a.one_int(1);
        else if (a.is("-ngl", "--n-gpu-layers", "--gpu-layers")) p.n_gpu_layers = a.one_int(-1, true);
        else if (a.is("-fa", "--flash-attn")) {
            // ik_llama.cpp's -fa is a switch; newer builds take on|off|auto.
            static const std::set<std::string> words = {"on", "off", "auto", "enabled", "disabled",
                                                        "true", "false", "1", "0", "-1"};
            p.flash_attn = a.has_value() && words.count(a.peek()) ? a.flash_attn()[0] : 1;
        }
        else if (a.is("-ot", "--override-tensor")) {
            // llama.cpp's common -ot: ',' separates the overrides of one value.
            p.tensor_overrides.push_back(a.parsed([](const std::string& v) {
                try {
                    parse_tensor_overrides(v);
                } catch (const PlacementError& e) {
                    throw UsageError(e.what());
                }
                return v;
            }));
        }
        else if (a.is("-cmoe", "--cpu-moe")) p.cpu_moe = true;
        else if (a.is("-ncmoe", "--n-cpu-moe")) p.n_cpu_moe = a.one_int(0);
        else if (a.is("-ctk", "--cache-type-k") || a.is("-ctv", "--cache-type-v")) {
            const std::vector<int> t = a.kv_types();
            if (t.size() != 1) throw UsageError(a.flag() + " takes a single value");
            (a.is("-ctk", "--cache-type-k") ? p.type_k : p.type_v) = t[0];
        }
        else if (a.is("--no-warmup")) p.warmup = false;
        else if (a.is("--no-mmap")) p.use_mmap = false;
        else if (a.is("--mlock")) p.use_mlock = true;
        else if (a.is("-o", "--output-format")) p.output = a.parsed([](const std::string& v) { return output_from_str(v, true); });
        else if (a.is("-v", "--verbose")) p.verbose = true;
        else a.unknown();
    }
    if (p.help) return p;
    if (p.model.empty()) throw UsageError("-m MODEL is required");
    if (p.n_gen <= 0) p.n_gen = std::max(1, p.n_ubatch / 4);
    if (p.n_ctx < p.n_ubatch + p.n_gen)
        throw UsageError("-c " + std::to_string(p.n_ctx) + " leaves no room for one step of " +
                         std::to_string(p.n_ubatch) + " prompt and " + std::to_string(p.n_gen) + " generated tokens");
    return p;
}

std::vector<TensorOverride> test_overrides(const TestInstance& t) {
    std::vector<std::string> items;
    if (t.tensor_overrides != kNoOverrides && !t.tensor_overrides.empty()) items = split(t.tensor_overrides, ';');
    return overrides_from_flags(items, false, t.n_cpu_moe);
}

bool overrides_ask_for_gpu(const std::vector<std::string>& values) {
    for (const std::string& value : values) {
        if (value == kNoOverrides) continue;
        for (const std::string& group : split(value, ';'))
            for (const TensorOverride& ov : parse_tensor_overrides(group))
                if (ov.buffer != "CPU") return true;
    }
    return false;
}

std::vector<TestInstance> expand_tests(const BenchParams& p) {
    std::vector<TestInstance> out;
    for (const std::string& model : p.models)
    for (const std::string& lm : p.load_mode)
    for (int ngl : p.n_gpu_layers)
    for (int ncmoe : p.n_cpu_moe)
    for (const std::string& ot : p.tensor_overrides)
    for (int nb : p.n_batch)
    for (int nub : p.n_ubatch)
    for (int tk : p.type_k)
    for (int tv : p.type_v)
    for (double share : p.gpu_expert_share)
    for (int fa : p.flash_attn)
    for (int nt : p.n_threads)
    for (int nd : p.n_depth) {
        const TestInstance base{model, 0, 0, nd, nb, nub, nt, ngl, fa, ot, ncmoe, tk, tv, share, lm};
        auto add = [&](int n_prompt, int n_gen) {
            if (n_prompt == 0 && n_gen == 0) return;
            TestInstance t = base;
            t.n_prompt = n_prompt;
            t.n_gen = n_gen;
            out.push_back(t);
        };
        for (int n : p.n_prompt) add(n, 0);
        for (int n : p.n_gen) add(0, n);
        for (const auto& pg : p.n_pg) add(pg.first, pg.second);
    }
    return out;
}

}  // namespace glmoe::bench
