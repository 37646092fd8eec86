"""A saved KV cache state is the same bytes whatever the placement (issue 17): each layer's rows
come from the backend that runs its attention, so a state saved with attention on the CPU loads
where the GPU (here its cpu_as_gpu stand-in) holds some or all layers, and back. The GPU's own
rows are checked on the device by tests/test_cuda_kv_types.py."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from glmoe import _core
from glmoe.tools.make_model import ModelSpec, write_model
from test_kv_types import FLOAT_MODEL, decode_all

# The stand-in stores what the GPU stores: q8_0 and q4_0 (and f16), K and V apart.
TYPES = [(QT.Q8_0, QT.Q8_0), (QT.Q4_0, QT.F16), (QT.F16, QT.Q4_0)]
# n_gpu_layers as llama.cpp counts it (the output head first): none, one block, every block.
PLACEMENTS = {"cpu": 0, "mixed": 2, "gpu": 99}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("kvp") / "float.gguf")
    write_model(path, ModelSpec(**FLOAT_MODEL), seed=11)
    return _core.Model(path)


def context(model, placement, type_k, type_v):
    ngl = PLACEMENTS[placement]
    return _core.Context(model, 128, 2, f32_activations=True, type_k=int(type_k), type_v=int(type_v),
                         n_gpu_layers=ngl, cpu_as_gpu=ngl > 0, gpu_expert_share=0.0)


TOKENS = np.random.default_rng(3).integers(0, FLOAT_MODEL["vocab"], 48).tolist()


def test_placements_do_what_they_say(model):
    assert [context(model, p, QT.Q8_0, QT.Q8_0).n_gpu_layers for p in PLACEMENTS] == [0, 1, 2]


@pytest.mark.parametrize("type_k,type_v", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("src,dst", [("cpu", "mixed"), ("cpu", "gpu"), ("gpu", "cpu"), ("mixed", "gpu")])
def test_state_moves_between_placements(model, type_k, type_v, src, dst):
    """Loaded elsewhere, a state's rows land in the other backends unchanged (saving them again gives
    the same bytes), and decoding goes on from them as it does where they were saved."""
    a = context(model, src, type_k, type_v)
    decode_all(a, TOKENS[:40])
    state = a.kv_state()
    b = context(model, dst, type_k, type_v)
    decode_all(b, TOKENS[:5], seq=1)  # something to be replaced
    b.kv_load_state(state)
    assert b.kv_used == 40 and b.kv_state() == state
    expected = decode_all(a, TOKENS[40:48], start=40)
    got = decode_all(b, TOKENS[40:48], start=40)
    # The stand-in runs the CPU's kernels: the same rows give the same logits.
    assert np.array_equal(got, expected)


def test_state_of_other_types_is_refused_across_placements(model):
    a = context(model, "cpu", QT.Q8_0, QT.Q8_0)
    decode_all(a, TOKENS[:10])
    b = context(model, "gpu", QT.Q8_0, QT.Q4_0)
    with pytest.raises(ValueError, match="saved with KV types K q8_0, V q8_0, but this context stores K q8_0, V q4_0"):
        b.kv_load_state(a.kv_state())
    assert b.kv_used == 0


def test_state_of_another_size_is_refused(model):
    a = context(model, "mixed", QT.Q8_0, QT.Q8_0)
    decode_all(a, TOKENS[:10])
    b = _core.Context(model, 64, 2, f32_activations=True, type_k=8, type_v=8, n_gpu_layers=2, cpu_as_gpu=True)
    with pytest.raises(ValueError, match="another size or model"):
        b.kv_load_state(a.kv_state())


@pytest.mark.parametrize("src,dst", [("cpu", "gpu"), ("gpu", "mixed"), ("mixed", "cpu")])
def test_sequence_state_moves_between_placements(model, src, dst):
    """One sequence's state (a server slot file's KV part) saves and loads on every placement, into
    another sequence, and decoding goes on from it as where it was saved."""
    a = context(model, src, QT.Q8_0, QT.Q4_0)
    decode_all(a, TOKENS[:7], seq=1)
    decode_all(a, TOKENS[:30])
    state = a.kv_seq_state(0)
    b = context(model, dst, QT.Q8_0, QT.Q4_0)
    decode_all(b, TOKENS[:5], seq=1)  # another sequence, left alone
    assert b.kv_seq_load_state(1, state, 64) == 30
    assert b.kv_used == 30 and b.kv_seq_state(1) == state
    expected = decode_all(a, TOKENS[30:36], start=30)
    got = decode_all(b, TOKENS[30:36], start=30, seq=1)
    assert np.array_equal(got, expected)
    with pytest.raises(ValueError, match="more than the 20"):
        b.kv_seq_load_state(0, state, 20)
    assert b.kv_used == 36

