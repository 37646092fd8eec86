// The selection machinery of the GPU samplers (sample.cu: one parameter set for all rows;
// sample_rows.cu: the whole chain with per-row parameters): see sample.cu for the method.
// Device code only, in an anonymous namespace: each .cu file gets its own copy.
#pragma once
#include <cmath>
#include <cstdint>

#include "cuda_common.cuh"

namespace glmoe::cuda {

namespace {

constexpr int kThreads = 1024;
constexpr float kFixedOne = 1099511627776.0f;  // 2^40: fixed-point scale of the top_p masses
constexpr float kMassCut = -27.8f;              // exp below this is < 2^-40: fixed mass 0

typedef unsigned long long u64;

__device__ __forceinline__ uint32_t float_key(float x) {
    const uint32_t b = __float_as_uint(x);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float key_float(uint32_t k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k);
}

__device__ __forceinline__ bool valid_logit(float x) { return x > -INFINITY; }  // false for NaN too

// exp(x - m) in 2^-40 fixed point; x - m is formed in double so it is exact.
__device__ __forceinline__ u64 fixed_mass(float x, float m) {
    const float d = static_cast<float>(static_cast<double>(x) - static_cast<double>(m));
    if (d < kMassCut) return 0;
    return __float2ull_rz(expf(d) * kFixedOne);
}

// The survivors: every valid token when `all`, else key > key_t, plus the r lowest-id tokens with
// key == key_t (n_eq of them exist).
struct Cut {
    uint32_t key;
    uint32_t r;
    uint32_t n_eq;
    bool all;
};

struct Shared {
    uint32_t cnt[256];
    u64 mass[256];
    float fscratch[32];
    double dscratch[32];
    uint32_t uscratch[32];
    int iscratch[32];
    // Decisions of the radix levels, broadcast through shared memory.
    uint32_t pref, above_cnt, r, n_eq;
    u64 above_mass, target;
    int all;
    int pick;
    double walk_base;
    uint32_t walk_tie;
};

// Calls f(id, x) for this thread's contiguous chunk [tid * chunk, ...) of the row, in id order.
template <typename F>
__device__ __forceinline__ void visit_chunk(const float* __restrict__ row, int n, int chunk, bool vec4, int tid,
                                            F&& f) {
    const int begin = tid * chunk;
    const int end = min(begin + chunk, n);
    if (vec4) {  // chunk and n are multiples of 4 and the row is 16-byte aligned
        for (int i = begin; i < end; i += 4) {
            const float4 v = *reinterpret_cast<const float4*>(row + i);
            f(i, v.x);
            f(i + 1, v.y);
            f(i + 2, v.z);
            f(i + 3, v.w);
        }
    } else {
        for (int i = begin; i < end; ++i) f(i, row[i]);
    }
}

// Radix selection of a cut. Count mode (kMass false): the first k tokens of the better order.
// Mass mode: the shortest prefix of the tokens inside `lo` whose exp(x - m) mass reaches
// top_p of theirs; `all` when rounding leaves it unreachable.
template <bool kMass>
__device__ Cut radix_select(const float* __restrict__ row, int n, int chunk, bool vec4, Shared& sh, uint32_t k,
                            float top_p, float m, Cut lo) {
    const int tid = threadIdx.x, lane = tid & 31;
    uint32_t pref = 0;
    Cut out{0, 0, 0, false};
    u64 lo_mass = 0;
    if (kMass && !lo.all) lo_mass = fixed_mass(key_float(lo.key), m);
    if (tid == 0) {
        sh.above_cnt = 0;
        sh.above_mass = 0;
        sh.all = 0;
    }
    for (int level = 0; level < 4; ++level) {
        const int shift = 24 - 8 * level;
        for (int i = tid; i < 256; i += blockDim.x) {
            sh.cnt[i] = 0;
            sh.mass[i] = 0;
        }
        __syncthreads();
        visit_chunk(row, n, chunk, vec4, tid, [&](int, float x) {
            if (!valid_logit(x)) return;
            const uint32_t key = float_key(x);
            if (level > 0 && (key >> (shift + 8)) != (pref >> (shift + 8))) return;
            const uint32_t bin = (key >> shift) & 255u;
            if (kMass) {
                // Ties at lo's key enter below as lo.r virtual tokens (only r of them survived top_k).
                if (!lo.all && key <= lo.key) return;
                const u64 w = fixed_mass(x, m);
                if (w == 0) return;
                atomicAdd(&sh.cnt[bin], 1u);
                atomicAdd(&sh.mass[bin], w);
            } else {
                // Logits crowd into few top-level bins: aggregate equal bins within the warp first.
                const unsigned active = __activemask();
                const unsigned peers = __match_any_sync(active, bin);
                if (lane == __ffs(peers) - 1) atomicAdd(&sh.cnt[bin], static_cast<uint32_t>(__popc(peers)));
            }
        });
        __syncthreads();
        if (kMass && tid == 0 && !lo.all && lo_mass > 0 &&
            (level == 0 || (lo.key >> (shift + 8)) == (pref >> (shift + 8)))) {
            const uint32_t bin = (lo.key >> shift) & 255u;
            sh.cnt[bin] += lo.r;
            sh.mass[bin] += static_cast<u64>(lo.r) * lo_mass;
        }
        __syncthreads();
        if (tid < 32) {
            // Lane l holds bins 255 - 8l down to 248 - 8l: lanes in descending key order.
            uint32_t c = 0;
            u64 w = 0;
            for (int j = 0; j < 8; ++j) {
                const int b = 255 - 8 * lane - j;
                c += sh.cnt[b];
                w += sh.mass[b];
            }
            const uint32_t c_incl = warp_inclusive_scan(c);
            const u64 w_incl = warp_inclusive_scan(w);
            const uint32_t above_c = sh.above_cnt;
            const u64 above_w = sh.above_mass;
            if (kMass && level == 0) {
                const u64 total = __shfl_sync(kFullMask, w_incl, 31);
                const double t = ceil(static_cast<double>(top_p) * static_cast<double>(total));
                sh.target = static_cast<u64>(t);  // read below by this same warp only
            }
            __syncwarp();
            const u64 target = sh.target;
            // First lane (descending keys) whose cumulative reaches the goal.
            const bool reach = kMass ? (above_c + c_incl >= 1 && above_w + w_incl >= target)
                                     : (above_c + c_incl >= k);
            const unsigned ballot = __ballot_sync(kFullMask, reach);
            if (ballot == 0) {
                if (lane == 0) sh.all = 1;
            } else if (lane == __ffs(ballot) - 1) {
                uint32_t cc = above_c + c_incl - c;
                u64 ww = above_w + w_incl - w;
                for (int j = 0; j < 8; ++j) {
                    const int b = 255 - 8 * lane - j;
                    const uint32_t nc = cc + sh.cnt[b];
                    const u64 nw = ww + sh.mass[b];
                    const bool hit = kMass ? (nc >= 1 && nw >= target) : (nc >= k);
                    if (hit) {
                        sh.pref = pref | (static_cast<uint32_t>(b) << shift);
                        sh.above_cnt = cc;
                        sh.above_mass = ww;
                        if (level == 3) {
                            const uint32_t n_eq = sh.cnt[b];
                            uint32_t r;
                            if (kMass) {
                                const u64 q = sh.mass[b] / n_eq;  // equal keys have equal masses
                                const u64 need = target > ww ? target - ww : 0;
                                r = need == 0 ? 1u : static_cast<uint32_t>((need + q - 1) / q < n_eq ? (need + q - 1) / q : n_eq);
                            } else {
                                r = k - cc;
                            }
                            sh.r = r;
                            sh.n_eq = n_eq;
                        }
                        break;
                    }
                    cc = nc;
                    ww = nw;
                }
            }
        }
        __syncthreads();
        if (sh.all) {
            out.all = true;
            break;
        }
        pref = sh.pref;
    }
    if (!out.all) {
        out.key = pref;
        out.r = sh.r;
        out.n_eq = sh.n_eq;
    }
    __syncthreads();  // shared state is reused by the caller
    return out;
}

struct KernelParams {
    float top_p;
    int top_k;
    bool greedy, use_top_p, use_min_p;
    double log_min_p;
    double inv_temp;
};

// (value, id) of the warp's largest value, the lowest id among ties, in every lane.
__device__ __forceinline__ void warp_argmax(float& bv, int& bi) {
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(kFullMask, bv, o);
        const int oi = __shfl_xor_sync(kFullMask, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) {
            bv = ov;
            bi = oi;
        }
    }
}

// The argmax of a row, ties to the lowest id, in every lane of warp 0 (other threads: undefined);
// -1 when every logit is -inf or NaN (nothing can be sampled: the CPU throws).
__device__ int row_argmax(const float* __restrict__ row, int n_vocab, int chunk, bool vec4, Shared& sh) {
    const int tid = threadIdx.x, lane = tid & 31;
    int result = -1;
    float bv = -INFINITY;
    int bi = 0x7FFFFFFF;
    visit_chunk(row, n_vocab, chunk, vec4, tid, [&](int i, float x) {
        if (x > bv) {  // strict: the lowest id of ties in the chunk; NaN and -inf never win
            bv = x;
            bi = i;
        }
    });
    warp_argmax(bv, bi);
    if (lane == 0) {
        sh.fscratch[tid >> 5] = bv;
        sh.iscratch[tid >> 5] = bi;
    }
    __syncthreads();
    if (tid < 32) {
        bv = sh.fscratch[lane];
        bi = sh.iscratch[lane];
        warp_argmax(bv, bi);
        result = bi == 0x7FFFFFFF ? -1 : bi;
    }
    return result;
}

// top_k -> top_p -> min_p -> temperature -> draw with u over a row whose max valid logit is mx
// (n_valid of them, > 0). The token is in every lane of warp 0 (other threads: undefined).
__device__ int draw_radix(const float* __restrict__ row, int n_vocab, int chunk, bool vec4, Shared& sh,
                          const KernelParams& p, float mx, uint32_t n_valid, double u) {
    const int tid = threadIdx.x, lane = tid & 31;
    const Cut all{0, 0, 0, true};
    Cut ck = all, cp = all;
    if (p.top_k > 0 && static_cast<uint32_t>(p.top_k) < n_valid)
        ck = radix_select<false>(row, n_vocab, chunk, vec4, sh, static_cast<uint32_t>(p.top_k), 0.0f, mx, all);
    if (p.use_top_p) cp = radix_select<true>(row, n_vocab, chunk, vec4, sh, 0, p.top_p, mx, ck);
    // Both cuts are prefixes of the same order: keep the shorter. top_p only counted tokens
    // inside top_k's cut, so its key is never below top_k's.
    Cut cut;
    if (ck.all) {
        cut = cp;
    } else if (cp.all || cp.key < ck.key) {
        cut = ck;
    } else if (cp.key > ck.key) {
        cut = cp;
    } else {
        cut = ck;
        cut.r = min(ck.r, cp.r);
    }
    const bool partial = !cut.all && cut.r < cut.n_eq;

    // Rank of this thread's first tie (key == cut.key) among all ties, in id order.
    uint32_t tie_start = 0;
    if (partial) {
        uint32_t ties = 0;
        visit_chunk(row, n_vocab, chunk, vec4, tid, [&](int, float x) {
            if (valid_logit(x) && float_key(x) == cut.key) ++ties;
        });
        uint32_t total_ties;
        tie_start = block_exclusive_scan(ties, sh.uscratch, total_ties);
    }

    // Tempered weight of a token, or 0 when it did not survive. `tie_rank` counts ties seen so far.
    const double m = static_cast<double>(mx);
    auto weight = [&](float x, uint32_t& tie_rank) -> double {
        if (!valid_logit(x)) return 0.0;
        bool keep = true;
        if (!cut.all) {
            const uint32_t key = float_key(x);
            if (key < cut.key) {
                keep = false;
            } else if (key == cut.key) {
                keep = !partial || tie_rank < cut.r;
                ++tie_rank;
            }
        }
        const double d = static_cast<double>(x) - m;
        if (!keep || (p.use_min_p && !(d >= p.log_min_p))) return 0.0;
        return static_cast<double>(expf(static_cast<float>(d * p.inv_temp)));
    };

    double mine = 0.0;
    {
        uint32_t tie_rank = tie_start;
        visit_chunk(row, n_vocab, chunk, vec4, tid, [&](int, float x) { mine += weight(x, tie_rank); });
    }
    double total;
    const double before = block_exclusive_scan(mine, sh.dscratch, total);
    const double target = u * total;
    if (tid == 0) sh.pick = -1;
    __syncthreads();
    // The chunk holding the target: the last one with mass that starts at or below it (robust to
    // the rounding of the scan; at least the first positive chunk qualifies).
    if (mine > 0.0 && before <= target) atomicMax(&sh.pick, tid);
    __syncthreads();
    const int pick = sh.pick;
    if (tid == pick) {
        sh.walk_base = before;
        sh.walk_tie = tie_start;
    }
    __syncthreads();
    if (tid >= 32) return -1;

    // Warp 0 walks the picked chunk in id order, 32 tokens a step.
    const int begin = pick * chunk, end = min(begin + chunk, n_vocab);
    double base = sh.walk_base;
    uint32_t tie_run = sh.walk_tie;
    int last_positive = -1, result = -1;
    for (int i0 = begin; i0 < end; i0 += 32) {
        const int id = i0 + lane;
        const float x = id < end ? row[id] : -INFINITY;
        const bool is_tie = !cut.all && valid_logit(x) && float_key(x) == cut.key;
        const unsigned tie_ballot = __ballot_sync(kFullMask, is_tie);
        uint32_t tie_rank = tie_run + __popc(tie_ballot & ((1u << lane) - 1u));
        const double w = weight(x, tie_rank);
        const double incl = warp_inclusive_scan(w);
        const unsigned hit = __ballot_sync(kFullMask, w > 0.0 && target < base + incl);
        if (hit) {
            result = begin + (i0 - begin) + (__ffs(hit) - 1);
            break;
        }
        const unsigned pos = __ballot_sync(kFullMask, w > 0.0);
        if (pos) last_positive = i0 + 31 - __clz(pos);
        base += __shfl_sync(kFullMask, incl, 31);
        tie_run += __popc(tie_ballot);
    }
    // Rounding pushed the target past the chunk's end: take its last drawable token, as the CPU does.
    if (result < 0) result = last_positive;
    return result;
}

}  // namespace

}  // namespace glmoe::cuda
