// matmul(): argument checks, activation quantization, and the split of rows x tokens over the
// thread pool. The per-type arithmetic lives in matmul_float.cpp, matmul_q32.cpp and
// matmul_kquants.cpp; builds without AVX2 use a portable dequantize-then-dot path.
#include <algorithm>
#include <atomic>
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

// Splits rows x tokens into work items handed out dynamically (other processes share the cores).
// With many tokens, rows come in chunks small enough that a chunk of weight rows stays in L2
// while every token tile of the chunk passes over it. With one tile of tokens (decode) the weights
// are streamed once, so each thread gets long contiguous runs of rows that the hardware
// prefetchers can follow (about 8 chunks per thread keep the dynamic balance).
// Tokens are split only when there are too few row chunks.
void run_chunks(ThreadPool& pool, ChunkFn fn, const MatmulJob& job, int64_t n_rows, int64_t n_tokens) {
    const int n_threads = pool.size();
    const int64_t max_rows_per_chunk = n_tokens <= kMaxTile ? std::max<int64_t>(16, n_rows / (8 * n_threads)) : 16;
    const int64_t rows_per_chunk = std::clamp<int64_t>((n_rows + n_threads - 1) / n_threads, 1, max_rows_per_chunk);
    const int64_t n_row_chunks = (n_rows + rows_per_chunk - 1) / rows_per_chunk;
    int64_t n_token_groups = 1;
    if (n_row_chunks < 2 * n_threads) {
        const int64_t max_groups = (n_tokens + kMaxTile - 1) / kMaxTile;
        n_token_groups = std::min<int64_t>(max_groups, (2 * n_threads + n_row_chunks - 1) / n_row_chunks);
    }
    // Token groups are whole tiles so that tiling does not depend on the split.
    const int64_t tiles = (n_tokens + kMaxTile - 1) / kMaxTile;
    const int64_t tokens_per_group = (tiles + n_token_groups - 1) / n_token_groups * kMaxTile;
    const int64_t n_items = n_row_chunks * n_token_groups;
    std::atomic<int64_t> next{0};
    auto worker = [&](int) {
        for (int64_t item = next++; item < n_items; item = next++) {
            const int64_t rc = item % n_row_chunks, tg = item / n_row_chunks;
            const int64_t t0 = tg * tokens_per_group;
            if (t0 >= n_tokens) continue;
            fn(job, rc * rows_per_chunk, std::min(n_rows, (rc + 1) * rows_per_chunk), t0,
               std::min(n_tokens, t0 + tokens_per_group));
        }
    };
    // Work of a few tens of microseconds is not worth waking the pool for: the hand-off costs as
    // much, and far more when the machine has more runnable threads than cores.
    const bool small = n_rows * job.k * n_tokens < (int64_t{1} << 18);
    if (n_threads == 1 || n_items == 1 || small)
        worker(0);
    else
        pool.run(worker);
}

#if defined(__AVX2__) && defined(__FMA__)

// Reused across calls on the same calling thread, so decode steps do not allocate.
thread_local std::vector<char> act_buffer;

// quantize(x_row, out_row) for every token.
template <class Quantize>
const char* quantize_activations(ThreadPool& pool, Quantize quantize, size_t row_bytes, const float* x,
                                 int64_t ldx, int64_t n_tokens) {
    act_buffer.resize(row_bytes * n_tokens);
    char* base = act_buffer.data();
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

void matmul(ThreadPool& pool, uint32_t type, const void* W, int64_t n_rows, int64_t k, const float* x,
            int64_t ldx, int64_t n_tokens, float* y, int64_t ldy, bool f32_activations) {
    check_args(type, W, n_rows, k, x, ldx, n_tokens, y, ldy);
    if (n_rows == 0 || n_tokens == 0) return;
    MatmulJob job{type, static_cast<const char*>(W), row_bytes(type, k), k, nullptr, 0, y, ldy};
#if defined(__AVX2__) && defined(__FMA__)
    if (!f32_activations) {
    ChunkFn fn = nullptr;
    switch (type) {
        case GGML_TYPE_F32: fn = chunk_f32; break;
        case GGML_TYPE_F16: fn = chunk_f16; break;
        case GGML_TYPE_BF16: fn = chunk_bf16; break;
        case GGML_TYPE_Q8_0: fn = chunk_q8_0; break;
        case GGML_TYPE_Q4_0: fn = chunk_q4_0; break;
        case GGML_TYPE_Q5_0: fn = chunk_q5_0; break;
        case GGML_TYPE_Q4_K: fn = chunk_q4_k; break;
        case GGML_TYPE_Q5_K: fn = chunk_q5_k; break;
        case GGML_TYPE_Q6_K: fn = chunk_q6_k; break;
    }
    switch (type) {
        case GGML_TYPE_F32: case GGML_TYPE_F16: case GGML_TYPE_BF16:
            job.act = reinterpret_cast<const char*>(x);
            job.act_row_bytes = static_cast<size_t>(ldx) * sizeof(float);
            break;
        case GGML_TYPE_Q8_0: case GGML_TYPE_Q4_0: case GGML_TYPE_Q5_0:
            job.act_row_bytes = (k / QK32 + 1) / 2 * sizeof(ActQ8x2);
            job.act = quantize_activations(pool, [k](const float* xr, char* out) {
                quantize_act_q8x2(xr, reinterpret_cast<ActQ8x2*>(out), k);
            }, job.act_row_bytes, x, ldx, n_tokens);
            break;
        default: {
            const bool interleaved = type != GGML_TYPE_Q6_K;
            job.act_row_bytes = k / QK_K * sizeof(ActQ8K);
            job.act = quantize_activations(pool, [k, interleaved](const float* xr, char* out) {
                quantize_act_q8k(xr, reinterpret_cast<ActQ8K*>(out), k, interleaved);
            }, job.act_row_bytes, x, ldx, n_tokens);
            break;
        }
    }
    run_chunks(pool, fn, job, n_rows, n_tokens);
    return;
    }
#endif
    job.act = reinterpret_cast<const char*>(x);
    job.act_row_bytes = static_cast<size_t>(ldx) * sizeof(float);
    run_chunks(pool, chunk_dequantized, job, n_rows, n_tokens);
}

}  // namespace glmoe
