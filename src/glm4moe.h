// The GLM4-MoE forward (DESIGN.md §3), written once over the ops of backend.h.
#pragma once
#include "backend.h"
#include "model.h"
#include "placement.h"

namespace glmoe {

// The backends a placement uses: `on(d)` is the one for device d (CPU always exists).
struct Backends {
    Backend* cpu = nullptr;
    Backend* gpu = nullptr;
    Backend& on(Device d) const { return d == Device::gpu ? *gpu : *cpu; }
};

// Runs one step through every trunk layer and the output head, each op on the backend its
// weights are placed on; activations cross between backends only where the placement changes.
void glm4moe_forward(const Model& model, const Placement& placement, const Backends& backends, const Step& step,
                     const StepOutput& out);

}  // namespace glmoe
