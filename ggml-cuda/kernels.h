// Host-side entry points of the CUDA kernels. Every function only enqueues work on `stream`:
// none synchronises or copies to the host, so a decode step built from them can be captured as
// one CUDA graph. Pointers are device pointers unless a comment says otherwise. Shapes are in
// elements; "rows" of a weight are its output features, each of `cols` (= ne[0]) inputs.
#pragma once
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace glmoe::cuda {

// A weight matrix (or a stack of expert matrices) in its GGUF type, bytes as in the file.
struct WeightView {
    const void* data = nullptr;
    uint32_t type = 0;        // GGMLType
    int64_t rows = 0;         // ne[1]
    int64_t cols = 0;         // ne[0]
    size_t row_bytes = 0;
    size_t matrix_bytes = 0;  // stride between stacked (expert) matrices
    explicit operator bool() const { return data != nullptr; }
};

// The experts of one MoE layer: routed experts 0..n_routed-1 in `routed`, and, when `shared` is
// set, the shared expert as expert index n_routed (fused shared expert: same launch, its own type).
struct ExpertSet {
    WeightView routed;
    WeightView shared;
    int n_routed = 0;
};

// Activations quantized for integer dot products, 32 values a block: x ~= d * q, s = d * sum(q).
struct BlockQ8 {
    float d;
    float s;
    int8_t q[32];
};
static_assert(sizeof(BlockQ8) == 40, "BlockQ8 layout");

// ---- activations -------------------------------------------------------------------------------
// out[r] = quantized x[r * x_stride .. + cols], for r < n_rows; cols % 32 == 0.
void quantize_q8(const float* x, int64_t n_rows, int64_t cols, int64_t x_stride, BlockQ8* out, cudaStream_t s);

// ---- decode: matrix x few vectors (n_tok in 1..kMaxMmvTokens) -------------------------------------
constexpr int kMaxMmvTokens = 8;
// Whether mmv reads x_q8 (quantized types) or x_f32 (F32/F16/BF16 weights).
bool mmv_wants_q8(uint32_t type);
// y[t * y_stride + r] (+)= sum_c W[r][c] * x[t][c].   x_f32 rows are `cols` apart; x_q8 rows are
// cols/32 blocks apart. accumulate: add to y instead of overwriting (fuses the residual add).
void mmv(const WeightView& w, const float* x_f32, const BlockQ8* x_q8, int n_tok, float* y, int64_t y_stride,
         bool accumulate, cudaStream_t s);
// Routed experts: for token t and slot j < n_slots, expert e = ids[t * n_slots + j] (e == n_routed:
// the shared expert) gives y[(t * n_slots + j) * rows + r] = sum_c W_e[r][c] * x[in][c], where
// in = t when !x_per_slot, else t * n_slots + j. All (token, slot) pairs in one launch.
void mmv_experts(const ExpertSet& w, const float* x_f32, const BlockQ8* x_q8, bool x_per_slot, const int32_t* ids,
                 int n_tok, int n_slots, float* y, cudaStream_t s);
// Fused gate/up of a SwiGLU FFN: out[t * n_slots + j][r] = silu(G_e x) * (U_e x), experts as in
// mmv_experts (input per token). Dense FFN: pass ids == nullptr, n_slots == 1 and expert sets
// holding just the one matrix (n_routed = 1, ids treated as all zero).
void mmv_swiglu(const ExpertSet& gate, const ExpertSet& up, const float* x_f32, const BlockQ8* x_q8,
                const int32_t* ids, int n_tok, int n_slots, float* out, cudaStream_t s);

// ---- prefill: matrix x many tokens (tensor cores) ------------------------------------------------
// y[t * y_stride + r] (+)= sum_c W[r][c] * x[t * cols + c], t < n.
void mm(const WeightView& w, const float* x, int64_t n, float* y, int64_t y_stride, bool accumulate,
        cudaStream_t s);
// mm with the columns split into up to `slices` slices (whole staged spans) run by blocks of their
// own, for few tokens and long rows (mm alone gives such a matrix one block per 128 rows, each
// walking every column). Slice partials go to scratch (>= slices * n * rows floats), then are
// added in slice order into y. The slicing depends on cols and slices alone.
void mm_split(const WeightView& w, const float* x, int64_t n, float* y, int64_t y_stride, bool accumulate,
              int slices, float* scratch, cudaStream_t s);
// The same in exact f32 for F32/F16/BF16 weights (the MoE router): f32 FMA over column slices
// set by cols alone, summed in a fixed order, so a token's result does not depend on n.
void mm_float(const WeightView& w, const float* x, int64_t n, float* y, int64_t y_stride, bool accumulate,
              cudaStream_t s);
// Tokens grouped by expert: expert e (e == n_routed: shared) handles pairs
// p in [offsets[e], offsets[e+1]) with y[dst_row[p] * rows + r] = sum_c W_e[r][c] * x[src_row[p] * cols + c].
// offsets has n_routed + 2 entries (device); max_pairs_per_expert is a host-side bound used to
// size the grid (no count is read back).
void mm_experts(const ExpertSet& w, const float* x, const int32_t* offsets, const int32_t* src_row,
                const int32_t* dst_row, int64_t max_pairs_per_expert, float* y, cudaStream_t s);

// ---- attention ---------------------------------------------------------------------------------
// KV cache of one layer: k_cache/v_cache [n_cells] rows of kv_width = n_head_kv * head_dim values
// of type_k / type_v: F16, BF16, or Q8_0 / Q4_0 (llama.cpp's 32-value blocks along the whole row, as the
// CPU stores them: kv_row_bytes). Quantized rows are dequantized to f16 in shared memory as a tile
// arrives (a value q * d rounded to f16 once), so they cost what f16 rows cost past the load.
// Query token t attends to cells[cell_start[t] .. cell_start[t] + n_visible[t]) (the host lists a
// sequence's cells in position order, so causality is a prefix). q, out: [n_tok][n_head * head_dim].
struct AttentionArgs {
    const float* q = nullptr;
    const void* k_cache = nullptr;
    const void* v_cache = nullptr;
    uint32_t type_k = 1, type_v = 1;      // GGML ids (1: F16)
    const int32_t* cells = nullptr;
    const int32_t* cell_start = nullptr;  // [n_tok]
    const int32_t* n_visible = nullptr;   // [n_tok], each >= 1
    float* out = nullptr;
    int n_tok = 0;
    int n_head = 0;
    int n_head_kv = 0;
    int head_dim = 0;                     // 64, 128 or 256 in files we load; kernels may require % 32 == 0
    int max_visible = 0;                  // host bound on n_visible: sizes the split over the KV length
    float scale = 1.0f;
    // Floats from one query row to the next, a multiple of 4 (16-byte float4 loads); 0: packed,
    // n_head * head_dim. Lets the kernels read q straight out of the fused qkv rows.
    int64_t q_stride = 0;
};
// Few query tokens, each possibly of another sequence (decode, drafts). Uses `scratch` (device,
// attention_decode_scratch_bytes) for partial results of the split over the KV length. A token's
// output does not depend on the other tokens of a launch of up to 8 (batch invariance).
// Whether the attention kernels and qkv_prepare store / read KV rows of this type (F16, BF16, Q8_0,
// Q4_0).
bool kv_type_supported(uint32_t type);
// Bytes of one KV row of `width` values of `type` (a supported type; width a multiple of 32).
int64_t kv_row_bytes(uint32_t type, int64_t width);
size_t attention_decode_scratch_bytes(int n_tok, int n_head, int n_head_kv, int head_dim, int max_visible);
void attention_decode(const AttentionArgs& a, float* scratch, cudaStream_t s);
// Many query tokens of one sequence (prompt chunk): all share cell_start[0]; n_visible may differ.
// cells may be null: the rows are then the cache's first rows in order (kv_rows_to_f16's output).
void attention_prefill(const AttentionArgs& a, cudaStream_t s);
// out (f16, [max_visible][width]) row i = cache row cells[cell_start[0] + i] of `type` converted to
// f16 (each value q * d rounded once, as the kernels' tiles hold it), for i < max(n_visible[0..n_tok));
// rows past that are left as they are. One pass over a prompt chunk's visible rows, which the f16
// prefill kernel then reads (cells null) instead of every block converting every tile again.
void kv_rows_to_f16(const void* cache, uint32_t type, int64_t width, const int32_t* cells, const int32_t* cell_start,
                    const int32_t* n_visible, int n_tok, int max_visible, void* out, cudaStream_t s);

// ---- element-wise and small ops (ops.cu) ---------------------------------------------------------
// out[i][:] = dequantized row ids[i] of the embedding table.
void get_rows(const WeightView& table, const int32_t* ids, int n, float* out, cudaStream_t s);
// out[t] = x[t] / rms(x[t]) * w (out may equal x).
void rms_norm(const float* x, const float* w, int64_t n, int64_t cols, float eps, float* out, cudaStream_t s);
// rms_norm that also writes the result quantized for mmv (as quantize_q8 would); cols % 32 == 0.
void rms_norm_q8(const float* x, const float* w, int64_t n, int64_t cols, float eps, float* out, BlockQ8* out_q8,
                 cudaStream_t s);
// Adds bias (nullable), per-head rms norm (norm weights nullable) and neox rope on the first
// n_rot dims of q and k heads, then stores k and v into the cache rows cells[t], in type_k /
// type_v (AttentionArgs): F16 rounded to nearest, Q8_0 / Q4_0 blocks rounded as the CPU's
// quantize_row (bit for bit the bytes the CPU backend would store).
// qkv: [n][(n_head + 2 * n_head_kv) * head_dim] (q, then k, then v), updated in place (q part).
struct QKVArgs {
    float* qkv = nullptr;
    const float* bias = nullptr;    // same width as a qkv row, or null
    const float* q_norm = nullptr;  // [head_dim] or null
    const float* k_norm = nullptr;
    const int32_t* pos = nullptr;
    const int32_t* cells = nullptr;
    void* k_cache = nullptr;
    void* v_cache = nullptr;
    uint32_t type_k = 1, type_v = 1;  // GGML ids (1: F16)
    int n = 0, n_head = 0, n_head_kv = 0, head_dim = 0, n_rot = 0;
    float eps = 1e-5f, freq_base = 10000.0f;
};
void qkv_prepare(const QKVArgs& a, cudaStream_t s);
// dst[at[i]] = values[i] for i < n where at[i] >= 0 (all on the device; distinct targets).
void scatter_values(const int32_t* at, const int32_t* values, int n, int32_t* dst, cudaStream_t s);
// dst[i][:] = src[rows[i]][:] for i < n (rows on the device).
void gather_rows(const float* src, const int32_t* rows, int n, int64_t cols, float* dst, cudaStream_t s);
// out[i] = silu(g[i]) * u[i].
void swiglu(const float* g, const float* u, int64_t n, float* out, cudaStream_t s);
// MoE routing (DESIGN.md §3) from router logits [n][n_expert]: writes ids [n][n_slots] and weights
// [n][n_slots]; n_slots = n_used, plus 1 with fuse_shared (last slot: expert n_expert, weight 1).
struct RouteArgs {
    const float* logits = nullptr;
    const float* bias = nullptr;  // exp_probs_b [n_expert]
    int32_t* ids = nullptr;
    float* weights = nullptr;
    int n = 0, n_expert = 0, n_used = 0, n_groups = 1, n_group_used = 1;
    bool norm = false, fuse_shared = false;
    float scale = 1.0f;
};
void moe_route(const RouteArgs& a, cudaStream_t s);
// Groups (token, slot) pairs by expert for mm_experts: offsets [n_expert_total + 1],
// src_row (= token), dst_row (= token * n_slots + slot). counts: scratch [n_expert_total].
void moe_group(const int32_t* ids, int n, int n_slots, int n_expert_total, int32_t* counts, int32_t* offsets,
               int32_t* src_row, int32_t* dst_row, cudaStream_t s);
// out[t] (+)= sum_j weights[t][j] * y[t * n_slots + j][:].
void moe_combine(const float* y, const float* weights, int n, int n_slots, int64_t cols, float* out,
                 bool accumulate, cudaStream_t s);

// ---- sampling (sample.cu) ------------------------------------------------------------------------
// Per output row: greedy (temperature <= 0) or top_k -> top_p -> min_p -> temperature -> draw with
// the uniform number u[row] (drawn on the host, uploaded with the step's inputs).
struct SampleParams {
    float temperature = 0.0f;
    int top_k = 0;
    float top_p = 1.0f;
    float min_p = 0.0f;
};
void sample_tokens(const float* logits, int n_rows, int n_vocab, const SampleParams& p, const float* u,
                   int32_t* out_ids, cudaStream_t s);

// ---- per-row sampling (sample_rows.cu) -----------------------------------------------------------
// The CPU Sampler's whole chain (src/sampling.cpp) per row, each row with its own parameters:
// logit bias -> repeat/presence/frequency penalties over the row's history window -> top_k ->
// typical_p -> top_p -> min_p -> temperature -> draw with u. typical_p < 1 needs at most
// kRowSampleMaxCandidates tokens after top_k (the kernel sorts them in shared memory); a row
// beyond that gets id -2, so callers route such rows elsewhere.
constexpr int kRowSampleMaxCandidates = 2048;
constexpr int kRowSampleMaxTop = 20;  // top logprobs per row
struct RowSampleParams {
    double u = 0;                 // the draw in [0, 1); unused when greedy
    double log_min_p = 0;         // std::log(min_p) from the host, so the cut is the CPU's exactly
    float temperature = 0;        // <= 0: greedy
    float top_p = 1, min_p = 0, typical_p = 1;
    float repeat_penalty = 1, presence_penalty = 0, frequency_penalty = 0;
    int32_t top_k = 0;
    int32_t repeat_last_n = 0;    // -1: the whole history
    int32_t hist_begin = 0;       // the row's history: history[hist_begin, hist_begin + hist_len)
    int32_t hist_len = 0;
    int32_t append = 0;           // 1: the sampled id goes to history[hist_begin + hist_len]
    int32_t bias_begin = 0, bias_count = 0;  // its entries of the logit-bias array
    int32_t n_top = 0;            // most likely raw-logit tokens to report (<= kRowSampleMaxTop)
    int32_t skip = 0;             // 1: not sampled here (its logits go to the host)
};
struct LogitBiasEntry {
    int32_t token;
    float bias;
};
// id: the token (-1: every logit -inf, nothing to sample); logprob: its log-softmax under the raw logits.
struct SampledToken {
    int32_t id;
    float logprob;
};
// logits: n_rows raw rows; work / counts: scratch of the same shape (counts all zero before and
// after); log_norm: n_rows. top: n_rows x kRowSampleMaxTop (most likely first, id -1 past the end),
// written only when any_top. All pointers are device memory.
void sample_rows(const float* logits, float* work, int32_t* counts, double* log_norm, int n_rows, int n_vocab,
                 const RowSampleParams* params, const LogitBiasEntry* bias, int32_t* history, SampledToken* out,
                 SampledToken* top, bool any_top, cudaStream_t s);
// Token feedback between overlapped decode steps: tokens[i] < 0 becomes sampled[-1 - tokens[i]].id,
// the token an earlier step sampled in that row (0 when it sampled none, id -1; the host drops that
// row's output). tokens: n entries, device memory, rewritten in place.
void resolve_tokens(int32_t* tokens, int n, const SampledToken* sampled, cudaStream_t s);

// Checks the last launch; throws std::runtime_error naming `what`.
void check_launch(const char* what);

// ---- accuracy mode (dequantize_matrix.cu) ---------------------------------------------------------
// out[r * w.cols + c] = row first_row + r of w dequantized to f32, for r < n_rows (packed rows of
// w.cols floats), bit-exact with the CPU / gguf-py dequantization; every type mmv supports. Lets a
// forward in f32 activations multiply exactly: dequantize into scratch, then mm_float on an F32
// view of it. One matrix: for expert e of a stack pass a view at data + e * matrix_bytes.
// n_rows == 0 enqueues nothing; a range outside [0, w.rows) throws std::invalid_argument.
void dequantize_matrix(const WeightView& w, int64_t first_row, int64_t n_rows, float* out, cudaStream_t s);

}  // namespace glmoe::cuda
