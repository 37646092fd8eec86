#include "bench_output.h"

#include <cmath>
#include <cstdarg>
#include <cstdlib>

#include "bench_runner.h"

namespace glmoe::bench {

namespace {

std::string format(const char* fmt, ...) {
    char buf[256];
    va_list args;
    va_start(args, fmt);
    std::vsnprintf(buf, sizeof(buf), fmt, args);
    va_end(args);
    return buf;
}

template <class T>
std::string join(const std::vector<T>& values, const char* sep, const char* fmt) {
    std::string out;
    for (size_t i = 0; i < values.size(); ++i) out += (i ? sep : "") + format(fmt, values[i]);
    return out;
}

double mean(const std::vector<double>& v) {
    double sum = 0;
    for (double x : v) sum += x;
    return v.empty() ? 0.0 : sum / v.size();
}

// Sample standard deviation (n - 1), as llama.cpp's.
double stddev(const std::vector<double>& v) {
    if (v.size() <= 1) return 0.0;
    const double m = mean(v);
    double sq = 0;
    for (double x : v) sq += (x - m) * (x - m);
    return std::sqrt(sq / (v.size() - 1));
}

enum class Kind { String, Bool, Int, Float };

struct Field {
    const char* name;
    Kind kind;
    std::string value;
};

std::string b(bool v) { return v ? "1" : "0"; }
std::string i(long long v) { return std::to_string(v); }

// llama.cpp's test fields, in its order. Settings glmoe does not have carry the value that describes
// what glmoe does (f32 KV cache, no split, no repacking).
std::vector<Field> fields_of(const TestResult& r) {
    std::vector<double> ns(r.samples_ns.begin(), r.samples_ns.end());
    const std::vector<double> ts = r.samples_ts();
    const TestInstance& t = r.test;
    static const std::string cpu = cpu_name(), commit = build_commit();
    return {
        {"build_commit", Kind::String, commit},
        {"build_number", Kind::Int, "0"},
        {"cpu_info", Kind::String, cpu},
        {"gpu_info", Kind::String, r.gpu_info},
        {"backends", Kind::String, r.gpu_info.empty() ? "CPU" : "CUDA,CPU"},
        {"model_filename", Kind::String, r.model.filename},
        {"model_type", Kind::String, r.model.type},
        {"model_size", Kind::Int, i(r.model.size)},
        {"model_n_params", Kind::Int, i(r.model.n_params)},
        {"n_batch", Kind::Int, i(t.n_batch)},
        {"n_ubatch", Kind::Int, i(t.n_ubatch)},
        {"n_threads", Kind::Int, i(r.n_threads)},
        {"cpu_mask", Kind::String, "0x0"},
        {"cpu_strict", Kind::Bool, b(false)},
        {"poll", Kind::Int, "0"},
        {"type_k", Kind::String, r.type_k},
        {"type_v", Kind::String, r.type_v},
        {"n_gpu_layers", Kind::Int, i(t.n_gpu_layers)},
        {"n_cpu_moe", Kind::Int, i(t.n_cpu_moe)},
        {"split_mode", Kind::String, "none"},
        {"main_gpu", Kind::Int, "0"},
        {"no_kv_offload", Kind::Bool, b(false)},
        {"flash_attn", Kind::Int, i(t.flash_attn)},
        {"devices", Kind::String, "auto"},
        {"tensor_split", Kind::String, "0.00"},
        {"tensor_buft_overrides", Kind::String, t.tensor_overrides},
        {"load_mode", Kind::String, t.load_mode},
        {"lazy_mode", Kind::String, "auto"},
        {"embeddings", Kind::Bool, b(false)},
        {"no_op_offload", Kind::Int, "0"},
        {"no_host", Kind::Bool, b(false)},
        {"repack", Kind::Bool, b(false)},
        {"fit_target", Kind::Int, "0"},
        {"fit_min_ctx", Kind::Int, "0"},
        {"n_prompt", Kind::Int, i(t.n_prompt)},
        {"n_gen", Kind::Int, i(t.n_gen)},
        {"n_depth", Kind::Int, i(t.n_depth)},
        {"test_time", Kind::String, r.test_time},
        {"avg_ns", Kind::Int, i(static_cast<long long>(mean(ns)))},
        {"stddev_ns", Kind::Int, i(static_cast<long long>(stddev(ns)))},
        {"avg_ts", Kind::Float, format("%f", mean(ts))},
        {"stddev_ts", Kind::Float, format("%f", stddev(ts))},
    };
}

std::string json_string(const std::string& s) {
    std::string out = "\"";
    for (char c : s) {
        if (c == '"' || c == '\\') out += '\\', out += c;
        else if (static_cast<unsigned char>(c) < 0x20) out += format("\\u%04x", c);
        else out += c;
    }
    return out + "\"";
}

std::string json_value(const Field& f) {
    switch (f.kind) {
        case Kind::String: return json_string(f.value);
        case Kind::Bool: return f.value == "0" ? "false" : "true";
        default: return f.value;
    }
}

std::string json_samples(const TestResult& r) {
    const std::vector<unsigned long long> ns(r.samples_ns.begin(), r.samples_ns.end());
    return "\"samples_ns\": [ " + join(ns, ", ", "%llu") + " ], \"samples_ts\": [ " +
           join(r.samples_ts(), ", ", "%g") + " ]";
}

class CsvPrinter : public Printer {
public:
    using Printer::Printer;
    void header() override {
        std::string line;
        for (const Field& f : fields_of(TestResult{})) line += (line.empty() ? "" : ",") + std::string(f.name);
        std::fprintf(out_, "%s\n", line.c_str());
    }
    void row(const TestResult& r) override {
        std::string line;
        for (const Field& f : fields_of(r)) {
            std::string quoted = "\"";
            for (char c : f.value) quoted += c == '"' ? "\"\"" : std::string(1, c);
            line += (line.empty() ? "" : ",") + quoted + "\"";
        }
        std::fprintf(out_, "%s\n", line.c_str());
    }
};

class JsonPrinter : public Printer {
public:
    using Printer::Printer;
    void header() override { std::fprintf(out_, "[\n"); }
    void row(const TestResult& r) override {
        std::fprintf(out_, "%s  {\n", first_ ? "" : ",\n");
        first_ = false;
        for (const Field& f : fields_of(r)) std::fprintf(out_, "    \"%s\": %s,\n", f.name, json_value(f).c_str());
        std::fprintf(out_, "    %s\n  }", json_samples(r).c_str());
    }
    void footer() override { std::fprintf(out_, "\n]\n"); }

private:
    bool first_ = true;
};

class JsonlPrinter : public Printer {
public:
    using Printer::Printer;
    void row(const TestResult& r) override {
        std::string line = "{";
        for (const Field& f : fields_of(r)) line += "\"" + std::string(f.name) + "\": " + json_value(f) + ", ";
        std::fprintf(out_, "%s%s}\n", line.c_str(), json_samples(r).c_str());
    }
};

// llama.cpp's table: fixed columns, plus a column for each setting that is swept or not at its default.
class MarkdownPrinter : public Printer {
public:
    MarkdownPrinter(FILE* out, const BenchParams& p) : Printer(out) {
        const BenchParams d;
        columns_ = {"model", "size", "params", "backend"};
        if (p.n_gpu_layers != d.n_gpu_layers) columns_.push_back("n_gpu_layers");
        if (p.n_cpu_moe != d.n_cpu_moe) columns_.push_back("n_cpu_moe");
        if (p.gpu_expert_share != d.gpu_expert_share) columns_.push_back("gpu_expert_share");
        columns_.push_back("n_threads");  // always shown on a CPU backend
        if (p.n_batch != d.n_batch) columns_.push_back("n_batch");
        if (p.n_ubatch != d.n_ubatch) columns_.push_back("n_ubatch");
        if (p.type_k != d.type_k) columns_.push_back("type_k");
        if (p.type_v != d.type_v) columns_.push_back("type_v");
        if (p.flash_attn != d.flash_attn) columns_.push_back("flash_attn");
        if (p.tensor_overrides != d.tensor_overrides) columns_.push_back("tensor_buft_overrides");
        if (p.load_mode != d.load_mode) columns_.push_back("load_mode");
        columns_.push_back("test");
        columns_.push_back("t/s");
    }
    void header() override {
        std::string names = "|", rule = "|";
        for (const std::string& c : columns_) {
            const int w = width(c);
            names += format(" %*s |", w, display_name(c).c_str());
            rule += " " + std::string(std::abs(w) - 1, '-') + (w > 0 ? ":" : "-") + " |";
        }
        std::fprintf(out_, "%s\n%s\n", names.c_str(), rule.c_str());
    }
    void row(const TestResult& r) override {
        const std::vector<Field> fields = fields_of(r);
        std::string line = "|";
        for (const std::string& c : columns_) {
            int w = width(c);
            if (c == "t/s") ++w;  // "±" is two bytes
            line += format(" %*s |", w, value(c, r, fields).c_str());
        }
        std::fprintf(out_, "%s\n", line.c_str());
    }
    void footer() override { std::fprintf(out_, "\nbuild: %s (0)\n", build_commit().c_str()); }

private:
    static int width(const std::string& c) {
        if (c == "model") return -30;
        if (c == "t/s") return 20;
        if (c == "size" || c == "params") return 10;
        if (c == "n_gpu_layers" || c == "flash_attn") return 3;
        if (c == "n_threads" || c == "n_batch") return 7;
        if (c == "n_ubatch") return 8;
        if (c == "test") return 15;
        const int w = std::max<int>(c.size(), 10);
        return c == "backend" || c == "tensor_buft_overrides" ? -w : w;  // text left, numbers right
    }
    static std::string display_name(const std::string& c) {
        if (c == "n_gpu_layers") return "ngl";
        if (c == "n_threads") return "threads";
        if (c == "flash_attn") return "fa";
        if (c == "tensor_buft_overrides") return "ot";
        return c;
    }
    static std::string value(const std::string& c, const TestResult& r, const std::vector<Field>& fields) {
        constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;
        if (c == "model") return r.model.type;
        if (c == "size")
            return r.model.size < kGiB ? format("%.2f MiB", r.model.size / 1024.0 / 1024.0)
                                       : format("%.2f GiB", r.model.size / kGiB);
        if (c == "params")
            return r.model.n_params < 1e9 ? format("%.2f M", r.model.n_params / 1e6)
                                          : format("%.2f B", r.model.n_params / 1e9);
        if (c == "backend") return r.gpu_info.empty() ? "CPU" : "CUDA";
        if (c == "test") return test_name(r.test.n_prompt, r.test.n_gen, r.test.n_depth);
        // glmoe's own setting: a markdown column only (the other formats keep llama.cpp's fields).
        if (c == "gpu_expert_share") return r.test.gpu_expert_share < 0 ? "default" : format("%.2f", r.test.gpu_expert_share);
        if (c == "t/s") {
            const std::vector<double> ts = r.samples_ts();
            return format("%.2f ± %.2f", mean(ts), stddev(ts));
        }
        for (const Field& f : fields)
            if (c == f.name) return f.value;
        return "";
    }
    std::vector<std::string> columns_;
};

}  // namespace

std::vector<double> TestResult::samples_ts() const {
    std::vector<double> ts;
    for (uint64_t ns : samples_ns) ts.push_back(1e9 * (test.n_prompt + test.n_gen) / ns);
    return ts;
}

std::string test_name(int n_prompt, int n_gen, int n_depth) {
    std::string name = n_gen == 0     ? "pp" + std::to_string(n_prompt)
                       : n_prompt == 0 ? "tg" + std::to_string(n_gen)
                                       : "pp" + std::to_string(n_prompt) + "+tg" + std::to_string(n_gen);
    return n_depth > 0 ? name + " @ d" + std::to_string(n_depth) : name;
}

std::unique_ptr<Printer> make_printer(OutputFormat format, FILE* out, const BenchParams& params) {
    switch (format) {
        case OutputFormat::Markdown: return std::make_unique<MarkdownPrinter>(out, params);
        case OutputFormat::Csv: return std::make_unique<CsvPrinter>(out);
        case OutputFormat::Json: return std::make_unique<JsonPrinter>(out);
        case OutputFormat::Jsonl: return std::make_unique<JsonlPrinter>(out);
        case OutputFormat::None: break;
    }
    return nullptr;
}

void print_sweep_header(FILE* out, OutputFormat format, const SweepSettings& s) {
    if (format != OutputFormat::Markdown) return;
    std::fprintf(out, "\nn_kv_max = %d, n_batch = %d, n_ubatch = %d, flash_attn = %d, n_gpu_layers = %d, n_threads = %d\n\n",
                 s.n_kv_max, s.n_batch, s.n_ubatch, s.flash_attn, s.n_gpu_layers, s.n_threads);
    std::fprintf(out, "|%6s | %6s | %6s | %8s | %8s | %8s | %8s |\n", "PP", "TG", "N_KV", "T_PP s", "S_PP t/s", "T_TG s",
                 "S_TG t/s");
    std::fprintf(out, "|%s-|-%s-|-%s-|-%s-|-%s-|-%s-|-%s-|\n", "------", "------", "------", "--------", "--------",
                 "--------", "--------");
}

void print_sweep_step(FILE* out, OutputFormat format, const SweepSettings& s, const SweepStep& st) {
    if (format == OutputFormat::Jsonl) {
        // ik_llama.cpp's fields, then which runtime and file, for plots that mix runtimes.
        std::fprintf(out,
                     "{\"n_kv_max\": %d, \"n_batch\": %d, \"n_ubatch\": %d, \"flash_attn\": %d, \"n_gpu_layers\": %d, "
                     "\"n_threads\": %d, \"n_threads_batch\": %d, \"pp\": %d, \"tg\": %d, \"n_kv\": %d, \"t_pp\": %f, "
                     "\"speed_pp\": %f, \"t_tg\": %f, \"speed_tg\": %f, \"build_commit\": %s, \"model_filename\": %s}\n",
                     s.n_kv_max, s.n_batch, s.n_ubatch, s.flash_attn, s.n_gpu_layers, s.n_threads, s.n_threads, st.pp,
                     st.tg, st.n_kv, st.t_pp_s, st.speed_pp(), st.t_tg_s, st.speed_tg(),
                     json_string(build_commit()).c_str(), json_string(s.model_filename).c_str());
    } else {
        std::fprintf(out, "|%6d | %6d | %6d | %8.3f | %8.2f | %8.3f | %8.2f |\n", st.pp, st.tg, st.n_kv, st.t_pp_s,
                     st.speed_pp(), st.t_tg_s, st.speed_tg());
    }
    std::fflush(out);
}

}  // namespace glmoe::bench
