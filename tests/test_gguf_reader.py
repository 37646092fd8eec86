"""GGUF reader: files written by gguf-py must read back exactly as gguf-py's own reader sees them."""
import math
import struct
import sys
import time
from pathlib import Path

import pytest
import gguf
from gguf import GGUFValueType as VT

sys.path.insert(0, str(Path(__file__).parent))
from gguf_samples import RawGGUF, write_rich_sample  # noqa: E402

from glmoe import _core  # noqa: E402

GGUFError = _core.GGUFError


def reference_value(field):
    """A ReaderField's value in gguf_summary's representation (strings as bytes)."""
    main = field.types[0]
    if main == VT.STRING:
        return field.parts[-1].tobytes()
    if main != VT.ARRAY:
        return field.parts[-1].tolist()[0]
    if field.types[-1] == VT.STRING:
        return [field.parts[i].tobytes() for i in field.data]
    return [v for i in field.data for v in field.parts[i].tolist()]


def same(a, b):
    if isinstance(a, float) or isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b and type(a) is type(b)


def check_against_gguf_py(path):
    ours = _core.gguf_summary(str(path))
    ref = gguf.GGUFReader(str(path))
    ref_fields = list(ref.fields.values())[3:]  # skip GGUF.version / tensor_count / kv_count
    assert list(ours["metadata"]) == [f.name for f in ref_fields]
    for f in ref_fields:
        if f.types[0] == VT.ARRAY and VT.ARRAY in f.types[1:]:
            continue  # gguf-py flattens nested arrays; these are checked against known values
        got, want = ours["metadata"][f.name], reference_value(f)
        if isinstance(want, list):
            assert len(got) == len(want), f.name
            assert all(same(g, w) for g, w in zip(got, want)), f.name
        else:
            assert same(got, want), (f.name, got, want)
    assert ours["alignment"] == ref.alignment
    assert len(ours["tensors"]) == len(ref.tensors)
    data_starts = set()
    for (name, ne, ttype, offset, n_bytes), rt in zip(ours["tensors"], ref.tensors):
        assert name == rt.name
        assert ne == [int(d) for d in rt.shape]
        assert ttype == int(rt.tensor_type)
        assert n_bytes == int(rt.n_bytes)
        assert offset % ours["alignment"] == 0
        data_starts.add(rt.data_offset - offset)
    if ref.tensors:
        # One data section, aligned, as gguf-py places it.
        assert len(data_starts) == 1
        assert data_starts.pop() % ours["alignment"] == 0
    return ours


@pytest.mark.parametrize("alignment", [None, 1, 64, 4096])
def test_rich_file_matches_gguf_py(tmp_path, alignment):
    path = tmp_path / "rich.gguf"
    write_rich_sample(path, alignment=alignment)
    s = check_against_gguf_py(path)
    assert s["version"] == 3
    assert s["alignment"] == (alignment or 32)
    m = s["metadata"]
    assert m["t.u64"] == 2**64 - 1
    assert m["t.u64_big"] == 2**63 + 12345
    assert m["t.i64"] == -(2**63)
    assert m["t.f64"] == 0.1
    assert m["t.true"] is True and m["t.false"] is False
    assert m["t.utf8"] == "héllo wörld ✓ 日本 🎉".encode()
    assert m["t.nul"] == b"a\x00b\x00"
    assert m["t.arr_u64"] == [0, 2**64 - 1, 2**63]
    assert m["t.arr_bool"] == [True, False, True]
    assert m["t.nested"] == [[1, 2], [3], [4, 5, 6]]
    names = [t[0] for t in s["tensors"]]
    assert names == ["f32.weight", "f16.weight", "q4k.weight", "q8_0.weight", "q6k.3d", "vec"]
    by_name = {t[0]: t for t in s["tensors"]}
    assert by_name["q4k.weight"][1:3] == ([512, 4], 12)
    assert by_name["q4k.weight"][4] == 4 * 2 * 144
    assert by_name["q6k.3d"][1] == [256, 3, 2]


def test_metadata_only_file(tmp_path):
    path = tmp_path / "meta.gguf"
    write_rich_sample(path, with_tensors=False)
    s = check_against_gguf_py(path)
    assert s["tensors"] == []


