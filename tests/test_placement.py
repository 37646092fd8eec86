"""Per-tensor placement (src/placement.cpp) with llama.cpp's flags: -ngl (the output head first, then
the blocks from the last, MTP blocks counted), -ot (regex search on the tensor name, first match
wins, before -ngl), --cpu-moe and --n-cpu-moe; the errors glmoe adds (a pattern that matches
nothing, a layer part split across devices); the CPU fallback; and the flags on Llama and the
engine. Decided without a GPU: _core.decide_placement only plans."""
from __future__ import annotations

import re

import numpy as np
import pytest

import glmoe
from glmoe import _core
from glmoe.tools.make_model import ModelSpec, write_model

GPU, CPU = "CUDA0", "CPU"
N_LAYERS = 4  # one dense lead layer, three MoE layers

BASE = dict(vocab=128, hidden=32, n_layers=N_LAYERS, n_dense_leading=1, n_head=2, n_head_kv=1, head_dim=16,
            n_rot=8, ffn=64, expert_ffn=16, n_experts=4, n_used=2, n_shared=1)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("placement")
    specs = {"plain": BASE, "mtp": dict(BASE, n_layers=3, nextn_layers=1), "tied": dict(BASE, tied_output=True)}
    out = {}
    for name, spec in specs.items():
        out[name] = str(d / f"{name}.gguf")
        write_model(out[name], ModelSpec(**spec), seed=5)
    return out


@pytest.fixture(scope="module")
def models(paths):
    return {name: _core.Model(path) for name, path in paths.items()}


@pytest.fixture(scope="module")
def model(models):
    return models["plain"]


def plan(model, **kw):
    return _core.decide_placement(model, **kw)


def devices(p, pattern):
    """Devices of the tensors whose name matches `pattern` (regex search), in file order."""
    return [d for name, d in p["tensors"] if re.search(pattern, name)]


def layer_of(name):
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else None


# --- -ngl -----------------------------------------------------------------------------------

@pytest.mark.parametrize("ngl", [0, 1, 2, 3, 4, 5, 6, 99, -1])
def test_ngl_offloads_the_output_head_then_the_last_layers(model, ngl):
    p = plan(model, n_gpu_layers=ngl)
    # llama.cpp: n_layer + 1 slots, the output head last; slot i is on the GPU iff i >= n_layer + 1 - ngl.
    n = N_LAYERS + 1 if ngl < 0 else ngl
    start = max(N_LAYERS + 1 - n, 0)
    on = lambda slot: GPU if slot >= start else CPU  # noqa: E731
    assert p["output"] == on(N_LAYERS)
    assert [l["attn"] for l in p["layers"]] == [on(i) for i in range(N_LAYERS)]
    for name, d in p["tensors"]:
        il = layer_of(name)
        want = on(il) if il is not None else on(N_LAYERS) if name.startswith("output") else on(0)
        assert d == want, (name, ngl)
    assert p["embd"] == p["layers"][0]["attn"]  # token_embd follows layer 0
    assert p["note"] == ""
    assert all(set(l.values()) == {l["attn"]} for l in p["layers"])


def test_ngl_counts_mtp_blocks_as_llama_cpp(models):
    m = models["mtp"]  # 3 trunk layers + 1 MTP block: 4 blocks and the output head
    assert m.n_layer == 3
    p = plan(m, n_gpu_layers=2)  # the output head and the MTP block: no trunk layer
    assert p["output"] == GPU and [l["attn"] for l in p["layers"]] == [CPU, CPU, CPU]
    assert set(devices(p, r"^blk\.3\.")) == {GPU} and "blk.3.nextn.eh_proj.weight" in dict(p["tensors"])
    p = plan(m, n_gpu_layers=4)
    assert [l["attn"] for l in p["layers"]] == [CPU, GPU, GPU] and p["embd"] == CPU
    p = plan(m, n_gpu_layers=5)
    assert [l["attn"] for l in p["layers"]] == [GPU] * 3 and p["embd"] == GPU
    assert len(p["layers"]) == 3  # the trunk only


def test_tensors_are_the_model_s_in_file_order(paths, model):
    names = [t[0] for t in _core.gguf_summary(paths["plain"])["tensors"]]
    assert [n for n, _ in plan(model)["tensors"]] == names


# --- -ot, --cpu-moe, --n-cpu-moe --------------------------------------------------------------

def test_ot_exps_cpu_keeps_only_the_experts_on_the_cpu(model):
    p = plan(model, n_gpu_layers=-1, tensor_overrides=["exps=CPU"])
    for name, d in p["tensors"]:
        assert d == (CPU if "_exps" in name else GPU), name
    assert p["layers"][0] == dict(attn=GPU, ffn=GPU, experts=GPU, shared=GPU)  # dense: no experts
    for l in p["layers"][1:]:
        assert l == dict(attn=GPU, ffn=GPU, experts=CPU, shared=GPU)
    assert p["embd"] == p["output"] == GPU


