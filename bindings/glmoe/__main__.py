"""`python -m glmoe`: evaluate a prompt of token ids and continue it greedily.

With no model argument it uses a small built-in GLM4-MoE model with random weights, made once
and cached (tokenizer-level text generation comes with the Python front).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from .llama import Llama

DEFAULT_PROMPT = "151331,151333,1,2,3,4,5,6,7,8"


def default_model_path() -> str:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = os.path.join(cache, "glmoe", "tiny-random-v1.gguf")
    if not os.path.exists(path):
        from .tools.make_model import PRESETS, ModelSpec, write_model

        os.makedirs(os.path.dirname(path), exist_ok=True)
        print(f"glmoe: making the built-in model {path}", file=sys.stderr)
        tmp = path + ".part"
        write_model(tmp, ModelSpec(**PRESETS["tiny"]), seed=0)
        os.replace(tmp, path)
    return path


def parse_tokens(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise SystemExit(f"glmoe: -p takes comma-separated token ids, got {text!r}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="glmoe", description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", help="GLM4-MoE GGUF file (default: the built-in tiny model)")
    ap.add_argument("-p", "--prompt", default=None, help="comma-separated token ids")
    ap.add_argument("-n", "--n-predict", type=int, default=16, help="tokens to generate (greedy)")
    ap.add_argument("-c", "--ctx-size", type=int, default=512)
    ap.add_argument("-t", "--threads", type=int, default=os.cpu_count())
    args = ap.parse_args(argv)

    path = args.model or default_model_path()
    llm = Llama(path, n_ctx=args.ctx_size, n_threads=args.threads, verbose=True)
    prompt = parse_tokens(args.prompt) if args.prompt else [t % llm.n_vocab() for t in parse_tokens(DEFAULT_PROMPT)]
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    out = []
    for _ in range(args.n_predict):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        llm.eval([tok])
    t2 = time.perf_counter()
    print("prompt:", ",".join(map(str, prompt)))
    print("generated:", ",".join(map(str, out)))
    print(
        f"glmoe: prompt {len(prompt)} tokens in {1000 * (t1 - t0):.1f} ms ({len(prompt) / (t1 - t0):.1f} t/s), "
        f"generation {len(out)} tokens in {1000 * (t2 - t1):.1f} ms ({len(out) / max(t2 - t1, 1e-9):.1f} t/s)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
