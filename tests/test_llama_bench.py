"""llama-bench and llama-sweep-bench: flag parsing, the output formats llama.cpp users parse, test
naming, sweep arithmetic, stdout/stderr separation; and the plot tool's reading of results."""
import csv
import importlib.util
import io
import json
import os
import subprocess
import sys

import pytest

import glmoe
import mlock_support
from cuda_support import HAVE_GPU
from glmoe.tools.make_model import PRESETS, ModelSpec, write_model

BIN = os.path.join(os.path.dirname(glmoe.__file__), "bin")
BENCH = os.path.join(BIN, "llama-bench")
SWEEP = os.path.join(BIN, "llama-sweep-bench")

# llama.cpp's llama-bench csv header (tools/llama-bench/llama-bench.cpp, test::get_fields).
LLAMA_CPP_FIELDS = [
    "build_commit", "build_number", "cpu_info", "gpu_info", "backends", "model_filename", "model_type",
    "model_size", "model_n_params", "n_batch", "n_ubatch", "n_threads", "cpu_mask", "cpu_strict", "poll",
    "type_k", "type_v", "n_gpu_layers", "n_cpu_moe", "split_mode", "main_gpu", "no_kv_offload", "flash_attn",
    "devices", "tensor_split", "tensor_buft_overrides", "load_mode", "lazy_mode", "embeddings",
    "no_op_offload", "no_host", "repack", "fit_target", "fit_min_ctx", "n_prompt", "n_gen", "n_depth",
    "test_time", "avg_ns", "stddev_ns", "avg_ts", "stddev_ts",
]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("bench") / "tiny.gguf")
    write_model(path, ModelSpec(**PRESETS["tiny"]), seed=0)
    return path


def run(exe, *args, check=True):
    p = subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=60)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def bench_jsonl(model, *args):
    out = run(BENCH, "-m", model, "-r", 1, "--no-warmup", "-o", "jsonl", *args).stdout
    return [json.loads(line) for line in out.splitlines()]


# --- flag parsing ---

def test_lists_sweep_every_combination(model):
    rows = bench_jsonl(model, "-p", "4,8", "-n", "2", "-d", "0,8", "-t", "1,2")
    got = [(r["n_prompt"], r["n_gen"], r["n_depth"], r["n_threads"]) for r in rows]
    # llama.cpp's order: settings outermost (threads, then depth), then -p tests, then -n tests.
    assert got == [(4, 0, 0, 1), (8, 0, 0, 1), (0, 2, 0, 1), (4, 0, 8, 1), (8, 0, 8, 1), (0, 2, 8, 1),
                   (4, 0, 0, 2), (8, 0, 0, 2), (0, 2, 0, 2), (4, 0, 8, 2), (8, 0, 8, 2), (0, 2, 8, 2)]


def test_ranges_and_repeated_flags(model):
    rows = bench_jsonl(model, "-p", "1-8*2,10-12+2", "-p", "3", "-n", "0")
    assert [r["n_prompt"] for r in rows] == [1, 2, 4, 8, 10, 12, 3]


def test_reported_settings(model):
    p = run(BENCH, "-m", model, "-p", 4, "-n", 0, "-r", 1, "-o", "jsonl", "-ngl", "99", "-fa", "on,off",
            "-ot", "exps=CPU;shexp=CPU", "-b", 64, "-ub", 2)
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    assert [(r["n_gpu_layers"], r["flash_attn"], r["tensor_buft_overrides"], r["n_batch"], r["n_ubatch"])
            for r in rows] == [(99, 1, "exps=CPU;shexp=CPU", 64, 2), (99, 0, "exps=CPU;shexp=CPU", 64, 2)]
    if not HAVE_GPU:
        assert all(r["backends"] == "CPU" for r in rows)
    # Said once, and only where there is no GPU to use.
    assert p.stderr.count("-ngl") == (0 if HAVE_GPU else 1)


