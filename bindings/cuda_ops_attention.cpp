// glmoe._core.cuda_ops.attention_decode / attention_prefill: the CUDA attention kernels on numpy
// arrays, for tests. K/V caches are raw rows [n_cells, row bytes] of type_k / type_v: float16 bits
// (arr.view(np.uint16)) for F16, the raw bytes (uint8) for BF16, Q8_0 / Q4_0.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <algorithm>
#include <cstdint>

#include "cuda_test_util.h"
#include "ggml_types.h"
#include "kernels.h"

namespace nb = nanobind;
using namespace glmoe;
using cuda_test::DeviceArray;
using cuda_test::upload;

namespace {

using F32In = nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using KVIn = nb::ndarray<nb::ndim<2>, nb::c_contig, nb::device::cpu>;

// Values per row of a raw cache of `type` (a KV type of the kernels).
int64_t row_values(const KVIn& cache, uint32_t type) {
    if (!cuda::kv_type_supported(type)) throw nb::value_error("KV types must be F16 (1), BF16 (30), Q8_0 (8) or Q4_0 (2)");
    const int64_t bytes = static_cast<int64_t>(cache.nbytes() / std::max<size_t>(cache.shape(0), 1));
    const int64_t per32 = cuda::kv_row_bytes(type, 32);
    if (bytes % per32 != 0) throw nb::value_error("cache row bytes are not whole blocks of the type");
    return bytes / per32 * 32;
}
using I32In = nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

// Checks shapes and indices (a bad index would read outside the device arrays), uploads, runs the
// kernel with the output poisoned, and returns out [n_tok, n_head * head_dim]. q_stride 0: q rows
// are packed [n_head * head_dim]; otherwise q rows are q_stride wide (q.shape(1) == q_stride) and
// only their first n_head * head_dim columns are read (as the fused qkv rows the model passes).
nb::ndarray<nb::numpy, float> run_attention(bool decode, const F32In& q, const KVIn& k_cache, const KVIn& v_cache,
                                            const I32In& cells, const I32In& cell_start, const I32In& n_visible,
                                            int n_head, int n_head_kv, float scale, int max_visible,
                                            int64_t q_stride, uint32_t type_k, uint32_t type_v, bool f16_rows = false) {
    const int64_t n_tok = q.shape(0), n_cells = k_cache.shape(0);
    const int64_t kv_width = row_values(k_cache, type_k);
    if (n_head <= 0 || n_head_kv <= 0 || n_head % n_head_kv != 0 || kv_width % n_head_kv != 0)
        throw nb::value_error("bad head counts");
    const int head_dim = static_cast<int>(kv_width / n_head_kv);
    const size_t q_width = static_cast<size_t>(n_head) * head_dim;
    if (q_stride < 0 || (q_stride == 0 && q.shape(1) != q_width) ||
        (q_stride > 0 && (q.shape(1) != static_cast<size_t>(q_stride) || q.shape(1) < q_width)))
        throw nb::value_error("q must be [n_tok, n_head * head_dim], or [n_tok, q_stride] with q_stride >= that");
    if (v_cache.shape(0) != k_cache.shape(0) ||
        row_values(v_cache, type_v) != kv_width || cell_start.shape(0) != static_cast<size_t>(n_tok) ||
        n_visible.shape(0) != static_cast<size_t>(n_tok))
        throw nb::value_error("array shapes disagree");
    int most = 1;
    for (int64_t t = 0; t < n_tok; ++t) {
        const int64_t b = cell_start.data()[t], n = n_visible.data()[t];
        if (n < 1 || b < 0 || b + n > static_cast<int64_t>(cells.shape(0)))
            throw nb::value_error("cell_start/n_visible outside cells (n_visible must be >= 1)");
        if (!decode && b != cell_start.data()[0]) throw nb::value_error("prefill tokens must share cell_start");
        most = std::max(most, static_cast<int>(n));
    }
    for (size_t i = 0; i < cells.shape(0); ++i)
        if (cells.data()[i] < 0 || cells.data()[i] >= n_cells) throw nb::value_error("cell index out of range");
    if (max_visible <= 0) max_visible = most;  // 0: the tight bound

    auto dq = upload<float>(q);
    DeviceArray<uint8_t> dk(static_cast<const uint8_t*>(k_cache.data()), k_cache.nbytes());
    DeviceArray<uint8_t> dv(static_cast<const uint8_t*>(v_cache.data()), v_cache.nbytes());
    auto dcells = upload<int32_t>(cells);
    auto dstart = upload<int32_t>(cell_start);
    auto dvis = upload<int32_t>(n_visible);
    DeviceArray<float> out(static_cast<size_t>(n_tok) * q_width);
    out.fill_bytes(0xFF);

    cuda::AttentionArgs a;
    a.q = dq.get();
    a.k_cache = dk.get();
    a.v_cache = dv.get();
    a.type_k = type_k;
    a.type_v = type_v;
    a.cells = dcells.get();
    a.cell_start = dstart.get();
    a.n_visible = dvis.get();
    a.out = out.get();
    a.n_tok = static_cast<int>(n_tok);
    a.n_head = n_head;
    a.n_head_kv = n_head_kv;
    a.head_dim = head_dim;
    a.max_visible = max_visible;
    a.scale = scale;
    a.q_stride = q_stride;
    if (decode) {
        const size_t bytes = cuda::attention_decode_scratch_bytes(a.n_tok, n_head, n_head_kv, head_dim, max_visible);
        DeviceArray<float> scratch(bytes / sizeof(float));
        scratch.fill_bytes(0xFF);  // partials must all be written, neutral ones included
        cuda::attention_decode(a, bytes ? scratch.get() : nullptr, nullptr);
        return cuda_test::to_numpy(out, {static_cast<size_t>(n_tok), q_width});  // syncs before scratch dies
    }
    if (!f16_rows) {
        cuda::attention_prefill(a, nullptr);
        return cuda_test::to_numpy(out, {static_cast<size_t>(n_tok), q_width});
    }
    // As the model runs a prompt chunk over a non-f16 cache: the visible rows converted once, then
    // the f16 kernel over them in order. Rows past the visible ones stay poisoned (never read).
    DeviceArray<uint16_t> fk(static_cast<size_t>(max_visible) * kv_width), fv(static_cast<size_t>(max_visible) * kv_width);
    fk.fill_bytes(0xFF);
    fv.fill_bytes(0xFF);
    cuda::kv_rows_to_f16(dk.get(), type_k, kv_width, a.cells, a.cell_start, a.n_visible, a.n_tok, max_visible, fk.get(),
                         nullptr);
    cuda::kv_rows_to_f16(dv.get(), type_v, kv_width, a.cells, a.cell_start, a.n_visible, a.n_tok, max_visible, fv.get(),
                         nullptr);
    a.k_cache = fk.get();
    a.v_cache = fv.get();
    a.type_k = a.type_v = glmoe::GGML_TYPE_F16;
    a.cells = nullptr;
    cuda::attention_prefill(a, nullptr);
    return cuda_test::to_numpy(out, {static_cast<size_t>(n_tok), q_width});
}

}  // namespace

