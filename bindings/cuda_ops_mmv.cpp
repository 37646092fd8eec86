// glmoe._core.cuda_ops: test entry points of the decode matrix-vector kernels (mmv.cu) and of the
// activation quantization (quantize.cu). Each uploads its numpy inputs, poisons the outputs (0xFF
// bytes: NaN), runs on the default stream and returns numpy arrays. Quantized weight types get
// their activations quantized on the device first, as the engine does.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "cuda_test_util.h"
#include "kernels.h"
#include "quants.h"

namespace nb = nanobind;
using namespace glmoe::cuda_test;
namespace gc = glmoe::cuda;

namespace {

using F32In = nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using I32In = nb::ndarray<const int32_t, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using U8In = nb::ndarray<const uint8_t, nb::c_contig, nb::device::cpu>;

void need(bool ok, const std::string& msg) {
    if (!ok) throw nb::value_error(msg.c_str());
}

// Weight bytes on the device, with 16 spare bytes: the kernels read whole 16-byte granules.
struct DeviceWeights {
    DeviceArray<uint8_t> d;
    explicit DeviceWeights(const U8In& w) : d(w.size() + 16) {
        d.fill_bytes(0);
        check(cudaMemcpy(d.get(), w.data(), w.size(), cudaMemcpyHostToDevice), "upload");
    }
};

// A weight (stack) of `type`: w is [rows, row_bytes] (n_mat == 0) or [n_mat, rows, row_bytes].
gc::WeightView view(const U8In& w, uint32_t type, int64_t cols, const DeviceWeights& d, bool stacked,
                    const char* what) {
    need(w.ndim() == (stacked ? 3u : 2u), std::string(what) + (stacked ? " must be [E, rows, row_bytes]" : " must be [rows, row_bytes]"));
    gc::WeightView v;
    v.data = d.d.get();
    v.type = type;
    v.rows = static_cast<int64_t>(w.shape(stacked ? 1 : 0));
    v.cols = cols;
    v.row_bytes = w.shape(stacked ? 2 : 1);
    v.matrix_bytes = v.row_bytes * static_cast<size_t>(v.rows);
    need(v.row_bytes == glmoe::row_bytes(type, cols),
         std::string(what) + ": row_bytes does not match the type and cols");
    return v;
}

// x [n, cols] on the device as f32 and (when quantize: for quantized types) as BlockQ8.
struct DeviceX {
    DeviceArray<float> f32;
    std::optional<DeviceArray<gc::BlockQ8>> q8;
    DeviceX(const F32In& x, bool quantize) : f32(upload<float>(x)) {
        const size_t n = x.shape(0), cols = x.shape(1);
        if (quantize) {
            q8.emplace(n * (cols / 32));
            q8->fill_bytes(0xFF);
            gc::quantize_q8(f32.get(), static_cast<int64_t>(n), static_cast<int64_t>(cols), static_cast<int64_t>(cols),
                            q8->get(), nullptr);
        }
    }
    const float* xf() const { return f32.get(); }
    const gc::BlockQ8* xq() const { return q8 ? q8->get() : nullptr; }
};

// x [n, cols] -> (d [n, cols/32], s [n, cols/32], q int8 [n, cols]).
nb::object quantize_q8_py(const F32In& x) {
    const size_t n = x.shape(0), cols = x.shape(1);
    need(cols % 32 == 0 && cols > 0, "cols must be a positive multiple of 32");
    DeviceX dx(x, true);
    const std::vector<gc::BlockQ8> h = dx.q8->download();
    check(cudaDeviceSynchronize(), "kernel");
    const size_t nb_ = n * (cols / 32);
    auto* d = new std::vector<float>(nb_);
    auto* s = new std::vector<float>(nb_);
    auto* q = new std::vector<int8_t>(n * cols);
    for (size_t i = 0; i < nb_; ++i) {
        (*d)[i] = h[i].d;
        (*s)[i] = h[i].s;
        for (int j = 0; j < 32; ++j) (*q)[32 * i + j] = h[i].q[j];
    }
    nb::capsule od(d, [](void* p) noexcept { delete static_cast<std::vector<float>*>(p); });
    nb::capsule os(s, [](void* p) noexcept { delete static_cast<std::vector<float>*>(p); });
    nb::capsule oq(q, [](void* p) noexcept { delete static_cast<std::vector<int8_t>*>(p); });
    const size_t sd[2] = {n, cols / 32}, sq[2] = {n, cols};
    return nb::make_tuple(nb::ndarray<nb::numpy, float>(d->data(), 2, sd, od),
                          nb::ndarray<nb::numpy, float>(s->data(), 2, sd, os),
                          nb::ndarray<nb::numpy, int8_t>(q->data(), 2, sq, oq));
}

// weight [rows, row_bytes]; x [n_tok, cols]; returns y [n_tok, y_stride] (y_stride 0: rows), the
// gaps between rows left poisoned. accumulate_into: the starting y (same shape), added to.
nb::object mmv_py(uint32_t type, const U8In& weight, int64_t cols, const F32In& x, std::optional<F32In> accumulate_into,
                  int64_t y_stride) {
    DeviceWeights d_w(weight);
    const gc::WeightView w = view(weight, type, cols, d_w, false, "weight");
    const size_t n_tok = x.shape(0);
    need(x.shape(1) == static_cast<size_t>(cols), "x must be [n_tok, cols]");
    if (y_stride == 0) y_stride = w.rows;
    need(y_stride >= w.rows, "y_stride must be >= rows");
    const size_t n_out = n_tok * static_cast<size_t>(y_stride);
    DeviceArray<float> d_y(n_out);
    if (accumulate_into) {
        need(accumulate_into->shape(0) == n_tok && accumulate_into->shape(1) == static_cast<size_t>(y_stride),
             "accumulate_into must be [n_tok, y_stride]");
        check(cudaMemcpy(d_y.get(), accumulate_into->data(), n_out * sizeof(float), cudaMemcpyHostToDevice), "upload");
    } else {
        d_y.fill_bytes(0xFF);
    }
    DeviceX dx(x, gc::mmv_wants_q8(type));
    gc::mmv(w, dx.xf(), dx.xq(), static_cast<int>(n_tok), d_y.get(), y_stride, accumulate_into.has_value(), nullptr);
    return nb::cast(to_numpy(d_y, {n_tok, static_cast<size_t>(y_stride)}));
}

struct DeviceExperts {
    DeviceWeights routed;
    std::optional<DeviceWeights> shared;
    gc::ExpertSet set;
    DeviceExperts(uint32_t type, const U8In& w, int64_t cols, int shared_type, const std::optional<U8In>& sh,
                  const char* what)
        : routed(w) {
        if (sh) shared.emplace(*sh);
        set.routed = view(w, type, cols, routed, true, what);
        set.n_routed = static_cast<int>(w.shape(0));
        if (sh) {
            need(shared_type >= 0, std::string(what) + ": shared expert given without shared_type");
            set.shared = view(*sh, static_cast<uint32_t>(shared_type), cols, *shared, false, what);
            need(set.shared.rows == set.routed.rows, std::string(what) + ": shared expert rows differ");
        }
    }
};

// weights [E, rows, row_bytes]; shared (optional, type shared_type) [rows, shared_row_bytes] is
// expert E; ids [n_tok, n_slots]; x [n_tok (or n_tok * n_slots with x_per_slot), cols].
// Returns y [n_tok * n_slots, rows].
nb::object mmv_experts_py(uint32_t type, const U8In& weights, int64_t cols, const F32In& x, const I32In& ids,
                          bool x_per_slot, int shared_type, std::optional<U8In> shared) {
    DeviceExperts ex(type, weights, cols, shared_type, shared, "weights");
    const size_t n_tok = ids.shape(0), n_slots = ids.shape(1), rows = static_cast<size_t>(ex.set.routed.rows);
    need(x.shape(1) == static_cast<size_t>(cols) && x.shape(0) == (x_per_slot ? n_tok * n_slots : n_tok),
         "x must be [n_tok (* n_slots with x_per_slot), cols]");
    DeviceArray<int32_t> d_ids(ids.data(), ids.size());
    DeviceArray<float> d_y(n_tok * n_slots * rows);
    d_y.fill_bytes(0xFF);
    DeviceX dx(x, gc::mmv_wants_q8(type) || (shared && gc::mmv_wants_q8(static_cast<uint32_t>(shared_type))));
    gc::mmv_experts(ex.set, dx.xf(), dx.xq(), x_per_slot, d_ids.get(), static_cast<int>(n_tok),
                    static_cast<int>(n_slots), d_y.get(), nullptr);
    return nb::cast(to_numpy(d_y, {n_tok * n_slots, rows}));
}

// gate, up [E, rows, row_bytes] (+ optional shared_gate / shared_up of shared_type as expert E);
// x [n_tok, cols]; ids [n_tok, n_slots] or None (dense: expert 0, one slot).
// Returns silu(gate x) * (up x) as [n_tok * n_slots, rows].
nb::object mmv_swiglu_py(uint32_t type, const U8In& gate, const U8In& up, int64_t cols, const F32In& x,
                         std::optional<I32In> ids, int shared_type, std::optional<U8In> shared_gate,
                         std::optional<U8In> shared_up) {
    need(shared_gate.has_value() == shared_up.has_value(), "give both shared_gate and shared_up, or neither");
    DeviceExperts g(type, gate, cols, shared_type, shared_gate, "gate");
    DeviceExperts u(type, up, cols, shared_type, shared_up, "up");
    need(g.set.routed.rows == u.set.routed.rows && g.set.n_routed == u.set.n_routed, "gate and up shapes differ");
    const size_t n_tok = x.shape(0), rows = static_cast<size_t>(g.set.routed.rows);
    need(x.shape(1) == static_cast<size_t>(cols), "x must be [n_tok, cols]");
    size_t n_slots = 1;
    std::optional<DeviceArray<int32_t>> d_ids;
    if (ids) {
        need(ids->shape(0) == n_tok, "ids must be [n_tok, n_slots]");
        n_slots = ids->shape(1);
        d_ids.emplace(ids->data(), ids->size());
    }
    DeviceArray<float> d_out(n_tok * n_slots * rows);
    d_out.fill_bytes(0xFF);
    DeviceX dx(x, gc::mmv_wants_q8(type) ||
                      (shared_gate && gc::mmv_wants_q8(static_cast<uint32_t>(shared_type))));
    gc::mmv_swiglu(g.set, u.set, dx.xf(), dx.xq(), d_ids ? d_ids->get() : nullptr, static_cast<int>(n_tok),
                   static_cast<int>(n_slots), d_out.get(), nullptr);
    return nb::cast(to_numpy(d_out, {n_tok * n_slots, rows}));
}

}  // namespace

