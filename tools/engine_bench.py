"""Batched decode throughput of glmoe's engine (the server's core, without HTTP), as llama.cpp's
llama-batched-bench measures its own: B sequences start together, each with a prompt of P tokens,
and each generates exactly N tokens (greedy, end-of-generation ignored). Prints, per B, the
prompt time, the decode throughput over all sequences, the time per decode step and what each
step copies to the host and waits for (the GPU backend's counters; zeros on the CPU).

    python tools/engine_bench.py MODEL.gguf -ngl 99 -npp 16 -ntg 128 -npl 1,8,32,64

Also, with --llama, `Llama`'s streaming time per output token (TPOT) for one sequence, the path
llama-cpp-python users take (compare with llama-bench's tg at the same depth). --no-overlap runs
both with every step waiting for the previous one's tokens (what overlapped decoding gains)."""
from __future__ import annotations

import argparse
import time

import numpy as np

import glmoe
from glmoe import _core
from glmoe.llama_options import CACHE_TYPE_HELP, cache_type_arg


def wait_all(engine, ids: list, n_gen: int) -> dict:
    """Polls until every request has finished; returns when each one's first token arrived."""
    first_token: dict = {}
    running = list(ids)
    while running:
        for i in list(running):
            ev = engine.poll(i, 0.0)
            if ev["tokens"] and i not in first_token:
                first_token[i] = time.perf_counter()
            if ev["finished"]:
                if ev["n_generated"] != n_gen:
                    raise RuntimeError(f"request {i} generated {ev['n_generated']} of {n_gen}: {ev}")
                running.remove(i)
        time.sleep(0.0002)
    return first_token


def engine_row(model, n_parallel: int, n_prompt: int, n_gen: int, n_gpu_layers: int, n_threads: int,
               seed: int, overlap: bool, type_k: int = -1, type_v: int = -1) -> dict:
    n_ctx = n_parallel * (n_prompt + n_gen + 8)
    engine = _core.BatchEngine(model, n_ctx=n_ctx, n_parallel=n_parallel, n_threads=n_threads,
                               n_gpu_layers=n_gpu_layers, overlap=overlap, type_k=type_k, type_v=type_v)
    rng = np.random.default_rng(seed)
    n_vocab = model.n_vocab
    prompts = [rng.integers(1000, min(n_vocab, 30000), n_prompt, dtype=np.int32) for _ in range(n_parallel)]
    try:
        # One warm-up request: the first steps capture graphs and fill caches.
        wait_all(engine, [engine.submit(prompts[0], max_tokens=8, temperature=0.0)], 8)
        before, stats0 = engine.gpu_counters(), engine.stats()
        t0 = time.perf_counter()
        ids = [engine.submit(p, max_tokens=n_gen, temperature=0.0) for p in prompts]
        first_token = wait_all(engine, ids, n_gen)
        t1 = time.perf_counter()
        after, stats1 = engine.gpu_counters(), engine.stats()
    finally:
        engine.shutdown()
    t_first = max(first_token.values())
    steps = stats1["decode_steps_total"] - stats0["decode_steps_total"]
    gpu_steps = max(after["steps"] - before["steps"], 1)
    return {
        "B": n_parallel,
        "prompt_s": t_first - t0,
        "decode_tps": n_parallel * (n_gen - 1) / (t1 - t_first),
        "total_tps": n_parallel * n_gen / (t1 - t0),
        "step_ms": (stats1["t_busy_ms_total"] - stats0["t_busy_ms_total"]) / max(steps, 1),
        "steps": steps,
        "overlapped": stats1["overlapped_steps_total"] - stats0["overlapped_steps_total"],
        "d2h_per_step": (after["device_to_host_copies"] - before["device_to_host_copies"]) / gpu_steps,
        "syncs_per_step": (after["host_syncs"] - before["host_syncs"]) / gpu_steps,
    }


def stepping(self, todo, sampler):
    """Llama's generate() without overlapping (each step waits for its token): --no-overlap."""
    while True:
        todo = [self._eval(todo, sampler)]
        yield todo[0]


def llama_tpot(path: str, n_gpu_layers: int, n_gen: int, n_threads: int, overlap: bool) -> float:
    if not overlap:
        glmoe.Llama._generate_overlapped = stepping
    llm = glmoe.Llama(path, n_gpu_layers=n_gpu_layers, n_ctx=max(512, n_gen + 64), verbose=False,
                      n_threads=n_threads or None)
    times = []
    for _ in range(2):  # the second pass is timed: the first captures graphs
        times = []
        for _chunk in llm.create_completion("Once upon a time", max_tokens=n_gen, temperature=0.0, stream=True):
            times.append(time.perf_counter())
    gaps = np.diff(times)
    return float(np.median(gaps) * 1e3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("-ngl", "--n-gpu-layers", type=int, default=0)
    ap.add_argument("-t", "--threads", type=int, default=0)
    ap.add_argument("-npp", type=int, default=16, help="prompt tokens per sequence")
    ap.add_argument("-ntg", type=int, default=128, help="generated tokens per sequence")
    ap.add_argument("-npl", default="1,8,32", help="sequence counts, comma-separated")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--llama", action="store_true", help="also Llama's streaming TPOT (one sequence)")
    ap.add_argument("--no-overlap", action="store_true", help="every step waits for the previous one's tokens")
    ap.add_argument("-ctk", "--cache-type-k", type=cache_type_arg, default=-1, help=CACHE_TYPE_HELP.format("K"))
    ap.add_argument("-ctv", "--cache-type-v", type=cache_type_arg, default=-1, help=CACHE_TYPE_HELP.format("V"))
    args = ap.parse_args()
    model = _core.Model(args.model)
    overlap = not args.no_overlap
    print("| B | prompt s | decode t/s (all) | total t/s | step ms | steps | overlapped | D2H copies/step "
          "| host syncs/step |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for b in (int(x) for x in args.npl.split(",")):
        r = engine_row(model, b, args.npp, args.ntg, args.n_gpu_layers, args.threads, args.seed, overlap,
                       args.cache_type_k, args.cache_type_v)
        print(f"| {r['B']} | {r['prompt_s']:.3f} | {r['decode_tps']:.1f} | {r['total_tps']:.1f} | {r['step_ms']:.2f} "
              f"| {r['steps']} | {r['overlapped']} | {r['d2h_per_step']:.2f} | {r['syncs_per_step']:.2f} |", flush=True)
    if args.llama:
        tpot = llama_tpot(args.model, args.n_gpu_layers, args.ntg, args.threads, overlap)
        print(f"Llama stream, 1 sequence, {args.ntg} tokens: TPOT median {tpot:.3f} ms = {1e3 / tpot:.1f} t/s")


if __name__ == "__main__":
    main()