@pytest.mark.parametrize("args", [
    ["--bogus"], ["-p", "abc"], ["-p", "8-4"], ["-p", "4-8*1"], ["-p", "4-8+0"], ["-p", "1,,2"], ["-p", "-3"],
    ["-r", "0"], ["-r", "2,3"], ["-o", "sql"], ["-fa", "maybe"], ["-pg", "8"], ["-pg", "8,4,2"],
    ["-ot", "no-equals"], ["-b", "0"], ["-p"], ["--delay", "x"],
    ["-ot", "exps=GPU"], ["-ot", "ffn_(up=CPU"], ["-ot", "=CPU"], ["-ot", "exps=CPU;x"], ["-ncmoe", "-1"],
    ["-ncmoe", "x"], ["-cmoe"],  # llama-bench has no -cmoe
    ["--gpu-expert-share", "1.5"], ["--gpu-expert-share", "x"], ["--gpu-expert-share", "0.2,"],
    ["-lm", "mapped"], ["-lm", "none,"],
])
def test_bad_arguments_are_usage_errors(model, args):
    p = run(BENCH, "-m", model, *args, check=False)
    assert p.returncode == 2
    assert p.stderr.startswith("error: ") and "usage: llama-bench" in p.stderr
    assert p.stdout == ""


def test_placement_flags_sweep_and_are_reported(model):
    # llama.cpp's order: -ngl, then -ncmoe, then -ot; ',' separates -ot tests (an empty one: none).
    rows = bench_jsonl(model, "-p", 4, "-n", 0, "-ngl", "-1", "-ncmoe", "0,1", "-ot", r"exps=CPU;blk\.0\.=CUDA0,")
    assert [(r["n_gpu_layers"], r["n_cpu_moe"], r["tensor_buft_overrides"]) for r in rows] == [
        (-1, 0, r"exps=CPU;blk\.0\.=CUDA0"), (-1, 0, "none"), (-1, 1, r"exps=CPU;blk\.0\.=CUDA0"), (-1, 1, "none")]


def test_markdown_n_cpu_moe_column(model):
    p = run(BENCH, "-m", model, "-p", 4, "-n", 0, "-r", 1, "-ngl", 99, "-ncmoe", 2)
    _, header, rows = md_table(p.stdout)
    assert header[:7] == ["model", "size", "params", "backend", "ngl", "n_cpu_moe", "threads"]
    assert rows[0][4:6] == ["99", "2"]


def test_override_matching_no_tensor_is_an_error(model):
    p = run(BENCH, "-m", model, "-p", 4, "-n", 0, "-r", 1, "-ot", "no_such_tensor=CPU", check=False)
    assert p.returncode == 1 and "-ot pattern 'no_such_tensor' matches no tensor" in p.stderr


def test_missing_model_is_usage_error():
    p = run(BENCH, "-p", "8", check=False)
    assert p.returncode == 2 and "-m" in p.stderr and "usage:" in p.stderr


def test_help_goes_to_stdout():
    p = run(BENCH, "--help")
    assert p.stdout.startswith("usage: llama-bench") and p.stderr == ""
    assert "--n-cpu-moe" in p.stdout and "CUDA0" in p.stdout and "glmoe runs on CPU" not in p.stdout


# --- output formats ---

def md_table(stdout):
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return lines, cells[0], cells[2:]


def test_markdown_columns_line_up_like_llama_cpp(model):
    p = run(BENCH, "-m", model, "-p", 8, "-n", 4, "-r", 2)
    lines, header, rows = md_table(p.stdout)
    assert header == ["model", "size", "params", "backend", "threads", "test", "t/s"]
    assert lines[1] == "| ------------------------------ | ---------: | ---------: | ---------- | ------: " \
                       "| --------------: | -------------------: |"
    # Every row has the header's cell widths ("±" is one character wide, two bytes).
    assert all(len(line) == len(lines[0]) for line in lines)
    assert [r[5] for r in rows] == ["pp8", "tg4"]
    assert all(r[3] == "CPU" and " ± " in r[6] for r in rows)
    assert "build: glmoe-" in p.stdout