def test_empty_file_is_valid(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(RawGGUF().build())  # the 24-byte header alone
    s = _core.gguf_summary(str(path))
    assert s == {"version": 3, "alignment": 32, "metadata": {}, "tensors": []}


def test_nested_and_empty_arrays(tmp_path):
    g = RawGGUF()
    g.add("empty.u8", VT.ARRAY, (VT.UINT8, []))
    g.add("empty.str", VT.ARRAY, (VT.STRING, []))
    g.add("empty.arr", VT.ARRAY, (VT.ARRAY, []))
    g.add("nested.str", VT.ARRAY, (VT.ARRAY, [(VT.STRING, ["a", "bc"]), (VT.STRING, [])]))
    deep = (VT.INT32, [7])
    for _ in range(7):  # 8 levels of arrays: the deepest allowed
        deep = (VT.ARRAY, [deep])
    g.add("nested.deep", VT.ARRAY, deep)
    g.add("empty.string", VT.STRING, "")
    g.add("", VT.UINT8, 1)  # empty key: odd but not harmful
    path = tmp_path / "nested.gguf"
    path.write_bytes(g.build())
    m = _core.gguf_summary(str(path))["metadata"]
    assert m["empty.u8"] == [] and m["empty.str"] == [] and m["empty.arr"] == []
    assert m["nested.str"] == [[b"a", b"bc"], []]
    v = m["nested.deep"]
    for _ in range(7):
        assert len(v) == 1
        v = v[0]
    assert v == [7]
    assert m["empty.string"] == b""
    assert m[""] == 1


def test_alignment_key_of_other_integer_type(tmp_path):
    g = RawGGUF(alignment=16).add("general.alignment", VT.UINT64, 16)
    g.add_tensor("a", [4], 0).add_tensor("b", [4, 2], 0)
    path = tmp_path / "a16.gguf"
    path.write_bytes(g.build())
    s = _core.gguf_summary(str(path))
    assert s["alignment"] == 16
    assert [t[3] for t in s["tensors"]] == [0, 16]


def patch_version(src, dst, version):
    data = bytearray(src.read_bytes())
    data[4:8] = struct.pack("<I", version)
    dst.write_bytes(bytes(data))


def test_version_2_reads(tmp_path):
    v3, v2 = tmp_path / "v3.gguf", tmp_path / "v2.gguf"
    write_rich_sample(v3)
    patch_version(v3, v2, 2)
    a, b = _core.gguf_summary(str(v3)), _core.gguf_summary(str(v2))
    assert b["version"] == 2
    b["version"] = 3
    assert a == b


@pytest.mark.parametrize("version", [1, 0, 4, 0x03000000])
def test_unsupported_versions(tmp_path, version):
    v3, bad = tmp_path / "v3.gguf", tmp_path / "bad.gguf"
    write_rich_sample(v3)
    patch_version(v3, bad, version)
    with pytest.raises(GGUFError, match=f"unsupported GGUF version {version}"):
        _core.gguf_summary(str(bad))


def test_big_endian_file_is_refused(tmp_path):
    path = tmp_path / "be.gguf"
    w = gguf.GGUFWriter(str(path), "testarch", endianess=gguf.GGUFEndian.BIG)
    w.add_uint32("x", 1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="unsupported GGUF version.*big-endian"):
        _core.gguf_summary(str(path))


def test_zero_byte_file(tmp_path):
    path = tmp_path / "zero.gguf"
    path.write_bytes(b"")
    with pytest.raises(GGUFError, match="too small to be GGUF"):
        _core.gguf_summary(str(path))


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "does-not-exist.gguf"
    with pytest.raises(Exception) as e:
        _core.gguf_summary(str(path))
    assert str(path) in str(e.value)


def test_directory_is_refused(tmp_path):
    with pytest.raises(GGUFError, match="not a regular file"):
        _core.gguf_summary(str(tmp_path))


def test_large_vocabulary_parses_fast(tmp_path):
    n_tokens, n_merges = 150_000, 300_000
    tokens = [f"tok{i}" for i in range(n_tokens)]
    merges = [f"t{i % 977} k{i}" for i in range(n_merges)]
    g = RawGGUF()
    g.add("tokenizer.ggml.tokens", VT.ARRAY, (VT.STRING, tokens))
    g.add("tokenizer.ggml.merges", VT.ARRAY, (VT.STRING, merges))
    g.add("tokenizer.ggml.scores", VT.ARRAY, (VT.FLOAT32, [0.0] * n_tokens))
    g.add("tokenizer.ggml.token_type", VT.ARRAY, (VT.INT32, [1] * n_tokens))
    path = tmp_path / "vocab.gguf"
    path.write_bytes(g.build())
    # gguf_summary also builds Python objects for every element; the C++ parse is a fraction.
    t0 = time.perf_counter()
    s = _core.gguf_summary(str(path))
    elapsed = time.perf_counter() - t0
    m = s["metadata"]
    assert m["tokenizer.ggml.tokens"][149_999] == b"tok149999"
    assert m["tokenizer.ggml.merges"][299_999] == b"t" + str(299_999 % 977).encode() + b" k299999"
    assert len(m["tokenizer.ggml.token_type"]) == n_tokens
    assert elapsed < 3.0, f"parsing a 150k-token vocabulary took {elapsed:.2f} s"


def test_tensor_offsets_locate_the_data(tmp_path):
    """Data section = first aligned offset after the tensor infos; offset is relative to it."""
    path = tmp_path / "rich.gguf"
    write_rich_sample(path, alignment=64)
    s = _core.gguf_summary(str(path))
    ref = gguf.GGUFReader(str(path))
    last = ref.tensors[-1].field
    infos_end = last.offset + sum(p.nbytes for p in last.parts)
    data_start = -(-infos_end // 64) * 64
    raw = path.read_bytes()
    for (name, _ne, _t, offset, n_bytes), rt in zip(s["tensors"], ref.tensors):
        assert data_start + offset == rt.data_offset, name
        assert raw[data_start + offset:data_start + offset + n_bytes] == rt.data.tobytes(), name
