// Every layer's KV rows from the backend that runs its attention (KVRows, kv_cache.h): what a
// saved state holds, in the same bytes whatever the placement, so that a state saved with one
// placement loads with another that stores the same KV types.
#pragma once
#include <stdexcept>
#include <string>

#include "kv_cache.h"
#include "kv_types.h"
#include "placement.h"

namespace glmoe {

class PlacedKVRows final : public KVRows {
public:
    // gpu: the rows of the layers whose attention is on the GPU (or its cpu_as_gpu stand-in); null
    // when there are none.
    PlacedKVRows(const Placement& placement, KVRows& cpu, KVRows* gpu) : placement_(placement), cpu_(cpu), gpu_(gpu) {}

    int n_layers() const override { return cpu_.n_layers(); }
    int64_t width(int il) const override { return of(il).width(il); }
    // One state header holds one K and one V type: a placement whose devices store different ones
    // (the defaults: f32 on the CPU, f16 on the GPU) cannot be saved or loaded.
    uint32_t type_k() const override { return common(true); }
    uint32_t type_v() const override { return common(false); }
    uint8_t* k(int il, int32_t cell) override { return of(il).k(il, cell); }
    uint8_t* v(int il, int32_t cell) override { return of(il).v(il, cell); }
    void read_rows(int il, const std::vector<int32_t>& cells, uint8_t* k_out, uint8_t* v_out) override {
        of(il).read_rows(il, cells, k_out, v_out);
    }
    void write_rows(int il, const std::vector<int32_t>& cells, const uint8_t* k_in, const uint8_t* v_in) override {
        of(il).write_rows(il, cells, k_in, v_in);
    }

private:
    KVRows& of(int il) const {
        return gpu_ && placement_.layers[il].attn == Device::gpu ? *gpu_ : cpu_;
    }
    uint32_t common(bool k) const {
        const bool cpu_used = placement_.n_layers_with_attn_on(Device::cpu) > 0;
        const uint32_t on_cpu = k ? cpu_.type_k() : cpu_.type_v();
        if (!gpu_ || placement_.n_layers_with_attn_on(Device::gpu) == 0) return on_cpu;
        const uint32_t on_gpu = k ? gpu_->type_k() : gpu_->type_v();
        if (cpu_used && on_cpu != on_gpu)
            throw std::invalid_argument(std::string("a KV cache state holds one ") + (k ? "K" : "V") +
                                        " type, but the CPU's layers store " + kv_type_name(on_cpu) +
                                        " and the GPU's " + kv_type_name(on_gpu) + ": give " +
                                        (k ? "-ctk (type_k)" : "-ctv (type_v)") + " to store one type on both");
        return on_gpu;
    }

    const Placement& placement_;
    KVRows& cpu_;
    KVRows* gpu_;
};

}  // namespace glmoe
