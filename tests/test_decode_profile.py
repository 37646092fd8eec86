"""tools/decode_profile.py (a device tool, loaded from the checkout): ncu's CSV read in either time
unit, the last step cut at the embedding gather, kernels grouped by name and grid, DRAM bytes."""
import importlib.util
import pathlib

import pytest

_path = pathlib.Path(__file__).resolve().parents[1] / "tools" / "decode_profile.py"
_spec = importlib.util.spec_from_file_location("decode_profile", _path)
decode_profile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(decode_profile)

HEADER = '"ID","Kernel Name","Grid Size","Metric Name","Metric Unit","Metric Value"'


def row(i, name, grid, unit, value, metric="gpu__time_duration.sum"):
    # ncu 2025 spells the anonymous namespace "unnamed>"; others "(anonymous namespace)".
    prefix = "void unnamed>::" if i % 2 else "glmoe::cuda::(anonymous namespace)::"
    return f'"{i}","{prefix}{name}(unnamed>::Args, const float *)","{grid}","{metric}","{unit}","{value}"'


def test_last_step_grouped_by_kernel_and_grid(capsys):
    lines = ["==PROF== Connected to process 1", HEADER,
             row(0, "get_rows_kernel", "(1, 1, 1)", "us", "9.0"),
             row(1, "mm_kernel<32, 8, 8>", "(1, 112, 1)", "us", "100.0"),
             row(2, "get_rows_kernel", "(2, 1, 1)", "ns", "3,000"),
             row(3, "mmvq_kernel<8, 4, 0>", "(256, 1, 1)", "ns", "50,000"),
             row(3, "mmvq_kernel<8, 4, 0>", "(256, 1, 1)", "inst", "7", metric="smsp__inst_executed.sum"),
             row(4, "mmvq_kernel<8, 4, 0>", "(256, 1, 1)", "us", "47.0"),
             row(5, "mmvq_kernel<8, 4, 0>", "(512, 1, 1)", "ms", "0.001")]
    rows = decode_profile.kernels(lines)
    assert rows[1] == ("mm_kernel<32, 8, 8>", "(1, 112, 1)", 100.0, None)
    step = decode_profile.last_step(rows)
    assert [r[2] for r in step] == pytest.approx([3.0, 50.0, 47.0, 1.0])
    decode_profile.report(step, verbose=False)
    out = capsys.readouterr().out
    assert out.startswith("4 kernels, 101.0 us")
    assert "| mmvq_kernel<8, 4, 0> | (256, 1, 1) | 2 | 97.0 | 96.0% |" in out
    assert "| mmvq_kernel<8, 4, 0> | (512, 1, 1) | 1 | 1.0 | 1.0% |" in out


def test_unknown_unit_and_missing_step_are_errors():
    with pytest.raises(ValueError, match="time unit"):
        decode_profile.kernels([HEADER, row(0, "get_rows_kernel", "(1, 1, 1)", "cycle", "9")])
    with pytest.raises(ValueError, match="no get_rows_kernel"):
        decode_profile.last_step(decode_profile.kernels([HEADER, row(0, "x_kernel", "(1, 1, 1)", "us", "1")]))


def test_widest_step_within_the_batch():
    """With a batch size, the step shown is the last of the widest ones that fit it: not a prompt
    step (wider) nor a straggler's step (narrower) after it."""
    launches = [("get_rows_kernel", "(1024, 1, 1)", 50.0), ("mm_kernel", "(8, 112, 1)", 500.0),
                ("get_rows_kernel", "(64, 1, 1)", 3.0), ("mm_kernel", "(2, 112, 1)", 100.0),
                ("get_rows_kernel", "(64, 1, 1)", 3.0), ("mm_kernel", "(2, 112, 1)", 99.0),
                ("get_rows_kernel", "(2, 1, 1)", 2.0), ("mmvq_kernel", "(176, 18, 1)", 90.0)]
    assert decode_profile.last_step(launches, 64) == launches[4:6]
    assert decode_profile.last_step(launches, 2) == launches[6:]
    assert decode_profile.last_step(launches) == launches[6:]
    with pytest.raises(ValueError, match="at most 1 tokens"):
        decode_profile.last_step(launches, 1)


def test_dram_bytes_give_bandwidth_per_group(capsys):
    """With dram__bytes_read.sum beside the time (one row per launch and metric), each group shows
    its megabytes and GB/s; any launch without the metric drops the columns."""
    lines = [HEADER,
             row(0, "get_rows_kernel", "(1, 1, 1)", "us", "10.0"),
             row(0, "get_rows_kernel", "(1, 1, 1)", "Kbyte", "16", metric="dram__bytes_read.sum"),
             row(1, "mmvq_kernel<1, 2, 0>", "(512, 1, 1)", "us", "20.0"),
             row(1, "mmvq_kernel<1, 2, 0>", "(512, 1, 1)", "Mbyte", "50", metric="dram__bytes_read.sum"),
             row(2, "mmvq_kernel<1, 2, 0>", "(512, 1, 1)", "us", "30.0"),
             row(2, "mmvq_kernel<1, 2, 0>", "(512, 1, 1)", "Gbyte", "0.05", metric="dram__bytes_read.sum")]
    rows = decode_profile.kernels(lines)
    assert rows[1] == ("mmvq_kernel<1, 2, 0>", "(512, 1, 1)", 20.0, 50e6)
    decode_profile.report(decode_profile.last_step(rows), verbose=False)
    out = capsys.readouterr().out
    assert out.startswith("3 kernels, 60.0 us, 100.0 MB read from DRAM (1667 GB/s)")
    assert "| mmvq_kernel<1, 2, 0> | (512, 1, 1) | 2 | 50.0 | 83.3% | 100.0 | 2000 |" in out
    decode_profile.report(decode_profile.last_step(rows[1:] + [("get_rows_kernel", "(1, 1, 1)", 1.0, None)]), False)
    assert "MB read" not in capsys.readouterr().out
    with pytest.raises(ValueError, match="byte unit"):
        decode_profile.kernels([HEADER, row(0, "x_kernel", "(1, 1, 1)", "sector", "9", metric="dram__bytes_read.sum")])
