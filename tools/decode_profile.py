"""One decode step of glmoe's engine, kernel by kernel, from Nsight Compute (ncu) on the device:
runs tools/engine_bench.py for a few steps of N sequences under `ncu --metrics
gpu__time_duration.sum --csv`, then prints the last decode step of all N (a step runs from an
embedding gather, get_rows_kernel, to the next) kernel by kernel, grouped by kernel and grid, with
each group's share. ncu runs kernels one at a time, so the sum is a little above the step's own time.

    python tools/decode_profile.py build/air8.gguf -npl 32            # needs ncu on PATH
    python tools/decode_profile.py --csv saved.csv [-v]                # an earlier run's output
"""
from __future__ import annotations

import argparse
import collections
import csv
import re
import subprocess
import sys

STEP_START = "get_rows_kernel"


def kernels(lines: list[str]) -> list[tuple[str, str, float]]:
    """(kernel, grid, microseconds) of every profiled launch, in launch order."""
    rows = []
    for r in csv.DictReader(line for line in lines if line.startswith('"')):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        # "void unnamed>::mm_kernel<32, 8, 8>(unnamed>::MmParams)" -> "mm_kernel<32, 8, 8>"
        name = re.sub(r"^void |glmoe::cuda::|\(anonymous namespace\)::|<?unnamed>::", "", r["Kernel Name"])
        name = re.sub(r"\(.*", "", name)
        value = float(r["Metric Value"].replace(",", ""))
        scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}.get(r["Metric Unit"])
        if scale is None:
            raise ValueError(f"unexpected time unit {r['Metric Unit']!r}")
        rows.append((name, r["Grid Size"], value * scale))
    return rows


def last_step(rows: list[tuple[str, str, float]], max_tokens: int | None = None) -> list[tuple[str, str, float]]:
    """The launches of the last step; with max_tokens, of the last of the widest steps of at most
    that many tokens (the embedding gather's grid is the step's token count): a decode step of all
    the sequences, not the prompts' steps before it nor the stragglers' after it."""
    starts = [i for i, r in enumerate(rows) if r[0] == STEP_START]
    if not starts:
        raise ValueError(f"no {STEP_START} launch: no step to show")
    ends = starts[1:] + [len(rows)]
    if max_tokens is None:
        return rows[starts[-1]:]
    width = [int(rows[i][1].strip("()").split(",")[0]) for i in starts]
    fits = [k for k, w in enumerate(width) if w <= max_tokens]
    if not fits:
        raise ValueError(f"no step of at most {max_tokens} tokens")
    best = max(fits, key=lambda k: (width[k], k))
    return rows[starts[best]:ends[best]]


def report(step: list[tuple[str, str, float]], verbose: bool) -> None:
    total = sum(us for _, _, us in step)
    groups: dict = collections.defaultdict(lambda: [0, 0.0])
    for name, grid, us in step:
        groups[(name, grid)][0] += 1
        groups[(name, grid)][1] += us
    print(f"{len(step)} kernels, {total:.1f} us")
    print("| kernel | grid | launches | us | share |\n|---|---|---:|---:|---:|")
    for (name, grid), (n, us) in sorted(groups.items(), key=lambda kv: -kv[1][1]):
        print(f"| {name} | {grid} | {n} | {us:.1f} | {100 * us / total:.1f}% |")
    if verbose:
        for name, grid, us in step:
            print(f"{us:9.1f}  {grid:>16s}  {name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?")
    ap.add_argument("-npl", type=int, help="sequences decoded together (default 1); shows the last of the widest "
                    "steps of at most this many tokens (with --csv and no -npl: the last step)")
    ap.add_argument("-ngl", type=int, default=99)
    ap.add_argument("--csv", help="parse this saved ncu --csv output instead of running ncu")
    ap.add_argument("-v", "--verbose", action="store_true", help="also every launch of the step, in order")
    args = ap.parse_args()
    if args.csv:
        with open(args.csv) as f:
            lines = f.readlines()
    elif args.model:
        cmd = ["ncu", "--clock-control", "none", "--metrics", "gpu__time_duration.sum", "--csv",
               sys.executable, "tools/engine_bench.py", args.model, "-ngl", str(args.ngl), "-npp", "16", "-ntg", "8",
               "-npl", str(args.npl or 1)]
        lines = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()
    else:
        ap.error("give a model to profile, or --csv")
    report(last_step(kernels(lines), args.npl), args.verbose)


if __name__ == "__main__":
    main()