void bind_cuda_mmv(nb::module_& m) {
    m.def("quantize_q8", &quantize_q8_py, nb::arg("x"),
          "8-bit activation blocks of x [n, cols]: (d [n, cols/32], s [n, cols/32], q int8 [n, cols]).");
    m.def("mmv_wants_q8", &gc::mmv_wants_q8, nb::arg("type"), "Whether weights of `type` take 8-bit activations.");
    m.def("mmv", &mmv_py, nb::arg("type"), nb::arg("weight"), nb::arg("cols"), nb::arg("x"),
          nb::arg("accumulate_into") = nb::none(), nb::arg("y_stride") = 0,
          "y [n_tok, y_stride] = x @ W.T for a raw [rows, row_bytes] weight of GGML type `type` (y_stride 0: rows); "
          "accumulate_into: add to this y instead of overwriting.");
    m.def("mmv_experts", &mmv_experts_py, nb::arg("type"), nb::arg("weights"), nb::arg("cols"), nb::arg("x"),
          nb::arg("ids"), nb::arg("x_per_slot") = false, nb::arg("shared_type") = -1, nb::arg("shared") = nb::none(),
          "Routed experts: y [n_tok * n_slots, rows]; row t * n_slots + j = W[ids[t, j]] @ x[t (or t * n_slots + j)]; "
          "id E (= weights.shape[0]) selects `shared`.");
    m.def("mmv_swiglu", &mmv_swiglu_py, nb::arg("type"), nb::arg("gate"), nb::arg("up"), nb::arg("cols"), nb::arg("x"),
          nb::arg("ids") = nb::none(), nb::arg("shared_type") = -1, nb::arg("shared_gate") = nb::none(),
          nb::arg("shared_up") = nb::none(),
          "silu(G x) * (U x) per (token, slot) as [n_tok * n_slots, rows]; ids None: dense (expert 0).");
}
