"""The GPU against the independent float64 reference (tests/reference_glm4moe.py), not only against
the CPU engine: f32-activation mode (every matrix product in f32 on dequantized weights) at tight
bounds for every weight type, prompt chunks and decode steps replayed from CUDA graphs; the default
mode at the CPU 8-bit mode's bounds; the trained tiny model's held-out perplexity; KV-cache forks,
truncation and prefix reuse followed by decoding; and every kind of placement (-ngl, -ot,
--cpu-moe, --n-cpu-moe, units moved either way), logits and greedy generation.

Rerun a failure with GLMOE_TEST_SEED=<seed> (the seed is in the messages)."""
from __future__ import annotations

import os
import re
import zlib
from dataclasses import dataclass, field

import numpy as np
import pytest

import glmoe
from glmoe import _core
from glmoe.tokenizer import GGUFTokenizer
from glmoe.tools.make_model import ModelSpec, write_model
from cuda_support import cuda_only
from reference_glm4moe import ReferenceModel
from test_cuda_model import CHUNKS, CONFIGS, assert_close, run_positions
from test_engine import TOLERANCE_F32_ACTIVATIONS, relative_errors
from test_trained_model import HELD_OUT, MODEL as TRAINED_MODEL, perplexity

pytestmark = cuda_only

SEED = int(os.environ.get("GLMOE_TEST_SEED", np.random.SeedSequence().entropy % 2**32))
N_CTX = 128
GPU_HEAD_SIZES = (64, 128, 256)  # what the attention kernels are built for

# ---- bounds ---------------------------------------------------------------------------------------
# f32 mode on the GPU: products in f32 (dequantize_matrix, then mm_float / the f32-weight
# matrix-vector kernels), so only attention's f16 separates it from the float64 reference: K and V
# are stored as f16 (relative rounding up to 2^-11 ~ 4.9e-4, ~2.8e-4 rms), and the flash-attention
# kernels round q * scale and the softmax weights p to f16 as well (attention outputs ~1e-3 off).
# The reference with exactly those four roundings (float64 otherwise), on these configurations, 20
# sequences of 75 tokens each clear of routing near-ties (below): per-position relative L2 error of
# the logits with median 1.4e-4 .. 7.3e-4, worst 1.2e-3 (the k-quant configuration, whose qk-norm
# makes its scores the largest). The bounds leave 3-4x over that. 8-bit activations left in the
# products give ~1e-2 (the CPU's 8-bit mode: 1-4e-2), a rope at a wrong position or a stale KV cell O(1).
F32_MEDIAN = 2e-3
F32_MAX = 5e-3
# A routing choice within the rounding of a tie flips, and a flipped expert moves that position's
# logits by 0.2-0.4 and, through its K/V, later positions' by up to ~1e-2 (the simulation above, on
# unselected random sequences, flipped in 3 of 120). The rounding moved the selection scores
# (sigmoid + bias, O(1)) by at most 6.8e-4 (k-quant configuration; 2.2e-4 the others), so the
# sequences used are clear of ties by 3e-3: every position's chosen experts (and kept groups) beat
# the best unchosen ones by at least that in the reference, twice what two scores moving apart
# by the most seen could close.
ROUTING_MARGIN = 3e-3
# Same kernels on the same inputs in the same step shapes (GPU against GPU): identical up to
# reduction order, which none of these kernels lets depend on other tokens or on cell indices.
SAME_KERNELS = 1e-4
# Greedy generation in the default mode against teacher-forced f32 logits: a token counts as agreeing
# when its f32 logit is within NEAR_TIE standard deviations of the row's maximum (as
# test_engine_runs_on_the_gpu). 8-bit activations flip routing choices now and then, and a flip can
# change the next token outright: the CPU's own 8-bit mode, 24 greedy tokens after 25 random
# prompts per configuration, had 0-4 tokens farther than 0.15 std (k-quant configuration; 0-2 the
# others). A broken forward disagrees at nearly every token.
GREEDY_TOKENS = 24
NEAR_TIE = 0.15
MAX_FAR = 6