def test_markdown_adds_columns_for_non_default_settings(model):
    p = run(BENCH, "-m", model, "-p", 4, "-n", 0, "-r", 1, "-ngl", 1, "-b", 8, "-ub", 4, "-fa", 1,
            "-ot", "exps=CPU")
    _, header, rows = md_table(p.stdout)
    assert header == ["model", "size", "params", "backend", "ngl", "threads", "n_batch", "n_ubatch", "fa",
                      "ot", "test", "t/s"]
    assert rows[0][4:10] == ["1", rows[0][5], "8", "4", "1", "exps=CPU"]


def test_csv_has_llama_cpp_header(model):
    p = run(BENCH, "-m", model, "-p", 8, "-n", 4, "-r", 2, "-o", "csv")
    reader = csv.DictReader(io.StringIO(p.stdout))
    assert reader.fieldnames == LLAMA_CPP_FIELDS
    rows = list(reader)
    assert [(r["n_prompt"], r["n_gen"]) for r in rows] == [("8", "0"), ("0", "4")]


def test_json_carries_every_sample(model):
    reps = 3
    p = run(BENCH, "-m", model, "-p", 8, "-n", 4, "-pg", "8,4", "-r", reps, "-o", "json")
    rows = json.loads(p.stdout)
    assert len(rows) == 3
    for r in rows:
        assert list(r)[:len(LLAMA_CPP_FIELDS)] == LLAMA_CPP_FIELDS
        assert len(r["samples_ns"]) == len(r["samples_ts"]) == reps
        n_tokens = r["n_prompt"] + r["n_gen"]
        for ns, ts in zip(r["samples_ns"], r["samples_ts"]):
            assert ts == pytest.approx(n_tokens * 1e9 / ns, rel=1e-5)
        assert r["avg_ts"] == pytest.approx(sum(r["samples_ts"]) / reps, rel=1e-5)
        assert r["avg_ns"] == pytest.approx(sum(r["samples_ns"]) / reps, abs=1)
        assert isinstance(r["cpu_strict"], bool) and isinstance(r["model_size"], int)


def test_jsonl_is_one_object_per_line(model):
    rows = bench_jsonl(model, "-p", "8", "-n", "4", "-d", "0,4")
    assert len(rows) == 4 and all(r["model_filename"] == model for r in rows)


def test_oe_prints_a_second_format_on_stderr(model):
    p = run(BENCH, "-m", model, "-p", 8, "-n", 0, "-r", 1, "-o", "json", "-oe", "jsonl")
    assert len(json.loads(p.stdout)) == 1
    assert [json.loads(line)["n_prompt"] for line in p.stderr.splitlines() if line.startswith("{")] == [8]


def test_test_names(model):
    p = run(BENCH, "-m", model, "-p", 64, "-n", 16, "-pg", "32,8", "-d", "0,128", "-r", 1)
    _, header, rows = md_table(p.stdout)
    names = [r[header.index("test")] for r in rows]
    assert names == ["pp64", "tg16", "pp32+tg8", "pp64 @ d128", "tg16 @ d128", "pp32+tg8 @ d128"]


def test_progress_only_on_stderr(model):
    p = run(BENCH, "-m", model, "-p", 8, "-n", 4, "-d", "0,8", "-r", 2, "-o", "json", "--progress")
    assert len(json.loads(p.stdout)) == 4
    assert "test 4/4: tg4 @ d8" in p.stderr and "depth fill" in p.stderr and "run 2/2" in p.stderr


# --- sweep ---

