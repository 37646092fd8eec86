// llama-bench: prompt-processing (ppN) and generation (tgN) speed, printed as llama.cpp's
// llama-bench prints it so both can share one table.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "context.h"
#include "model.h"

using namespace glmoe;

namespace {

struct Options {
    std::string model;
    std::vector<int> n_prompt = {512};
    std::vector<int> n_gen = {128};
    int n_batch = 2048;
    int threads = 0;
    int reps = 5;
};

[[noreturn]] void usage(const char* msg) {
    std::fprintf(stderr, "error: %s\nusage: llama-bench -m MODEL.gguf [-p N[,N..]] [-n N[,N..]] [-b N] [-t N] [-r N]\n", msg);
    std::exit(2);
}

int parse_int(const std::string& s, const char* flag) {
    try {
        size_t used = 0;
        const int v = std::stoi(s, &used);
        if (used != s.size() || v < 0) throw std::invalid_argument(s);
        return v;
    } catch (const std::exception&) {
        usage((std::string("bad value for ") + flag + ": '" + s + "'").c_str());
    }
}

std::vector<int> parse_list(const std::string& s, const char* flag) {
    std::vector<int> out;
    size_t start = 0;
    while (start <= s.size()) {
        const size_t comma = s.find(',', start);
        out.push_back(parse_int(s.substr(start, comma - start), flag));
        if (comma == std::string::npos) break;
        start = comma + 1;
    }
    return out;
}

Options parse(int argc, char** argv) {
    Options o;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        auto value = [&]() -> std::string {
            if (i + 1 >= argc) usage(("missing value for " + a).c_str());
            return argv[++i];
        };
        if (a == "-m" || a == "--model") o.model = value();
        else if (a == "-p" || a == "--n-prompt") o.n_prompt = parse_list(value(), "-p");
        else if (a == "-n" || a == "--n-gen") o.n_gen = parse_list(value(), "-n");
        else if (a == "-b" || a == "--batch-size") o.n_batch = std::max(1, parse_int(value(), "-b"));
        else if (a == "-t" || a == "--threads") o.threads = parse_int(value(), "-t");
        else if (a == "-r" || a == "--repetitions") o.reps = std::max(1, parse_int(value(), "-r"));
        else usage(("unknown argument: " + a).c_str());
    }
    if (o.model.empty()) usage("-m is required");
    return o;
}

double now_s() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

void run_prompt(Context& ctx, const std::vector<int32_t>& tokens, int n_batch, std::vector<float>& logits) {
    for (size_t start = 0; start < tokens.size(); start += n_batch) {
        const size_t n = std::min<size_t>(n_batch, tokens.size() - start);
        Batch b;
        for (size_t i = 0; i < n; ++i) {
            b.token.push_back(tokens[start + i]);
            b.pos.push_back(static_cast<int32_t>(start + i));
            b.seq.push_back(0);
            b.want_logits.push_back(i + 1 == n);
        }
        ctx.decode(b, logits);
    }
}

void run_gen(Context& ctx, int n_gen, int32_t first, std::vector<float>& logits) {
    int32_t tok = first;
    for (int i = 0; i < n_gen; ++i) {
        ctx.decode(Batch{{tok}, {i}, {0}, {1}}, logits);
        tok = static_cast<int32_t>(i % 100);  // speed does not depend on which token follows
    }
}

}  // namespace

int main(int argc, char** argv) {
    const Options o = parse(argc, argv);
    std::unique_ptr<Model> model;
    try {
        model = Model::load(o.model);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    const HParams& hp = model->hparams();
    int max_ctx = 1;
    for (int p : o.n_prompt) max_ctx = std::max(max_ctx, p);
    for (int g : o.n_gen) max_ctx = std::max(max_ctx, g);
    Context ctx(*model, ContextParams{max_ctx, o.threads});
    std::mt19937 rng(42);
    std::uniform_int_distribution<int32_t> tok(0, hp.n_vocab - 1);
    std::vector<float> logits;

    const double gib = model->n_bytes() / (1024.0 * 1024.0 * 1024.0);
    std::printf("| model | size | params | backend | threads | test | t/s |\n");
    std::printf("| --- | ---: | ---: | --- | ---: | ---: | ---: |\n");
    auto row = [&](const std::string& test, const std::vector<double>& ts) {
        double mean = 0, sd = 0;
        for (double t : ts) mean += t / ts.size();
        for (double t : ts) sd += (t - mean) * (t - mean);
        sd = ts.size() > 1 ? std::sqrt(sd / (ts.size() - 1)) : 0.0;
        std::printf("| glm4moe %dL | %.2f GiB | %.2f B | CPU | %d | %s | %.2f ± %.2f |\n", hp.n_layer, gib,
                    model->n_params() / 1e9, ctx.n_threads(), test.c_str(), mean, sd);
        std::fflush(stdout);
    };
    for (int p : o.n_prompt) {
        if (p == 0) continue;
        std::vector<int32_t> prompt(p);
        for (auto& t : prompt) t = tok(rng);
        run_prompt(ctx, prompt, o.n_batch, logits);  // warm-up
        std::vector<double> ts;
        for (int r = 0; r < o.reps; ++r) {
            ctx.kv_cache().clear();
            const double t0 = now_s();
            run_prompt(ctx, prompt, o.n_batch, logits);
            ts.push_back(p / (now_s() - t0));
        }
        ctx.kv_cache().clear();
        row("pp" + std::to_string(p), ts);
    }
    for (int g : o.n_gen) {
        if (g == 0) continue;
        run_gen(ctx, 1, tok(rng), logits);  // warm-up
        std::vector<double> ts;
        for (int r = 0; r < o.reps; ++r) {
            ctx.kv_cache().clear();
            const double t0 = now_s();
            run_gen(ctx, g, tok(rng), logits);
            ts.push_back(g / (now_s() - t0));
        }
        ctx.kv_cache().clear();
        row("tg" + std::to_string(g), ts);
    }
    return 0;
}
