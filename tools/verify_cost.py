"""What a speculative verification step costs: the time of one forward of n tokens of a
sequence (the sampled token plus n - 1 draft tokens, logits for each) against a plain
one-token decode step, at a given context depth.

    python tools/verify_cost.py MODEL.gguf [-ngl -1] [--depth 512] [--max-tokens 8] [--reps 40]

A draft of k tokens pays only if it yields more than cost(k + 1) / cost(1) - 1 accepted tokens
on average; on an MoE model each extra token also reads the experts it routes to.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from glmoe import _core


def step_times(ctx, n_vocab: int, depth: int, n_tokens: int, reps: int, rng) -> list:
    """Wall time (ms) of `reps` forwards of n_tokens at positions depth.., each rolled back."""
    times = []
    for r in range(reps + 2):  # the first two capture and warm the step's graph
        tokens = rng.integers(0, n_vocab, n_tokens).astype(np.int32)
        pos = np.arange(depth, depth + n_tokens, dtype=np.int32)
        t0 = time.perf_counter()
        ctx.decode(tokens, pos, np.zeros(n_tokens, np.int32), np.ones(n_tokens, np.uint8))
        if r >= 2:
            times.append(1000 * (time.perf_counter() - t0))
        ctx.kv_seq_rm(0, depth, -1)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--n-gpu-layers", "-ngl", type=int, default=0)
    ap.add_argument("--depth", type=int, default=512, help="tokens already in the cache")
    ap.add_argument("--max-tokens", type=int, default=8, help="largest step measured")
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()

    model = _core.Model(args.model)
    ctx = _core.Context(model, args.depth + args.max_tokens + 16, n_threads=args.threads,
                        n_gpu_layers=args.n_gpu_layers)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, model.n_vocab, args.depth).astype(np.int32)
    for p0 in range(0, args.depth, 512):
        chunk = prompt[p0:p0 + 512]
        ctx.decode(chunk, np.arange(p0, p0 + len(chunk), dtype=np.int32), np.zeros(len(chunk), np.int32),
                   np.zeros(len(chunk), np.uint8))
    # Interleaved rounds, so that a slow spell of the machine hits every size alike.
    samples = {n: [] for n in range(1, args.max_tokens + 1)}
    for _ in range(4):
        for n in samples:
            samples[n] += step_times(ctx, model.n_vocab, args.depth, n, args.reps // 4, rng)
    print(f"model: {args.model}, n_gpu_layers {args.n_gpu_layers}, depth {args.depth}, "
          f"median of {len(samples[1])} steps each")
    print("| tokens in the step | ms | x one-token step |")
    print("|---|---|---|")
    one = statistics.median(samples[1])
    for n, t in samples.items():
        print(f"| {n} | {statistics.median(t):.3f} | {statistics.median(t) / one:.2f} |")


if __name__ == "__main__":
    main()
