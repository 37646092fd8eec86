// llama-sweep-bench: speed against context depth, as ik_llama.cpp's llama-sweep-bench. The context is
// filled one prompt chunk (-ub tokens) at a time; at each depth N_KV it times -n generated tokens
// (then removes them) and the next chunk of prompt, until the context is full.
// Results go to stdout; progress and notes to stderr.
#include <algorithm>
#include <cstdio>
#include <memory>
#include <vector>

#include "bench_args.h"
#include "bench_output.h"
#include "bench_runner.h"
#include "context.h"
#include "model.h"

using namespace glmoe;
using namespace glmoe::bench;

int main(int argc, char** argv) {
    SweepParams p;
    try {
        p = parse_sweep_args(argc, argv);
    } catch (const UsageError& e) {
        std::fprintf(stderr, "error: %s\n\n%s", e.what(), kSweepUsage);
        return 2;
    }
    if (p.help) {
        std::fputs(kSweepUsage, stdout);
        return 0;
    }
    note_cpu_only(p.n_gpu_layers, overrides_ask_for_gpu(p.tensor_overrides));
    try {
        const std::unique_ptr<Model> model = Model::load(p.model, p.use_mmap, p.use_mlock);
        if (p.verbose)
            std::fprintf(stderr, "llama-sweep-bench: %s (%s%s)\n", model->description().c_str(),
                         model->file().mapped() ? "mapped" : "read into memory",
                         model->file().locked() ? ", locked in RAM" : "");
        ContextParams cp;
        cp.n_ctx = p.n_ctx;
        cp.n_threads = p.n_threads;
        cp.n_gpu_layers = p.n_gpu_layers;
        cp.tensor_overrides = overrides_from_flags(p.tensor_overrides, p.cpu_moe, p.n_cpu_moe);
        cp.n_ubatch = std::min(p.n_batch, p.n_ubatch);
        cp.type_k = p.type_k;
        cp.type_v = p.type_v;
        Context ctx(*model, cp);
        if (p.verbose) std::fprintf(stderr, "%s", ctx.placement_summary().c_str());
        TokenSource tokens(model->hparams().n_vocab);
        std::vector<float> logits;
        const int chunk = std::min(p.n_batch, p.n_ubatch);
        const int pp = p.n_ubatch, tg = p.n_gen;
        const SweepSettings settings{p.n_ctx, p.n_batch, p.n_ubatch, p.flash_attn, p.n_gpu_layers, ctx.n_threads(), p.model};

        if (p.warmup) {
            decode_generation(ctx, 1, 0, tokens, logits);
            ctx.kv_cache().clear();
        }
        print_sweep_header(stdout, p.output, settings);
        // A step needs room for its prompt chunk and its generated tokens on top of N_KV.
        const int n_steps = (p.n_ctx - std::max(pp, tg)) / pp + 1;
        for (int step = 0; step < n_steps; ++step) {
            const int n_kv = step * pp;
            std::fprintf(stderr, "llama-sweep-bench: step %d/%d: N_KV = %d\n", step + 1, n_steps, n_kv);
            uint64_t t0 = now_ns();
            for (int rep = 0; rep < p.reps; ++rep) {
                ctx.kv_cache().seq_rm(0, n_kv, -1);
                decode_generation(ctx, tg, n_kv, tokens, logits);
            }
            const double t_tg = (now_ns() - t0) * 1e-9 / p.reps;
            t0 = now_ns();
            for (int rep = 0; rep < p.reps; ++rep) {
                ctx.kv_cache().seq_rm(0, n_kv, -1);
                decode_prompt(ctx, pp, n_kv, chunk, tokens, logits);
            }
            const double t_pp = (now_ns() - t0) * 1e-9 / p.reps;
            print_sweep_step(stdout, p.output, settings, SweepStep{pp, tg, n_kv, t_pp, t_tg});
        }
    } catch (const std::exception& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    return 0;
}
