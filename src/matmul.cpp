// matmul(): argument checks, activation quantization, and the split of rows x tokens over the
// thread pool. The per-type arithmetic lives in matmul_float.cpp, matmul_q32.cpp and
// matmul_kquants.cpp; builds without AVX2 use a portable dequantize-then-dot path.
#include <algorithm>
#include <atomic>
#include <deque>
#include <stdexcept>
#include <string>
#include <vector>

#include "matmul_tiles.h"
#include "quantize_act.h"
#include "quants.h"
#include "vec.h"

namespace glmoe {
namespace {

void check_args(uint32_t type, const void* W, int64_t n_rows, int64_t k, const float* x, int64_t ldx,
                int64_t n_tokens, const float* y, int64_t ldy) {
    const TypeTraits& tr = type_traits(type);
    if (!tr.supported) throw std::invalid_argument("matmul: unsupported weight type " + type_name(type));
    if (k <= 0 || k % tr.block_size != 0)
        throw std::invalid_argument("matmul: k = " + std::to_string(k) + " is not a positive multiple of the " +
                                    tr.name + " block size");
    if (n_rows < 0 || n_tokens < 0) throw std::invalid_argument("matmul: negative dimension");
    if (ldx < k || ldy < n_rows) throw std::invalid_argument("matmul: leading dimension too small");
    if (n_rows > 0 && n_tokens > 0 && (!W || !x || !y)) throw std::invalid_argument("matmul: null pointer");
}

// How one matmul's rows x tokens are cut into work items (handed out dynamically: other processes
// share the cores). With many tokens, rows come in chunks small enough that a chunk of weight rows
// stays in L2 while every token tile of the chunk passes over it. With one tile of tokens (decode)
// the weights are streamed once, so each thread gets long contiguous runs of rows that the
// hardware prefetchers can follow (about 8 chunks per thread keep the dynamic balance). Tokens
// are split only when there are too few row chunks. (Results do not depend on the cut.)
struct Plan {
    ChunkFn fn;
    MatmulJob job;
    int64_t n_rows, n_tokens, rows_per_chunk, n_row_chunks, tokens_per_group, n_items;