def test_cpu_moe_is_llama_cpp_s_exps_regex(model):
    p = plan(model, n_gpu_layers=99, cpu_moe=True)
    assert p == plan(model, n_gpu_layers=99, tensor_overrides=[r"\.ffn_(up|down|gate|gate_up)_(ch|)exps=CPU"])
    assert set(devices(p, "_exps")) == {CPU} and set(devices(p, "_shexp")) == {GPU}


def test_n_cpu_moe_takes_the_first_layers_dense_ones_counted(model):
    p = plan(model, n_gpu_layers=-1, n_cpu_moe=2)
    # Layer 0 is dense: llama.cpp's entry for it matches nothing, which is no error.
    assert [l["experts"] for l in p["layers"]] == [GPU, CPU, GPU, GPU]
    assert set(devices(p, r"^blk\.1\.ffn_.*_exps")) == {CPU}
    assert set(devices(p, r"^blk\.[23]\.ffn_.*_exps")) == {GPU}
    # More layers than the model has is no error either.
    assert [l["experts"] for l in plan(model, n_gpu_layers=-1, n_cpu_moe=50)["layers"]] == [GPU, CPU, CPU, CPU]
    assert plan(model, n_gpu_layers=-1, n_cpu_moe=0) == plan(model, n_gpu_layers=-1)


def test_first_matching_override_wins(model):
    keep_1 = r"blk\.1\.ffn_(up|down|gate)_exps=CUDA0"
    p = plan(model, n_gpu_layers=0, tensor_overrides=[keep_1 + ",exps=CPU"])
    assert [l["experts"] for l in p["layers"]] == [CPU, GPU, CPU, CPU]
    assert [l["attn"] for l in p["layers"]] == [CPU] * 4
    # Reversed, the first entry takes every expert; the second still matches, so it is no error.
    p = plan(model, n_gpu_layers=0, tensor_overrides=["exps=CPU", keep_1])
    assert [l["experts"] for l in p["layers"]] == [CPU] * 4
    # -ot entries come before --cpu-moe's, in the order given.
    p = plan(model, n_gpu_layers=-1, tensor_overrides=[keep_1.replace("1", "3")], cpu_moe=True)
    assert [l["experts"] for l in p["layers"]] == [GPU, CPU, CPU, GPU]


def test_overrides_move_tensors_either_way(model):
    # A bare "output" would also match attn_output: a regex search, as llama.cpp's.
    p = plan(model, n_gpu_layers=0, tensor_overrides=[r"blk\.2\.=CUDA0,^output=CUDA0"])
    assert [l["attn"] for l in p["layers"]] == [CPU, CPU, GPU, CPU] and p["output"] == GPU
    assert set(devices(p, r"^blk\.2\.")) == {GPU} and p["embd"] == CPU
    p = plan(model, n_gpu_layers=-1, tensor_overrides=["token_embd=CPU"])
    assert p["embd"] == CPU and dict(p["tensors"])["token_embd.weight"] == CPU
    assert p["layers"][0]["attn"] == GPU
    p = plan(model, n_gpu_layers=0, tensor_overrides=["token_embd=CUDA0"])
    assert p["embd"] == GPU and p["layers"][0]["attn"] == CPU


def test_tied_output_follows_output_norm(models):
    m = models["tied"]
    p = plan(m, n_gpu_layers=1)
    assert "output.weight" not in dict(p["tensors"])
    assert p["output"] == GPU and p["embd"] == CPU
    p = plan(m, n_gpu_layers=-1, tensor_overrides=["output_norm=CPU"])
    assert p["output"] == CPU and p["embd"] == GPU


def test_parse_tensor_overrides():
    assert _core.parse_tensor_overrides(r"exps=CPU,blk\.0\.=CUDA0") == [("exps", CPU), (r"blk\.0\.", GPU)]
    with pytest.raises(ValueError, match="unknown buffer type 'b=CPU'"):  # split at the first '='
        _core.parse_tensor_overrides("a=b=CPU")


# --- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (["nothing_like_this=CPU"], "-ot pattern 'nothing_like_this' matches no tensor of this model"),
    (["exps=GPU"], r"unknown buffer type 'GPU'.*CPU, CUDA0"),
    (["exps=CUDA_Host"], r"unknown buffer type 'CUDA_Host'"),
    (["exps=cpu"], r"unknown buffer type 'cpu'"),
    (["ffn_(up=CPU"], r"invalid regular expression 'ffn_\(up'"),
    (["exps"], r"expected PATTERN=BUFFER, got 'exps'"),
    (["exps=CPU,"], r"expected PATTERN=BUFFER, got ''"),
    (["=CPU"], "empty tensor name pattern"),
    (["attn_q=CPU"], r"blk\.0 attention would be split across devices: blk\.0\.attn_norm\.weight on CUDA0, "
                     r"blk\.0\.attn_q\.weight on CPU"),
    ([r"ffn_up_exps=CPU"], r"blk\.1 routed experts would be split across devices: .*ffn_gate_exps.* on CUDA0, "
                           r".*ffn_up_exps.* on CPU"),
    ([r"^output\.weight=CPU"], "the output head would be split across devices"),
])
def test_bad_overrides_are_errors(model, overrides, message):
    for gpu_available in (True, False):  # the same errors without a GPU
        with pytest.raises(_core.PlacementError, match=message):
            plan(model, n_gpu_layers=99, tensor_overrides=overrides, gpu_available=gpu_available)
    assert issubclass(_core.PlacementError, ValueError)


