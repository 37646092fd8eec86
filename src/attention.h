// Causal attention of a batch of query tokens over their sequences' KV cells, on the CPU.
// The result row of a query token depends only on that token's q and its visible cells: it is
// bitwise the same whatever else is in the batch and however many threads run it, so that a
// batch (e.g. speculative-decoding drafts) gives the same output as its tokens one at a time.
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "thread_pool.h"

namespace glmoe {

// Which cells each query token sees, shared by all layers of a batch.
struct AttentionPlan {
    // seq_cells[s]: the cells of sequence s (any order), for every s in seq[];
    // cell_pos(c): the position held by cell c. A token sees its sequence's cells at positions <= its own.
    void build(int64_t n_tokens, const int32_t* pos, const int32_t* seq,
               const std::vector<std::vector<int32_t>>& seq_cells, const std::function<int32_t(int32_t)>& cell_pos);

    struct Run {
        int64_t first, n;  // tokens order[first, first + n): one sequence's tokens, by position
    };
    std::vector<Run> runs;
    std::vector<int32_t> order;        // batch tokens grouped by sequence
    std::vector<int32_t> cells;        // each sequence's cells, sorted by position
    std::vector<int64_t> cells_begin;  // per batch token: where its sequence's cells start in `cells`
    std::vector<int64_t> n_visible;    // per batch token: how many of them it sees (a prefix)
};

// One layer's K or V rows as stored: cell c's n_head_kv * head_dim values of `type` (f32, f16, bf16,
// q8_0 or q4_0: GGML ids; blocks run along the whole row) at (const uint8_t*)data + c * row_bytes.
struct KVRowsView {
    const void* data;
    uint32_t type;
    size_t row_bytes;
};

struct AttentionLayer {
    const float* q;  // [n_tokens][n_head * head_dim], roped
    float* out;      // [n_tokens][n_head * head_dim]
    int n_head, n_head_kv, head_dim;  // q head h reads kv head h / (n_head / n_head_kv)
    float scale;
    KVRowsView k_cache, v_cache;
};

// out = softmax(q k^T * scale) v per q head, over the visible cells. A token that sees no cell gets 0.
void attention(ThreadPool& pool, const AttentionPlan& plan, const AttentionLayer& layer);

// y[i] = exp(x[i]) with the kernel's vectorized exp (for tests and other softmaxes).
void vec_exp(const float* x, float* y, int64_t n);

}  // namespace glmoe
