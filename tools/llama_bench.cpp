// llama-bench: prompt-processing (ppN), generation (tgN) and combined (ppN+tgM) speed, optionally at a
// KV-cache depth, with llama.cpp's llama-bench flags and output, so both runtimes share one table.
// Results go to stdout; progress and notes to stderr.
#include <algorithm>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "bench_args.h"
#include "bench_output.h"
#include "bench_runner.h"
#include "context.h"
#include "devices.h"
#include "model.h"

using namespace glmoe;
using namespace glmoe::bench;

namespace {

class Progress {
public:
    Progress(bool detailed, size_t n_tests) : detailed_(detailed), n_tests_(n_tests) {}
    void start(size_t index, const TestInstance& t) {
        index_ = index;
        std::fprintf(stderr, "llama-bench: test %zu/%zu: %s\n", index + 1, n_tests_,
                     test_name(t.n_prompt, t.n_gen, t.n_depth).c_str());
    }
    // Phases within a test, only with --progress (as llama.cpp).
    void phase(const char* what, int rep = 0, int reps = 0) const {
        if (!detailed_) return;
        if (reps) std::fprintf(stderr, "llama-bench: test %zu/%zu: %s %d/%d\n", index_ + 1, n_tests_, what, rep, reps);
        else std::fprintf(stderr, "llama-bench: test %zu/%zu: %s\n", index_ + 1, n_tests_, what);
    }

private:
    bool detailed_;
    size_t n_tests_, index_ = 0;
};

// As llama.cpp: an untimed warm-up, then the depth filled once (untimed) and kept; each repetition
// times the prompt then the generation on top of it and removes them again.
TestResult run_test(const Model& model, const ModelInfo& info, const TestInstance& t, const BenchParams& p,
                    const Progress& progress) {
    ContextParams cp;
    cp.n_ctx = t.n_depth + t.n_prompt + t.n_gen;
    cp.n_threads = t.n_threads;
    cp.n_gpu_layers = t.n_gpu_layers;
    cp.tensor_overrides = test_overrides(t);
    cp.n_ubatch = std::min(t.n_batch, t.n_ubatch);
    cp.type_k = t.type_k;
    cp.type_v = t.type_v;
    cp.gpu_expert_share = t.gpu_expert_share;
    Context ctx(model, cp);
    if (p.verbose)
        std::fprintf(stderr, "llama-bench: n_ctx %d, n_threads %d, prompt chunk %d\n", t.n_depth + t.n_prompt + t.n_gen,
                     ctx.n_threads(), std::min(t.n_batch, t.n_ubatch));
    if (p.verbose) std::fprintf(stderr, "%s", ctx.placement_summary().c_str());
    // -ngl 1 (the output head) or -ot ...=CUDA0 use the GPU with no layer's attention on it.
    const bool on_gpu = ctx.placement().uses(Device::gpu);
    TestResult r{t, info, ctx.n_threads(), ctx.n_gpu_layers(), on_gpu ? cuda_device_name() : "", ctx.kv_type_k_name(),
                 ctx.kv_type_v_name(), utc_now(), {}};
    // The physical batch bounds what one decode call sees, as llama.cpp's ubatch does.
    const int chunk = std::min(t.n_batch, t.n_ubatch);
    TokenSource tokens(model.hparams().n_vocab);
    std::vector<float> logits;
    if (p.delay_s > 0) sleep_s(p.delay_s);

    if (!p.no_warmup) {
        progress.phase("warmup");
        if (t.n_prompt > 0) decode_prompt(ctx, t.n_prompt, 0, chunk, tokens, logits);
        if (t.n_gen > 0) decode_generation(ctx, 1, t.n_prompt, tokens, logits);
        ctx.kv_cache().clear();
    }
    if (t.n_depth > 0) {
        progress.phase("depth fill");
        decode_prompt(ctx, t.n_depth, 0, chunk, tokens, logits);
    }
    for (int rep = 1; rep <= p.reps; ++rep) {
        ctx.kv_cache().seq_rm(0, t.n_depth, -1);
        progress.phase("run", rep, p.reps);
        const uint64_t t0 = now_ns();
        if (t.n_prompt > 0) decode_prompt(ctx, t.n_prompt, t.n_depth, chunk, tokens, logits);
        if (t.n_gen > 0) decode_generation(ctx, t.n_gen, t.n_depth + t.n_prompt, tokens, logits);
        r.samples_ns.push_back(now_ns() - t0);
    }
    return r;
}

}  // namespace

int main(int argc, char** argv) {
    BenchParams params;
    try {
        params = parse_bench_args(argc, argv);
    } catch (const UsageError& e) {
        std::fprintf(stderr, "error: %s\n\n%s", e.what(), kBenchUsage);
        return 2;
    }
    if (params.help) {
        std::fputs(kBenchUsage, stdout);
        return 0;
    }
    const std::vector<TestInstance> tests = expand_tests(params);
    const bool ot_gpu = overrides_ask_for_gpu(params.tensor_overrides);
    for (int ngl : params.n_gpu_layers) note_cpu_only(ngl, ot_gpu);

    std::vector<std::unique_ptr<Printer>> printers;
    if (auto out = make_printer(params.output, stdout, params)) printers.push_back(std::move(out));
    if (auto err = make_printer(params.output_err, stderr, params)) printers.push_back(std::move(err));
    for (auto& pr : printers) pr->header();

    Progress progress(params.progress, tests.size());
    std::unique_ptr<Model> model;
    bool model_locks = false;  // the mode's ask (file().locked() is false where mlock failed)
    ModelInfo info;
    try {
        for (size_t i = 0; i < tests.size(); ++i) {
            const TestInstance& t = tests[i];
            // Tests of one model are adjacent, and of one load mode within it.
            const bool maps = load_mode_maps(t.load_mode), locks = load_mode_locks(t.load_mode);
            if (!model || info.filename != t.model || maps != model->file().mapped() || locks != model_locks) {
                model.reset();
                model = Model::load(t.model, maps, locks);
                model_locks = locks;
                info = model_info(*model, t.model);
                if (params.verbose) std::fprintf(stderr, "llama-bench: %s\n", model->description().c_str());
            }
            progress.start(i, t);
            const TestResult r = run_test(*model, info, t, params, progress);
            for (auto& pr : printers) pr->row(r);
            std::fflush(stdout);  // a row per test as it finishes, even into a pipe
        }
    } catch (const std::exception& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    for (auto& pr : printers) pr->footer();
    return 0;
}
