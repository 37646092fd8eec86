// glmoe._core.attention and vec_exp: the CPU attention kernel on numpy arrays, for tests.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "attention.h"
#include "ggml_types.h"
#include "thread_pool.h"

namespace nb = nanobind;
using namespace glmoe;

namespace {

using F32In = nb::ndarray<const float, nb::c_contig, nb::device::cpu>;
using I32In = nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using F32Out = nb::ndarray<nb::numpy, float>;

// q [n_tokens, n_head * head_dim]; k_cache, v_cache [n_cells, n_head_kv * head_dim]; cell i holds
// position cell_pos[i] of sequence cell_seq[i]; query t is at pos[t] of seq[t].
F32Out attention_py(const F32In& q, const F32In& k_cache, const F32In& v_cache, const I32In& cell_pos,
                    const I32In& cell_seq, const I32In& pos, const I32In& seq, int n_head, int n_head_kv,
                    int n_threads) {
    if (q.ndim() != 2 || k_cache.ndim() != 2 || v_cache.ndim() != 2) throw nb::value_error("q, k, v must be 2-d");
    const int64_t n_tokens = q.shape(0), n_cells = k_cache.shape(0);
    if (n_head <= 0 || n_head_kv <= 0 || n_head % n_head_kv != 0 || q.shape(1) % n_head != 0)
        throw nb::value_error("bad head counts");
    const int head_dim = static_cast<int>(q.shape(1) / n_head);
    if (k_cache.shape(1) != static_cast<size_t>(n_head_kv) * head_dim || v_cache.shape(0) != k_cache.shape(0) ||
        v_cache.shape(1) != k_cache.shape(1) || cell_pos.shape(0) != static_cast<size_t>(n_cells) ||
        cell_seq.shape(0) != static_cast<size_t>(n_cells) || pos.shape(0) != static_cast<size_t>(n_tokens) ||
        seq.shape(0) != static_cast<size_t>(n_tokens))
        throw nb::value_error("array shapes disagree");
    std::vector<std::vector<int32_t>> seq_cells;
    for (int64_t c = 0; c < n_cells; ++c) {
        const int32_t s = cell_seq.data()[c];
        if (s < 0) throw nb::value_error("cell_seq must be >= 0");
        if (static_cast<size_t>(s) >= seq_cells.size()) seq_cells.resize(s + 1);
        seq_cells[s].push_back(static_cast<int32_t>(c));
    }
    for (int64_t t = 0; t < n_tokens; ++t) {
        const int32_t s = seq.data()[t];
        if (s < 0) throw nb::value_error("seq must be >= 0");
        if (static_cast<size_t>(s) >= seq_cells.size()) seq_cells.resize(s + 1);
    }

    float* out = new float[q.size()];
    nb::capsule owner(out, [](void* p) noexcept { delete[] static_cast<float*>(p); });
    {
        nb::gil_scoped_release release;
        AttentionPlan plan;
        const int32_t* cp = cell_pos.data();
        plan.build(n_tokens, pos.data(), seq.data(), seq_cells, [cp](int32_t c) { return cp[c]; });
        const size_t row_bytes = sizeof(float) * n_head_kv * head_dim;
        AttentionLayer layer{q.data(), out, n_head, n_head_kv, head_dim, 1.0f / std::sqrt(static_cast<float>(head_dim)),
                             {k_cache.data(), GGML_TYPE_F32, row_bytes}, {v_cache.data(), GGML_TYPE_F32, row_bytes}};
        ThreadPool pool(n_threads);
        attention(pool, plan, layer);
    }
    return F32Out(out, {static_cast<size_t>(n_tokens), q.shape(1)}, owner);
}

F32Out vec_exp_py(const F32In& x) {
    float* y = new float[x.size()];
    nb::capsule owner(y, [](void* p) noexcept { delete[] static_cast<float*>(p); });
    vec_exp(x.data(), y, static_cast<int64_t>(x.size()));
    return F32Out(y, {x.size()}, owner);
}

}  // namespace

void bind_attention(nb::module_& m) {
    m.def("attention", &attention_py, nb::arg("q"), nb::arg("k_cache"), nb::arg("v_cache"), nb::arg("cell_pos"),
          nb::arg("cell_seq"), nb::arg("pos"), nb::arg("seq"), nb::arg("n_head"), nb::arg("n_head_kv"),
          nb::arg("n_threads") = 1, "The engine's CPU attention kernel (scale 1/sqrt(head_dim)); returns out.");
    m.def("vec_exp", &vec_exp_py, nb::arg("x"), "exp of a float32 array (flattened) with the attention kernel's exp.");
}
