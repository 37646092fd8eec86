// The GLM4-MoE forward, read top to bottom (the math: DESIGN.md §3; the ops: backend.h).
//
//   x = token_embd[tokens]
//   per layer:  x += attn_output(attention(qkv_prepare(rms_norm(x))))
//               x += ffn(rms_norm(x))     ffn: dense SwiGLU, or routed experts + shared expert
//   out = output(rms_norm(x))
//
// Each op runs on the backend that holds its weights (placement.h). The residual stream x lives
// on one backend at a time and crosses when the next op's weights are elsewhere. When some of a
// layer's experts are on another device than its router (hybrid CPU expert offload: the routed
// experts in RAM), h and the routing cross to them and their weighted sum comes back, while the
// experts beside the router (the shared one) run at the same time.
#include "glm4moe.h"

namespace glmoe {

void glm4moe_forward(const Model& model, const Placement& placement, const Backends& backends, const Step& step,
                     const StepOutput& out) {
    const HParams& hp = model.hparams();
    for (Backend* b : {backends.cpu, backends.gpu})
        if (b) b->begin_step(step, out);

    Device x_on = placement.embd;
    backends.on(x_on).embed(model.token_embd());
    auto move_x = [&](Device to) -> Backend& {
        if (to != x_on) {
            backends.on(to).upload(Act::x, backends.on(x_on).download({Act::x}, -1)[0], -1);
            x_on = to;
        }
        return backends.on(to);
    };

    for (int il = 0; il < hp.n_layer; ++il) {
        const LayerWeights& w = model.layer(il);
        const LayerPlacement& lp = placement.layers[il];

        Backend& attn = move_x(lp.attn);
        attn.rms_norm(w.attn_norm, il, Part::attention);
        attn.qkv_prepare(il);
        attn.attention(il);
        attn.attn_output(il);

        Backend& ffn = move_x(lp.ffn);
        ffn.rms_norm(w.post_attention_norm, il, Part::ffn);
        if (!hp.layers[il].is_moe) {
            ffn.ffn_dense(il);
            continue;
        }
        ffn.moe_route(il);
        if ((lp.experts == lp.ffn || ffn.borrows_experts(il)) && lp.shared == lp.ffn) {
            ffn.moe_experts(il, /*into_x=*/true);
            continue;
        }
        Backend& other = backends.on(lp.ffn == Device::gpu ? Device::cpu : Device::gpu);
        const std::vector<const void*> input = ffn.download({Act::h, Act::route_ids, Act::route_weights}, il);
        other.upload(Act::h, input[0], il);
        other.upload(Act::route_ids, input[1], il);
        other.upload(Act::route_weights, input[2], il);
        // Each side runs the experts it holds; the GPU's part is enqueued before or while the CPU
        // computes its part, so that both run at once.
        if (other.device() == Device::gpu) {
            other.moe_experts(il, /*into_x=*/false);
            other.flush();
            ffn.moe_experts(il, /*into_x=*/true);
        } else {
            // The CPU's threads start on their experts while this thread enqueues the GPU's
            // (its share of the routed ones, copied per step, and the shared one).
            other.moe_experts_alongside(il, /*into_x=*/false, [&] {
                ffn.moe_experts(il, /*into_x=*/true);
                ffn.flush();
            });
        }
        ffn.upload(Act::moe_out, other.download({Act::moe_out}, il)[0], il);
        ffn.add_moe_out();
    }
    move_x(placement.output).output(out);
}

}  // namespace glmoe