    Plan(ChunkFn f, const MatmulJob& j, int64_t rows, int64_t tokens, int n_threads)
        : fn(f), job(j), n_rows(rows), n_tokens(tokens) {
        const int64_t max_rows_per_chunk = n_tokens <= kMaxTile ? std::max<int64_t>(16, n_rows / (8 * n_threads)) : 16;
        rows_per_chunk = std::clamp<int64_t>((n_rows + n_threads - 1) / n_threads, 1, max_rows_per_chunk);
        n_row_chunks = (n_rows + rows_per_chunk - 1) / rows_per_chunk;
        int64_t n_token_groups = 1;
        if (n_row_chunks < 2 * n_threads) {
            const int64_t max_groups = (n_tokens + kMaxTile - 1) / kMaxTile;
            n_token_groups = std::min<int64_t>(max_groups, (2 * n_threads + n_row_chunks - 1) / n_row_chunks);
        }
        // Token groups are whole tiles so that tiling does not depend on the split.
        const int64_t tiles = (n_tokens + kMaxTile - 1) / kMaxTile;
        tokens_per_group = (tiles + n_token_groups - 1) / n_token_groups * kMaxTile;
        n_items = n_row_chunks * n_token_groups;
    }
    void run_item(int64_t item) const {
        const int64_t rc = item % n_row_chunks, tg = item / n_row_chunks;
        const int64_t t0 = tg * tokens_per_group;
        if (t0 >= n_tokens) return;
        fn(job, rc * rows_per_chunk, std::min(n_rows, (rc + 1) * rows_per_chunk), t0,
           std::min(n_tokens, t0 + tokens_per_group));
    }
    int64_t work() const { return n_rows * job.k * n_tokens; }
};

// Runs the items of every plan in one loop of the pool.
void run_plans(ThreadPool& pool, const std::vector<Plan>& plans, const std::function<void()>* caller_first) {
    int64_t n_items = 0, work = 0;
    for (const Plan& p : plans) {
        n_items += p.n_items;
        work += p.work();
    }
    std::atomic<int64_t> next{0};
    auto worker = [&](int) {
        size_t plan = 0;
        int64_t first = 0;  // items before plans[plan]
        for (int64_t item = next++; item < n_items; item = next++) {
            while (item >= first + plans[plan].n_items) first += plans[plan++].n_items;
            plans[plan].run_item(item - first);
        }
    };
    // Work of a few tens of microseconds is not worth waking the pool for: the hand-off costs as
    // much, and far more when the machine has more runnable threads than cores.
    const bool small = work < (int64_t{1} << 18);
    if (pool.size() == 1 || n_items == 1 || small) {
        if (caller_first) (*caller_first)();
        worker(0);
    } else {
        pool.run(worker, caller_first);
    }
}

#if defined(__AVX2__) && defined(__FMA__)

// quantize(x_row, out_row) for every token, into buf.
template <class Quantize>
const char* quantize_activations(ThreadPool& pool, Quantize quantize, size_t row_bytes, const float* x,
                                 int64_t ldx, int64_t n_tokens, std::vector<char>& buf) {
    buf.resize(row_bytes * n_tokens);
    char* base = buf.data();
    auto quantize_range = [&](int64_t t0, int64_t t1, int) {
        for (int64_t t = t0; t < t1; ++t) quantize(x + t * ldx, base + t * row_bytes);
    };
    if (n_tokens < 4 || pool.size() == 1 || n_tokens * row_bytes < (size_t{1} << 16))
        quantize_range(0, n_tokens, 0);
    else
        pool.parallel_for(n_tokens, quantize_range);
    return base;
}

#endif

// Each weight row is dequantized once and dotted with every token in f32: the portable path, and
// the f32-activation mode (no 8-bit rounding of activations) on every build.
void chunk_dequantized(const MatmulJob& job, int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
    thread_local std::vector<float> w;
    w.resize(job.k);
    for (int64_t r = r0; r < r1; ++r) {
        dequantize_row(job.type, job.W + r * job.w_row_bytes, w.data(), job.k);
        for (int64_t t = t0; t < t1; ++t) {
            const float* xt = reinterpret_cast<const float*>(job.act + t * job.act_row_bytes);
            job.y[t * job.ldy + r] = vec_dot(w.data(), xt, job.k);
        }
    }
}


}  // namespace

namespace {

// What a kernel reads as activations: the f32 rows themselves, or 8-bit blocks of one of two layouts.
enum class ActFormat { f32, q8x2, q8k, q8k_interleaved };

ActFormat act_format(uint32_t type, bool f32_activations) {
#if defined(__AVX2__) && defined(__FMA__)
    if (f32_activations) return ActFormat::f32;
    switch (type) {
        case GGML_TYPE_Q8_0: case GGML_TYPE_Q4_0: case GGML_TYPE_Q5_0: return ActFormat::q8x2;
        case GGML_TYPE_Q6_K: return ActFormat::q8k;
        case GGML_TYPE_Q4_K: case GGML_TYPE_Q5_K: return ActFormat::q8k_interleaved;
        default: return ActFormat::f32;
    }
#else
    (void)type;
    (void)f32_activations;
    return ActFormat::f32;
#endif
}

ChunkFn chunk_fn(uint32_t type, bool f32_activations) {
#if defined(__AVX2__) && defined(__FMA__)
    if (!f32_activations) switch (type) {
        case GGML_TYPE_F32: return chunk_f32;
        case GGML_TYPE_F16: return chunk_f16;
        case GGML_TYPE_BF16: return chunk_bf16;
        case GGML_TYPE_Q8_0: return chunk_q8_0;
        case GGML_TYPE_Q4_0: return chunk_q4_0;
        case GGML_TYPE_Q5_0: return chunk_q5_0;
        case GGML_TYPE_Q4_K: return chunk_q4_k;
        case GGML_TYPE_Q5_K: return chunk_q5_k;
        case GGML_TYPE_Q6_K: return chunk_q6_k;
    }
#else
    (void)type;
    (void)f32_activations;
#endif
    return chunk_dequantized;
}

// A call's activations in format f: its own rows, or quantized into buf. Sets job.act and
// job.act_row_bytes.
void prepare_activations(ThreadPool& pool, const MatmulCall& c, ActFormat f, std::vector<char>& buf, MatmulJob& job) {
    const int64_t k = c.k;
    switch (f) {
        case ActFormat::f32:
            job.act = reinterpret_cast<const char*>(c.x);
            job.act_row_bytes = static_cast<size_t>(c.ldx) * sizeof(float);
            return;
#if defined(__AVX2__) && defined(__FMA__)
        case ActFormat::q8x2:
            job.act_row_bytes = (k / QK32 + 1) / 2 * sizeof(ActQ8x2);
            job.act = quantize_activations(pool, [k](const float* xr, char* out) {
                quantize_act_q8x2(xr, reinterpret_cast<ActQ8x2*>(out), k);
            }, job.act_row_bytes, c.x, c.ldx, c.n_tokens, buf);
            return;
        case ActFormat::q8k:
        case ActFormat::q8k_interleaved: {
            const bool interleaved = f == ActFormat::q8k_interleaved;
            job.act_row_bytes = k / QK_K * sizeof(ActQ8K);
            job.act = quantize_activations(pool, [k, interleaved](const float* xr, char* out) {
                quantize_act_q8k(xr, reinterpret_cast<ActQ8K*>(out), k, interleaved);
            }, job.act_row_bytes, c.x, c.ldx, c.n_tokens, buf);
            return;
        }
#else
        default: break;
#endif
    }
    (void)pool;
    (void)buf;
}

// Reused across calls on the same calling thread, so decode steps do not allocate; one set per
// nesting level (a matmul_many inside another's caller_first must not overwrite its activations).
thread_local std::deque<std::vector<std::vector<char>>> act_buffers_by_depth;  // grows without moving a level
thread_local int matmul_depth = 0;

}  // namespace

void matmul(ThreadPool& pool, uint32_t type, const void* W, int64_t n_rows, int64_t k, const float* x,
            int64_t ldx, int64_t n_tokens, float* y, int64_t ldy, bool f32_activations) {
    matmul_many(pool, {MatmulCall{type, W, n_rows, k, x, ldx, n_tokens, y, ldy}}, f32_activations);
}

void matmul_many(ThreadPool& pool, const std::vector<MatmulCall>& calls, bool f32_activations,
                 const std::function<void()>* caller_first) {
    if (static_cast<int>(act_buffers_by_depth.size()) <= matmul_depth) act_buffers_by_depth.resize(matmul_depth + 1);
    std::vector<std::vector<char>>& act_buffers = act_buffers_by_depth[matmul_depth];
    if (act_buffers.size() < calls.size()) act_buffers.resize(calls.size());
    struct Nested {
        Nested() { ++matmul_depth; }
        ~Nested() { --matmul_depth; }
    } nested;
    std::vector<Plan> plans;
    std::vector<std::pair<const MatmulCall*, ActFormat>> quantized;  // inputs quantized so far, by plan
    plans.reserve(calls.size());
    for (size_t i = 0; i < calls.size(); ++i) {
        const MatmulCall& c = calls[i];
        check_args(c.type, c.W, c.n_rows, c.k, c.x, c.ldx, c.n_tokens, c.y, c.ldy);
        if (c.n_rows == 0 || c.n_tokens == 0) continue;
        MatmulJob job{c.type, static_cast<const char*>(c.W), row_bytes(c.type, c.k), c.k, nullptr, 0, c.y, c.ldy};
        const ActFormat f = act_format(c.type, f32_activations);
        // Calls reading the same rows in the same format (an expert's gate and up, or q, k and v)
        // share one quantization of them.
        size_t same = 0;
        while (same < quantized.size() && !(quantized[same].second == f && quantized[same].first->x == c.x &&
                                              quantized[same].first->ldx == c.ldx && quantized[same].first->k == c.k &&
                                              quantized[same].first->n_tokens == c.n_tokens))
            ++same;
        if (f != ActFormat::f32 && same < quantized.size()) {
            job.act = plans[same].job.act;
            job.act_row_bytes = plans[same].job.act_row_bytes;
        } else {
            prepare_activations(pool, c, f, act_buffers[i], job);
        }
        plans.emplace_back(chunk_fn(c.type, f32_activations), job, c.n_rows, c.n_tokens, pool.size());
        quantized.emplace_back(&c, f);
    }
    if (!plans.empty()) run_plans(pool, plans, caller_first);
    else if (caller_first) (*caller_first)();
}

}  // namespace glmoe
