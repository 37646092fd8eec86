// glmoe._core.cuda_ops: test entry points of the small ops (ops.cu) and of GPU sampling
// (sample.cu). Each uploads its numpy inputs, poisons the outputs (0xFF bytes: NaN floats, -1
// ints), runs the kernel on the default stream and returns numpy arrays.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "cuda_test_util.h"
#include "ggml_types.h"
#include "kernels.h"
#include "row_sample_params.h"
#include "sampling_args.h"

namespace nb = nanobind;
using namespace glmoe::cuda_test;

namespace {

using F32In = nb::ndarray<const float, nb::c_contig, nb::device::cpu>;
using I32In = nb::ndarray<const int32_t, nb::c_contig, nb::device::cpu>;
using U8In = nb::ndarray<const uint8_t, nb::ndim<2>, nb::c_contig, nb::device::cpu>;

void need(bool ok, const std::string& msg) {
    if (!ok) throw nb::value_error(msg.c_str());
}

size_t dim(const F32In& a, size_t i) { return i < a.ndim() ? a.shape(i) : 0; }

// table: raw rows [n_rows, row_bytes] of `type`, each `cols` elements.
nb::object get_rows_py(uint32_t type, const U8In& table, int64_t cols, const I32In& ids) {
    need(ids.ndim() == 1, "ids must be 1-d");
    DeviceArray<uint8_t> d_table = upload<uint8_t>(table);
    DeviceArray<int32_t> d_ids = upload<int32_t>(ids);
    const size_t n = ids.shape(0);
    DeviceArray<float> d_out(n * cols);
    d_out.fill_bytes(0xFF);
    const glmoe::cuda::WeightView w = view(d_table, type, table.shape(0), cols, table.shape(1));
    glmoe::cuda::get_rows(w, d_ids.get(), static_cast<int>(n), d_out.get(), nullptr);
    return nb::cast(to_numpy(d_out, {n, static_cast<size_t>(cols)}));
}

// Rows [first_row, first_row + n_rows) of a raw [rows, row_bytes] matrix of `type` (each `cols`
// elements) dequantized to f32 by the accuracy-mode kernel: float32 [n_rows, cols].
nb::object dequantize_matrix_py(uint32_t type, const U8In& matrix, int64_t cols, int64_t first_row, int64_t n_rows) {
    need(n_rows >= 0, "n_rows must be >= 0");
    DeviceArray<uint8_t> d_matrix = upload<uint8_t>(matrix);
    DeviceArray<float> d_out(static_cast<size_t>(n_rows) * cols);
    d_out.fill_bytes(0xFF);
    const glmoe::cuda::WeightView w = view(d_matrix, type, matrix.shape(0), cols, matrix.shape(1));
    glmoe::cuda::dequantize_matrix(w, first_row, n_rows, d_out.get(), nullptr);  // bad arguments: ValueError
    return nb::cast(to_numpy(d_out, {static_cast<size_t>(n_rows), static_cast<size_t>(cols)}));
}

nb::object rms_norm_py(const F32In& x, const F32In& w, float eps, bool in_place) {
    need(x.ndim() == 2 && w.ndim() == 1 && w.shape(0) == x.shape(1), "x [n, cols] and w [cols] required");
    const size_t n = x.shape(0), cols = x.shape(1);
    DeviceArray<float> d_x = upload<float>(x);
    DeviceArray<float> d_w = upload<float>(w);
    if (in_place) {
        glmoe::cuda::rms_norm(d_x.get(), d_w.get(), n, cols, eps, d_x.get(), nullptr);
        return nb::cast(to_numpy(d_x, {n, cols}));
    }
    DeviceArray<float> d_out(n * cols);
    d_out.fill_bytes(0xFF);
    glmoe::cuda::rms_norm(d_x.get(), d_w.get(), n, cols, eps, d_out.get(), nullptr);
    return nb::cast(to_numpy(d_out, {n, cols}));
}

// rms_norm with the quantized copy: returns (y, d [n, cols/32], s [n, cols/32], q int8 [n, cols]).
nb::object rms_norm_q8_py(const F32In& x, const F32In& w, float eps) {
    need(x.ndim() == 2 && w.ndim() == 1 && w.shape(0) == x.shape(1), "x [n, cols] and w [cols] required");
    const size_t n = x.shape(0), cols = x.shape(1), nb_ = n * (cols / 32);
    DeviceArray<float> d_x = upload<float>(x);
    DeviceArray<float> d_w = upload<float>(w);
    DeviceArray<float> d_out(n * cols);
    DeviceArray<glmoe::cuda::BlockQ8> d_q8(nb_);
    d_out.fill_bytes(0xFF);
    d_q8.fill_bytes(0xFF);
    glmoe::cuda::rms_norm_q8(d_x.get(), d_w.get(), n, cols, eps, d_out.get(), d_q8.get(), nullptr);
    auto y = to_numpy(d_out, {n, cols});
    const std::vector<glmoe::cuda::BlockQ8> h = d_q8.download();
    std::vector<float> hd(nb_), hs(nb_);
    std::vector<int8_t> hq(n * cols);
    for (size_t i = 0; i < nb_; ++i) {
        hd[i] = h[i].d;
        hs[i] = h[i].s;
        for (int j = 0; j < 32; ++j) hq[32 * i + j] = h[i].q[j];
    }
    auto* qv = new std::vector<int8_t>(std::move(hq));
    nb::capsule oq(qv, [](void* p) noexcept { delete static_cast<std::vector<int8_t>*>(p); });
    const size_t sq[2] = {n, cols};
    return nb::make_tuple(y, to_numpy(DeviceArray<float>(hd.data(), nb_), {n, cols / 32}),
                          to_numpy(DeviceArray<float>(hs.data(), nb_), {n, cols / 32}),
                          nb::ndarray<nb::numpy, int8_t>(qv->data(), 2, sq, oq));
}

// A cache of n_cells rows of `type` as numpy: F16 as float16 bits (uint16) [n_cells, width], a
// quantized type as its block bytes (uint8) [n_cells, row bytes].
nb::object cache_to_numpy(const DeviceArray<uint8_t>& d, uint32_t type, size_t n_cells, size_t width) {
    auto bytes = to_numpy(d, {n_cells, d.size() / n_cells});
    if (type != glmoe::GGML_TYPE_F16) return nb::cast(bytes);
    return nb::module_::import_("numpy").attr("ascontiguousarray")(bytes).attr("view")("uint16").attr("reshape")(
        n_cells, width);
}

// Returns (qkv after the op, k_cache, v_cache); the caches are [n_cells] rows of n_head_kv * head_dim
// values of type_k / type_v (cache_to_numpy), poisoned with 0xFF bytes where not written.
nb::object qkv_prepare_py(const F32In& qkv, std::optional<F32In> bias, std::optional<F32In> q_norm,
                          std::optional<F32In> k_norm, const I32In& pos, const I32In& cells, int n_cells, int n_head,
                          int n_head_kv, int head_dim, int n_rot, float eps, float freq_base, uint32_t type_k,
                          uint32_t type_v) {
    need(glmoe::cuda::kv_type_supported(type_k) && glmoe::cuda::kv_type_supported(type_v),
         "KV types must be F16 (1), BF16 (30), Q8_0 (8) or Q4_0 (2)");
    need(qkv.ndim() == 2, "qkv must be 2-d");
    const size_t n = qkv.shape(0), width = qkv.shape(1);
    need(width == static_cast<size_t>(n_head + 2 * n_head_kv) * head_dim, "qkv width does not match the heads");
    need(pos.ndim() == 1 && pos.shape(0) == n && cells.ndim() == 1 && cells.shape(0) == n,
         "pos and cells must have n entries");
    need(!bias || bias->size() == width, "bias must have the qkv width");
    need(!q_norm || q_norm->size() == static_cast<size_t>(head_dim), "q_norm must have head_dim entries");
    need(!k_norm || k_norm->size() == static_cast<size_t>(head_dim), "k_norm must have head_dim entries");
    need(n_cells > 0, "n_cells must be positive");
    for (size_t t = 0; t < n; ++t) need(cells.data()[t] < n_cells, "cell out of range");
    const size_t kv_width = static_cast<size_t>(n_head_kv) * head_dim;

    DeviceArray<float> d_qkv = upload<float>(qkv);
    DeviceArray<int32_t> d_pos = upload<int32_t>(pos), d_cells = upload<int32_t>(cells);
    std::optional<DeviceArray<float>> d_bias, d_qn, d_kn;
    if (bias) d_bias.emplace(bias->data(), bias->size());
    if (q_norm) d_qn.emplace(q_norm->data(), q_norm->size());
    if (k_norm) d_kn.emplace(k_norm->data(), k_norm->size());
    need(head_dim % 32 == 0 || (type_k == glmoe::GGML_TYPE_F16 && type_v == glmoe::GGML_TYPE_F16),
         "quantized KV rows need head_dim % 32 == 0");
    DeviceArray<uint8_t> d_k(n_cells * glmoe::cuda::kv_row_bytes(type_k, kv_width));
    DeviceArray<uint8_t> d_v(n_cells * glmoe::cuda::kv_row_bytes(type_v, kv_width));
    d_k.fill_bytes(0xFF);
    d_v.fill_bytes(0xFF);

    glmoe::cuda::QKVArgs a;
    a.qkv = d_qkv.get();
    a.bias = d_bias ? d_bias->get() : nullptr;
    a.q_norm = d_qn ? d_qn->get() : nullptr;
    a.k_norm = d_kn ? d_kn->get() : nullptr;
    a.pos = d_pos.get();
    a.cells = d_cells.get();
    a.k_cache = d_k.get();
    a.v_cache = d_v.get();
    a.type_k = type_k;
    a.type_v = type_v;
    a.n = static_cast<int>(n);
    a.n_head = n_head;
    a.n_head_kv = n_head_kv;
    a.head_dim = head_dim;
    a.n_rot = n_rot;
    a.eps = eps;
    a.freq_base = freq_base;
    glmoe::cuda::qkv_prepare(a, nullptr);
    const size_t nc = static_cast<size_t>(n_cells);
    return nb::make_tuple(to_numpy(d_qkv, {n, width}), cache_to_numpy(d_k, type_k, nc, kv_width),
                          cache_to_numpy(d_v, type_v, nc, kv_width));
}

nb::object swiglu_py(const F32In& g, const F32In& u) {
    need(g.size() == u.size(), "g and u must have the same size");
    DeviceArray<float> d_g = upload<float>(g), d_u = upload<float>(u);
    DeviceArray<float> d_out(g.size());
    d_out.fill_bytes(0xFF);
    glmoe::cuda::swiglu(d_g.get(), d_u.get(), g.size(), d_out.get(), nullptr);
    return nb::cast(to_numpy(d_out, {g.size()}));
}

// logits [n, n_expert] -> (ids [n, n_slots] int32, weights [n, n_slots] float32).
nb::object moe_route_py(const F32In& logits, std::optional<F32In> bias, int n_used, int n_groups, int n_group_used,
                        bool norm, float scale, bool fuse_shared) {
    need(logits.ndim() == 2, "logits must be [n, n_expert]");
    const size_t n = logits.shape(0), E = logits.shape(1);
    need(!bias || bias->size() == E, "bias must have n_expert entries");
    const size_t slots = static_cast<size_t>(n_used) + (fuse_shared ? 1 : 0);
    DeviceArray<float> d_logits = upload<float>(logits);
    std::optional<DeviceArray<float>> d_bias;
    if (bias) d_bias.emplace(bias->data(), bias->size());
    DeviceArray<int32_t> d_ids(n * slots);
    DeviceArray<float> d_w(n * slots);
    d_ids.fill_bytes(0xFF);
    d_w.fill_bytes(0xFF);
    glmoe::cuda::RouteArgs a;
    a.logits = d_logits.get();
    a.bias = d_bias ? d_bias->get() : nullptr;
    a.ids = d_ids.get();
    a.weights = d_w.get();
    a.n = static_cast<int>(n);
    a.n_expert = static_cast<int>(E);
    a.n_used = n_used;
    a.n_groups = n_groups;
    a.n_group_used = n_group_used;
    a.norm = norm;
    a.fuse_shared = fuse_shared;
    a.scale = scale;
    glmoe::cuda::moe_route(a, nullptr);
    return nb::make_tuple(to_numpy(d_ids, {n, slots}), to_numpy(d_w, {n, slots}));
}

// ids [n, n_slots] -> (counts [E], offsets [E + 1], src_row [n * n_slots], dst_row [n * n_slots]).
nb::object moe_group_py(const I32In& ids, int n_expert_total) {
    need(ids.ndim() == 2, "ids must be [n, n_slots]");
    const size_t n = ids.shape(0), n_slots = ids.shape(1), E = static_cast<size_t>(n_expert_total);
    DeviceArray<int32_t> d_ids = upload<int32_t>(ids);
    DeviceArray<int32_t> d_counts(E), d_offsets(E + 1), d_src(n * n_slots), d_dst(n * n_slots);
    d_counts.fill_bytes(0xFF);
    d_offsets.fill_bytes(0xFF);
    d_src.fill_bytes(0xFF);
    d_dst.fill_bytes(0xFF);
    glmoe::cuda::moe_group(d_ids.get(), static_cast<int>(n), static_cast<int>(n_slots), n_expert_total,
                           d_counts.get(), d_offsets.get(), d_src.get(), d_dst.get(), nullptr);
    return nb::make_tuple(to_numpy(d_counts, {E}), to_numpy(d_offsets, {E + 1}), to_numpy(d_src, {n * n_slots}),
                          to_numpy(d_dst, {n * n_slots}));
}

// y [n * n_slots, cols], weights [n, n_slots]; out given: accumulate into it.
nb::object moe_combine_py(const F32In& y, const F32In& weights, std::optional<F32In> out) {
    need(y.ndim() == 2 && weights.ndim() == 2, "y [n * n_slots, cols] and weights [n, n_slots] required");
    const size_t n = weights.shape(0), n_slots = weights.shape(1), cols = y.shape(1);
    need(y.shape(0) == n * n_slots, "y must have n * n_slots rows");
    need(!out || (out->ndim() == 2 && out->shape(0) == n && out->shape(1) == cols), "out must be [n, cols]");
    DeviceArray<float> d_y = upload<float>(y), d_w = upload<float>(weights);
    DeviceArray<float> d_out(n * cols);
    if (out)
        check(cudaMemcpy(d_out.get(), out->data(), n * cols * sizeof(float), cudaMemcpyHostToDevice), "upload");
    else
        d_out.fill_bytes(0xFF);
    glmoe::cuda::moe_combine(d_y.get(), d_w.get(), static_cast<int>(n), static_cast<int>(n_slots), cols, d_out.get(),
                             out.has_value(), nullptr);
    return nb::cast(to_numpy(d_out, {n, cols}));
}

// logits [n_rows, n_vocab]; u [n_rows] (needed when temperature > 0) -> ids [n_rows] int32.
nb::object sample_tokens_py(const F32In& logits, float temperature, int top_k, float top_p, float min_p,
                            std::optional<F32In> u) {
    need(logits.ndim() == 2, "logits must be [n_rows, n_vocab]");
    const size_t n_rows = logits.shape(0), n_vocab = logits.shape(1);
    need(!u || u->size() == n_rows, "u must have n_rows entries");
    DeviceArray<float> d_logits = upload<float>(logits);
    std::optional<DeviceArray<float>> d_u;
    if (u) d_u.emplace(u->data(), u->size());
    DeviceArray<int32_t> d_out(n_rows);
    d_out.fill_bytes(0xFF);
    glmoe::cuda::SampleParams p;
    p.temperature = temperature;
    p.top_k = top_k;
    p.top_p = top_p;
    p.min_p = min_p;
    glmoe::cuda::sample_tokens(d_logits.get(), static_cast<int>(n_rows), static_cast<int>(n_vocab), p,
                               d_u ? d_u->get() : nullptr, d_out.get(), nullptr);
    return nb::cast(to_numpy(d_out, {n_rows}));
}

// logits [n_rows, n_vocab]; rows: a dict per row (row_sampling_args; "seq" unused) or None (skipped).
// Returns (ids, logprobs, top [n_rows][(id, logprob)...], histories after the kernel's appends).
nb::object sample_rows_py(const F32In& logits, const nb::list& rows) {
    need(logits.ndim() == 2, "logits must be [n_rows, n_vocab]");
    const size_t n_rows = logits.shape(0), n_vocab = logits.shape(1);
    need(rows.size() == n_rows, "one entry of rows per row of logits");
    std::vector<glmoe::cuda::RowSampleParams> params(n_rows);
    std::vector<glmoe::cuda::LogitBiasEntry> bias;
    std::vector<int32_t> history;
    std::vector<RowSamplingArgs> args(n_rows);
    bool any_top = false;
    for (size_t r = 0; r < n_rows; ++r) {
        glmoe::cuda::RowSampleParams& q = params[r];
        if (rows[r].is_none()) {
            q.skip = 1;
            continue;
        }
        const RowSamplingArgs& a = args[r] = row_sampling_args(nb::cast<nb::dict>(rows[r]));
        const glmoe::SamplingParams& sp = a.params;
        glmoe::Sampler::check(sp, static_cast<int>(n_vocab));
        q = glmoe::cuda::row_sample_params(sp, a.u, a.n_top);
        any_top = any_top || q.n_top > 0;
        q.bias_begin = static_cast<int32_t>(bias.size());
        for (const auto& [t, b] : sp.logit_bias) bias.push_back({t, b});
        q.hist_begin = static_cast<int32_t>(history.size());
        q.hist_len = static_cast<int32_t>(a.history.size());
        q.append = 1;
        history.insert(history.end(), a.history.begin(), a.history.end());
        history.push_back(-1);  // room for the appended token
    }
    DeviceArray<float> d_logits = upload<float>(logits), d_work(n_rows * n_vocab);
    DeviceArray<int32_t> d_counts(n_rows * n_vocab);
    d_counts.fill_bytes(0);
    DeviceArray<double> d_norm(n_rows);
    DeviceArray<glmoe::cuda::RowSampleParams> d_params(params.data(), n_rows);
    DeviceArray<glmoe::cuda::LogitBiasEntry> d_bias(bias.data(), bias.size());
    DeviceArray<int32_t> d_hist(history.data(), history.size());
    DeviceArray<glmoe::cuda::SampledToken> d_out(n_rows), d_top(n_rows * glmoe::cuda::kRowSampleMaxTop);
    d_out.fill_bytes(0xFF);
    glmoe::cuda::sample_rows(d_logits.get(), d_work.get(), d_counts.get(), d_norm.get(), static_cast<int>(n_rows),
                             static_cast<int>(n_vocab), d_params.get(), d_bias.get(), d_hist.get(), d_out.get(),
                             d_top.get(), any_top, nullptr);
    check(cudaDeviceSynchronize(), "sample_rows");
    const std::vector<glmoe::cuda::SampledToken> out = d_out.download(), top = d_top.download();
    const std::vector<int32_t> hist = d_hist.download();
    const std::vector<int32_t> counts = d_counts.download();
    for (int32_t c : counts) need(c == 0, "penalty counts must be left at zero");
    nb::list ids, logprobs, tops, histories;
    for (size_t r = 0; r < n_rows; ++r) {
        ids.append(params[r].skip ? -3 : out[r].id);
        logprobs.append(params[r].skip ? 0.0 : static_cast<double>(out[r].logprob));
        nb::list t;
        for (int k = 0; k < params[r].n_top && top[r * glmoe::cuda::kRowSampleMaxTop + k].id >= 0; ++k)
            t.append(nb::make_tuple(top[r * glmoe::cuda::kRowSampleMaxTop + k].id,
                                    static_cast<double>(top[r * glmoe::cuda::kRowSampleMaxTop + k].logprob)));
        tops.append(t);
        if (params[r].skip) {
            histories.append(nb::list());
            continue;
        }
        histories.append(std::vector<int32_t>(hist.begin() + params[r].hist_begin,
                                               hist.begin() + params[r].hist_begin + params[r].hist_len + 1));
    }
    return nb::make_tuple(ids, logprobs, tops, histories);
}

}  // namespace

