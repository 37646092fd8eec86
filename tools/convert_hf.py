"""Convert a Hugging Face GLM4-MoE checkpoint (config.json + *.safetensors) to a glm4moe GGUF.

    python tools/convert_hf.py HF_DIR OUT.gguf [--outtype f32|f16|bf16|q8_0]

Layout and metadata are make_model's (same tensor plan, same keys); only the values come from the
checkpoint. Facts this relies on (transformers 5.23, models/glm4_moe):
- Rope is neox-style (rotate_half) on the first head_dim * partial_rotary_factor dims of each head,
  pairing (i, i + n_rot/2) with inv_freq = theta^(-2i/n_rot): exactly the GGUF convention, so q/k
  rows are copied without permutation.
- save_pretrained writes experts one by one (mlp.experts.N.{gate,up,down}_proj.weight); in memory
  transformers fuses them to experts.gate_up_proj [E, 2*Fe, H] (gate rows first) and
  experts.down_proj [E, H, Fe]. Both spellings are accepted.
- MTP layers (model.layers.{num_hidden_layers + i}) are not part of the transformers model; when a
  checkpoint has them they are converted, otherwise nextn_predict_layers is written as 0.
The tokenizer section is make_model's synthetic one unless convert() is given `vocab` (tokens in
GPT-2 byte-alphabet form, token types, merges), e.g. tools/train_tiny.py's trained tokenizer; the
checkpoint's own tokenizer files are not read.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import numpy as np

try:
    from .make_model import ModelSpec, TensorSpec, quantize, storage_type, tensor_plan, write_gguf
except ImportError:  # run as a script
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from make_model import ModelSpec, TensorSpec, quantize, storage_type, tensor_plan, write_gguf

OUT_TYPES = ("f32", "f16", "bf16", "q8_0")

# GGUF per-layer name (after "blk.N.") -> HF name (after "model.layers.N.")
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight", "exp_probs_b.bias": "mlp.gate.e_score_correction_bias",
    "ffn_gate_shexp.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_experts.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_experts.down_proj.weight",
    "nextn.eh_proj.weight": "eh_proj.weight", "nextn.enorm.weight": "enorm.weight",
    "nextn.hnorm.weight": "hnorm.weight", "nextn.shared_head_norm.weight": "shared_head.norm.weight",
    "nextn.shared_head_head.weight": "shared_head.head.weight",
    "nextn.embed_tokens.weight": "embed_tokens.weight",
}
GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}


class Checkpoint:
    """Lazy access to the tensors of all *.safetensors files in a directory, as float32 numpy."""

    def __init__(self, directory: str):
        from safetensors import safe_open
        self.files = {}
        for f in sorted(os.listdir(directory)):
            if f.endswith(".safetensors"):
                handle = safe_open(os.path.join(directory, f), framework="pt")
                for k in handle.keys():
                    self.files[k] = handle

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> np.ndarray:
        # Through torch because numpy has no bfloat16.
        return self.files[name].get_tensor(name).float().numpy()


def spec_from_config(config: dict, n_nextn_present: int, outtype: str) -> ModelSpec:
    rope = config.get("rope_parameters") or {}
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    n_group = config.get("n_group", 1) or 1
    return ModelSpec(
        vocab=config["vocab_size"], hidden=config["hidden_size"], n_layers=config["num_hidden_layers"],
        n_dense_leading=config.get("first_k_dense_replace", 0), n_head=config["num_attention_heads"],
        n_head_kv=config["num_key_value_heads"], head_dim=head_dim, n_rot=int(head_dim * partial),
        ffn=config["intermediate_size"], expert_ffn=config["moe_intermediate_size"],
        n_experts=config["n_routed_experts"], n_used=config["num_experts_per_tok"],
        n_shared=config.get("n_shared_experts", 0),
        n_groups=n_group if n_group > 1 else 0, n_group_used=config.get("topk_group", 0) if n_group > 1 else 0,
        qk_norm=bool(config.get("use_qk_norm", False)), tied_output=bool(config.get("tie_word_embeddings", False)),
        nextn_layers=n_nextn_present, nextn_tensors=True,
        weights_scale=float(config.get("routed_scaling_factor", 1.0)),
        weights_norm=bool(config.get("norm_topk_prob", True)),
        rope_base=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        rms_eps=float(config.get("rms_norm_eps", 1e-5)),
        context_length=int(config.get("max_position_embeddings", 131072)),
        name=config.get("_name_or_path") or "glm4moe-converted", default_type=outtype,
    )


def _expert_source(ckpt: Checkpoint, layer: str, which: str, n_experts: int, n_ff: int):
    """Yield one expert's [rows, n_in] matrix at a time for ffn_{which}_exps."""
    fused_gate_up, fused_down = layer + "mlp.experts.gate_up_proj", layer + "mlp.experts.down_proj"
    if which in ("gate", "up") and fused_gate_up in ckpt:
        both = ckpt.get(fused_gate_up)  # [E, 2*Fe, H], gate rows then up rows (chunk(2))
        part = both[:, :n_ff] if which == "gate" else both[:, n_ff:]
        yield from part
    elif which == "down" and fused_down in ckpt:
        yield from ckpt.get(fused_down)  # [E, H, Fe]
    else:
        for e in range(n_experts):
            yield ckpt.get(f"{layer}mlp.experts.{e}.{which}_proj.weight")


