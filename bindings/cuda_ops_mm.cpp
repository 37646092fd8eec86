// glmoe._core.cuda_ops.mm / mm_experts: the tensor-core prefill matmuls on numpy arrays (tests).
// Outputs are poisoned with 0xFF bytes (NaN) before the launch, so rows a kernel fails to write show.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "cuda_test_util.h"
#include "kernels.h"

namespace nb = nanobind;
using namespace glmoe;
using namespace glmoe::cuda_test;

namespace {

using U8In = nb::ndarray<const uint8_t, nb::c_contig, nb::device::cpu>;
using F32In = nb::ndarray<const float, nb::c_contig, nb::device::cpu>;
using I32In = nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using F32Out = nb::ndarray<nb::numpy, float>;


// weight: [rows, row_bytes] raw GGUF rows; x: [n, cols]. Returns y [n, rows] = x @ W.T, plus
// accumulate_into when given (the accumulate mode). exact: the f32 kernel for float weights (mm_float).
// slices > 0: mm_split over that many column slices.
F32Out mm_py(uint32_t type, const U8In& weight, int64_t cols, const F32In& x, std::optional<F32In> accumulate_into,
             bool exact, int slices) {
    if (weight.ndim() != 2) throw nb::value_error("weight must be [rows, row_bytes]");
    if (x.ndim() != 2 || static_cast<int64_t>(x.shape(1)) != cols) throw nb::value_error("x must be [n, cols]");
    const size_t rows = weight.shape(0), n = x.shape(0);
    DeviceArray<uint8_t> dw = upload<uint8_t>(weight);
    DeviceArray<float> dx = upload<float>(x);
    DeviceArray<float> dy(n * rows);
    const bool acc = accumulate_into.has_value();
    if (acc) {
        const F32In& a = *accumulate_into;
        if (a.ndim() != 2 || a.shape(0) != n || a.shape(1) != rows)
            throw nb::value_error("accumulate_into must be [n, rows]");
        check(cudaMemcpy(dy.get(), a.data(), n * rows * sizeof(float), cudaMemcpyHostToDevice), "upload");
    } else {
        dy.fill_bytes(0xFF);
    }
    const cuda::WeightView w = view(dw, type, rows, cols, weight.shape(1));
    if (exact && slices > 0) throw nb::value_error("exact and slices do not combine");
    if (exact) {
        cuda::mm_float(w, dx.get(), static_cast<int64_t>(n), dy.get(), static_cast<int64_t>(rows), acc, nullptr);
    } else if (slices > 0) {
        DeviceArray<float> scratch(static_cast<size_t>(slices) * n * rows);
        cuda::mm_split(w, dx.get(), static_cast<int64_t>(n), dy.get(), static_cast<int64_t>(rows), acc, slices,
                       scratch.get(), nullptr);
        check(cudaDeviceSynchronize(), "mm_split");  // before scratch is freed
    } else {
        cuda::mm(w, dx.get(), static_cast<int64_t>(n), dy.get(), static_cast<int64_t>(rows), acc, nullptr);
    }
    return to_numpy(dy, {n, rows});
}

// routed: [E, rows, row_bytes]; shared (optional, expert index E): [rows, row_bytes]; pairs p in
// [offsets[e], offsets[e+1]) give y[dst_row[p]] = W_e x[src_row[p]]. Returns y [n_dst_rows, rows];
// rows no pair names stay NaN.
F32Out mm_experts_py(uint32_t routed_type, const U8In& routed, uint32_t shared_type, std::optional<U8In> shared,
                     int64_t cols, const F32In& x, const I32In& offsets, const I32In& src_row, const I32In& dst_row,
                     int64_t n_dst_rows, int64_t max_pairs_per_expert) {
    if (routed.ndim() != 3) throw nb::value_error("routed must be [n_routed, rows, row_bytes]");
    if (x.ndim() != 2 || static_cast<int64_t>(x.shape(1)) != cols) throw nb::value_error("x must be [n, cols]");
    const size_t n_routed = routed.shape(0), rows = routed.shape(1), row_bytes = routed.shape(2);
    const int64_t n = static_cast<int64_t>(x.shape(0));
    if (shared && (shared->ndim() != 2 || shared->shape(0) != rows))
        throw nb::value_error("shared must be [rows, row_bytes]");
    const size_t n_experts = n_routed + (shared ? 1 : 0);
    const size_t n_pairs = src_row.shape(0);
    if (offsets.shape(0) < n_experts + 1) throw nb::value_error("offsets needs n_experts + 1 entries");
    if (dst_row.shape(0) != n_pairs) throw nb::value_error("src_row and dst_row differ in length");
    if (n_dst_rows < 0) throw nb::value_error("n_dst_rows must be >= 0");
    // The kernel trusts these; check here so that a bad test cannot fault the device.
    for (size_t e = 0; e < n_experts; ++e) {
        const int32_t b = offsets.data()[e], end = offsets.data()[e + 1];
        if (b < 0 || end < b || static_cast<size_t>(end) > n_pairs) throw nb::value_error("bad offsets");
    }
    for (size_t i = 0; i < n_pairs; ++i) {
        if (src_row.data()[i] < 0 || src_row.data()[i] >= n) throw nb::value_error("src_row out of range");
        if (dst_row.data()[i] < 0 || dst_row.data()[i] >= n_dst_rows) throw nb::value_error("dst_row out of range");
    }
    if (max_pairs_per_expert < 0) max_pairs_per_expert = n;

    DeviceArray<uint8_t> dr = upload<uint8_t>(routed);
    std::optional<DeviceArray<uint8_t>> ds;
    if (shared) ds.emplace(shared->data(), shared->size());
    DeviceArray<float> dx = upload<float>(x);
    DeviceArray<int32_t> doff = upload<int32_t>(offsets);
    DeviceArray<int32_t> dsrc = upload<int32_t>(src_row);
    DeviceArray<int32_t> ddst = upload<int32_t>(dst_row);
    DeviceArray<float> dy(static_cast<size_t>(n_dst_rows) * rows);
    dy.fill_bytes(0xFF);

    cuda::ExpertSet es;
    es.routed = view(dr, routed_type, rows, cols, row_bytes);
    es.n_routed = static_cast<int>(n_routed);
    if (ds) es.shared = view(*ds, shared_type, rows, cols, shared->shape(1));
    cuda::mm_experts(es, dx.get(), doff.get(), dsrc.get(), ddst.get(), max_pairs_per_expert, dy.get(), nullptr);
    return to_numpy(dy, {static_cast<size_t>(n_dst_rows), rows});
}

}  // namespace

void bind_cuda_mm(nb::module_& m) {
    m.def("mm", &mm_py, nb::arg("type"), nb::arg("weight"), nb::arg("cols"), nb::arg("x"),
          nb::arg("accumulate_into").none() = nb::none(), nb::arg("exact") = false, nb::arg("slices") = 0,
          "Prefill matmul y[n, rows] = x @ W.T (+ accumulate_into): tensor cores (slices > 0: split over that "
          "many column slices), or exact f32 (float weights).");
    m.def("mm_experts", &mm_experts_py, nb::arg("routed_type"), nb::arg("routed"), nb::arg("shared_type"),
          nb::arg("shared").none(), nb::arg("cols"), nb::arg("x"), nb::arg("offsets"), nb::arg("src_row"),
          nb::arg("dst_row"), nb::arg("n_dst_rows"), nb::arg("max_pairs_per_expert") = -1,
          "Grouped-by-expert prefill matmul; max_pairs_per_expert < 0 means n (tokens).");
}
