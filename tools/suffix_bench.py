"""Suffix decoding on an agentic-coding-like workload: greedy TPOT and accepted tokens per step,
with and without `SuffixDecoding`.

    python tools/suffix_bench.py /tmp/models/small.gguf [--max-tokens 96] [--threads 2] [--n-gpu-layers -1]

The workload, built here: (1) a ~60-line Python file and "return it whole with one edit";
(2) an agent transcript that repeats its last tool call with one argument changed; (3) a
multi-turn chat whose turns quote earlier turns. The requests run in order, so the shared store
holds the earlier requests' outputs as a server's would; each setting keeps one Llama for all
`--repeat` passes (a fresh SuffixDecoding, so an empty store, each pass) and the fastest pass of
each request is kept. The last row is the workload as a whole. A model that copies from its
context, as an agent's model does: `tools/train_tiny.py --copy-fraction 0.5`.

Then the cost where nothing repeats: random prompts through the engine, sampled at
`--overhead-temp` (1.5: small random models loop under greedy decoding; a large vocabulary
does not within the generated length, so 0 suits the Air-shaped files), with and without suffix
decoding, alternating, median TPOT of `--overhead-runs` each and the mean of the runs' ratios.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

import glmoe

SOURCE_FILE = "\n".join(
    [
        "import json",
        "import os",
        "from dataclasses import dataclass, field",
        "from typing import Dict, List, Optional",
        "",
        "",
        "@dataclass",
        "class Task:",
        "    name: str",
        "    priority: int = 0",
        "    tags: List[str] = field(default_factory=list)",
        "    done: bool = False",
        "",
        "",
        "class TaskStore:",
        "    def __init__(self, path: str):",
        "        self.path = path",
        "        self.tasks: Dict[str, Task] = {}",
        "        if os.path.exists(path):",
        "            self.load()",
        "",
        "    def load(self) -> None:",
        "        with open(self.path) as f:",
        "            for row in json.load(f):",
        "                self.tasks[row['name']] = Task(**row)",
        "",
        "    def save(self) -> None:",
        "        rows = [t.__dict__ for t in self.tasks.values()]",
        "        with open(self.path, 'w') as f:",
        "            json.dump(rows, f, indent=2)",
        "",
        "    def add(self, name: str, priority: int = 0, tags: Optional[List[str]] = None) -> Task:",
        "        if name in self.tasks:",
        "            raise KeyError(f'task {name} exists')",
        "        task = Task(name, priority, tags or [])",
        "        self.tasks[name] = task",
        "        return task",
        "",
        "    def complete(self, name: str) -> None:",
        "        self.tasks[name].done = True",
        "",
        "    def pending(self) -> List[Task]:",
        "        todo = [t for t in self.tasks.values() if not t.done]",
        "        return sorted(todo, key=lambda t: -t.priority)",
        "",
        "    def by_tag(self, tag: str) -> List[Task]:",
        "        return [t for t in self.tasks.values() if tag in t.tags]",
        "",
        "",
        "def main() -> None:",
        "    store = TaskStore('tasks.json')",
        "    store.add('write tests', priority=2, tags=['dev'])",
        "    store.add('review pull request', priority=1, tags=['dev', 'review'])",
        "    store.add('book travel', tags=['admin'])",
        "    for task in store.pending():",
        "        print(task.priority, task.name, ','.join(task.tags))",
        "    store.save()",
        "",
        "",
        "if __name__ == '__main__':",
        "    main()",
    ]
)


def workload() -> list:
    """(name, prompt text) pairs a coding agent would send."""
    edit = (f"<|user|>\nHere is tasks.py:\n```python\n{SOURCE_FILE}\n```\nRename TaskStore to TaskRepository "
            "everywhere and return the whole file.<|assistant|>\n```python\n"
            + SOURCE_FILE.replace("TaskStore", "TaskRepository")[:400])
    calls, transcript = [], ""
    for path in ["src/app.py", "src/db.py", "src/api.py", "tests/test_api.py"]:
        call = {"name": "read_file", "arguments": {"path": path, "start_line": 1, "end_line": 200}}
        calls.append(json.dumps(call))
        transcript += f"<|assistant|>\n<tool_call>{calls[-1]}</tool_call>\n<|observation|>\n(200 lines of {path})\n"
    tool = transcript + "<|assistant|>\n<tool_call>"
    turns = ""
    quoted = "def pending(self) -> List[Task]:\n    todo = [t for t in self.tasks.values() if not t.done]"
    for i in range(3):
        turns += (f"<|user|>\nIn the snippet\n> {quoted}\nwhy is the sort stable? (turn {i})\n"
                  f"<|assistant|>\nYou quoted:\n> {quoted}\nThe sort uses key=-priority, and Python's sort is stable.\n")
    chat = turns + "<|user|>\nQuote it again and add a tie-break on name.\n<|assistant|>\nYou quoted:\n>"
    return [("edit file", edit), ("repeat tool call", tool), ("multi-turn quote", chat)]


def run(llm, draft: bool, max_tokens: int) -> list:
    """The workload's requests in order on `llm`, greedy; with `draft`, a fresh SuffixDecoding
    (an empty store of earlier outputs) for the pass."""
    llm.draft_model = glmoe.SuffixDecoding() if draft else None
    rows = []
    for name, text in workload():
        prompt = llm.tokenize(text.encode(), add_bos=True, special=True)
        llm.reset()
        t0 = time.perf_counter()
        gen = llm.generate(prompt, temp=0.0)
        first = None
        tokens = []
        for tok in gen:
            if first is None:
                first = time.perf_counter()
            tokens.append(tok)
            if len(tokens) == max_tokens:
                break
        gen.close()
        t_end = time.perf_counter()
        stats = llm.last_draft_stats or {"steps": len(tokens) - 1, "drafted": 0, "accepted": 0}
        rows.append({
            "workload": name, "prompt": len(prompt), "generated": len(tokens), "tokens": tokens,
            "ttft_ms": 1000 * (first - t0), "tpot_ms": 1000 * (t_end - first) / max(len(tokens) - 1, 1),
            "steps": stats["steps"], "drafted": stats["drafted"], "accepted": stats["accepted"],
        })
    return rows


def no_repetition_overhead(model_path: str, runs: int, max_tokens: int, threads: int, n_gpu_layers: int,
                           temperature: float) -> dict:
    """Median TPOT without and with suffix decoding on text that does not repeat (random prompts):
    what the adaptive control costs when drafts do not pay."""
    from glmoe import _core

    model = _core.Model(model_path)
    # One engine for both settings (a request may opt out of drafting), so that the two differ
    # in drafting only, not in which context, buffers or thread they ran on.
    engine = _core.BatchEngine(model, 2048, n_parallel=1, n_threads=threads, spec_suffix=True,
                               n_gpu_layers=n_gpu_layers)
    rng = np.random.default_rng(0)
    tpot = {False: [], True: []}
    drafted = accepted = 0
    try:
        for r in range(runs):
            prompt = rng.integers(0, model.n_vocab, 32).tolist()
            for draft in ((False, True) if r % 2 == 0 else (True, False)):  # alternate who goes first
                rid = engine.submit(prompt, max_tokens, [], temperature=temperature, top_k=0, top_p=1.0, min_p=0.0,
                                    seed=1000 + r, draft=draft)
                while not (ev := engine.poll(rid, 60.0))["finished"]:
                    pass
                tpot[draft].append(ev["t_gen_ms"] / max(ev["n_generated"] - 1, 1))
                drafted += ev["draft_n"]
                accepted += ev["draft_n_accepted"]
    finally:
        engine.shutdown()
    off, on = statistics.median(tpot[False]), statistics.median(tpot[True])
    # Each run's pair ran back to back on one prompt: their ratio cancels slow spells of the machine.
    ratios = [b / a for a, b in zip(tpot[False], tpot[True])]
    half_width = 1.96 * statistics.stdev(ratios) / len(ratios) ** 0.5 if len(ratios) > 1 else float("nan")
    return {"off": off, "on": on, "ratio": statistics.mean(ratios), "ratio_ci": half_width, "drafted": drafted,
            "accepted": accepted}


def workload_table(args) -> None:
    """The workload through one Llama for every pass of both settings, as a server keeps its
    context: the settings differ only in drafting, the first pass pays one-off costs (GPU graph
    captures of each step size) and the fastest pass is kept."""
    llm = glmoe.Llama(args.model, n_ctx=8192, n_batch=512, n_threads=args.threads, n_gpu_layers=args.n_gpu_layers,
                      verbose=False)
    best = {}
    for p in range(args.repeat):
        for draft in ((False, True) if p % 2 == 0 else (True, False)):  # alternate which goes first
            for row in run(llm, draft, args.max_tokens):
                key = (row["workload"], draft)
                if key not in best or row["tpot_ms"] < best[key]["tpot_ms"]:
                    best[key] = row
    print(f"model: {args.model}, greedy, {args.max_tokens} tokens, {args.threads} threads, "
          f"n_gpu_layers {args.n_gpu_layers}")
    print("| workload | prompt | TPOT off (ms) | TPOT suffix (ms) | speedup | tokens/step | drafted | accepted "
          "| output identical |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, _ in workload():
        off, on = best[(name, False)], best[(name, True)]
        # Tokens per verification forward: every step yields one token plus its accepted drafts.
        per_step = (on["generated"] - 1) / max(on["steps"], 1)
        print(f"| {name} | {on['prompt']} | {off['tpot_ms']:.3f} | {on['tpot_ms']:.3f} | "
              f"{off['tpot_ms'] / on['tpot_ms']:.2f}x | {per_step:.2f} | {on['drafted']} | {on['accepted']} | "
              f"{'yes' if on['tokens'] == off['tokens'] else 'NO'} |")
    # The workload as a whole: every request's generation time over all its tokens after the first.
    total = {d: sum(best[(n, d)]["tpot_ms"] * (best[(n, d)]["generated"] - 1) for n, _ in workload()) /
             sum(best[(n, d)]["generated"] - 1 for n, _ in workload()) for d in (False, True)}
    on_rows = [best[(n, True)] for n, _ in workload()]
    steps, generated = sum(r["steps"] for r in on_rows), sum(r["generated"] - 1 for r in on_rows)
    print(f"| all three | | {total[False]:.3f} | {total[True]:.3f} | {total[False] / total[True]:.2f}x "
          f"({100 * (total[True] / total[False] - 1):+.1f}% TPOT) | {generated / max(steps, 1):.2f} | "
          f"{sum(r['drafted'] for r in on_rows)} | {sum(r['accepted'] for r in on_rows)} | |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-gpu-layers", "-ngl", type=int, default=0, help="layers on the GPU (-1: all)")
    ap.add_argument("--repeat", type=int, default=3, help="passes of each setting; the fastest TPOT is kept (0: skip)")
    ap.add_argument("--overhead-runs", type=int, default=16, help="no-repetition runs per setting (0: skip)")
    ap.add_argument("--overhead-tokens", type=int, default=96, help="tokens generated by each no-repetition run")
    ap.add_argument("--overhead-temp", type=float, default=1.5, help="temperature of the no-repetition runs")
    args = ap.parse_args()
    if args.repeat > 0:
        workload_table(args)
    if args.overhead_runs > 0:
        o = no_repetition_overhead(args.model, args.overhead_runs, args.overhead_tokens, args.threads,
                                   args.n_gpu_layers, args.overhead_temp)
        print(f"\nno repetition (random prompts, temperature {args.overhead_temp}, {args.overhead_tokens} tokens, "
              f"median of {args.overhead_runs}): TPOT off {o['off']:.3f} ms, "
              f"suffix {o['on']:.3f} ms ({100 * (o['on'] / o['off'] - 1):+.2f}%); mean of the runs' ratios "
              f"{100 * (o['ratio'] - 1):+.2f}% (95% interval +-{100 * o['ratio_ci']:.2f}%), "
              f"drafted {o['drafted']}, accepted {o['accepted']}")


if __name__ == "__main__":
    main()