def case_rng(*names: str) -> np.random.Generator:
    return np.random.default_rng([SEED, *(zlib.crc32(n.encode()) for n in names)])


# ---- the reference, clear of routing near-ties ------------------------------------------------------

class RoutingGapReference(ReferenceModel):
    """The float64 reference that also records, for each position, how close its routing came to a
    tie: over the MoE layers, the smallest of (last chosen expert's selection score - best unchosen
    one's, among the experts of the kept groups) and, with group-limited routing, (last kept
    group's score - best dropped group's). The choice itself is the reference's own (route)."""

    def __init__(self, path: str):
        super().__init__(path)
        self._gaps = None

    def logits_and_gaps(self, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
        self._gaps = np.full(len(tokens), np.inf)
        try:
            return self.logits(tokens), self._gaps
        finally:
            self._gaps = None

    def route(self, il: int, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        top, w = super().route(il, h)
        if self._gaps is None:
            return top, w
        p = f"blk.{il}."
        choice = (1.0 / (1.0 + np.exp(-(h @ self.weight(p + "ffn_gate_inp.weight").T)))
                  + self.weight(p + "exp_probs_b.bias"))
        T, E = choice.shape
        allowed = np.ones((T, E), bool)
        gap = np.full(T, np.inf)
        if 1 < self.n_groups and self.n_group_used < self.n_groups:
            group_score = np.sort(choice.reshape(T, self.n_groups, -1), axis=2)[:, :, -2:].sum(axis=2)
            ranked = -np.sort(-group_score, axis=1)
            gap = ranked[:, self.n_group_used - 1] - ranked[:, self.n_group_used]
            kept = group_score >= ranked[:, self.n_group_used - 1:self.n_group_used]
            allowed = np.repeat(kept, E // self.n_groups, axis=1)
        chosen = np.zeros((T, E), bool)
        np.put_along_axis(chosen, top, True, axis=1)
        last_in = np.where(chosen, choice, np.inf).min(axis=1)
        first_out = np.where(allowed & ~chosen, choice, -np.inf).max(axis=1)
        self._gaps = np.minimum(self._gaps, np.minimum(gap, last_in - first_out))
        return top, w


def clear_sequence(ref: RoutingGapReference, rng: np.random.Generator, n: int) -> tuple[list[int], np.ndarray]:
    """n random tokens whose every routing choice is clear of a tie by ROUTING_MARGIN, and their
    reference logits. The first position too close to a tie gets a new token; earlier positions do
    not see it (causal), so this settles after about as many tries as the first draw had near-ties."""
    tokens = rng.integers(0, ref.vocab, n).tolist()
    for _ in range(200):
        logits, gaps = ref.logits_and_gaps(tokens)
        close = np.flatnonzero(gaps < ROUTING_MARGIN)
        if len(close) == 0:
            return tokens, logits
        tokens[close[0]] = int(rng.integers(0, ref.vocab))
    raise AssertionError("found no sequence clear of routing near-ties")


@dataclass
class Case:
    name: str
    path: str
    model: object
    ref: RoutingGapReference
    tokens: list[int]        # sum(CHUNKS) tokens clear of routing near-ties
    logits: np.ndarray       # their reference logits
    cpu_f32: np.ndarray = field(default=None)  # the CPU engine's f32 mode on the same tokens

    def tag(self, what: str) -> str:
        return f"{self.name}, {what} (GLMOE_TEST_SEED={SEED})"


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
    name = request.param
    path = str(tmp_path_factory.mktemp("cuda_reference") / f"{name}.gguf")
    write_model(path, ModelSpec(**CONFIGS[name]), seed=4321)
    ref = RoutingGapReference(path)
    tokens, logits = clear_sequence(ref, case_rng(name), sum(CHUNKS))
    model = _core.Model(path)
    c = Case(name, path, model, ref, tokens, logits)
    c.cpu_f32 = run_positions(_core.Context(model, N_CTX, 2, f32_activations=True), tokens, CHUNKS)
    return c


# Prompt chunks of CHUNKS' 40 tokens copy RAM-placed experts to the GPU (the big-batch path) rather
# than send their tokens to the CPU; the smaller steps take the CPU's experts.
BORROW_MIN_TOKENS = 32


def gpu_context(model, **kw) -> _core.Context:
    """A context with a GPU part (n_gpu_layers=-1 unless given); fails if the GPU is not used."""
    kw.setdefault("n_gpu_layers", -1)
    kw.setdefault("expert_borrow_min_tokens", BORROW_MIN_TOKENS)
    ctx = _core.Context(model, N_CTX, 2, **kw)
    assert ctx.gpu_counters(), f"no GPU backend with {kw}"
    return ctx


def assert_tight(case: Case, what: str, got: np.ndarray, ref: np.ndarray):
    assert got.shape == ref.shape and np.isfinite(got).all(), case.tag(what)
    err = relative_errors(got.astype(np.float64), ref)
    worst = int(np.argmax(err))
    assert np.median(err) < F32_MEDIAN and err[worst] < F32_MAX, (
        case.tag(what) + f": relative error median {np.median(err):.2e}, max {err[worst]:.2e} at position {worst}")


def decode_one(ctx, token: int, pos: int, seq: int = 0) -> np.ndarray:
    return ctx.decode(np.asarray([token], np.int32), np.asarray([pos], np.int32), np.asarray([seq], np.int32),
                      np.ones(1, np.uint8))[0]


def decode_chunk(ctx, tokens, start: int, seq: int = 0) -> np.ndarray:
    n = len(tokens)
    return ctx.decode(np.asarray(tokens, np.int32), np.arange(start, start + n, dtype=np.int32),
                      np.full(n, seq, np.int32), np.ones(n, np.uint8))


def assert_same_kernels(got, want, what):
    err = relative_errors(np.atleast_2d(got).astype(np.float64), np.atleast_2d(want).astype(np.float64))
    assert np.isfinite(got).all() and err.max() < SAME_KERNELS, (what, err.max(), f"GLMOE_TEST_SEED={SEED}")


# ---- a) every position against the reference ----------------------------------------------------------

def test_cpu_f32_mode_is_the_reference(case):
    """The anchor of the placement comparisons below: the CPU's f32 mode meets its own bound."""
    err = relative_errors(case.cpu_f32.astype(np.float64), case.logits)
    assert np.median(err) < TOLERANCE_F32_ACTIVATIONS[0] and err.max() < 10 * TOLERANCE_F32_ACTIVATIONS[1], (
        case.tag("CPU f32"), np.median(err), err.max())


def test_gpu_f32_mode_matches_float64_reference(case):
    """Prompt chunk, six graph-replayed single steps, a 5-token step and a 40-token chunk at depth."""
    ctx = gpu_context(case.model, f32_activations=True)
    got = run_positions(ctx, case.tokens, CHUNKS)
    assert ctx.gpu_counters()["steps"] >= len(CHUNKS)
    assert_tight(case, "f32 mode, all on the GPU", got, case.logits)


def test_gpu_default_mode_matches_float64_reference(case):
    """8-bit activations in decode steps, bf16 in the tensor-core prompt chunks, f16 K/V: the CPU
    8-bit mode's bound against the reference (median 0.1), and test_cuda_model's for the tail."""
    got = run_positions(gpu_context(case.model), case.tokens, CHUNKS)
    assert np.isfinite(got).all()
    assert_close(case.tag("default mode, all on the GPU"), relative_errors(got.astype(np.float64), case.logits))


# ---- b) decode steps replayed from graphs read their own positions ------------------------------------------

def test_gpu_f32_graph_replayed_steps_match_the_reference_at_each_position(case):
    """Twelve single-token steps at positions 24..35: each a replay of a captured graph, each must
    give the reference's logits at its own position (a replay that kept the capture's position,
    cell or visible length would be O(1) off)."""
    n_prompt, n_steps = 24, 12
    ctx = gpu_context(case.model, f32_activations=True)
    decode_chunk(ctx, case.tokens[:n_prompt], 0)
    before = ctx.gpu_counters()
    for i in range(n_steps):
        p = n_prompt + i
        row = decode_one(ctx, case.tokens[p], p)
        err = relative_errors(row[None].astype(np.float64), case.logits[p:p + 1])[0]
        assert np.isfinite(row).all() and err < F32_MAX, case.tag(f"step at position {p}: relative error {err:.2e}")
    after = ctx.gpu_counters()
    # Each step is one graph launch; a new capture is allowed for the first step and for a new KV bucket.
    assert after["graph_replays"] - before["graph_replays"] >= n_steps - 2, (before, after)
    assert after["graph_captures"] - before["graph_captures"] <= 2, (before, after)


# ---- c) the trained model's held-out perplexity ---------------------------------------------------------------

def test_trained_model_heldout_perplexity_on_the_gpu():
    if not os.path.exists(TRAINED_MODEL):
        pytest.skip("packaged model missing")
    head = int(_core.gguf_summary(TRAINED_MODEL)["metadata"]["glm4moe.attention.key_length"])
    if head not in GPU_HEAD_SIZES:
        pytest.skip(f"{os.path.basename(TRAINED_MODEL)} has head size {head}; the GPU attention kernels have "
                    f"{', '.join(map(str, GPU_HEAD_SIZES))}, so it runs on the CPU only")
    with open(HELD_OUT, "rb") as f:
        tokens = GGUFTokenizer.from_gguf(TRAINED_MODEL).tokenize(f.read(), add_bos=False)
    ref = perplexity(ReferenceModel(TRAINED_MODEL).logits(tokens), tokens)
    model = _core.Model(TRAINED_MODEL)
    n = len(tokens)
    chunks = [n - 16] + [1] * 8 + [8]  # a prompt chunk, graph-replayed steps and a small step
    for f32, rel in ((True, 0.01), (False, 0.03)):
        ctx = _core.Context(model, 512, 2, f32_activations=f32, n_gpu_layers=-1)
        assert ctx.gpu_counters(), "the trained model did not go to the GPU"
        ppl = perplexity(run_positions(ctx, tokens, chunks), tokens)
        assert ppl == pytest.approx(ref, rel=rel), ("f32" if f32 else "default", ppl, ref)


# ---- d) KV-cache edits on the GPU, then decoding -------------------------------------------------------------

MODES = pytest.mark.parametrize("f32", [True, False], ids=["f32", "default"])


@MODES
def test_gpu_fork_and_truncate_then_decode(case, f32):
    """Fork a prefix to seq 1, decode different tails on both seqs in shared steps, truncate seq 0
    back to the prefix and decode seq 1's tail on it: each step as a fresh context gives it."""
    n_prefix, n_tail = 20, 7
    prefix, tail_a = case.tokens[:n_prefix], case.tokens[n_prefix:n_prefix + n_tail]
    tail_b = case_rng(case.name, "tail_b").integers(0, case.model.n_vocab, n_tail).tolist()

    def fresh(tail):
        ctx = gpu_context(case.model, f32_activations=f32)
        decode_chunk(ctx, prefix, 0)
        return np.stack([decode_one(ctx, t, n_prefix + i) for i, t in enumerate(tail)])

    want_a, want_b = fresh(tail_a), fresh(tail_b)
    ctx = gpu_context(case.model, f32_activations=f32)
    decode_chunk(ctx, prefix, 0)
    ctx.kv_seq_cp(0, 1, 0, -1)
    assert ctx.kv_used == n_prefix
    for i in range(n_tail):
        pos = n_prefix + i
        out = ctx.decode(np.asarray([tail_a[i], tail_b[i]], np.int32), np.asarray([pos, pos], np.int32),
                         np.asarray([0, 1], np.int32), np.ones(2, np.uint8))
        assert_same_kernels(out[0], want_a[i], f"seq 0 after the fork, step {i}")
        assert_same_kernels(out[1], want_b[i], f"seq 1 after the fork, step {i}")
    assert ctx.kv_used == n_prefix + 2 * n_tail

    ctx.kv_seq_rm(0, n_prefix, -1)
    assert ctx.kv_seq_pos_max(0) == n_prefix - 1 and ctx.kv_used == n_prefix + n_tail
    for i, t in enumerate(tail_b):
        assert_same_kernels(decode_one(ctx, t, n_prefix + i, seq=0), want_b[i], f"seq 0 after truncation, step {i}")
    if f32:  # the fresh context's steps on the case's own tokens are the reference's too
        assert_tight(case, "fresh f32 context, first tail", want_a, case.logits[n_prefix:n_prefix + n_tail])


@MODES
def test_gpu_prefix_reuse_then_decode(case, f32):
    """Decode a prompt, remove its tail from position k, decode another continuation from k (a
    chunk, then single steps): as a fresh context fed the same prefix and continuation. Every step
    has at most 8 tokens, so that the prefix's K/V, computed in an 8-token step here and a 5-token
    one in the fresh context, come out the same (batch-invariant kernels)."""
    n_prompt, k, n_rest, n_steps = 8, 5, 7, 6
    rng = case_rng(case.name, "prefix_reuse")
    rest = rng.integers(0, case.model.n_vocab, n_rest + n_steps).tolist()

    def run(ctx, head_len):
        decode_chunk(ctx, case.tokens[:head_len], 0)
        if head_len > k:
            ctx.kv_seq_rm(0, k, -1)
            assert ctx.kv_seq_pos_max(0) == k - 1 and ctx.kv_used == k
        chunk = decode_chunk(ctx, rest[:n_rest], k)
        steps = [decode_one(ctx, t, k + n_rest + i) for i, t in enumerate(rest[n_rest:])]
        return np.concatenate([chunk, np.stack(steps)])

    want = run(gpu_context(case.model, f32_activations=f32), k)
    got = run(gpu_context(case.model, f32_activations=f32), n_prompt)
    assert_same_kernels(got, want, "continuation after prefix reuse")


# ---- e) placements -------------------------------------------------------------------------------------------

# Each entry: the Context / Llama flags, and regexes of tensor names with the device they must land
# on. Every layer part (attention; post-attention norm + router + dense FFN; routed experts; shared
# expert) stays on one device. Every configuration has one dense lead layer (0) and MoE layers 1...
PLACEMENTS = {
    "all-gpu": (dict(n_gpu_layers=-1), {r"": "CUDA0"}),
    "ngl-1": (dict(n_gpu_layers=1), {r"^blk\.0\.": "CPU"}),
    "ngl-n_layer": (dict(n_gpu_layers="n_layer"), {r"^blk\.0\.": "CPU", r"^blk\.1\.": "CUDA0"}),
    "ot-exps-cpu": (dict(n_gpu_layers=-1, tensor_overrides=["exps=CPU"]), {r"_exps": "CPU", r"attn|shexp": "CUDA0"}),
    "cpu-moe": (dict(n_gpu_layers=-1, cpu_moe=True), {r"_exps": "CPU", r"attn|shexp": "CUDA0"}),
    # Layer 0 is dense: --n-cpu-moe 2 moves the experts of layer 1 only.
    "n-cpu-moe-2": (dict(n_gpu_layers=-1, n_cpu_moe=2), {r"^blk\.1\.ffn_.*_exps": "CPU", r"^blk\.1\.attn": "CUDA0"}),
    "ot-units-to-cpu": (
        dict(n_gpu_layers=-1, tensor_overrides=[r"blk\.0\.attn=CPU", r"blk\.1\.ffn_.*_exps=CPU",
                                                r"blk\.1\.(post_attention_norm|ffn_gate_inp|exp_probs_b)=CPU"]),
        {r"^blk\.0\.attn": "CPU", r"^blk\.0\.ffn_(gate|up|down)\.": "CUDA0", r"^blk\.1\.attn": "CUDA0",
         r"^blk\.1\.(ffn_.*_exps|post_attention_norm|ffn_gate_inp)": "CPU", r"^blk\.1\.ffn_.*_shexp": "CUDA0",
         r"^output": "CUDA0"}),
    "ot-units-to-gpu": (
        dict(n_gpu_layers=0, tensor_overrides=[r"blk\.0\.(post_attention_norm|ffn_(gate|up|down)\.)=CUDA0",
                                               r"blk\.1\.ffn_.*_shexp=CUDA0", r"blk\.1\.attn=CUDA0"]),
        {r"^blk\.0\.(post_attention_norm|ffn_(gate|up|down)\.)": "CUDA0", r"^blk\.0\.attn": "CPU",
         r"^blk\.1\.ffn_.*_shexp": "CUDA0", r"^blk\.1\.attn": "CUDA0", r"^blk\.1\.ffn_.*_exps": "CPU",
         r"^output": "CPU"}),
}


def placement_flags(name: str, model) -> dict:
    flags = dict(PLACEMENTS[name][0])
    if flags.get("n_gpu_layers") == "n_layer":
        flags["n_gpu_layers"] = model.n_layer
    return flags


def check_placement(name: str, placement: list[tuple[str, str]]):
    """The tensors landed where the flags say, and both devices are used (all on the GPU for all-gpu)."""
    devices = {d for _, d in placement}
    assert devices == ({"CUDA0"} if name == "all-gpu" else {"CPU", "CUDA0"}), (name, devices)
    for pattern, device in PLACEMENTS[name][1].items():
        hit = [(n, d) for n, d in placement if re.search(pattern, n)]
        assert hit and all(d == device for _, d in hit), (name, pattern, [h for h in hit if h[1] != device])


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_placement_f32_matches_reference_and_cpu(case, placement):
    ctx = gpu_context(case.model, f32_activations=True, **placement_flags(placement, case.model))
    check_placement(placement, ctx.placement())
    got = run_positions(ctx, case.tokens, CHUNKS)
    assert_tight(case, f"f32 mode, {placement}: against the reference", got, case.logits)
    assert_tight(case, f"f32 mode, {placement}: against the CPU's f32 mode", got, case.cpu_f32.astype(np.float64))


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_placement_greedy_generation(case, placement):
    """Llama with the placement flags, greedy, every step at most 8 tokens (n_batch=8): the same
    tokens twice, and each token the f32 CPU's argmax under teacher forcing up to a near tie."""
    flags = placement_flags(placement, case.model)
    prompt = case_rng(case.name, placement, "greedy").integers(0, case.model.n_vocab, 12).tolist()
    runs = []
    for _ in range(2):
        llm = glmoe.Llama(case.path, n_ctx=N_CTX, n_batch=8, n_threads=2, verbose=False, **flags)
        check_placement(placement, llm._ctx.placement())
        runs.append([t for t, _ in zip(llm.generate(prompt, temp=0.0), range(GREEDY_TOKENS))])
        del llm
    assert runs[0] == runs[1], (placement, runs)
    seq = prompt + runs[0]
    f32 = run_positions(_core.Context(case.model, N_CTX, 2, f32_activations=True), seq[:-1], [len(seq) - 1])
    rows = f32[len(prompt) - 1:].astype(np.float64)
    gap = (rows.max(axis=1) - rows[np.arange(GREEDY_TOKENS), runs[0]]) / rows.std(axis=1)
    far = np.flatnonzero(gap > NEAR_TIE)
    assert len(far) <= MAX_FAR, case.tag(f"{placement}: greedy tokens {far.tolist()} are "
                                         f"{np.round(gap[far], 2).tolist()} std below the f32 argmax")
