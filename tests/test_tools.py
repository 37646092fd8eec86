"""Tests for tools/make_model.py, tools/convert_hf.py (installed as glmoe.tools) and
tests/reference_glm4moe.py.

The strongest one: a random HF transformers GLM4-MoE model, converted to GGUF, gives the same
float64 logits in ReferenceModel as in transformers, which checks converter and reference at once,
and the engine gives transformers' logits to float32 rounding.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import gguf
from gguf import GGMLQuantizationType as QT

import glmoe
from glmoe.tools import convert_hf, make_model
from glmoe.tools.make_model import ModelSpec, PRESETS, TYPE_NAMES, effective_type, tensor_plan, write_model
from reference_glm4moe import ReferenceModel

# Worst-case |error| of one element relative to its block's max |x|, with margin: half a code step
# (Q4_K/Q5_K also lose up to a step to the 6-bit scale round-up).
MAX_REL_ERROR = {"f32": 0, "f16": 1e-3, "bf16": 4e-3, "q8_0": 5e-3, "q4_0": 0.07, "q5_0": 0.035,
                 "q4_k": 0.15, "q5_k": 0.07, "q6_k": 0.04}


@pytest.mark.parametrize("type_name", sorted(TYPE_NAMES))
@pytest.mark.parametrize("n_rows", [1, 3, 7])
def test_quantizer_packing_matches_gguf_dequantize(type_name, n_rows):
    qtype = TYPE_NAMES[type_name]
    rng = np.random.default_rng(n_rows)
    x = rng.standard_normal((n_rows, 512)).astype(np.float32) * 0.3
    x[0, :256] += 0.7  # an all-positive region exercises the K-quant mins
    x[-1, 300:340] = 0  # an all-zero block must not divide by zero
    packed, values = make_model.quantize_with_values(x, qtype)
    decoded = gguf.quants.dequantize(packed, qtype)
    assert decoded.shape == x.shape
    # Bit-exact: the codes and scales we chose are exactly what gguf-py reads back.
    np.testing.assert_array_equal(decoded, values)
    assert np.abs(decoded - x).max() <= MAX_REL_ERROR[type_name] * np.abs(x).max() + 1e-7
    if type_name == "bf16":
        np.testing.assert_array_equal(packed, gguf.quants.quantize(x, QT.BF16))
    if type_name in ("q8_0", "q4_0", "q5_0"):  # no worse than gguf-py's own quantizer
        theirs = gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype)
        assert np.sqrt(np.mean((decoded - x) ** 2)) <= 1.05 * np.sqrt(np.mean((theirs - x) ** 2))


@pytest.mark.parametrize("type_name", sorted(TYPE_NAMES))
def test_random_blocks_have_the_requested_spread(type_name):
    qtype = TYPE_NAMES[type_name]
    data = make_model.random_blocks(np.random.default_rng(0), (16, 1024), qtype, 0.05)
    values = gguf.quants.dequantize(data, qtype)
    assert values.shape == (16, 1024) and np.isfinite(values).all()
    # Q4_0 codes q-8 average -0.5: a mean of about -0.1 std is inherent.
    assert 0.04 < values.std() < 0.06 and abs(values.mean()) < 0.008


def test_k_quant_fallback_follows_llama_cpp():
    assert effective_type(QT.Q4_K, 4096) == QT.Q4_K
    assert effective_type(QT.Q4_K, 1408) == QT.Q5_0
    assert effective_type(QT.Q5_K, 10944) == QT.Q5_0
    assert effective_type(QT.Q6_K, 1408) == QT.Q8_0
    assert effective_type(QT.Q8_0, 100) == QT.F16


def _metadata(reader: gguf.GGUFReader) -> dict:
    out = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        value = field.contents()
        out[name] = value
    return out


def test_make_model_layout_types_and_metadata(tmp_path):
    spec = ModelSpec(vocab=300, hidden=256, n_layers=3, n_dense_leading=1, n_head=4, n_head_kv=[2, 1, 2, 2],
                     head_dim=32, n_rot=16, ffn=384, expert_ffn=96, n_experts=6, n_used=2, n_shared=1,
                     n_groups=3, n_group_used=2, qk_norm=True, per_layer_arrays=True, nextn_layers=1,
                     weights_scale=2.5, default_type="q8_0", expert_type="q4_k", attn_type="q5_k",
                     embd_type="q6_k", output_type="q6_k", ffn_type="q4_0")
    path = str(tmp_path / "m.gguf")
    write_model(path, spec, seed=3)
    reader = gguf.GGUFReader(path)
    meta = _metadata(reader)
    assert meta["general.architecture"] == "glm4moe"
    expected = {
        "glm4moe.block_count": 4, "glm4moe.embedding_length": 256, "glm4moe.feed_forward_length": 384,
        "glm4moe.attention.head_count": [4] * 4, "glm4moe.attention.head_count_kv": [2, 1, 2, 2],
        "glm4moe.attention.key_length": 32, "glm4moe.attention.value_length": 32,
        "glm4moe.rope.dimension_count": 16, "glm4moe.expert_count": 6, "glm4moe.expert_used_count": [2] * 4,
        "glm4moe.expert_shared_count": 1, "glm4moe.expert_feed_forward_length": 96,
        "glm4moe.leading_dense_block_count": 1, "glm4moe.expert_weights_norm": True,
        "glm4moe.expert_gating_func": 2, "glm4moe.expert_group_count": 3, "glm4moe.expert_group_used_count": 2,
        "glm4moe.nextn_predict_layers": 1, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "glm4",
    }
    for k, v in expected.items():
        assert meta[k] == v, k
    assert meta["glm4moe.expert_weights_scale"] == pytest.approx(2.5)
    for k in ("glm4moe.context_length", "glm4moe.rope.freq_base", "glm4moe.attention.layer_norm_rms_epsilon",
              "tokenizer.ggml.merges", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.bos_token_id",
              "tokenizer.ggml.padding_token_id", "tokenizer.chat_template", "general.name"):
        assert k in meta, k
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == 300 == len(meta["tokenizer.ggml.token_type"]) and len(set(tokens)) == 300
    assert tokens[meta["tokenizer.ggml.bos_token_id"]] == "[gMASK]"
    assert tokens[meta["tokenizer.ggml.eos_token_id"]] == "<|endoftext|>"

    tensors = {t.name: (t.shape.tolist(), t.tensor_type) for t in reader.tensors}
    want = {  # ggml ne order, type after fallback
        "token_embd.weight": ([256, 300], QT.Q6_K), "output.weight": ([256, 300], QT.Q6_K),
        "output_norm.weight": ([256], QT.F32),
        "blk.0.attn_q.weight": ([256, 128], QT.Q5_K), "blk.0.attn_q.bias": ([128], QT.F32),
        "blk.1.attn_k.weight": ([256, 32], QT.Q5_K), "blk.1.attn_v.bias": ([32], QT.F32),
        "blk.0.attn_output.weight": ([128, 256], QT.Q5_0),  # rows of 128: K-quant fallback
        "blk.0.attn_q_norm.weight": ([32], QT.F32), "blk.0.ffn_down.weight": ([384, 256], QT.Q4_0),
        "blk.1.ffn_gate_inp.weight": ([256, 6], QT.F32), "blk.1.exp_probs_b.bias": ([6], QT.F32),
        "blk.1.ffn_gate_exps.weight": ([256, 96, 6], QT.Q4_K), "blk.2.ffn_up_exps.weight": ([256, 96, 6], QT.Q4_K),
        "blk.1.ffn_down_exps.weight": ([96, 256, 6], QT.Q5_0), "blk.1.ffn_up_shexp.weight": ([256, 96], QT.Q4_0),
        "blk.1.ffn_down_shexp.weight": ([96, 256], QT.Q4_0), "blk.3.nextn.eh_proj.weight": ([512, 256], QT.Q8_0),
        "blk.3.nextn.enorm.weight": ([256], QT.F32), "blk.3.ffn_gate_exps.weight": ([256, 96, 6], QT.Q4_K),
    }
    for name, (shape, qtype) in want.items():
        assert tensors[name] == (shape, qtype), name
    assert "blk.0.ffn_gate_inp.weight" not in tensors and "blk.1.ffn_gate.weight" not in tensors
    assert len(tensors) == len(tensor_plan(spec))

    # nextn count without the MTP tensors, and a tied output.
    path2 = str(tmp_path / "m2.gguf")
    write_model(path2, ModelSpec(nextn_layers=1, nextn_tensors=False, tied_output=True), seed=1)
    reader2 = gguf.GGUFReader(path2)
    names = {t.name for t in reader2.tensors}
    assert "output.weight" not in names and not any(n.startswith("blk.3.") for n in names)
    assert _metadata(reader2)["glm4moe.block_count"] == 4
    assert ReferenceModel(path2).logits([1, 2, 3]).shape == (3, 512)


def test_same_seed_same_file_and_cli(tmp_path):
    a, b = str(tmp_path / "a.gguf"), str(tmp_path / "b.gguf")
    write_model(a, ModelSpec(default_type="q4_0"), seed=5)
    make_model.main([b, "--preset", "tiny", "--seed", "5", "--type", "q4_0"])
    assert open(a, "rb").read() == open(b, "rb").read()


def test_air_presets_have_the_benchmark_shapes():
    spec = ModelSpec(**PRESETS["air-8layer"])
    plan = tensor_plan(spec)
    n_params = sum(int(np.prod(t.shape)) for t in plan)
    assert 17.8e9 < n_params < 18.0e9
    types = {t.name: make_model.storage_type(spec, t) for t in plan}
    assert types["blk.1.ffn_gate_exps.weight"] == QT.Q4_K and types["blk.1.ffn_down_exps.weight"] == QT.Q5_0
    assert types["blk.0.attn_q.weight"] == QT.Q8_0 and types["token_embd.weight"] == QT.Q8_0
    total = sum(make_model.nbytes_of(t.shape, types[t.name]) for t in plan)
    assert 10.5 * 2**30 < total < 11.5 * 2**30


# ----------------------------------------------------------------------------------------------
# HF transformers vs converter + reference

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

HF_CASES = {
    # groups, qk-norm, weight norm, scale != 1, per-expert tensors as save_pretrained writes them
    "groups-qknorm": dict(
        config=dict(vocab_size=300, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1, first_k_dense_replace=1,
                    n_group=4, topk_group=2, use_qk_norm=True, norm_topk_prob=True, routed_scaling_factor=2.5,
                    attention_bias=True, partial_rotary_factor=0.5, rope_theta=10000.0,
                    tie_word_embeddings=False),
        fused=False),
    # no groups, no qk-norm, no weight norm, tied output, GQA 4:1, fused expert tensors
    "tied-fused": dict(
        config=dict(vocab_size=288, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                    n_routed_experts=6, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                    n_group=1, topk_group=1, use_qk_norm=False, norm_topk_prob=False,
                    routed_scaling_factor=1.5, attention_bias=True, partial_rotary_factor=0.5,
                    rope_theta=500.0, tie_word_embeddings=True),
        fused=True),
}


def _randomize(model, seed: int) -> None:
    """HF's init (std 0.02, zero selection bias, unit norms) would hide most mapping mistakes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if "rotary_emb" in name:
                continue
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "norm" in name or "layernorm" in name:
                p.copy_(1 + 0.1 * r)
            elif "e_score_correction_bias" in name:
                p.copy_(0.05 * r)
            elif p.dim() == 1:
                p.copy_(0.1 * r)
            elif "embed_tokens" in name:
                p.copy_(r)
            else:
                p.copy_(r / p.shape[-1] ** 0.5)


