// The CUDA backend's per-row sampling (StepOutput::Kind::sampled; kernels in sample_rows.cu).
// Everything that changes from step to step (parameters, draws, logit biases, new history tokens)
// is uploaded in begin_step before a graph is captured or replayed, into buffers at fixed
// addresses; the output then costs one device-to-host copy of ids and logprobs (a second for top
// logprobs, one per row whose logits the host wants) and one wait, which a deferred step leaves to
// finish_sampled() so that the host can begin the next step first.
#include "cuda_backend_impl.cuh"
#include "row_sample_params.h"

namespace glmoe {

static_assert(kRowSampleMaxTop == kMaxSampledTop, "backend.h and kernels.h agree on top logprobs");
static_assert(kRowSampleMaxCandidates == kMaxTypicalCandidates, "backend.h and kernels.h agree on typical_p");
static_assert(sizeof(SampledToken) == sizeof(SampledTop), "top entries are copied as they are");

void CudaBackendImpl::lay_out_sampling(Arena& a) {
    if (placement_.output != Device::gpu || p_.embeddings) return;
    const size_t rows = kLogitRows, n = static_cast<size_t>(U_);
    work_ = a.array<float>(rows * hp_.n_vocab);
    counts_ = a.array<int32_t>(rows * hp_.n_vocab);
    log_norm_ = a.array<double>(rows);
    row_params_ = a.array<RowSampleParams>(n);
    bias_ = a.array<LogitBiasEntry>(n * kMaxRowLogitBias);
    history_ = a.array<int32_t>(static_cast<size_t>(KVCache::kMaxSeq) * p_.n_ctx);
    sampled_ = a.array<SampledToken>(n);
    top_ = a.array<SampledToken>(n * kMaxSampledTop);
}

void CudaBackendImpl::init_sampling() {
    if (!sampled_) return;
    const size_t n = static_cast<size_t>(U_);
    ck(cudaMemset(counts_, 0, sizeof(int32_t) * kLogitRows * hp_.n_vocab), "clearing penalty counts");
    for (Staging& set : staging_) {
        ck(cudaMallocHost(&set.row_params, sizeof(RowSampleParams) * n), "allocating pinned memory");
        ck(cudaMallocHost(&set.bias, sizeof(LogitBiasEntry) * n * kMaxRowLogitBias), "allocating pinned memory");
    }
    for (SampledOut& o : outs_) {
        ck(cudaMallocHost(&o.ids, sizeof(SampledToken) * n), "allocating pinned memory");
        ck(cudaMallocHost(&o.top, sizeof(SampledToken) * n * kMaxSampledTop), "allocating pinned memory");
        ck(cudaEventCreateWithFlags(&o.landed, cudaEventDisableTiming), "creating an event");
    }
    history_mirror_ = std::make_unique<HistoryMirror>(KVCache::kMaxSeq, p_.n_ctx);
}

void CudaBackendImpl::free_sampling() {
    for (Staging& set : staging_)
        for (void* ptr : {static_cast<void*>(set.row_params), static_cast<void*>(set.bias)})
            if (ptr) cudaFreeHost(ptr);
    if (h_hist_) cudaFreeHost(h_hist_);
    for (SampledOut& o : outs_) {
        for (void* ptr : {static_cast<void*>(o.ids), static_cast<void*>(o.top)})
            if (ptr) cudaFreeHost(ptr);
        if (o.landed) cudaEventDestroy(o.landed);
    }
}

void CudaBackendImpl::stage_row_sampling(const StepOutput& out) {
    if (!sampled_) throw std::logic_error("per-row sampling needs the output head on the GPU");
    const int n_rows = static_cast<int>(out.rows.size());
    RowSampleParams* const h_row_params = staged().row_params;
    LogitBiasEntry* const h_bias = staged().bias;
    append_seq_.assign(n_rows, -1);
    // A sequence sampled in two rows of one step cannot take both tokens: no appends for it.
    std::vector<int> rows_of_seq(KVCache::kMaxSeq, 0);
    struct Upload {
        int seq;
        size_t first;
        const std::vector<int32_t>* history;
    };
    std::vector<Upload> uploads;
    size_t n_bias = 0, n_upload = 0;
    try {
        for (int r = 0; r < n_rows; ++r) {
            const RowSampling& rs = out.row_sampling[r];
            RowSampleParams q{};
            if (!rs.params) {
                q.skip = 1;
                if (r < 64) host_rows_ |= uint64_t{1} << r;
                h_row_params[r] = q;
                continue;
            }
            const SamplingParams& sp = *rs.params;
            q = cuda::row_sample_params(sp, rs.u, rs.n_top);
            any_top_ = any_top_ || q.n_top > 0;
            if (sp.logit_bias.size() > static_cast<size_t>(kMaxRowLogitBias))
                throw std::invalid_argument("GPU sampling takes at most " + std::to_string(kMaxRowLogitBias) +
                                            " logit_bias entries per row");
            q.bias_begin = static_cast<int32_t>(n_bias);
            for (const auto& [token, bias] : sp.logit_bias) h_bias[n_bias++] = LogitBiasEntry{token, bias};
            if (sp.penalizes()) {
                if (!rs.history) throw std::invalid_argument("penalties need the row's history");
                if (rs.seq < 0 || rs.seq >= KVCache::kMaxSeq)
                    throw std::invalid_argument("bad sequence for a history");
                const size_t first = history_mirror_->sync(rs.seq, *rs.history);
                if (first < rs.history->size()) {
                    uploads.push_back({rs.seq, first, rs.history});
                    n_upload += rs.history->size() - first;
                }
                q.hist_begin = rs.seq * p_.n_ctx;
                q.hist_len = static_cast<int32_t>(rs.history->size());
                if (rs.history->size() < static_cast<size_t>(p_.n_ctx)) {
                    q.append = 1;
                    append_seq_[r] = rs.seq;
                    ++rows_of_seq[rs.seq];
                }
            }
            h_row_params[r] = q;
        }
        for (int r = 0; r < n_rows; ++r)
            if (append_seq_[r] >= 0 && rows_of_seq[append_seq_[r]] > 1) {
                h_row_params[r].append = 0;
                history_mirror_->forget(append_seq_[r]);
                append_seq_[r] = -1;
            }
        if (n_upload > h_hist_cap_) {  // the previous step has ended, so its staging is free
            if (h_hist_) cudaFreeHost(h_hist_);
            h_hist_ = nullptr;
            h_hist_cap_ = 0;
            ck(cudaMallocHost(&h_hist_, sizeof(int32_t) * n_upload), "allocating pinned memory");
            h_hist_cap_ = n_upload;
        }
        size_t staged = 0;
        for (const Upload& u : uploads) {
            const size_t count = u.history->size() - u.first;
            std::copy(u.history->begin() + u.first, u.history->end(), h_hist_ + staged);
            ck(cudaMemcpyAsync(history_ + static_cast<size_t>(u.seq) * p_.n_ctx + u.first, h_hist_ + staged,
                               sizeof(int32_t) * count, cudaMemcpyHostToDevice, stream_),
               "history upload");
            staged += count;
        }
        ck(cudaMemcpyAsync(row_params_, h_row_params, sizeof(RowSampleParams) * n_rows, cudaMemcpyHostToDevice,
                           stream_),
           "sampling parameters");
        if (n_bias)
            ck(cudaMemcpyAsync(bias_, h_bias, sizeof(LogitBiasEntry) * n_bias, cudaMemcpyHostToDevice, stream_),
               "logit bias");
    } catch (...) {
        // Whatever the record claims for these sequences may not have reached the device.
        for (int r = 0; r < n_rows; ++r) {
            const RowSampling& rs = out.row_sampling[r];
            if (rs.params && rs.seq >= 0 && rs.seq < KVCache::kMaxSeq) history_mirror_->forget(rs.seq);
        }
        throw;
    }
}

void CudaBackendImpl::output_sampled(const StepOutput& out) {
    const int64_t H = hp_.n_embd, V = hp_.n_vocab;
    const int n_rows_total = static_cast<int>(out.rows.size());
    SampledOut& o = outs_[out_next_];
    if (o.pending) throw std::logic_error("more than kMaxDeferredSteps deferred steps outstanding");
    int64_t host_rows_done = 0;
    for (int r0 = 0; r0 < n_rows_total; r0 += kLogitRows) {
        const int n_rows = std::min(kLogitRows, n_rows_total - r0);
        if (!skip()) {
            gather_rows(x_, in(IN_ROWS) + r0, n_rows, H, h_, stream_);
            cuda::rms_norm(h_, output_norm_, n_rows, H, hp_.rms_eps, h_, stream_);
        }
        output_head(h_, n_rows, logits_);
        if (!skip())
            sample_rows(logits_, work_, counts_, log_norm_, n_rows, static_cast<int>(V), row_params_ + r0, bias_,
                        history_, sampled_ + r0, top_ + static_cast<size_t>(r0) * kMaxSampledTop, any_top_, stream_);
        int n_host = 0;
        for (int i = 0; i < n_rows; ++i)
            if (!out.row_sampling[r0 + i].params)
                copy_to_host(h_out_ + n_host++ * V, logits_ + i * V, sizeof(float) * V);
        if (n_host) {  // h_out_ holds one pass: hand it over before the next pass refills it
            if (out.deferred) throw std::logic_error("a deferred step samples every row on the GPU");
            end_stretch();
            wait();
            std::memcpy(out.logits + host_rows_done * V, h_out_, sizeof(float) * n_host * V);
            host_rows_done += n_host;
        }
    }
    end_stretch();
    // The sampled ids of every pass in one copy, outside the graphs (each step in its own slot,
    // so that the host may read one while the next step runs): a step waits once, however many
    // passes it took.
    ++counters_.device_to_host_copies;
    ck(cudaMemcpyAsync(o.ids, sampled_, sizeof(SampledToken) * n_rows_total, cudaMemcpyDeviceToHost, stream_),
       "copy to host");
    if (any_top_) {
        ++counters_.device_to_host_copies;
        ck(cudaMemcpyAsync(o.top, top_, sizeof(SampledToken) * n_rows_total * kMaxSampledTop, cudaMemcpyDeviceToHost,
                           stream_),
           "copy to host");
    }
    ck(cudaEventRecord(o.landed, stream_), "recording an event");
    o.n_rows = n_rows_total;
    o.on_device.resize(n_rows_total);
    o.n_top.resize(n_rows_total);
    for (int r = 0; r < n_rows_total; ++r) {
        o.on_device[r] = out.row_sampling[r].params != nullptr;
        o.n_top[r] = out.row_sampling[r].n_top;
    }
    o.append_seq.assign(append_seq_.begin(), append_seq_.begin() + n_rows_total);
    out_next_ = (out_next_ + 1) % kMaxDeferredSteps;
    if (out.deferred) {
        o.pending = true;
        ++out_pending_;
        return;
    }
    read_sampled(o, out.ids, out.logprobs, out.top);
}

void CudaBackendImpl::finish_sampled(int32_t* ids, float* logprobs, SampledTop* top) {
    if (out_pending_ == 0) throw std::logic_error("finish_sampled without a deferred step");
    SampledOut& o = outs_[(out_next_ - out_pending_ + kMaxDeferredSteps) % kMaxDeferredSteps];
    --out_pending_;
    o.pending = false;
    read_sampled(o, ids, logprobs, top);
}

void CudaBackendImpl::read_sampled(SampledOut& o, int32_t* ids, float* logprobs, SampledTop* top) {
    ck(cudaEventSynchronize(o.landed), "GPU step");
    ++counters_.host_syncs;
    for (int r = 0; r < o.n_rows; ++r) {
        if (!o.on_device[r]) continue;
        const SampledToken t = o.ids[r];
        if (t.id == -2)
            throw std::logic_error("typical_p over more than " + std::to_string(kMaxTypicalCandidates) +
                                   " candidates is sampled on the host (Context::samples_row_on_gpu)");
        ids[r] = t.id;
        logprobs[r] = t.logprob;
        if (t.id >= 0 && o.append_seq[r] >= 0) history_mirror_->appended(o.append_seq[r], t.id);
        if (o.n_top[r] > 0 && top)
            std::memcpy(top + static_cast<size_t>(r) * kMaxSampledTop, o.top + static_cast<size_t>(r) * kMaxSampledTop,
                        sizeof(SampledTop) * kMaxSampledTop);
    }
}

}  // namespace glmoe
