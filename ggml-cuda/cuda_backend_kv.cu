// The CUDA backend's KV rows as KVRows (src/kv_cache.h): a layer's rows copied through the host,
// in the bytes the device stores (the CPU backend's format for the same types), for save/load.
#include "cuda_backend_impl.cuh"

namespace glmoe {

int64_t CudaBackendImpl::width(int il) const {
    return layers_[il].attn ? static_cast<int64_t>(layers_[il].n_head_kv) * hp_.head_dim_k : 0;
}

uint8_t* CudaBackendImpl::k(int, int32_t) {
    throw std::logic_error("the GPU's KV rows are in device memory: use read_rows / write_rows");
}

uint8_t* CudaBackendImpl::v(int, int32_t) {
    throw std::logic_error("the GPU's KV rows are in device memory: use read_rows / write_rows");
}

namespace {

// The whole of one side of a layer's cache through the host: one copy each way, whatever the
// cells (a state saves and loads rarely; a copy per row would cost a round trip per cell).
// Copies on the backend's stream, waited for: ordered after its steps and before the next one.
void copy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t s) {
    ck(cudaMemcpyAsync(dst, src, bytes, kind, s), "copying the KV cache");
    ck(cudaStreamSynchronize(s), "copying the KV cache");
}

void read_side(const void* cache, size_t row_bytes, int n_ctx, const std::vector<int32_t>& cells, uint8_t* out,
               cudaStream_t s) {
    std::vector<uint8_t> all(row_bytes * static_cast<size_t>(n_ctx));
    copy(all.data(), cache, all.size(), cudaMemcpyDeviceToHost, s);
    for (size_t i = 0; i < cells.size(); ++i)
        std::memcpy(out + i * row_bytes, all.data() + cells[i] * row_bytes, row_bytes);
}

void write_side(void* cache, size_t row_bytes, int n_ctx, const std::vector<int32_t>& cells, const uint8_t* in,
                cudaStream_t s) {
    std::vector<uint8_t> all(row_bytes * static_cast<size_t>(n_ctx));
    copy(all.data(), cache, all.size(), cudaMemcpyDeviceToHost, s);
    for (size_t i = 0; i < cells.size(); ++i)
        std::memcpy(all.data() + cells[i] * row_bytes, in + i * row_bytes, row_bytes);
    copy(cache, all.data(), all.size(), cudaMemcpyHostToDevice, s);
}

}  // namespace

void CudaBackendImpl::read_rows(int il, const std::vector<int32_t>& cells, uint8_t* k_out, uint8_t* v_out) {
    const DevLayer& l = layers_[il];
    if (!l.attn || cells.empty()) return;
    read_side(l.k_cache, l.k_row_bytes, p_.n_ctx, cells, k_out, stream_);
    read_side(l.v_cache, l.v_row_bytes, p_.n_ctx, cells, v_out, stream_);
}

void CudaBackendImpl::write_rows(int il, const std::vector<int32_t>& cells, const uint8_t* k_in, const uint8_t* v_in) {
    const DevLayer& l = layers_[il];
    if (!l.attn || cells.empty()) return;
    write_side(l.k_cache, l.k_row_bytes, p_.n_ctx, cells, k_in, stream_);
    write_side(l.v_cache, l.v_row_bytes, p_.n_ctx, cells, v_in, stream_);
}

}  // namespace glmoe
