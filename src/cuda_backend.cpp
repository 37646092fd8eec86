// What the CUDA backend can run, and the stand-in of a build without CUDA.
#include "cuda_backend.h"

#include "ggml_types.h"

namespace glmoe {

std::string CudaBackend::unsupported(const Model& model) {
    const HParams& hp = model.hparams();
    if (hp.head_dim_k != hp.head_dim_v) return "different K and V head sizes";
    if (hp.head_dim_k != 64 && hp.head_dim_k != 128 && hp.head_dim_k != 256)
        return "head size " + std::to_string(hp.head_dim_k) + " (it has kernels for 64, 128 and 256)";
    if (hp.n_rot % 2 != 0 || hp.n_rot > hp.head_dim_k) return "rope dimension " + std::to_string(hp.n_rot);
    // The routing kernel keeps a token's scores in one warp's registers (ggml-cuda/ops.cu).
    if (hp.n_expert > 512) return std::to_string(hp.n_expert) + " experts (it routes at most 512)";
    if (hp.n_expert_groups > 32) return std::to_string(hp.n_expert_groups) + " expert groups (at most 32)";
    // Routing is computed in exact float arithmetic (a quantized router would change expert choices).
    for (int il = 0; il < hp.n_layer; ++il) {
        const uint32_t t = model.layer(il).ffn_gate_inp.type;
        if (hp.layers[il].is_moe && t != GGML_TYPE_F32 && t != GGML_TYPE_F16 && t != GGML_TYPE_BF16)
            return "a " + type_name(t) + " MoE router (layer " + std::to_string(il) + "; it needs F32, F16 or BF16)";
    }
    return "";
}

bool CudaBackend::kv_type_supported(uint32_t type) {
    return type == GGML_TYPE_F16 || type == GGML_TYPE_BF16 || type == GGML_TYPE_Q8_0 || type == GGML_TYPE_Q4_0;
}

#ifndef GLMOE_CUDA
std::unique_ptr<CudaBackend> CudaBackend::create(const Model&, const Placement&, const GpuParams&, ThreadPool&) {
    throw GpuError("this build of glmoe has no CUDA backend");
}
#endif

}  // namespace glmoe
