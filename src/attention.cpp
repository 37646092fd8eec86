// Blocked online-softmax attention with the rows (query token x q head) in vector lanes.
//
// A task takes up to kMaxRowVecs vectors' worth of rows of one sequence and one kv head, and walks
// that sequence's cells (sorted by position) in chunks of kChunk: K and V of a chunk are read once
// for all its rows. Q is kept transposed ([d][row]) so that a score is a chain of FMAs of one lane
// against a broadcast K element; the running max, sum and output accumulator ([d][row]) are per
// lane too. Every row therefore goes through the same operations in the same order whatever its
// lane, its block or the thread, which makes the results batch and thread-count invariant.
//
// K and V rows of another type than f32 are dequantized, a chunk's cells at a time and only the
// blocks that hold the task's kv head, into f32 scratch that the same tiles then read: a cell's
// values do not depend on the task that reads them, so invariance holds for every type.
#include "attention.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>

#include "ggml_types.h"
#include "quants.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
// GCC 12's AVX-512 intrinsics trip these warnings on their own internals (GCC bug 105593).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#endif

namespace glmoe {

namespace {

// exp(x) = 2^n exp(r), n = round(x / ln2), r = x - n ln2 in [-ln2/2, ln2/2] (ln2 in two parts so
// r is exact), exp(r) by its Taylor series to r^7: truncation error < 0.05 ulp, so the result is
// within about 1 ulp (rounding in Horner's scheme). Below -104 the result rounds to 0.
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693145751953125f, kLn2Lo = 1.42860682030941723212e-6f;
constexpr float kExpMin = -104.0f, kExpMax = 89.0f;
constexpr float kTaylor[8] = {1.0f, 1.0f, 1.0f / 2, 1.0f / 6, 1.0f / 24, 1.0f / 120, 1.0f / 720, 1.0f / 5040};
constexpr float kInf = std::numeric_limits<float>::infinity();

#if defined(__AVX512F__)
using V = __m512;
constexpr int W = 16;
inline V load(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, V v) { _mm512_storeu_ps(p, v); }
inline V set1(float x) { return _mm512_set1_ps(x); }
inline V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline V mul(V a, V b) { return _mm512_mul_ps(a, b); }
inline V sub(V a, V b) { return _mm512_sub_ps(a, b); }
inline V add(V a, V b) { return _mm512_add_ps(a, b); }
inline V max(V a, V b) { return _mm512_max_ps(a, b); }
// s where j < n_visible, else -inf.
inline V mask_hidden(V s, V n_visible, float j) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(set1(j), n_visible, _CMP_LT_OQ), set1(-kInf), s);
}
inline V exp_v(V x) {
    // max/min return their second operand for NaN, so NaN goes through.
    x = _mm512_min_ps(set1(kExpMax), _mm512_max_ps(set1(kExpMin), x));
    const V n = _mm512_roundscale_ps(mul(x, set1(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    V r = _mm512_fnmadd_ps(n, set1(kLn2Hi), x);
    r = _mm512_fnmadd_ps(n, set1(kLn2Lo), r);
    V p = set1(kTaylor[7]);
    for (int i = 6; i >= 0; --i) p = fmadd(p, r, set1(kTaylor[i]));
    return _mm512_scalef_ps(p, n);  // handles the subnormal and overflow ends
}
#elif defined(__AVX2__)
using V = __m256;
constexpr int W = 8;
inline V load(const float* p) { return _mm256_loadu_ps(p); }
inline void store(float* p, V v) { _mm256_storeu_ps(p, v); }
inline V set1(float x) { return _mm256_set1_ps(x); }
inline V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V mul(V a, V b) { return _mm256_mul_ps(a, b); }
inline V sub(V a, V b) { return _mm256_sub_ps(a, b); }
inline V add(V a, V b) { return _mm256_add_ps(a, b); }
inline V max(V a, V b) { return _mm256_max_ps(a, b); }
inline V mask_hidden(V s, V n_visible, float j) {
    return _mm256_blendv_ps(set1(-kInf), s, _mm256_cmp_ps(set1(j), n_visible, _CMP_LT_OQ));
}
// 2^n for integral n in [-126, 127], from the exponent bits.
inline V pow2(V n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
inline V exp_v(V x) {
    x = _mm256_min_ps(set1(kExpMax), _mm256_max_ps(set1(kExpMin), x));
    const V n = _mm256_round_ps(mul(x, set1(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    V r = _mm256_fnmadd_ps(n, set1(kLn2Hi), x);
    r = _mm256_fnmadd_ps(n, set1(kLn2Lo), r);
    V p = set1(kTaylor[7]);
    for (int i = 6; i >= 0; --i) p = fmadd(p, r, set1(kTaylor[i]));
    // n is in [-150, 128]: scaling by 2^(n/2) then 2^(n - n/2) keeps both factors normal and
    // rounds only once, at the end (subnormal results included).
    const V n1 = _mm256_floor_ps(mul(n, set1(0.5f)));
    return mul(mul(p, pow2(n1)), pow2(sub(n, n1)));
}
#else
using V = float;
constexpr int W = 1;
inline V load(const float* p) { return *p; }
inline void store(float* p, V v) { *p = v; }
inline V set1(float x) { return x; }
inline V fmadd(V a, V b, V c) { return std::fma(a, b, c); }
inline V mul(V a, V b) { return a * b; }
inline V sub(V a, V b) { return a - b; }
inline V add(V a, V b) { return a + b; }
inline V max(V a, V b) { return std::max(a, b); }
inline V mask_hidden(V s, V n_visible, float j) { return j < n_visible ? s : -kInf; }
inline V exp_v(V x) { return std::exp(x); }
#endif

constexpr int kMaxRowVecs = 4;   // rows of a task: up to 4 vectors (64 with AVX-512)
constexpr int kChunk = 64;       // cells per online-softmax step; fixed, so the arithmetic is too
constexpr int kAccRegs = W == 8 ? 8 : 16;  // register tiles stay within the register file

struct Scratch {
    std::vector<float> qt, acc, p;  // [head_dim][rows], [head_dim][rows], [kChunk][rows]
    std::vector<float> rows;        // [kChunk][span]: a chunk's K (then V) values, when not stored as f32
    const float* k[kChunk];
    const float* v[kChunk];
};

// Where kv head kvh's values lie in a stored row: the whole blocks that hold them, and the
// head's first value within those.
struct HeadSpan {
    size_t byte_offset;  // of the first block
    int64_t n_values;    // in the blocks
    int64_t skip;        // values before the head's first
};

HeadSpan head_span(uint32_t type, int kvh, int D) {
    const TypeTraits& tr = type_traits(type);
    const int64_t first = static_cast<int64_t>(kvh) * D, bs = tr.block_size;
    const int64_t b0 = first / bs, b1 = (first + D + bs - 1) / bs;
    return {static_cast<size_t>(b0) * tr.type_size, (b1 - b0) * bs, first - b0 * bs};
}

// out[j] = kv head kvh of cell cells[j], j < nc, as f32: into the rows themselves for f32, else
// dequantized into `buf` ([nc][span.n_values]).
void head_values(const KVRowsView& rows, const HeadSpan& span, int kvh, int D, const int32_t* cells, int nc,
                 float* buf, const float** out) {
    const uint8_t* base = static_cast<const uint8_t*>(rows.data);
    if (rows.type == GGML_TYPE_F32) {
        for (int j = 0; j < nc; ++j)
            out[j] = reinterpret_cast<const float*>(base + cells[j] * rows.row_bytes) + static_cast<int64_t>(kvh) * D;
        return;
    }
    for (int j = 0; j < nc; ++j) {
        float* dst = buf + j * span.n_values;
        dequantize_row(rows.type, base + cells[j] * rows.row_bytes + span.byte_offset, dst, span.n_values);
        out[j] = dst + span.skip;
    }
}

// p[j][rows] = q . k_j for NJ cells, q pre-scaled and transposed.
template <int RV, int NJ>
inline void scores_tile(const float* qt, const float* const* k, int D, float* p) {
    constexpr int RW = RV * W;
    V acc[NJ][RV];
    for (int j = 0; j < NJ; ++j)
        for (int rv = 0; rv < RV; ++rv) acc[j][rv] = set1(0.0f);
    for (int d = 0; d < D; ++d) {
        V q[RV];
        for (int rv = 0; rv < RV; ++rv) q[rv] = load(qt + d * RW + rv * W);
        for (int j = 0; j < NJ; ++j) {
            const V kd = set1(k[j][d]);
            for (int rv = 0; rv < RV; ++rv) acc[j][rv] = fmadd(q[rv], kd, acc[j][rv]);
        }
    }
    for (int j = 0; j < NJ; ++j)
        for (int rv = 0; rv < RV; ++rv) store(p + j * RW + rv * W, acc[j][rv]);
}

// acc[d0 .. d0+DT][rows] = acc * alpha + sum_j p_j v_j[d], j in cell order.
template <int RV, int DT>
inline void pv_tile(float* acc, const V* alpha, const float* p, const float* const* v, int nc, int d0) {
    constexpr int RW = RV * W;
    V a[DT][RV];
    for (int t = 0; t < DT; ++t)
        for (int rv = 0; rv < RV; ++rv) a[t][rv] = mul(load(acc + (d0 + t) * RW + rv * W), alpha[rv]);
    for (int j = 0; j < nc; ++j) {
        V pj[RV];
        for (int rv = 0; rv < RV; ++rv) pj[rv] = load(p + j * RW + rv * W);
        for (int t = 0; t < DT; ++t) {
            const V vd = set1(v[j][d0 + t]);
            for (int rv = 0; rv < RV; ++rv) a[t][rv] = fmadd(vd, pj[rv], a[t][rv]);
        }
    }
    for (int t = 0; t < DT; ++t)
        for (int rv = 0; rv < RV; ++rv) store(acc + (d0 + t) * RW + rv * W, a[t][rv]);
}

// Rows [r0, r1) of a run, row r being q head (kvh * G + r % G) of the run's token r / G.
template <int RV>
void attend_rows(const AttentionPlan& plan, const AttentionLayer& L, const AttentionPlan::Run& run, int64_t r0,
                 int64_t r1, int kvh, Scratch& s) {
    constexpr int RW = RV * W;
    constexpr int NJ = std::max(1, kAccRegs / RV), DT = std::max(1, kAccRegs / RV);
    const int D = L.head_dim, G = L.n_head / L.n_head_kv;
    const int64_t q_width = static_cast<int64_t>(L.n_head) * D;
    const HeadSpan k_span = head_span(L.k_cache.type, kvh, D), v_span = head_span(L.v_cache.type, kvh, D);
    s.rows.resize(static_cast<size_t>(kChunk) * std::max(k_span.n_values, v_span.n_values));
    s.qt.assign(static_cast<size_t>(D) * RW, 0.0f);
    s.acc.assign(static_cast<size_t>(D) * RW, 0.0f);
    s.p.resize(static_cast<size_t>(kChunk) * RW);

    alignas(64) float n_visible[RW] = {};
    int64_t n_cells = 0;
    const int32_t* cells = nullptr;
    for (int64_t r = r0; r < r1; ++r) {
        const int32_t t = plan.order[run.first + r / G];
        const int lane = static_cast<int>(r - r0);
        const float* q = L.q + t * q_width + static_cast<int64_t>(kvh * G + r % G) * D;
        for (int d = 0; d < D; ++d) s.qt[d * RW + lane] = q[d] * L.scale;
        n_visible[lane] = static_cast<float>(plan.n_visible[t]);
        n_cells = std::max(n_cells, plan.n_visible[t]);
        cells = plan.cells.data() + plan.cells_begin[t];
    }

    V nvis[RV], m[RV], l[RV];
    for (int rv = 0; rv < RV; ++rv) {
        nvis[rv] = load(n_visible + rv * W);
        m[rv] = set1(-kInf);
        l[rv] = set1(0.0f);
    }
    for (int64_t c0 = 0; c0 < n_cells; c0 += kChunk) {
        const int nc = static_cast<int>(std::min<int64_t>(kChunk, n_cells - c0));
        head_values(L.k_cache, k_span, kvh, D, cells + c0, nc, s.rows.data(), s.k);
        int j = 0;
        for (; j + NJ <= nc; j += NJ) scores_tile<RV, NJ>(s.qt.data(), s.k + j, D, s.p.data() + j * RW);
        for (; j < nc; ++j) scores_tile<RV, 1>(s.qt.data(), s.k + j, D, s.p.data() + j * RW);

        // Hide cells past each row's prefix, then rescale to the new running max. A row that sees
        // none of the chunk keeps its max, so alpha = 1 and p = 0 leave its state exactly as is.
        V chunk_max[RV];
        for (int rv = 0; rv < RV; ++rv) chunk_max[rv] = set1(-kInf);
        for (int jj = 0; jj < nc; ++jj)
            for (int rv = 0; rv < RV; ++rv) {
                float* pj = s.p.data() + jj * RW + rv * W;
                const V sc = mask_hidden(load(pj), nvis[rv], static_cast<float>(c0 + jj));
                store(pj, sc);
                chunk_max[rv] = max(chunk_max[rv], sc);
            }
        V alpha[RV];
        for (int rv = 0; rv < RV; ++rv) {
            // Lanes that have seen no cell yet (padding) subtract a finite value, not -inf - -inf.
            const V m_new = max(max(m[rv], chunk_max[rv]), set1(-std::numeric_limits<float>::max()));
            alpha[rv] = exp_v(sub(m[rv], m_new));
            m[rv] = m_new;
            l[rv] = mul(l[rv], alpha[rv]);
        }
        for (int jj = 0; jj < nc; ++jj)
            for (int rv = 0; rv < RV; ++rv) {
                float* pj = s.p.data() + jj * RW + rv * W;
                const V e = exp_v(sub(load(pj), m[rv]));
                store(pj, e);
                l[rv] = add(l[rv], e);
            }

        // K's scratch is no longer needed: V's values take its place.
        head_values(L.v_cache, v_span, kvh, D, cells + c0, nc, s.rows.data(), s.v);
        int d = 0;
        for (; d + DT <= D; d += DT) pv_tile<RV, DT>(s.acc.data(), alpha, s.p.data(), s.v, nc, d);
        for (; d < D; ++d) pv_tile<RV, 1>(s.acc.data(), alpha, s.p.data(), s.v, nc, d);
    }

    alignas(64) float sum[RW];
    for (int rv = 0; rv < RV; ++rv) store(sum + rv * W, l[rv]);
    for (int64_t r = r0; r < r1; ++r) {
        const int32_t t = plan.order[run.first + r / G];
        const int lane = static_cast<int>(r - r0);
        float* out = L.out + t * q_width + static_cast<int64_t>(kvh * G + r % G) * D;
        for (int d = 0; d < D; ++d) out[d] = sum[lane] > 0.0f ? s.acc[d * RW + lane] / sum[lane] : 0.0f;
    }
}

}  // namespace

void AttentionPlan::build(int64_t n_tokens, const int32_t* pos, const int32_t* seq,
                          const std::vector<std::vector<int32_t>>& seq_cells,
                          const std::function<int32_t(int32_t)>& cell_pos) {
    runs.clear();
    order.clear();
    cells.clear();
    cells_begin.assign(n_tokens, 0);
    n_visible.assign(n_tokens, 0);
    std::vector<int32_t> seqs;
    for (int64_t t = 0; t < n_tokens; ++t)
        if (std::find(seqs.begin(), seqs.end(), seq[t]) == seqs.end()) seqs.push_back(seq[t]);

    std::vector<std::pair<int32_t, int32_t>> by_pos;  // (position, cell)
    std::vector<int32_t> sorted_pos;
    for (int32_t s : seqs) {
        by_pos.clear();
        for (int32_t c : seq_cells[s]) by_pos.emplace_back(cell_pos(c), c);
        std::sort(by_pos.begin(), by_pos.end());
        const int64_t begin = static_cast<int64_t>(cells.size());
        sorted_pos.clear();
        for (const auto& [p, c] : by_pos) {
            cells.push_back(c);
            sorted_pos.push_back(p);
        }
        const int64_t first = static_cast<int64_t>(order.size());
        for (int64_t t = 0; t < n_tokens; ++t)
            if (seq[t] == s) order.push_back(static_cast<int32_t>(t));
        // By position, so that a block's rows see nearly the same prefix.
        std::stable_sort(order.begin() + first, order.end(), [&](int32_t a, int32_t b) { return pos[a] < pos[b]; });
        for (auto it = order.begin() + first; it != order.end(); ++it) {
            cells_begin[*it] = begin;
            n_visible[*it] = std::upper_bound(sorted_pos.begin(), sorted_pos.end(), pos[*it]) - sorted_pos.begin();
        }
        runs.push_back({first, static_cast<int64_t>(order.size()) - first});
    }
}

void attention(ThreadPool& pool, const AttentionPlan& plan, const AttentionLayer& layer) {
    const int G = layer.n_head / layer.n_head_kv;
    constexpr int64_t kMaxRows = kMaxRowVecs * W;
    struct Block {
        const AttentionPlan::Run* run;
        int64_t r0, r1, n_cells;
    };
    std::vector<Block> blocks;
    for (const AttentionPlan::Run& run : plan.runs)
        for (int64_t r0 = 0; r0 < run.n * G; r0 += kMaxRows) {
            const int64_t r1 = std::min(run.n * G, r0 + kMaxRows);
            blocks.push_back({&run, r0, r1, plan.n_visible[plan.order[run.first + (r1 - 1) / G]]});
        }
    // Longest first, so that the dynamic schedule ends evenly.
    std::stable_sort(blocks.begin(), blocks.end(), [](const Block& a, const Block& b) { return a.n_cells > b.n_cells; });

    const int64_t n_tasks = static_cast<int64_t>(blocks.size()) * layer.n_head_kv;
    int64_t work = 0;  // query rows x visible cells x head_dim, summed
    for (const Block& b : blocks) work += (b.r1 - b.r0) * b.n_cells * layer.head_dim * layer.n_head_kv;
    std::atomic<int64_t> next{0};
    auto worker = [&](int) {
        thread_local Scratch scratch;
        for (int64_t task; (task = next.fetch_add(1)) < n_tasks;) {
            const Block& b = blocks[task / layer.n_head_kv];
            const int kvh = static_cast<int>(task % layer.n_head_kv);
            switch ((b.r1 - b.r0 + W - 1) / W) {
                case 1: attend_rows<1>(plan, layer, *b.run, b.r0, b.r1, kvh, scratch); break;
                case 2: attend_rows<2>(plan, layer, *b.run, b.r0, b.r1, kvh, scratch); break;
                case 3: attend_rows<3>(plan, layer, *b.run, b.r0, b.r1, kvh, scratch); break;
                default: attend_rows<4>(plan, layer, *b.run, b.r0, b.r1, kvh, scratch); break;
            }
        }
    };
    // Small layers run on the calling thread: waking the pool would cost more than the work.
    if (work < (int64_t{1} << 18))
        worker(0);
    else
        pool.run(worker);
}

void vec_exp(const float* x, float* y, int64_t n) {
    int64_t i = 0;
    for (; i + W <= n; i += W) store(y + i, exp_v(load(x + i)));
    for (; i < n; ++i) {
        alignas(64) float lane[W] = {x[i]};
        store(lane, exp_v(load(lane)));
        y[i] = lane[0];
    }
}

}  // namespace glmoe
