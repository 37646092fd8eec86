"""The packaged trained model (bindings/glmoe/models/tiny-kjv.gguf, made by tools/train_tiny.py).

Random weights give every position about the same perplexity whatever the engine does; trained
weights make perplexity on held-out text a sharp check: it is low only when tokenizer, rope,
attention mask, routing and norms all match what the model was trained with.
tests/data/kjv_heldout.txt is the start of Revelation, a book left out of training.
"""
from __future__ import annotations

import os
import string
import subprocess
import sys

import numpy as np
import pytest

import glmoe
from glmoe import _core
from glmoe.__main__ import default_model_path
from glmoe.tokenizer import GGUFTokenizer
from reference_glm4moe import ReferenceModel

MODEL = default_model_path()
HELD_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "kjv_heldout.txt")
# Measured when the model was made (420 tokens): engine and reference 31.6; the held-out text's
# own unigram frequencies (a baseline fitted to the very text it scores) 107; with GPT-J rope
# 71.9, with positions 3 apart 74.9.
PPL_BOUND = 40.0

pytestmark = pytest.mark.skipif(not os.path.exists(MODEL), reason="packaged model missing")


@pytest.fixture(scope="module")
def tokens() -> list[int]:
    with open(HELD_OUT, "rb") as f:
        return GGUFTokenizer.from_gguf(MODEL).tokenize(f.read(), add_bos=False)


def perplexity(logits: np.ndarray, tokens: list[int]) -> float:
    """exp of the mean next-token negative log-likelihood over the sequence."""
    x = logits[:-1].astype(np.float64)
    x = x - x.max(axis=1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    return float(np.exp(-logp[np.arange(len(tokens) - 1), tokens[1:]].mean()))


def unigram_perplexity(tokens: list[int]) -> float:
    """Perplexity of the text's own unigram frequencies: what no context at all achieves."""
    counts = np.bincount(tokens)
    p = counts[tokens[1:]] / counts.sum()
    return float(np.exp(-np.log(p).mean()))


def engine_logits(tokens: list[int], positions: np.ndarray | None = None) -> np.ndarray:
    model = _core.Model(MODEL)
    ctx = _core.Context(model, 512, 2)
    pos = np.arange(len(tokens), dtype=np.int32) if positions is None else positions.astype(np.int32)
    n = len(tokens)
    return ctx.decode(np.asarray(tokens, np.int32), pos, np.zeros(n, np.int32), np.ones(n, np.uint8))


class InterleavedRopeReference(ReferenceModel):
    """GPT-J rope (pairs 2i, 2i+1) instead of GLM's neox halves: the classic conversion mistake."""

    def _rope(self, x: np.ndarray) -> np.ndarray:
        half, n_rot = self.n_rot // 2, self.n_rot
        positions = np.arange(x.shape[0], dtype=np.float64)
        freqs = self.rope_base ** (-2.0 * np.arange(half, dtype=np.float64) / n_rot)
        angle = positions[:, None] * freqs[None, :]
        cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
        out = x.copy()
        a, b = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
        out[..., 0:n_rot:2] = a * cos - b * sin
        out[..., 1:n_rot:2] = b * cos + a * sin
        return out


def test_heldout_perplexity_engine_matches_reference(tokens):
    assert 300 <= len(tokens) <= 512
    llm = glmoe.Llama(MODEL, n_ctx=512, logits_all=True, verbose=False)
    llm.eval(tokens)
    engine = perplexity(np.asarray(llm.scores[:len(tokens)]), tokens)
    ref = perplexity(ReferenceModel(MODEL).logits(tokens), tokens)
    unigram = unigram_perplexity(tokens)
    assert engine < PPL_BOUND and engine < unigram / 2.5, (engine, unigram)
    assert engine == pytest.approx(ref, rel=1e-3), (engine, ref)


def test_wrong_rope_jumps(tokens):
    """What a broken rope would look like: perplexity well above the right one."""
    right = perplexity(ReferenceModel(MODEL).logits(tokens), tokens)
    interleaved = perplexity(InterleavedRopeReference(MODEL).logits(tokens), tokens)
    # The engine with positions spaced 3 apart: the rope angles are wrong, the mask is not.
    stretched = perplexity(engine_logits(tokens, 3 * np.arange(len(tokens))), tokens)
    assert interleaved > 1.8 * right, (right, interleaved)
    assert stretched > 1.8 * right, (right, stretched)


def test_tokenizer_round_trip(tokens):
    tok = GGUFTokenizer.from_gguf(MODEL)
    with open(HELD_OUT, "rb") as f:
        text = f.read()
    assert tok.detokenize(tokens) == text
    # Trained on English: whole words, not bytes (the KJV averages ~3.7 bytes a token).
    assert len(text) / len(tokens) > 3.0
    other = "Grüße, 世界! tabs\tand  spaces\n\n".encode()
    assert tok.detokenize(tok.tokenize(other, add_bos=False)) == other
    eos = tok.eos_id
    assert tok.token_to_piece(eos, special=True) == b"<|endoftext|>" and tok.token_to_piece(eos) == b""


def test_greedy_generation_reads_as_english():
    llm = glmoe.Llama(MODEL, n_ctx=256, verbose=False)
    text = llm("In the beginning", max_tokens=40, temperature=0.0)["choices"][0]["text"]
    ok = set(string.ascii_letters + " \n,.;:'?!")
    assert sum(c in ok for c in text) >= 0.95 * len(text), text
    words = text.split()
    assert len(words) >= 15 and {"the", "and", "of"} & {w.strip(",.;:").lower() for w in words}, text


def test_cli_no_mmap_and_mlock_generate_the_same_text():
    """`python -m glmoe --no-mmap` (the file read into memory) and `--mlock` (the mapped file locked in
    RAM, or a warning) write what the mapped model writes."""
    out = [subprocess.run([sys.executable, "-m", "glmoe", "-n", "8", "--temp", "0", "-t", "1", *flag],
                          capture_output=True, text=True, timeout=120) for flag in ([], ["--no-mmap"], ["--mlock"])]
    assert [p.returncode for p in out] == [0, 0, 0], [p.stderr for p in out]
    assert out[0].stdout == out[1].stdout == out[2].stdout and len(out[0].stdout.split()) >= 4