void bind_cuda_attention(nb::module_& m) {
    m.def(
        "attention_decode",
        [](const F32In& q, const KVIn& k, const KVIn& v, const I32In& cells, const I32In& cell_start,
           const I32In& n_visible, int n_head, int n_head_kv, float scale, int max_visible, int64_t q_stride,
           uint32_t type_k, uint32_t type_v) {
            return run_attention(true, q, k, v, cells, cell_start, n_visible, n_head, n_head_kv, scale, max_visible,
                                 q_stride, type_k, type_v);
        },
        nb::arg("q"), nb::arg("k_cache"), nb::arg("v_cache"), nb::arg("cells"), nb::arg("cell_start"),
        nb::arg("n_visible"), nb::arg("n_head"), nb::arg("n_head_kv"), nb::arg("scale"), nb::arg("max_visible") = 0,
        nb::arg("q_stride") = 0, nb::arg("type_k") = 1, nb::arg("type_v") = 1,
        "Split-K decode attention. q f32 [n_tok, n_head*D]; k_cache, v_cache float16 bits (uint16) "
        "[n_cells, n_head_kv*D]; token t sees cells[cell_start[t] : cell_start[t] + n_visible[t]]. "
        "max_visible: the split bucket (0: max(n_visible)). q_stride: 0, or q.shape[1] for wider q rows "
        "of which the first n_head*D columns are read (a multiple of 4). type_k/type_v: GGML ids of the cache "
        "rows (1 F16; 8 Q8_0, 2 Q4_0: raw block bytes, uint8). Returns out f32 [n_tok, n_head*D].");
    m.def(
        "attention_prefill",
        [](const F32In& q, const KVIn& k, const KVIn& v, const I32In& cells, const I32In& cell_start,
           const I32In& n_visible, int n_head, int n_head_kv, float scale, int64_t q_stride, uint32_t type_k,
           uint32_t type_v, bool f16_rows) {
            return run_attention(false, q, k, v, cells, cell_start, n_visible, n_head, n_head_kv, scale, 0, q_stride,
                                 type_k, type_v, f16_rows);
        },
        nb::arg("q"), nb::arg("k_cache"), nb::arg("v_cache"), nb::arg("cells"), nb::arg("cell_start"),
        nb::arg("n_visible"), nb::arg("n_head"), nb::arg("n_head_kv"), nb::arg("scale"), nb::arg("q_stride") = 0,
        nb::arg("type_k") = 1, nb::arg("type_v") = 1, nb::arg("f16_rows") = false,
        "Tensor-core prompt attention: as attention_decode, all tokens sharing cell_start[0]. f16_rows: first "
        "convert the visible rows to f16 (kv_rows_to_f16), then read those, as the model does for a prompt chunk.");
    m.def(
        "kv_rows_to_f16",
        [](const KVIn& cache, uint32_t type, const I32In& cells, const I32In& cell_start, const I32In& n_visible) {
            const int64_t width = row_values(cache, type);
            int most = 0;
            for (size_t t = 0; t < n_visible.shape(0); ++t) most = std::max(most, n_visible.data()[t]);
            if (cell_start.shape(0) < 1 || n_visible.shape(0) < 1 || cell_start.data()[0] < 0 ||
                cell_start.data()[0] + static_cast<int64_t>(most) > static_cast<int64_t>(cells.shape(0)))
                throw nb::value_error("cell_start[0] + max(n_visible) must lie within cells");
            for (size_t i = 0; i < cells.shape(0); ++i)
                if (cells.data()[i] < 0 || cells.data()[i] >= static_cast<int64_t>(cache.shape(0)))
                    throw nb::value_error("cell index out of range");
            DeviceArray<uint8_t> d(static_cast<const uint8_t*>(cache.data()), cache.nbytes());
            auto dcells = upload<int32_t>(cells);
            auto dstart = upload<int32_t>(cell_start);
            auto dvis = upload<int32_t>(n_visible);
            const int rows = most + 5;  // 5 rows more than visible: they must stay as they were
            DeviceArray<uint16_t> out(static_cast<size_t>(rows) * width);
            out.fill_bytes(0xFF);
            cuda::kv_rows_to_f16(d.get(), type, width, dcells.get(), dstart.get(), dvis.get(),
                                 static_cast<int>(n_visible.shape(0)), rows, out.get(), nullptr);
            return cuda_test::to_numpy(out, {static_cast<size_t>(rows), static_cast<size_t>(width)});
        },
        nb::arg("cache"), nb::arg("type"), nb::arg("cells"), nb::arg("cell_start"), nb::arg("n_visible"),
        "Rows cells[cell_start[0] + i] of a raw cache of `type`, i < max(n_visible), as float16 bits (uint16) "
        "[max(n_visible) + 5, width]; the 5 rows past them are returned untouched (0xFFFF).");
}