def convert(hf_dir: str, out_path: str, outtype: str = "f16",
            vocab: tuple[list[str], list[int], list[str]] | None = None) -> ModelSpec:
    with open(os.path.join(hf_dir, "config.json")) as f:
        config = json.load(f)
    ckpt = Checkpoint(hf_dir)
    n_trunk = config["num_hidden_layers"]
    n_nextn = 0
    for i in range(int(config.get("num_nextn_predict_layers", 0) or 0)):
        if f"model.layers.{n_trunk + i}.eh_proj.weight" in ckpt:
            n_nextn += 1
    spec = spec_from_config(config, n_nextn, outtype)

    plan = tensor_plan(spec)
    for il in range(n_trunk, spec.block_count):  # optional MTP extras, only when present
        H, V = spec.hidden, spec.vocab
        if f"model.layers.{il}.shared_head.head.weight" in ckpt:
            plan.append(TensorSpec(f"blk.{il}.nextn.shared_head_head.weight", (V, H), "output"))
        if f"model.layers.{il}.embed_tokens.weight" in ckpt:
            plan.append(TensorSpec(f"blk.{il}.nextn.embed_tokens.weight", (V, H), "embd"))

    tensors = []
    for t in plan:
        qtype = storage_type(spec, t)
        if t.name.startswith("blk."):
            _, il, rest = t.name.split(".", 2)
            layer = f"model.layers.{il}."
        else:
            layer, rest = "", t.name
        if rest.endswith("_exps.weight"):
            which = rest.split("_")[1]
            source = (lambda layer=layer, which=which, qtype=qtype: (
                quantize(m, qtype) for m in _expert_source(ckpt, layer, which, spec.n_experts, spec.expert_ffn)))
        else:
            hf_name = GLOBAL_NAMES[rest] if not layer else layer + LAYER_NAMES[rest]
            if hf_name not in ckpt:
                if t.kind == "bias":  # attention_bias=False checkpoints: the GGUF layout keeps biases
                    source = (lambda t=t: iter([np.zeros(t.shape, np.float32)]))
                elif rest.startswith("nextn.shared_head_norm"):
                    continue
                else:
                    raise KeyError(f"{hf_name} (for {t.name}) is not in the checkpoint")
            else:
                source = (lambda hf_name=hf_name, qtype=qtype, t=t: iter(
                    [quantize(ckpt.get(hf_name).reshape(t.shape), qtype)]))
        tensors.append((t.name, t.shape, qtype, source))
    write_gguf(out_path, spec, tensors, vocab)
    return spec


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("hf_dir")
    ap.add_argument("out")
    ap.add_argument("--outtype", choices=OUT_TYPES, default="f16",
                    help="type of the matrices; norms, biases and the router stay f32")
    args = ap.parse_args(argv)
    spec = convert(args.hf_dir, args.out, args.outtype)
    print(f"wrote {args.out}: {spec}", file=sys.stderr)


if __name__ == "__main__":
    main()
