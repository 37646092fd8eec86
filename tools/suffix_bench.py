"""Suffix decoding on an agentic-coding-like workload: greedy TPOT and accepted tokens per step,
with and without `SuffixDecoding`.

    python tools/suffix_bench.py /tmp/models/small.gguf [--max-tokens 96] [--threads 2]

The workload, built here: (1) a ~60-line Python file and "return it whole with one edit";
(2) an agent transcript that repeats its last tool call with one argument changed; (3) a
multi-turn chat whose turns quote earlier turns. Each request runs on a fresh context, in
order, so the shared store holds the earlier requests' outputs as a server's would.
"""
from __future__ import annotations

import argparse
import json
import time

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


def run(model_path: str, draft: bool, max_tokens: int, threads: int) -> list:
    llm = glmoe.Llama(model_path, n_ctx=8192, n_batch=512, n_threads=threads, verbose=False,
                      draft_model=glmoe.SuffixDecoding() if draft else None)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2, help="runs of each setting; the fastest TPOT is kept")
    args = ap.parse_args()
    best = {}
    for _ in range(args.repeat):
        for draft in (False, True):
            for row in run(args.model, draft, args.max_tokens, args.threads):
                key = (row["workload"], draft)
                if key not in best or row["tpot_ms"] < best[key]["tpot_ms"]:
                    best[key] = row
    print(f"model: {args.model}, greedy, {args.max_tokens} tokens, {args.threads} threads")
    print("| workload | prompt | TPOT off (ms) | TPOT suffix (ms) | speedup | tokens/step | drafted | accepted "
          "| output identical |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, _ in workload():
        off, on = best[(name, False)], best[(name, True)]
        # Tokens per verification forward: every step yields one token plus its accepted drafts.
        per_step = (on["generated"] - 1) / max(on["steps"], 1)
        print(f"| {name} | {on['prompt']} | {off['tpot_ms']:.2f} | {on['tpot_ms']:.2f} | "
              f"{off['tpot_ms'] / on['tpot_ms']:.2f}x | {per_step:.2f} | {on['drafted']} | {on['accepted']} | "
              f"{'yes' if on['tokens'] == off['tokens'] else 'NO'} |")


if __name__ == "__main__":
    main()
