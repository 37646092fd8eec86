"""The forward under every kind of placement, on a machine without a GPU: the GPU's share runs on a
second CPU backend (Context(cpu_as_gpu=True)), so every crossing between devices the placement
makes (hidden states moved between layers, h and the routing sent to experts on the other device
and their sum sent back, the shared expert beside the router, the output head elsewhere) is
exercised with the CPU's kernels on both sides. Every op then computes exactly what the all-CPU
context computes, so the logits are bitwise equal, except that where the shared expert runs on
another device than the routed experts their sums are added to x in another order (f32 rounding);
a lost crossing, a part run twice or on stale inputs gives errors of order 1. The same placements
run on the GPU in test_cuda_reference.py."""
from __future__ import annotations

import numpy as np
import pytest

from glmoe import _core
from test_engine import CONFIGS, make_spec
from glmoe.tools.make_model import write_model

# Flags and the parts that must end up on the (stand-in) GPU. Layer 0 of every configuration is
# dense; layers 1.. are MoE layers with a shared expert.
PLACEMENTS = {
    "all-gpu": dict(n_gpu_layers=-1),
    "output-only": dict(n_gpu_layers=1),
    "last-layer": dict(n_gpu_layers=2),
    "exps-cpu": dict(n_gpu_layers=-1, tensor_overrides=["exps=CPU"]),
    "cpu-moe": dict(n_gpu_layers=-1, cpu_moe=True),
    "n-cpu-moe-2": dict(n_gpu_layers=-1, n_cpu_moe=2),
    "units-to-cpu": dict(n_gpu_layers=-1, tensor_overrides=[
        r"blk\.0\.attn=CPU", r"blk\.1\.ffn_.*_exps=CPU", r"blk\.1\.(post_attention_norm|ffn_gate_inp|exp_probs_b)=CPU"]),
    "units-to-gpu": dict(n_gpu_layers=0, tensor_overrides=[
        r"blk\.0\.(post_attention_norm|ffn_(gate|up|down)\.)=CUDA0", r"blk\.1\.ffn_.*_shexp=CUDA0", r"blk\.1\.attn=CUDA0"]),
    "shared-cpu": dict(n_gpu_layers=-1, tensor_overrides=["shexp=CPU"]),
    "experts-gpu-router-cpu": dict(n_gpu_layers=0, tensor_overrides=[r"_exps=CUDA0", "shexp=CUDA0"]),
}

# Placements whose shared and routed experts of some layer are on different devices.
SPLIT_EXPERTS = {"exps-cpu", "cpu-moe", "n-cpu-moe-2", "units-to-cpu", "units-to-gpu", "shared-cpu"}
# Relative error per position where the order differs. f32 activations: the f32 rounding of x's
# sum carried through the layers (seen ~1e-6). 8-bit activations: that difference moves values
# across the 8-bit rounding of the next layers' activations, and can flip a routing near-tie
# (seen: 2e-3 to 1.4e-2 at the worst position, far less at the median).
ROUNDING_F32 = 1e-5
ROUNDING_8BIT_MEDIAN = 1e-2

# A prompt chunk, single steps, a small batch, and a chunk at a depth, with two sequences mixed.
CHUNKS = [(0, 17), (0, 1), (1, 9), (0, 1), (1, 1), (0, 5), (1, 30)]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("placement_forward") / f"{request.param}.gguf")
    write_model(path, make_spec(**CONFIGS[request.param]), seed=77)
    return _core.Model(path)


def run(ctx, tokens):
    """Logits of every position of two interleaved sequences fed in CHUNKS."""
    out, pos = [], [0, 0]
    for seq, n in CHUNKS:
        part = np.asarray(tokens[seq][pos[seq]:pos[seq] + n], np.int32)
        out.append(ctx.decode(part, np.arange(pos[seq], pos[seq] + n, dtype=np.int32), np.full(n, seq, np.int32),
                              np.ones(n, np.uint8)))
        pos[seq] += n
    return np.concatenate(out)