def _float64_everywhere(model) -> None:
    """transformers computes rms_norm, the router and the rope angles in float32 even in a
    float64 model; redo those three in float64 so the comparison can be tight."""
    from transformers.models.glm4_moe import modeling_glm4_moe as m

    def rms_forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def router_forward(self, x):  # modeling_glm4_moe's router, without its float32 casts
        x = x.view(-1, self.hidden_dim)
        scores = torch.nn.functional.linear(x, self.weight).sigmoid()
        choice = scores + self.e_score_correction_bias
        groups = choice.view(-1, self.num_group, self.num_experts // self.num_group).topk(2, dim=-1)[0].sum(-1)
        keep = torch.zeros_like(groups).scatter_(1, torch.topk(groups, k=self.topk_group, dim=-1)[1], 1)
        keep = keep.unsqueeze(-1).expand(-1, self.num_group, self.num_experts // self.num_group).reshape(-1, self.num_experts)
        top = torch.topk(choice.masked_fill(~keep.bool(), float("-inf")), k=self.top_k, dim=-1)[1]
        w = scores.gather(1, top)
        if self.norm_topk_prob:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return None, w * self.routed_scaling_factor, top

    def rope_forward(self, x, position_ids):
        base = self.config.rope_parameters["rope_theta"]
        dim = 2 * self.inv_freq.shape[0]
        inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        freqs = position_ids[..., None].to(torch.float64) * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    for module in model.modules():
        if isinstance(module, m.Glm4MoeRMSNorm):
            module.forward = rms_forward.__get__(module)
        elif isinstance(module, m.Glm4MoeTopkRouter):
            module.forward = router_forward.__get__(module)
        elif isinstance(module, m.Glm4MoeRotaryEmbedding):
            module.forward = rope_forward.__get__(module)


N_HF_POSITIONS = 100


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_reference_matches_transformers_through_converter(case, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    cfg = transformers.Glm4MoeConfig(**HF_CASES[case]["config"])
    cfg._attn_implementation = "sdpa"  # eager attention takes its softmax in float32
    cfg._experts_implementation = "eager"  # the grouped_mm path refuses float64
    model = transformers.Glm4MoeForCausalLM(cfg).eval()
    _randomize(model, seed=11)
    hf_dir = str(tmp_path / "hf")
    if HF_CASES[case]["fused"]:  # transformers' in-memory names: experts.gate_up_proj / down_proj
        os.makedirs(hf_dir)
        cfg.save_pretrained(hf_dir)
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
                 if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
        assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
        save_file(state, os.path.join(hf_dir, "model.safetensors"))
    else:
        model.save_pretrained(hf_dir)
    gguf_path = str(tmp_path / "m.gguf")
    spec = convert_hf.convert(hf_dir, gguf_path, "f32")
    assert spec.n_rot == cfg.head_dim // 2 and spec.tied_output == cfg.tie_word_embeddings

    tokens = np.random.default_rng().integers(0, cfg.vocab_size, N_HF_POSITIONS).tolist()
    ids = torch.tensor([tokens])
    model = model.double()
    with torch.no_grad():
        loose = model(ids).logits[0].numpy()  # transformers as shipped (float32 router/norm/rope)
        _float64_everywhere(model)
        tight = model(ids).logits[0].numpy()
    ref = ReferenceModel(gguf_path).logits(tokens)
    assert ref.shape == tight.shape
    scale = np.abs(tight).max()
    assert np.abs(ref - loose).max() / scale < 1e-4
    assert np.abs(ref - tight).max() / scale < 1e-10

    # The engine on the converted file: f32 arithmetic throughout, evaluated in batches shorter
    # than the sequence, so per-position error of ~1e-6 is rounding; 1e-4 would still catch any
    # wrong mapping, which gives errors of order 1.
    llm = glmoe.Llama(gguf_path, n_ctx=N_HF_POSITIONS, n_batch=24, logits_all=True, n_threads=2, verbose=False)
    llm.eval(tokens)
    got = llm.scores[: len(tokens)].astype(np.float64)
    err = np.linalg.norm(got - tight, axis=1) / np.linalg.norm(tight, axis=1)
    print(f"engine vs transformers ({case}): relative error median {np.median(err):.2e}, "
          f"p90 {np.percentile(err, 90):.2e}, max {err.max():.2e}")
    assert np.median(err) < 2e-5 and np.percentile(err, 90) < 1e-4


def test_decode_bytes_counts_chosen_experts_and_kv(tmp_path):
    from glmoe.tools.decode_bytes import decode_bytes

    spec = ModelSpec(**PRESETS["tiny"])
    path = str(tmp_path / "tiny.gguf")
    write_model(path, spec, seed=3)
    reader = gguf.GGUFReader(path)
    total = sum(int(t.n_bytes) for t in reader.tensors)
    experts = sum(int(t.n_bytes) for t in reader.tensors if "_exps" in t.name)
    embd = next(int(t.n_bytes) for t in reader.tensors if t.name == "token_embd.weight")
    per = decode_bytes(path, [0, 100])
    # Everything but the unchosen experts and all embedding rows but one.
    expect = total - experts * (1 - spec.n_used / spec.n_experts) - embd * (1 - 1 / spec.vocab)
    assert per[0] == pytest.approx(expect)
    # K and V, f16, of every layer for each cached position.
    assert per[100] - per[0] == pytest.approx(100 * spec.n_layers * 2 * spec.n_head_kv * spec.head_dim * 2)
    # q8_0 K (34 bytes per 32 values) and q4_0 V (18): the weights unchanged.
    quant = decode_bytes(path, [0, 100], "q8_0", "q4_0")
    assert quant[0] == per[0]
    assert quant[100] - quant[0] == pytest.approx(100 * spec.n_layers * spec.n_head_kv * spec.head_dim * (34 + 18) / 32)
