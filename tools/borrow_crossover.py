"""Where copying RAM-placed experts to the GPU beats running them on the CPU, for one file and
placement: times one step of N prompt tokens both ways (expert_borrow_min_tokens = N, and one
above the step) and prints a markdown table. Sets GpuParams::expert_borrow_min_tokens' default.

    python3 tools/borrow_crossover.py MODEL.gguf [-ot exps=CPU] [-t 16] [-n 16,32,64,...] [-r 3]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from glmoe import _core


def step_ms(model, n: int, args, borrow: bool) -> float:
    ctx = _core.Context(model, n_ctx=n, n_threads=args.threads, n_gpu_layers=99, n_ubatch=n,
                        tensor_overrides=args.override, expert_borrow_min_tokens=n if borrow else n + 1)
    tokens = (7 * np.arange(n, dtype=np.int32) + 1) % model.n_vocab
    pos, seq = np.arange(n, dtype=np.int32), np.zeros(n, dtype=np.int32)
    want = np.zeros(n, dtype=np.uint8)
    want[-1] = 1
    if not ctx.gpu_counters():
        raise SystemExit("borrow_crossover: no GPU backend (both ways would run on the CPU)")
    times = []
    for rep in range(args.reps + 1):  # the first run warms the staging and the page mappings
        ctx.kv_clear()
        t0 = time.perf_counter()
        ctx.decode(tokens, pos, seq, want)
        if rep:
            times.append(1000.0 * (time.perf_counter() - t0))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("-ot", "--override-tensor", dest="override", action="append", default=None)
    ap.add_argument("-t", "--threads", type=int, default=16)
    ap.add_argument("-n", "--tokens", default="16,32,64,128,256,512,1024")
    ap.add_argument("-r", "--reps", type=int, default=3)
    args = ap.parse_args()
    args.override = args.override or ["exps=CPU"]
    model = _core.Model(args.model)
    print(f"{args.model}, -ot {' -ot '.join(args.override)}, {args.threads} threads; median of {args.reps} steps\n")
    print("| tokens | experts on the CPU (ms) | experts copied to the GPU (ms) | CPU / copied |")
    print("| ---: | ---: | ---: | ---: |")
    for n in (int(x) for x in args.tokens.split(",")):
        cpu, gpu = step_ms(model, n, args, False), step_ms(model, n, args, True)
        print(f"| {n} | {cpu:.1f} | {gpu:.1f} | {cpu / gpu:.2f} |", flush=True)


if __name__ == "__main__":
    main()