@pytest.mark.parametrize("f32", [False, True])
@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
def test_every_placement_gives_the_cpu_logits(model, placement, f32):
    rng = np.random.default_rng()
    tokens = [rng.integers(0, model.n_vocab, 64).tolist() for _ in range(2)]
    want = run(_core.Context(model, 128, 2, f32_activations=f32), tokens)
    ctx = _core.Context(model, 128, 2, f32_activations=f32, cpu_as_gpu=True, **PLACEMENTS[placement])
    devices = {d for _, d in ctx.placement()}
    assert devices == ({"CUDA0"} if placement == "all-gpu" else {"CPU", "CUDA0"}), devices
    got = run(ctx, tokens)
    if placement in SPLIT_EXPERTS:
        err = np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)
        if f32:
            assert err.max() < ROUNDING_F32, (placement, err.max())
        else:
            assert np.median(err) < ROUNDING_8BIT_MEDIAN, (placement, np.median(err))
    else:
        assert np.array_equal(got, want), (placement, float(np.abs(got - want).max()))


def test_a_placement_that_moves_nothing_is_refused_when_it_splits_a_part(model):
    with pytest.raises(ValueError, match="attn"):
        _core.Context(model, 64, 1, cpu_as_gpu=True, n_gpu_layers=-1, tensor_overrides=[r"blk\.1\.attn_q=CPU"])


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_experts_in_ram_split_between_the_devices_give_the_cpu_logits(model, share):
    # In small steps the GPU runs a share of each step's experts (among those it holds pinned: here
    # experts [0, share x n_expert)) and the CPU the rest; share 0 is the old path (the CPU runs
    # them all), bitwise the same as the CPU's order of sums.
    rng = np.random.default_rng()
    tokens = [rng.integers(0, model.n_vocab, 64).tolist() for _ in range(2)]
    want = run(_core.Context(model, 128, 2, f32_activations=True), tokens)
    ctx = _core.Context(model, 128, 2, f32_activations=True, cpu_as_gpu=True, n_gpu_layers=-1,
                        tensor_overrides=["exps=CPU"], gpu_expert_share=share)
    got = run(ctx, tokens)
    err = np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)
    assert err.max() < ROUNDING_F32, (share, err.max())
    streamed = int(share * model.n_expert + 0.5)
    summary = ctx.placement_summary()
    assert ("%d%% of the routed experts" % round(100 * share) in summary) == (streamed > 0), summary
    assert ("among experts 0-%d, copied from pinned memory" % (streamed - 1) in summary) == (streamed > 0), summary


def gpu_step_experts_by_definition(ids, n_expert, fetchable, share):
    """expert_split.h's rule written out: round(share x distinct) of the fetchable routed experts,
    most tokens first, then the lowest id."""
    counts = np.bincount(ids[(ids >= 0) & (ids < n_expert)], minlength=n_expert)
    candidates = [e for e in range(min(fetchable, n_expert)) if counts[e] > 0]
    quota = min(len(candidates), int(np.floor(share * np.count_nonzero(counts) + 0.5)))
    return sorted(candidates, key=lambda e: (-counts[e], e))[:quota]


@pytest.mark.parametrize("n_tokens,k,n_expert", [(1, 8, 128), (3, 8, 128), (17, 8, 128), (63, 8, 128), (5, 4, 16),
                                                 (1, 1, 2)])
def test_the_gpu_takes_a_fixed_share_of_each_step_s_experts(n_tokens, k, n_expert):
    rng = np.random.default_rng()
    for _ in range(50):
        ids = np.stack([rng.choice(n_expert, k, replace=False) for _ in range(n_tokens)]).astype(np.int32)
        share = float(rng.choice([0.0, 0.25, 0.4, 0.5, 1.0, rng.random()]))
        fetchable = int(rng.choice([n_expert, rng.integers(0, n_expert + 1)]))
        got = _core.gpu_step_experts(ids.ravel().tolist(), k, n_expert, fetchable, share)
        assert got == gpu_step_experts_by_definition(ids.ravel(), n_expert, fetchable, share), (ids, fetchable, share)
        if fetchable == n_expert:  # every routed expert can be had: the count is the share's
            assert len(got) == int(np.floor(share * len(np.unique(ids)) + 0.5))


def test_gpu_step_experts_skips_bad_ids_and_refuses_partial_rows():
    assert _core.gpu_step_experts([3, -1, 200, 3, 5, 7], 3, 8, 8, 1.0) == [3, 5, 7]
    with pytest.raises(ValueError, match="whole rows"):
        _core.gpu_step_experts([1, 2, 3], 2, 8, 8, 0.5)


@pytest.mark.parametrize("share", [1.5, float("nan")])
def test_a_gpu_expert_share_outside_0_1_is_refused(model, share):
    with pytest.raises(ValueError, match="gpu_expert_share"):
        _core.Context(model, 64, 1, cpu_as_gpu=True, n_gpu_layers=-1, tensor_overrides=["exps=CPU"],
                      gpu_expert_share=share)
