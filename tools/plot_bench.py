#!/usr/bin/env python3
"""Plot tokens/s against context depth from llama-bench and llama-sweep-bench results.

Reads llama-bench `-o json` / `-o jsonl` files (glmoe's or llama.cpp's: the fields are the same) and
llama-sweep-bench `-o jsonl` files (glmoe's or ik_llama.cpp's). Draws one panel per test (pp512,
tg128, ...) with one line per runtime, and under each a panel of the ratio of every runtime to the
baseline (by default the last file's runtime, e.g. `ours.json peer.json` plots ours / peer).

    python3 tools/plot_bench.py ours.json llama_cpp.json -o bench.png
    python3 tools/plot_bench.py ours.json peer.json --label glmoe --label llama.cpp -o bench.png

Needs matplotlib (pip install 'glmoe[plot]'); reading the files does not.
"""
import argparse
import json
import os
import sys
from collections import defaultdict
from dataclasses import dataclass


@dataclass
class Point:
    runtime: str
    test: str      # "pp512", "tg128", "pp512+tg128"
    depth: int
    ts: float      # tokens per second
    sd: float = 0.0


def read_records(path):
    """The JSON objects of a file: a json array, or one object per line (jsonl)."""
    with open(path) as f:
        text = f.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        return json.loads(stripped)
    # Log lines may share the stream with jsonl rows (ik_llama.cpp prints rows through its log).
    return [json.loads(line) for line in text.splitlines() if line.lstrip().startswith("{")]


def test_name(n_prompt, n_gen):
    if n_gen == 0:
        return f"pp{n_prompt}"
    if n_prompt == 0:
        return f"tg{n_gen}"
    return f"pp{n_prompt}+tg{n_gen}"


def runtime_label(record, path):
    commit = str(record.get("build_commit", ""))
    if commit.startswith("glmoe"):
        return commit.replace("glmoe-", "glmoe ", 1)
    if commit:
        return f"llama.cpp {commit}"
    if "speed_pp" in record:  # ik_llama.cpp's sweep jsonl names no build
        return "ik_llama.cpp"
    return os.path.splitext(os.path.basename(path))[0]


def points_of(records, path, label=None):
    """Points of one file. llama-bench rows give their test at n_depth; sweep rows give a ppN and a
    tgM point at n_kv each."""
    points = []
    for r in records:
        runtime = label or runtime_label(r, path)
        if "avg_ts" in r:
            points.append(Point(runtime, test_name(r["n_prompt"], r["n_gen"]), int(r.get("n_depth", 0)),
                                float(r["avg_ts"]), float(r.get("stddev_ts", 0.0))))
        elif "speed_pp" in r:
            # A sweep times another way than llama-bench does: its own line, unless the user names it.
            runtime = label or runtime + " sweep"
            points.append(Point(runtime, f"pp{r['pp']}", int(r["n_kv"]), float(r["speed_pp"])))
            points.append(Point(runtime, f"tg{r['tg']}", int(r["n_kv"]), float(r["speed_tg"])))
        else:
            raise ValueError(f"{path}: not a llama-bench or llama-sweep-bench record: {sorted(r)[:6]}...")
    return points


def series(points):
    """{test: {runtime: [(depth, ts, sd)] sorted by depth}}, tests and runtimes in first-seen order."""
    out = defaultdict(lambda: defaultdict(list))
    for p in points:
        out[p.test][p.runtime].append((p.depth, p.ts, p.sd))
    for by_runtime in out.values():
        for rows in by_runtime.values():
            rows.sort()
    return out


def ratios(rows, base_rows):
    """(depth, ts / baseline ts) at the depths both have."""
    base = {d: ts for d, ts, _ in base_rows}
    return [(d, ts / base[d]) for d, ts, _ in rows if d in base and base[d] > 0]


def plot(by_test, baseline, title, out_path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("plot_bench.py needs matplotlib: pip install 'glmoe[plot]' (or: pip install matplotlib)")

    tests = list(by_test)
    fig, axes = plt.subplots(2, len(tests), figsize=(5.5 * len(tests), 7), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1.3]}, sharex="col")
    colors = {}
    for col, test in enumerate(tests):
        top, bottom = axes[0][col], axes[1][col]
        for runtime, rows in by_test[test].items():
            color = colors.setdefault(runtime, f"C{len(colors)}")
            depths, ts, sd = zip(*rows)
            top.errorbar(depths, ts, yerr=sd, marker="o", capsize=3, color=color, label=runtime)
            for d, v in zip(depths, ts):
                top.annotate(f"{v:.0f}", (d, v), textcoords="offset points", xytext=(0, 6), ha="center",
                             fontsize=7, color=color)
            if runtime != baseline and baseline in by_test[test]:
                r = ratios(rows, by_test[test][baseline])
                if r:
                    xs, ys = zip(*r)
                    bottom.plot(xs, ys, marker="o", color=color, label=f"{runtime} / {baseline}")
                    for x, y in r:
                        bottom.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=(0, 6),
                                        ha="center", fontsize=7, color=color)
        depths = sorted({d for rows in by_test[test].values() for d, _, _ in rows})
        if len(depths) <= 8:  # few depths: tick exactly those
            bottom.set_xticks(depths)
            bottom.tick_params(axis="x", labelrotation=45 if len(depths) > 5 else 0)
        top.set_title(test)
        top.set_ylabel("tokens / s")
        top.set_ylim(bottom=0, top=top.get_ylim()[1] * 1.1)
        top.grid(alpha=0.3)
        top.legend(fontsize=8)
        bottom.axhline(1.0, color="grey", lw=0.8, ls="--")
        bottom.set_ylabel(f"ratio to {baseline}", fontsize=8)
        bottom.set_xlabel("context depth (tokens in KV cache)")
        bottom.set_ylim(bottom=0)
        bottom.grid(alpha=0.3)
        if bottom.get_legend_handles_labels()[0]:
            bottom.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    print(out_path)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help="llama-bench json/jsonl or llama-sweep-bench jsonl")
    ap.add_argument("--label", action="append", default=[],
                    help="runtime name of each file, in the files' order (default: from build_commit)")
    ap.add_argument("--baseline", help="runtime the ratios divide by (default: the last file's)")
    ap.add_argument("--title", default=None)
    ap.add_argument("-o", "--output", default="bench.png", help="PNG to write")
    args = ap.parse_args(argv)
    if len(args.label) > len(args.files):
        ap.error("more --label than files")
    args.label += [None] * (len(args.files) - len(args.label))
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    points = []
    for path, label in zip(args.files, args.label):
        file_points = points_of(read_records(path), path, label)
        if not file_points:
            sys.exit(f"{path}: no results")
        points += file_points
    runtimes = list(dict.fromkeys(p.runtime for p in points))
    baseline = args.baseline or file_points[0].runtime
    if baseline not in runtimes:
        sys.exit(f"--baseline {baseline!r} is none of {runtimes}")
    title = args.title or "tokens/s against context depth: " + " vs ".join(runtimes)
    plot(series(points), baseline, title, args.output)


if __name__ == "__main__":
    main()