def test_negative_n_cpu_moe_is_an_error(model):
    with pytest.raises(ValueError, match="n-cpu-moe"):
        plan(model, n_cpu_moe=-1)


def test_ngl_split_of_a_layer_part_by_ot_is_an_error_only_when_it_splits(model):
    # Whole parts may move: attention of layer 3 on the CPU, its FFN on the GPU.
    p = plan(model, n_gpu_layers=-1, tensor_overrides=[r"blk\.3\.attn_=CPU"])
    assert p["layers"][3] == dict(attn=CPU, ffn=GPU, experts=GPU, shared=GPU)


# --- without a GPU ------------------------------------------------------------------------------

def test_without_a_gpu_everything_is_on_the_cpu_with_a_note(model):
    p = plan(model, n_gpu_layers=-1, tensor_overrides=["exps=CPU"], gpu_available=False)
    assert {d for _, d in p["tensors"]} == {CPU} and p["embd"] == p["output"] == CPU
    assert all(set(l.values()) == {CPU} for l in p["layers"])
    assert "n_gpu_layers = -1" in p["note"] and "-ot" not in p["note"] and "running on the CPU" in p["note"]
    note = plan(model, n_gpu_layers=0, tensor_overrides=["exps=CUDA0"], gpu_available=False)["note"]
    assert "-ot" in note and "n_gpu_layers" not in note
    # Nothing asked for the GPU: nothing to say.
    assert plan(model, n_gpu_layers=0, gpu_available=False)["note"] == ""
    assert plan(model, n_gpu_layers=-1, tensor_overrides=[".=CPU"], gpu_available=False)["note"] == ""


# --- Llama and the engine -----------------------------------------------------------------------

HAVE_GPU = _core.built_with_cuda() and _core.cuda_device_count() > 0


@pytest.mark.parametrize("kw, error", [
    (dict(tensor_overrides="nothing_like_this=CPU"), ValueError),
    (dict(tensor_overrides=["exps=CPU", "exps"]), ValueError),
    (dict(tensor_overrides="exps=GPU"), ValueError),
    (dict(n_cpu_moe=-2), ValueError),
    (dict(tensor_overrides=[3]), TypeError),
])
def test_llama_rejects_bad_placement_flags(paths, kw, error):
    with pytest.raises(error):
        glmoe.Llama(paths["plain"], n_ctx=64, n_threads=1, verbose=False, **kw)


@pytest.mark.skipif(HAVE_GPU, reason="CPU fallback: on a GPU the offloaded forward is checked by the cuda tests")
def test_llama_placement_flags_without_a_gpu_run_on_the_cpu(paths):
    tokens = list(range(1, 20))
    plain = glmoe.Llama(paths["plain"], n_ctx=64, n_threads=1, verbose=False)
    plain.eval(tokens)
    for kw in (dict(n_gpu_layers=-1, tensor_overrides="exps=CPU"),
               dict(n_gpu_layers=-1, tensor_overrides=["exps=CPU", r"blk\.0\.=CUDA0"], cpu_moe=True),
               dict(n_gpu_layers=3, n_cpu_moe=2)):
        llm = glmoe.Llama(paths["plain"], n_ctx=64, n_threads=1, verbose=False, **kw)
        assert llm.tensor_overrides == ([kw["tensor_overrides"]] if isinstance(kw.get("tensor_overrides"), str)
                                        else list(kw.get("tensor_overrides", [])))
        llm.eval(tokens)
        np.testing.assert_array_equal(llm.scores[:len(tokens)], plain.scores[:len(tokens)])


def test_engine_takes_placement_flags(models):
    with pytest.raises(ValueError, match="matches no tensor"):
        _core.BatchEngine(models["plain"], 64, n_threads=1, tensor_overrides=["nothing_like_this=CPU"])
    with pytest.raises(ValueError):
        _core.BatchEngine(models["plain"], 64, n_threads=1, tensor_overrides=["exps"])
    engine = _core.BatchEngine(models["plain"], 64, n_threads=1, n_gpu_layers=-1,
                               tensor_overrides=["exps=CPU"], cpu_moe=True, n_cpu_moe=1)
    try:
        rid = engine.submit([1, 2, 3], max_tokens=3)
        ev = engine.poll(rid, 30.0)
        while not ev["finished"]:
            ev = engine.poll(rid, 30.0)
        assert ev["finish_reason"] in ("length", "stop")
    finally:
        engine.shutdown()