void bind_cuda_misc(nb::module_& m) {
    m.def("get_rows", &get_rows_py, nb::arg("type"), nb::arg("table"), nb::arg("cols"), nb::arg("ids"),
          "Dequantized rows ids of a raw [n_rows, row_bytes] table of GGML type `type`: float32 [n, cols].");
    m.def("dequantize_matrix", &dequantize_matrix_py, nb::arg("type"), nb::arg("matrix"), nb::arg("cols"),
          nb::arg("first_row"), nb::arg("n_rows"),
          "Rows [first_row, first_row + n_rows) of a raw [rows, row_bytes] matrix of GGML type `type`, "
          "dequantized to f32 (accuracy mode): float32 [n_rows, cols].");
    m.def("rms_norm_q8", &rms_norm_q8_py, nb::arg("x"), nb::arg("w"), nb::arg("eps"));
    m.def("rms_norm", &rms_norm_py, nb::arg("x"), nb::arg("w"), nb::arg("eps"), nb::arg("in_place") = false,
          "x / rms(x) * w per row of x [n, cols].");
    m.def("qkv_prepare", &qkv_prepare_py, nb::arg("qkv"), nb::arg("bias").none(), nb::arg("q_norm").none(),
          nb::arg("k_norm").none(), nb::arg("pos"), nb::arg("cells"), nb::arg("n_cells"), nb::arg("n_head"),
          nb::arg("n_head_kv"), nb::arg("head_dim"), nb::arg("n_rot"), nb::arg("eps"), nb::arg("freq_base"),
          nb::arg("type_k") = 1, nb::arg("type_v") = 1,
          "Bias, qk-norm and neox rope; returns (qkv, k_cache, v_cache), caches as float16 bits (uint16) for "
          "F16, as block bytes (uint8, [n_cells, row bytes]) for Q8_0 (8) / Q4_0 (2).");
    m.def("swiglu", &swiglu_py, nb::arg("g"), nb::arg("u"), "silu(g) * u, flattened.");
    m.def("moe_route", &moe_route_py, nb::arg("logits"), nb::arg("bias").none(), nb::arg("n_used"),
          nb::arg("n_groups") = 1, nb::arg("n_group_used") = 1, nb::arg("norm") = false, nb::arg("scale") = 1.0f,
          nb::arg("fuse_shared") = false, "MoE routing: (ids [n, n_slots], weights [n, n_slots]).");
    m.def("moe_group", &moe_group_py, nb::arg("ids"), nb::arg("n_expert_total"),
          "Pairs grouped by expert: (counts, offsets, src_row, dst_row).");
    m.def("moe_combine", &moe_combine_py, nb::arg("y"), nb::arg("weights"), nb::arg("out").none() = nb::none(),
          "sum_j weights[t, j] * y[t * n_slots + j] (+ out when given).");
    m.def("sample_tokens", &sample_tokens_py, nb::arg("logits"), nb::arg("temperature"), nb::arg("top_k") = 0,
          nb::arg("top_p") = 1.0f, nb::arg("min_p") = 0.0f, nb::arg("u").none() = nb::none(),
          "Sampled token per row of logits [n_rows, n_vocab] with uniform numbers u [n_rows].");
    m.def("sample_rows", &sample_rows_py, nb::arg("logits"), nb::arg("rows"),
          "The per-row sampling chain: rows has a dict of sampling keywords plus u, history and n_top (or None)"
          " per row of logits [n_rows, n_vocab]. Returns (ids, logprobs, top, histories with the appended id).");
}
