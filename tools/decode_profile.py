"""One decode step of glmoe's engine, kernel by kernel, from Nsight Compute (ncu) on the device:
runs tools/engine_bench.py for a few steps of N sequences under `ncu --metrics
gpu__time_duration.sum,dram__bytes_read.sum --csv`, then prints the last decode step of all N (a
step runs from an embedding gather, get_rows_kernel, to the next) kernel by kernel, grouped by
kernel and grid, with each group's share and the bytes it read from DRAM per microsecond (ncu
replays each kernel with cold caches, so a weight is read once per launch). ncu runs kernels one
at a time, so the sum is a little above the step's own time.

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


TIME = "gpu__time_duration.sum"
DRAM_READ = "dram__bytes_read.sum"
_TIME_SCALE = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}  # -> us
_BYTE_SCALE = {"byte": 1.0, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9}


def kernels(lines: list[str]) -> list[tuple[str, str, float, float | None]]:
    """(kernel, grid, microseconds, bytes read from DRAM or None) of every profiled launch, in
    launch order (ncu writes a row per launch and metric)."""
    launches: dict[str, list] = {}
    for r in csv.DictReader(line for line in lines if line.startswith('"')):
        metric, unit = r.get("Metric Name"), r.get("Metric Unit")
        if metric not in (TIME, DRAM_READ):
            continue
        scale = (_TIME_SCALE if metric == TIME else _BYTE_SCALE).get(unit)
        if scale is None:
            raise ValueError(f"unexpected {'time' if metric == TIME else 'byte'} unit {unit!r}")
        # "void unnamed>::mm_kernel<32, 8, 8>(unnamed>::MmParams)" -> "mm_kernel<32, 8, 8>"
        name = re.sub(r"^void |glmoe::cuda::|\(anonymous namespace\)::|<?unnamed>::", "", r["Kernel Name"])
        name = re.sub(r"\(.*", "", name)
        entry = launches.setdefault(r["ID"], [name, r["Grid Size"], None, None])
        entry[2 if metric == TIME else 3] = float(r["Metric Value"].replace(",", "")) * scale
    return [(name, grid, us, read) for name, grid, us, read in launches.values() if us is not None]


def last_step(rows: list[tuple], max_tokens: int | None = None) -> list[tuple]:
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


def report(step: list[tuple[str, str, float, float | None]], verbose: bool) -> None:
    total = sum(r[2] for r in step)
    has_bytes = all(r[3] is not None for r in step)
    groups: dict = collections.defaultdict(lambda: [0, 0.0, 0.0])
    for name, grid, us, read in step:
        g = groups[(name, grid)]
        g[0] += 1
        g[1] += us
        g[2] += read or 0.0
    if has_bytes:
        read = sum(r[3] for r in step)
        print(f"{len(step)} kernels, {total:.1f} us, {read / 1e6:.1f} MB read from DRAM ({read / total / 1e3:.0f} GB/s)")
        print("| kernel | grid | launches | us | share | MB read | GB/s |\n|---|---|---:|---:|---:|---:|---:|")
    else:
        print(f"{len(step)} kernels, {total:.1f} us")
        print("| kernel | grid | launches | us | share |\n|---|---|---:|---:|---:|")
    for (name, grid), (n, us, read) in sorted(groups.items(), key=lambda kv: -kv[1][1]):
        row = f"| {name} | {grid} | {n} | {us:.1f} | {100 * us / total:.1f}% |"
        print(row + (f" {read / 1e6:.1f} | {read / us / 1e3:.0f} |" if has_bytes else ""))
    if verbose:
        for name, grid, us, _ in step:
            print(f"{us:9.1f}  {grid:>16s}  {name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?")
    ap.add_argument("-npl", type=int, help="sequences decoded together (default 1); shows the last of the widest "
                    "steps of at most this many tokens (with --csv and no -npl: the last step)")
    ap.add_argument("-ngl", type=int, default=99)
    ap.add_argument("-npp", type=int, default=16, help="prompt tokens per sequence: the depth decoded at")
    ap.add_argument("-ctk", default="f16", help="K cache type (engine_bench's -ctk)")
    ap.add_argument("-ctv", default="f16", help="V cache type (engine_bench's -ctv)")
    ap.add_argument("--csv", help="parse this saved ncu --csv output instead of running ncu")
    ap.add_argument("-v", "--verbose", action="store_true", help="also every launch of the step, in order")
    args = ap.parse_args()
    if args.csv:
        with open(args.csv) as f:
            lines = f.readlines()
    elif args.model:
        cmd = ["ncu", "--clock-control", "none", "--metrics", f"{TIME},{DRAM_READ}", "--csv",
               sys.executable, "tools/engine_bench.py", args.model, "-ngl", str(args.ngl), "-npp", str(args.npp),
               "-ntg", "8", "-npl", str(args.npl or 1), "-ctk", args.ctk, "-ctv", args.ctv]
        lines = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()
    else:
        ap.error("give a model to profile, or --csv")
    report(last_step(kernels(lines), args.npl), args.verbose)


if __name__ == "__main__":
    main()
