"""Load benchmark for OpenAI-compatible servers (ours, llama.cpp's llama-server): N concurrent
streaming clients, each sending its requests one after another to /v1/completions; reports
time to first token (TTFT), time per output token after the first (TPOT), both p50/p90/p99, and
total generated tokens per second of wall time.

    python tools/load_bench.py --url http://127.0.0.1:8080 --clients 8 --requests 4 --max-tokens 64

Requests are greedy with ignore_eos (both servers take it), so every request generates exactly
max_tokens and both servers do the same work. Token counts come from the final usage report
(stream_options.include_usage), or from the number of text chunks when a server sends none."""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from typing import List, Optional

import httpx


async def one_request(client: httpx.AsyncClient, url: str, body: dict, headers: dict) -> dict:
    t0 = time.perf_counter()
    t_first: Optional[float] = None
    t_last = t0
    chunks, usage_tokens = 0, None
    async with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage_tokens = event["usage"]["completion_tokens"]
            if any(c.get("text") for c in event.get("choices") or []):
                now = time.perf_counter()
                t_first = t_first if t_first is not None else now
                t_last = now
                chunks += 1
    n = usage_tokens if usage_tokens is not None else chunks
    if t_first is None:
        raise RuntimeError("no text came back")
    return {"ttft": t_first - t0, "tpot": (t_last - t_first) / (n - 1) if n > 1 else None, "tokens": n}


async def run(args) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.clients + 4)
    results: List[dict] = []

    async def client_loop(cid: int, client: httpx.AsyncClient):
        for i in range(args.requests):
            body = {"model": args.model, "prompt": f"{args.prompt} (client {cid}, request {i})",
                    "max_tokens": args.max_tokens, "temperature": 0.0, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
            results.append(await one_request(client, args.url, body, headers))

    async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as client:
        # One request first so model warm-up is not in the numbers.
        await one_request(client, args.url, {"prompt": args.prompt, "max_tokens": 2, "stream": True,
                                             "temperature": 0.0}, headers)
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(c, client) for c in range(args.clients)))
        wall = time.perf_counter() - t0
    return summarize(results, wall)


def percentile(values: List[float], q: float) -> float:
    values = sorted(values)
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def summarize(results: List[dict], wall: float) -> dict:
    ttft = [r["ttft"] * 1000 for r in results]
    tpot = [r["tpot"] * 1000 for r in results if r["tpot"] is not None]
    out = {"requests": len(results), "tokens": sum(r["tokens"] for r in results), "wall_s": wall}
    for name, values in (("ttft_ms", ttft), ("tpot_ms", tpot)):
        for q in (50, 90, 99):
            out[f"{name}_p{q}"] = percentile(values, q) if values else float("nan")
    out["tok_per_s"] = out["tokens"] / wall
    return out


def markdown_row(label: str, clients: int, s: dict) -> str:
    return (f"| {label} | {clients} | {s['requests']} | {s['ttft_ms_p50']:.0f} / {s['ttft_ms_p90']:.0f} / "
            f"{s['ttft_ms_p99']:.0f} | {s['tpot_ms_p50']:.2f} / {s['tpot_ms_p90']:.2f} / {s['tpot_ms_p99']:.2f} | "
            f"{s['tokens']} | {s['tok_per_s']:.1f} |")


HEADER = ("| server | clients | requests | TTFT ms p50 / p90 / p99 | TPOT ms p50 / p90 / p99 | tokens | tok/s |\n"
          "|---|---:|---:|---:|---:|---:|---:|")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=4, help="requests per client, one after another")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt", default="Once upon a time, in a land far away,")
    ap.add_argument("--model", default="default")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--label", default=None, help="name in the table (default: the URL)")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--json", action="store_true", help="print the numbers as JSON instead of a table row")
    args = ap.parse_args(argv)
    summary = asyncio.run(run(args))
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(HEADER)
        print(markdown_row(args.label or args.url, args.clients, summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