def test_sweep_steps_until_the_context_is_full(model):
    p = run(SWEEP, "-m", model, "-c", 100, "-ub", 16, "-n", 4, "-o", "jsonl")
    rows = [json.loads(line) for line in p.stdout.splitlines()]  # stdout is results only
    # A step at N_KV needs N_KV + 16 <= 100.
    assert [r["n_kv"] for r in rows] == [0, 16, 32, 48, 64, 80]
    for r in rows:
        assert (r["pp"], r["tg"], r["n_kv_max"], r["n_ubatch"]) == (16, 4, 100, 16)
        assert r["speed_pp"] == pytest.approx(r["pp"] / r["t_pp"], rel=1e-2)
        assert r["speed_tg"] == pytest.approx(r["tg"] / r["t_tg"], rel=1e-2)
    assert "step 6/6: N_KV = 80" in p.stderr


def test_sweep_markdown_table(model):
    p = run(SWEEP, "-m", model, "-c", 64, "-ub", 16)
    lines = [line for line in p.stdout.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["PP", "TG", "N_KV", "T_PP s", "S_PP t/s", "T_TG s", "S_TG t/s"]
    rows = [[float(c) for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [r[2] for r in rows] == [0, 16, 32, 48]
    assert all(r[0] == 16 and r[1] == 4 for r in rows)  # TG defaults to ubatch / 4
    for r in rows:  # T columns print 3 decimals, S columns 2
        assert r[3] < 0.01 or r[4] == pytest.approx(r[0] / r[3], rel=0.5)


def test_sweep_placement_flags(model):
    p = run(SWEEP, "-m", model, "-c", 32, "-ub", 16, "-o", "jsonl", "-ngl", 99, "-ot", r"exps=CPU,blk\.0\.=CUDA0",
            "-ot", "shexp=CPU", "-cmoe", "-ncmoe", 1)
    assert [json.loads(line)["n_kv"] for line in p.stdout.splitlines()] == [0, 16]
    p = run(SWEEP, "-m", model, "-c", 32, "-ub", 16, "-ot", "no_such_tensor=CPU", check=False)
    assert p.returncode == 1 and "matches no tensor" in p.stderr


@pytest.mark.parametrize("args", [["-c", "8", "-ub", "16"], ["-ub", "x"], ["--bogus"], ["-o", "csv"], [],
                                  ["-ot", "exps"], ["-ot", "exps=GPU"], ["-ncmoe", "-1"]])
def test_sweep_usage_errors(model, args):
    p = run(SWEEP, *(["-m", model] if args else []), *args, check=False)
    assert p.returncode == 2 and "usage: llama-sweep-bench" in p.stderr and p.stdout == ""


# --- plot tool (reading and arithmetic; drawing needs matplotlib) ---

@pytest.fixture(scope="module")
def plot_bench():
    path = os.path.join(os.path.dirname(__file__), "..", "tools", "plot_bench.py")
    spec = importlib.util.spec_from_file_location("plot_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plot_reads_both_runtimes_and_sweeps(model, tmp_path, plot_bench):
    ours = tmp_path / "ours.json"
    ours.write_text(run(BENCH, "-m", model, "-p", 8, "-n", 4, "-d", "0,8", "-r", 1, "-o", "json").stdout)
    peer = tmp_path / "peer.jsonl"  # llama.cpp's jsonl shape, cut to the fields the plot reads
    peer.write_text("".join(json.dumps({"build_commit": "0c1e570", "n_prompt": p, "n_gen": g, "n_depth": d,
                                        "avg_ts": 100.0, "stddev_ts": 1.0}) + "\n"
                            for d in (0, 8) for p, g in ((8, 0), (0, 4))))
    sweep = tmp_path / "sweep.jsonl"
    sweep.write_text(run(SWEEP, "-m", model, "-c", 32, "-ub", 8, "-n", 4, "-o", "jsonl").stdout)

    points = []
    for path in (ours, peer, sweep):
        points += plot_bench.points_of(plot_bench.read_records(str(path)), str(path))
    by_test = plot_bench.series(points)
    assert list(by_test) == ["pp8", "tg4"]
    runtimes = list(by_test["pp8"])
    assert runtimes[0].startswith("glmoe") and runtimes[1] == "llama.cpp 0c1e570"
    assert [d for d, _, _ in by_test["pp8"]["llama.cpp 0c1e570"]] == [0, 8]
    ours_rows = by_test["tg4"][runtimes[0]]
    ratio = plot_bench.ratios(ours_rows, by_test["tg4"]["llama.cpp 0c1e570"])
    assert [r for _, r in ratio] == pytest.approx([ts / 100.0 for _, ts, _ in ours_rows])
    sweep_runtime = runtimes[0] + " sweep"  # kept apart from the llama-bench line of the same build
    assert [d for d, _, _ in by_test["pp8"][sweep_runtime]] == [0, 8, 16, 24]


def test_plot_without_matplotlib_says_how_to_get_it(model, tmp_path, plot_bench, monkeypatch):
    ours = tmp_path / "ours.jsonl"
    ours.write_text(run(BENCH, "-m", model, "-p", 8, "-n", 0, "-r", 1, "-o", "jsonl").stdout)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    with pytest.raises(SystemExit, match="matplotlib"):
        plot_bench.main([str(ours), "-o", str(tmp_path / "x.png")])


def test_gpu_expert_share_sweeps_and_shows_in_markdown(model):
    # glmoe's own flag: a list like the others; a markdown column, no csv/json field (llama.cpp's schema).
    p = run(BENCH, "-m", model, "-r", 1, "--no-warmup", "-p", "0", "-n", "2", "--gpu-expert-share", "0,0.5")
    rows = [line for line in p.stdout.splitlines() if "tg2" in line]
    assert len(rows) == 2 and "gpu_expert_share" in p.stdout.splitlines()[0]
    assert "0.00" in rows[0] and "0.50" in rows[1]
    assert all("gpu_expert_share" not in r for r in bench_jsonl(model, "-p", "0", "-n", "2", "--gpu-expert-share", "0.5"))


def test_load_mode_reads_or_maps_the_file_with_the_same_results(model):
    # llama.cpp's -lm: none (like mlock and dio) reads the file into memory, auto/mmap map it; the
    # mode is a field of every format and a markdown column when set.
    rows = bench_jsonl(model, "-p", "0", "-n", "2", "-lm", "auto,none", "-t", "1")
    assert [r["load_mode"] for r in rows] == ["auto", "none"]
    assert all(r["load_mode"] == "auto" for r in bench_jsonl(model, "-p", "0", "-n", "2"))
    p = run(BENCH, "-m", model, "-r", 1, "--no-warmup", "-p", "0", "-n", "2", "-lm", "dio")
    assert "load_mode" in p.stdout.splitlines()[0] and "dio" in p.stdout.splitlines()[2]
    # mlock and mmap+mlock also lock the file (a model of its own each): where Linux refuses, a
    # warning per load and the tests run unlocked.
    p = run(BENCH, "-m", model, "-r", 1, "--no-warmup", "-o", "jsonl", "-p", "0", "-n", "2",
            "-lm", "none,mlock,mmap+mlock")
    assert [json.loads(line)["load_mode"] for line in p.stdout.splitlines()] == ["none", "mlock", "mmap+mlock"]
    allowed = mlock_support.may_mlock(os.getpid(), os.path.getsize(model))
    assert p.stderr.count("warning: failed to mlock") == (0 if allowed else 2)
    # ik_llama.cpp's spellings in the sweep: --no-mmap, --mlock (mapped or read).
    assert run(SWEEP, "-m", model, "-c", 64, "-ub", 32, "-n", 2, "--no-mmap").returncode == 0
    for load, how in (([], "mapped"), (["--no-mmap"], "read into memory")):
        p = run(SWEEP, "-m", model, "-c", 64, "-ub", 32, "-n", 2, "-v", "--mlock", *load)
        assert ("(%s, locked in RAM)" % how in p.stderr) == allowed, p.stderr
        assert p.stderr.count("warning: failed to mlock") == (0 if allowed else 1), p.stderr
        assert "(%s)" % how in run(SWEEP, "-m", model, "-c", 64, "-ub", 32, "-n", 2, "-v", *load).stderr
