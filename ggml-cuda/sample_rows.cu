// Per-row sampling on the GPU: the CPU Sampler's chain (src/sampling.cpp) with each row's own
// parameters, in three launches of one 1024-thread block per row:
//   prepare: raw logits -> work rows with logit bias and penalties; log-normaliser of the raw row;
//   sample:  greedy argmax, or top_k -> typical_p -> top_p -> min_p -> temperature -> draw on work;
//   top:     (only when a row asks) the most likely raw-logit tokens with their logprobs.
// Penalties count each window token with integer atomics on a per-row count row that is zero
// before and after (each distinct token is penalised once, by the thread that clears its count).
// Sampling: when at most kRowSampleMaxCandidates tokens survive top_k (radix selection, see
// sample_select.cuh), they are sorted in shared memory and the rest of the chain follows the CPU's
// steps one by one (typical_p's score order, top_p's cumulative mass, the id-ordered draw), in
// double; only the order of the sums differs from the CPU's sequential ones. More candidates
// (top_k off or large) take sample.cu's radix path, which has no typical_p: those rows get -2.
#include <cmath>
#include <stdexcept>
#include <string>

#include "cuda_common.cuh"
#include "kernels.h"
#include "sample_select.cuh"

namespace glmoe::cuda {

namespace {

constexpr int kCand = kRowSampleMaxCandidates;
// Shared memory of the candidate path: keys, probabilities, a second key array, an order, flags.
constexpr size_t kCandidateBytes = kCand * (3 * sizeof(uint64_t) + sizeof(int32_t) + sizeof(uint8_t));

// ---- prepare ----------------------------------------------------------------------------------

__global__ void __launch_bounds__(kThreads) prepare_kernel(const float* __restrict__ logits, float* __restrict__ work,
                                                           int32_t* __restrict__ counts, double* __restrict__ log_norm,
                                                           int n_vocab, const RowSampleParams* __restrict__ params,
                                                           const LogitBiasEntry* __restrict__ bias,
                                                           const int32_t* __restrict__ history) {
    pdl_enter();
    __shared__ float fscratch[32];
    __shared__ double dscratch[32];
    const RowSampleParams p = params[blockIdx.x];
    if (p.skip) return;
    const int tid = threadIdx.x;
    const int64_t off = static_cast<int64_t>(blockIdx.x) * n_vocab;
    const float* raw = logits + off;
    float* w = work + off;
    int32_t* cnt = counts + off;

    // One block streams the whole row (a vocabulary of 151552 is 600 KB): 16-byte loads, several
    // in flight per thread, keep that from being latency-bound.
    const bool vec4 = n_vocab % 4 == 0 && reinterpret_cast<uintptr_t>(raw) % 16 == 0 &&
                      reinterpret_cast<uintptr_t>(w) % 16 == 0;
    const int n4 = vec4 ? n_vocab / 4 : 0;
    float mx = -INFINITY;
#pragma unroll 4
    for (int i = tid; i < n4; i += blockDim.x) {
        const float4 v = reinterpret_cast<const float4*>(raw)[i];
        reinterpret_cast<float4*>(w)[i] = v;
        mx = fmaxf(fmaxf(mx, fmaxf(v.x, v.y)), fmaxf(v.z, v.w));
    }
    for (int i = 4 * n4 + tid; i < n_vocab; i += blockDim.x) {
        const float x = raw[i];
        w[i] = x;
        mx = fmaxf(mx, x);
    }
    mx = block_max(mx, fscratch);
    // The engine's token_logprobs: log-sum-exp of the raw row around its float max, summed in
    // double. Each term is a float exp of the exact difference (a double exp per token cost tens
    // of microseconds on one SM); the normaliser stays within ~1e-7 of the CPU's double one.
    const double dmx = mx;
    auto term = [dmx](float x) { return static_cast<double>(expf(static_cast<float>(static_cast<double>(x) - dmx))); };
    double sum = 0.0;
#pragma unroll 4
    for (int i = tid; i < n4; i += blockDim.x) {
        const float4 v = reinterpret_cast<const float4*>(raw)[i];
        sum += (term(v.x) + term(v.y)) + (term(v.z) + term(v.w));
    }
    for (int i = 4 * n4 + tid; i < n_vocab; i += blockDim.x) sum += term(raw[i]);
    sum = block_sum(sum, dscratch);
    if (tid == 0) log_norm[blockIdx.x] = static_cast<double>(mx) + log(sum);
    __syncthreads();

    // In list order by one thread: repeated tokens add up exactly as on the CPU.
    if (tid == 0)
        for (int j = 0; j < p.bias_count; ++j) {
            const LogitBiasEntry e = bias[p.bias_begin + j];
            if (e.token >= 0 && e.token < n_vocab) w[e.token] += e.bias;
        }
    __syncthreads();

    const bool neutral = p.repeat_penalty == 1.0f && p.presence_penalty == 0.0f && p.frequency_penalty == 0.0f;
    if (p.repeat_last_n == 0 || neutral) return;
    const int window = p.repeat_last_n < 0 ? p.hist_len : min(p.hist_len, p.repeat_last_n);
    const int32_t* h = history + p.hist_begin + (p.hist_len - window);
    for (int i = tid; i < window; i += blockDim.x)
        if (h[i] >= 0 && h[i] < n_vocab) atomicAdd(&cnt[h[i]], 1);
    __syncthreads();
    for (int i = tid; i < window; i += blockDim.x) {
        const int32_t t = h[i];
        if (t < 0 || t >= n_vocab) continue;
        const int32_t c = atomicExch(&cnt[t], 0);
        if (c == 0) continue;  // another occurrence's thread took it
        float x = w[t];
        // Unfused float operations, as the CPU's expression (negative logits are multiplied).
        x = x <= 0.0f ? __fmul_rn(x, p.repeat_penalty) : __fdiv_rn(x, p.repeat_penalty);
        x = __fsub_rn(x, __fadd_rn(__fmul_rn(static_cast<float>(c), p.frequency_penalty), p.presence_penalty));
        w[t] = x;
    }
}

// ---- the candidate path ---------------------------------------------------------------------------

// Ascending bitonic sort of a[0, n2) (n2 a power of two) under `less`; the block calls it together.
template <typename T, typename Less>
__device__ void bitonic_sort(T* a, int n2, Less less) {
    __syncthreads();
    for (int k = 2; k <= n2; k <<= 1) {
        for (int j = k >> 1; j > 0; j >>= 1) {
            for (int i = threadIdx.x; i < n2; i += blockDim.x) {
                const int partner = i ^ j;
                if (partner <= i) continue;
                const bool ascending = (i & k) == 0;
                const T x = a[i], y = a[partner];
                if (less(y, x) == ascending) {
                    a[i] = y;
                    a[partner] = x;
                }
            }
            __syncthreads();
        }
    }
}

// A candidate's sort key: descending logit, then ascending id (the CPU's Better order) as one
// ascending integer.
__device__ __forceinline__ uint64_t better_key(float x, int id) {
    return (static_cast<uint64_t>(~float_key(x)) << 32) | static_cast<uint32_t>(id);
}
__device__ __forceinline__ float key_logit(uint64_t k) { return key_float(~static_cast<uint32_t>(k >> 32)); }
__device__ __forceinline__ int key_id(uint64_t k) { return static_cast<int>(static_cast<uint32_t>(k)); }

// Sum of v(i) for i in [0, n) by warp 0 in 32-wide steps, the order the walks below use, so that
// a walk's last cumulative equals this total exactly. Valid in warp 0.
template <typename V>
__device__ double warp_total(int n, V v) {
    const int lane = threadIdx.x & 31;
    double base = 0.0;
    for (int j0 = 0; j0 < n; j0 += 32) {
        const double incl = warp_inclusive_scan(j0 + lane < n ? v(j0 + lane) : 0.0);
        base += __shfl_sync(kFullMask, incl, 31);
    }
    return base;
}

// The chain after top_k over the n_cand (<= kCand) tokens that survive it; the token in thread 0.
__device__ int draw_candidates(const float* __restrict__ row, int n_vocab, int chunk, bool vec4, Shared& sh,
                               const RowSampleParams& p, float mx, uint32_t n_valid, uint8_t* smem) {
    __shared__ uint32_t n_taken;
    __shared__ int first_alive, cut, n_alive;
    const int tid = threadIdx.x, lane = tid & 31;
    uint64_t* key = reinterpret_cast<uint64_t*>(smem);
    double* prob = reinterpret_cast<double*>(key + kCand);
    uint64_t* aux = reinterpret_cast<uint64_t*>(prob + kCand);
    int32_t* ord = reinterpret_cast<int32_t*>(aux + kCand);
    uint8_t* alive = reinterpret_cast<uint8_t*>(ord + kCand);

    // top_k's cut, then the survivors into shared memory (the r lowest-id ties at the cut's key).
    const Cut all{0, 0, 0, true};
    Cut ck = all;
    if (p.top_k > 0 && static_cast<uint32_t>(p.top_k) < n_valid)
        ck = radix_select<false>(row, n_vocab, chunk, vec4, sh, static_cast<uint32_t>(p.top_k), 0.0f, mx, all);
    const bool partial = !ck.all && ck.r < ck.n_eq;
    uint32_t tie_rank = 0;
    if (partial) {
        uint32_t ties = 0;
        visit_chunk(row, n_vocab, chunk, vec4, tid, [&](int, float x) {
            if (valid_logit(x) && float_key(x) == ck.key) ++ties;
        });
        uint32_t total_ties;
        tie_rank = block_exclusive_scan(ties, sh.uscratch, total_ties);
    }
    if (tid == 0) n_taken = 0;
    __syncthreads();
    visit_chunk(row, n_vocab, chunk, vec4, tid, [&](int i, float x) {
        if (!valid_logit(x)) return;
        if (!ck.all) {
            const uint32_t k = float_key(x);
            if (k < ck.key) return;
            if (k == ck.key && partial && tie_rank++ >= ck.r) return;
        }
        const uint32_t slot = atomicAdd(&n_taken, 1u);
        if (slot < kCand) key[slot] = better_key(x, i);
    });
    __syncthreads();
    const int n = static_cast<int>(min(n_taken, static_cast<uint32_t>(kCand)));
    int n2 = 1;
    while (n2 < n) n2 <<= 1;
    for (int i = n + tid; i < n2; i += blockDim.x) key[i] = ~uint64_t{0};
    bitonic_sort(key, n2, [](uint64_t a, uint64_t b) { return a < b; });
    for (int i = tid; i < n; i += blockDim.x) alive[i] = 1;
    __syncthreads();

    // typical_p: probabilities over the candidates, entropy, then the shortest prefix of the
    // |-log p - entropy| order (ties: the better token first) whose mass exceeds typical_p.
    if (p.typical_p < 1.0f) {
        const double m = key_logit(key[0]);
        double part = 0.0;
        for (int i = tid; i < n; i += blockDim.x) part += prob[i] = exp(static_cast<double>(key_logit(key[i])) - m);
        const double total = block_sum(part, sh.dscratch);
        double ent = 0.0;
        for (int i = tid; i < n; i += blockDim.x) {
            const double q = prob[i] / total;
            prob[i] = q;
            if (q > 0.0) ent -= q * log(q);
        }
        const double entropy = block_sum(ent, sh.dscratch);
        double* score = reinterpret_cast<double*>(aux);
        for (int i = tid; i < n2; i += blockDim.x) {
            ord[i] = i;
            if (i < n) score[i] = prob[i] > 0.0 ? fabs(-log(prob[i]) - entropy) : INFINITY;
        }
        bitonic_sort(ord, n2, [&](int32_t a, int32_t b) {
            if ((a >= n) != (b >= n)) return a < b;  // padding last
            if (a >= n) return a < b;
            if (score[a] != score[b]) return score[a] < score[b];
            return a < b;
        });
        if (tid < 32) {
            int keep = n;
            double base = 0.0;
            for (int j0 = 0; j0 < n; j0 += 32) {
                const int j = j0 + lane;
                const double incl = warp_inclusive_scan(j < n ? prob[ord[j]] : 0.0);
                const unsigned hit = __ballot_sync(kFullMask, j < n && base + incl > static_cast<double>(p.typical_p));
                if (hit) {
                    keep = j0 + __ffs(hit);
                    break;
                }
                base += __shfl_sync(kFullMask, incl, 31);
            }
            if (lane == 0) cut = keep;
        }
        __syncthreads();
        for (int j = tid; j < n; j += blockDim.x) alive[ord[j]] = j < cut;
        __syncthreads();
    }

    // The best survivor: the max that top_p, min_p and the draw measure from.
    if (tid == 0) first_alive = n;
    __syncthreads();
    for (int i = tid; i < n; i += blockDim.x)
        if (alive[i]) atomicMin(&first_alive, i);
    __syncthreads();
    const double m = key_logit(key[first_alive]);

    // top_p keeps the shortest prefix (better order, survivors only) with mass >= top_p, min_p the
    // tokens with logit - max >= log(min_p): also a prefix. The shorter one stays.
    const bool use_top_p = p.top_p < 1.0f, use_min_p = p.min_p > 0.0f;
    if (use_top_p || use_min_p) {
        auto passes = [&](int i) { return static_cast<double>(key_logit(key[i])) - m >= p.log_min_p; };
        if (!use_top_p) {
            for (int i = tid; i < n; i += blockDim.x)
                if (alive[i] && !passes(i)) alive[i] = 0;
            __syncthreads();
        } else {
            uint32_t c = 0;
            double part = 0.0;
            for (int i = tid; i < n; i += blockDim.x) {
                if (!alive[i]) continue;
                c += !use_min_p || passes(i);
                part += exp(static_cast<double>(key_logit(key[i])) - m);
            }
            const uint32_t n_min_p = block_sum(c, sh.uscratch);
            const double total = block_sum(part, sh.dscratch);
            if (tid < 32) {
                int last = n - 1;
                double base = 0.0;
                uint32_t rank_base = 0;
                for (int j0 = 0; j0 < n; j0 += 32) {
                    const int j = j0 + lane;
                    const bool a = j < n && alive[j];
                    const double v = a ? exp(static_cast<double>(key_logit(key[j])) - m) / total : 0.0;
                    const double incl = warp_inclusive_scan(v);
                    const unsigned am = __ballot_sync(kFullMask, a);
                    const uint32_t rank = rank_base + __popc(am & ((1u << lane) - 1u));
                    const bool stop = a && (base + incl >= static_cast<double>(p.top_p) || rank + 1 == n_min_p);
                    const unsigned hit = __ballot_sync(kFullMask, stop);
                    if (hit) {
                        last = j0 + __ffs(hit) - 1;
                        break;
                    }
                    base += __shfl_sync(kFullMask, incl, 31);
                    rank_base += __popc(am);
                }
                if (lane == 0) cut = last;
            }
            __syncthreads();
            for (int i = tid; i < n; i += blockDim.x)
                if (i > cut) alive[i] = 0;
            __syncthreads();
        }
    }

    // The draw: survivors in ascending id order, tempered weights exp((x - max) / T), the first
    // whose cumulative weight exceeds u * total (the last positive one if rounding overshoots).
    for (int i = tid; i < n2; i += blockDim.x)
        aux[i] = i < n && alive[i] ? (static_cast<uint64_t>(key_id(key[i])) << 32) | static_cast<uint32_t>(i)
                                   : ~uint64_t{0};
    if (tid == 0) n_alive = 0;
    __syncthreads();
    for (int i = tid; i < n; i += blockDim.x)
        if (alive[i]) atomicAdd(&n_alive, 1);
    bitonic_sort(aux, n2, [](uint64_t a, uint64_t b) { return a < b; });
    if (tid >= 32) return -1;
    const int na = n_alive;
    const double temperature = static_cast<double>(p.temperature);
    auto weight = [&](int j) {
        const int i = static_cast<int>(static_cast<uint32_t>(aux[j]));
        return exp((static_cast<double>(key_logit(key[i])) - m) / temperature);
    };
    const double target = p.u * warp_total(na, weight);
    double base = 0.0;
    int result = -1, last_positive = -1;
    for (int j0 = 0; j0 < na; j0 += 32) {
        const int j = j0 + lane;
        const double w = j < na ? weight(j) : 0.0;
        const double incl = warp_inclusive_scan(w);
        const unsigned hit = __ballot_sync(kFullMask, w > 0.0 && target < base + incl);
        if (hit) {
            result = j0 + __ffs(hit) - 1;
            break;
        }
        const unsigned pos = __ballot_sync(kFullMask, w > 0.0);
        if (pos) last_positive = j0 + 31 - __clz(pos);
        base += __shfl_sync(kFullMask, incl, 31);
    }
    if (result < 0) result = last_positive;
    return result < 0 ? -1 : static_cast<int>(aux[result] >> 32);
}

// ---- sample -----------------------------------------------------------------------------------

__global__ void __launch_bounds__(kThreads) sample_rows_kernel(const float* __restrict__ work,
                                                               const float* __restrict__ logits,
                                                               const double* __restrict__ log_norm, int n_vocab,
                                                               const RowSampleParams* __restrict__ params,
                                                               int32_t* __restrict__ history,
                                                               SampledToken* __restrict__ out) {
    pdl_enter();
    extern __shared__ __align__(16) uint8_t smem[];
    __shared__ Shared sh;
    const RowSampleParams p = params[blockIdx.x];
    if (p.skip) return;
    const int tid = threadIdx.x;
    const int64_t off = static_cast<int64_t>(blockIdx.x) * n_vocab;
    const float* row = work + off;
    const bool vec4 = (n_vocab % 4 == 0) && (reinterpret_cast<uintptr_t>(row) % 16 == 0);
    int chunk = (n_vocab + kThreads - 1) / kThreads;
    chunk = (chunk + 3) & ~3;

    int id;
    if (p.temperature <= 0.0f) {
        id = row_argmax(row, n_vocab, chunk, vec4, sh);
    } else {
        float mx = -INFINITY;
        uint32_t n_valid = 0;
        visit_chunk(row, n_vocab, chunk, vec4, tid, [&](int, float x) {
            if (valid_logit(x)) {
                mx = fmaxf(mx, x);
                ++n_valid;
            }
        });
        mx = block_max(mx, sh.fscratch);
        n_valid = block_sum(n_valid, sh.uscratch);
        __syncthreads();
        const uint32_t n_cand = p.top_k > 0 && static_cast<uint32_t>(p.top_k) < n_valid ? p.top_k : n_valid;
        if (n_valid == 0) {
            id = -1;
        } else if (n_cand <= static_cast<uint32_t>(kCand)) {
            id = draw_candidates(row, n_vocab, chunk, vec4, sh, p, mx, n_valid, smem);
        } else if (p.typical_p < 1.0f) {
            id = -2;
        } else {
            KernelParams kp{};
            kp.top_p = p.top_p;
            kp.top_k = p.top_k;
            kp.use_top_p = p.top_p < 1.0f;
            kp.use_min_p = p.min_p > 0.0f;
            kp.log_min_p = p.log_min_p;
            kp.inv_temp = 1.0 / static_cast<double>(p.temperature);
            id = draw_radix(row, n_vocab, chunk, vec4, sh, kp, mx, n_valid, p.u);
        }
    }
    if (tid != 0) return;
    SampledToken t{id, NAN};
    if (id >= 0) {
        t.logprob = static_cast<float>(static_cast<double>(logits[off + id]) - log_norm[blockIdx.x]);
        if (p.append) history[p.hist_begin + p.hist_len] = id;
    }
    out[blockIdx.x] = t;
}

// ---- top logprobs -----------------------------------------------------------------------------

// n_top block-wide argmax passes, each over the tokens after the previous pick in the better
// order (NaN skipped, -inf included), as the engine's host loop ranks them.
__global__ void __launch_bounds__(kThreads) top_kernel(const float* __restrict__ logits,
                                                       const double* __restrict__ log_norm, int n_vocab,
                                                       const RowSampleParams* __restrict__ params,
                                                       SampledToken* __restrict__ top) {
    pdl_enter();
    __shared__ float fscratch[32];
    __shared__ int iscratch[32];
    __shared__ float prev_x;
    __shared__ int prev_id;
    const RowSampleParams p = params[blockIdx.x];
    if (p.skip || p.n_top <= 0) return;
    const int tid = threadIdx.x, lane = tid & 31;
    const float* raw = logits + static_cast<int64_t>(blockIdx.x) * n_vocab;
    SampledToken* dst = top + static_cast<int64_t>(blockIdx.x) * kRowSampleMaxTop;
    if (tid == 0) {
        prev_x = INFINITY;
        prev_id = -1;
    }
    __syncthreads();
    const int n_top = min(p.n_top, kRowSampleMaxTop);
    for (int k = 0; k < n_top; ++k) {
        const float px = prev_x;
        const int pid = prev_id;
        float bv = -INFINITY;
        int bi = 0x7FFFFFFF;
        for (int i = tid; i < n_vocab; i += blockDim.x) {
            const float x = raw[i];
            if (isnan(x) || !(x < px || (x == px && i > pid))) continue;
            if (x > bv || (x == bv && i < bi)) {
                bv = x;
                bi = i;
            }
        }
        warp_argmax(bv, bi);
        __syncthreads();  // the previous pass's readers of the scratch are done
        if (lane == 0) {
            fscratch[tid >> 5] = bv;
            iscratch[tid >> 5] = bi;
        }
        __syncthreads();
        if (tid < 32) {
            bv = fscratch[lane];
            bi = iscratch[lane];
            warp_argmax(bv, bi);
            if (lane == 0) {
                const bool found = bi != 0x7FFFFFFF;
                const double lp = static_cast<double>(bv) - log_norm[blockIdx.x];
                dst[k] = SampledToken{found ? bi : -1, found ? static_cast<float>(lp) : NAN};
                prev_x = bv;
                prev_id = found ? bi : 0x7FFFFFFF;
            }
        }
        __syncthreads();
    }
    for (int k = n_top + tid; k < kRowSampleMaxTop; k += blockDim.x) dst[k] = SampledToken{-1, NAN};
}

}  // namespace

void sample_rows(const float* logits, float* work, int32_t* counts, double* log_norm, int n_rows, int n_vocab,
                 const RowSampleParams* params, const LogitBiasEntry* bias, int32_t* history, SampledToken* out,
                 SampledToken* top, bool any_top, cudaStream_t s) {
    if (n_rows < 0 || n_vocab <= 0) throw std::invalid_argument("sample_rows: bad shape");
    if (n_rows == 0) return;
    static const bool smem_ok = [] {
        return cudaFuncSetAttribute(sample_rows_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(kCandidateBytes)) == cudaSuccess;
    }();
    if (!smem_ok) throw std::runtime_error("sample_rows: the candidate sort's shared memory is not available");
    launch_kernel(prepare_kernel, dim3(n_rows), dim3(kThreads), 0, s, logits, work, counts, log_norm, n_vocab, params,
                  bias, static_cast<const int32_t*>(history));
    check_launch("sample_rows (prepare)");
    launch_kernel(sample_rows_kernel, dim3(n_rows), dim3(kThreads), kCandidateBytes, s,
                  static_cast<const float*>(work), logits, static_cast<const double*>(log_norm), n_vocab, params,
                  history, out);
    check_launch("sample_rows (sample)");
    if (any_top) {
        launch_kernel(top_kernel, dim3(n_rows), dim3(kThreads), 0, s, logits, static_cast<const double*>(log_norm),
                      n_vocab, params, top);
        check_launch("sample_rows (top)");
    }
}

}  // namespace glmoe::cuda
