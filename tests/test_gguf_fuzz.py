"""Hostile GGUF files: hand-made ones must fail with a message naming the problem, and thousands
of mutated real files must each either parse or raise GGUFError, never crash or raise anything
else. The mutation loop runs in a subprocess so a crash fails the test with the case that did it.
"""
import json
import os
import random
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import gguf
from gguf import GGUFValueType as VT

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from gguf_samples import HUGE_U64, RawGGUF, u64_field_offsets, write_rich_sample  # noqa: E402

from glmoe import _core  # noqa: E402

GGUFError = _core.GGUFError
FUZZ_SEED = 20240611
FUZZ_CASES = 20000


# ---------------------------------------------------------------- hand-made hostile files

def header(n_tensors=0, n_kv=0, version=3, magic=b"GGUF"):
    return magic + struct.pack("<IQQ", version, n_tensors, n_kv)


def one_tensor(ne, ggml_type=0, offset=0, name="t", extra=()):
    g = RawGGUF()
    for key, vt, v in extra:
        g.add(key, vt, v)
    return g.add_tensor(name, ne, ggml_type, offset=offset, data=bytes(64))


def nested(depth):
    v = (VT.UINT8, [1])
    for _ in range(depth - 1):
        v = (VT.ARRAY, [v])
    return v


def raw_key(key):
    return RawGGUF.enc_str(key)


HOSTILE = {
    "wrong magic": (header(magic=b"GGML"), "wrong magic 'GGML'"),
    "wrong magic binary": (b"\x00\x01\x02\x03" + bytes(40), "wrong magic"),
    "short non-GGUF file": (b"{}\n\n", "wrong magic"),
    "three bytes": (b"GGU", "too small to be GGUF (3 bytes)"),
    "header only, counts say more": (header(n_kv=1), "metadata count 1 is more than the 0 bytes left"),
    "truncated value": (header(n_kv=1) + raw_key("key") + struct.pack("<I", VT.UINT64) + b"\x01\x02",
                        "truncated file: metadata key 'key' at offset 39 needs 8 bytes but only 2 remain"),
    "truncated header": (header()[:20], "too small to be GGUF"),
    "huge n_kv": (header(n_kv=2**63) + bytes(64), "metadata count 9223372036854775808"),
    "huge n_tensors": (header(n_tensors=2**64 - 1) + bytes(64), "tensor count 18446744073709551615"),
    "huge key length": (header(n_kv=1) + struct.pack("<Q", 2**62) + bytes(16), "string length 4611686018427387904"),
    "huge string value": (header(n_kv=1) + raw_key("k") + struct.pack("<IQ", VT.STRING, 2**40) + b"abc",
                          "string length 1099511627776 of metadata key 'k'"),
    "huge array length": (header(n_kv=1) + raw_key("arr") + struct.pack("<IIQ", VT.ARRAY, VT.UINT32, 2**61)
                          + bytes(100), "array length 2305843009213693952 of metadata key 'arr'"),
    "array length just too big": (header(n_kv=1) + raw_key("arr") + struct.pack("<IIQ", VT.ARRAY, VT.UINT32, 26)
                                  + bytes(100), "array length 26"),
    "huge array of arrays": (header(n_kv=1) + raw_key("a") + struct.pack("<IIQ", VT.ARRAY, VT.ARRAY, 2**50)
                             + bytes(1000), "array length"),
    "unknown value type": (header(n_kv=1) + raw_key("k") + struct.pack("<I", 13) + bytes(8),
                           "unknown value type 13 for metadata key 'k'"),
    "unknown array element type": (header(n_kv=1) + raw_key("k") + struct.pack("<IIQ", VT.ARRAY, 99, 1) + bytes(8),
                                   "unknown array element type 99"),
    "invalid bool": (RawGGUF().add_raw("b", struct.pack("<IB", VT.BOOL, 2)).build(), "invalid bool byte 2 in metadata key 'b'"),
    "invalid bool in array": (RawGGUF().add_raw("b", struct.pack("<IIQBB", VT.ARRAY, VT.BOOL, 2, 1, 7)).build(),
                              "invalid bool byte 7"),
    "duplicate key": (RawGGUF().add("k", VT.UINT8, 1).add("k", VT.UINT8, 2).build(), "duplicate metadata key 'k'"),
    "key not utf-8": (RawGGUF().add(b"\xff\xfe", VT.UINT8, 1).build(), "not valid UTF-8"),
    "key with NUL": (RawGGUF().add(b"a\x00b", VT.UINT8, 1).build(), "contains a NUL"),
    "nesting too deep": (RawGGUF().add("deep", VT.ARRAY, nested(9)).build(), "nested more than 8 deep in metadata key 'deep'"),
    "alignment zero": (RawGGUF().add("general.alignment", VT.UINT32, 0).build(), "invalid general.alignment 0"),
    "alignment not power of two": (RawGGUF().add("general.alignment", VT.UINT32, 48).build(), "invalid general.alignment 48"),
    "alignment negative": (RawGGUF().add("general.alignment", VT.INT32, -32).build(), "invalid general.alignment -32"),
    "alignment float": (RawGGUF().add("general.alignment", VT.FLOAT32, 32.0).build(), "invalid general.alignment a float32"),
    "alignment string": (RawGGUF().add("general.alignment", VT.STRING, "32").build(), "invalid general.alignment a string"),
    "alignment huge": (RawGGUF().add("general.alignment", VT.UINT64, 2**40).build(), "invalid general.alignment 1099511627776"),
    "unknown tensor type": (one_tensor([32], ggml_type=4).build(), "tensor 't' has unknown type id 4"),
    "unknown tensor type big": (one_tensor([32], ggml_type=2**31).build(), "unknown type id 2147483648"),
    "n_dims 5": (one_tensor([1, 1, 1, 1, 1]).build(), "tensor 't' has n_dims 5"),
    "n_dims 0": (one_tensor([]).build(), "has n_dims 0"),
    "zero dim": (one_tensor([4, 0]).build(), "dimension 1 = 0 (must be >= 1)"),
    "negative dim": (one_tensor([-4]).build(), "dimension 0 = -4"),
    "not whole blocks": (one_tensor([100, 2], ggml_type=12).build(), "first dimension 100, not a multiple of the block size 256"),
    "element count overflow": (one_tensor([2**32, 2**32, 2**32]).build(), "element count that overflows"),
    "byte size overflow": (one_tensor([2**62, 1]).build(), "byte size that overflows"),
    "quant byte size overflow": (one_tensor([2**40 * 256, 2**30], ggml_type=12).build(), "overflow"),
    "offset past end": (one_tensor([8], offset=2**20).build(), "tensor 't' data [1048576, +32)"),
    "offset wraps": (one_tensor([8], offset=2**64 - 32).build(), "extends past the end of the file"),
    "size past end": (RawGGUF().add_tensor("t", [64], 0, data=bytes(32)).build(), "extends past the end of the file"),
    "misaligned offset": (RawGGUF().add_tensor("a", [8]).add_tensor("b", [8], offset=40).build(),
                          "tensor 'b' data offset 40 is not a multiple of the alignment 32"),
    "overlapping tensors": (RawGGUF().add_tensor("a", [16]).add_tensor("b", [16], offset=32).build(),
                            "tensors 'a' and 'b' overlap"),
    "overlap out of order": (RawGGUF().add_tensor("a", [8], offset=64).add_tensor("b", [8], offset=0).add_tensor("c", [24], offset=32).build(),
                             "tensors 'c' and 'a' overlap"),
    "duplicate tensor name": (RawGGUF().add_tensor("w", [8]).add_tensor("w", [8]).build(), "duplicate tensor name 'w'"),
    "tensor name not utf-8": (RawGGUF().add_tensor(b"\xc0\x80", [8]).build(), "not valid UTF-8"),
    # The file ends right after the tensor infos, before the padding to the data section.
    "data section past end": (RawGGUF().add_tensor("t", [8]).build()[:24 + 8 + 1 + 4 + 8 + 4 + 8],
                              "data section would start at offset 64"),
    "truncated tensor info": (RawGGUF().add_tensor("a_long_tensor_name", [8]).build()[:24 + 8 + 18 + 4 + 4],
                              "truncated file: dimension 0 of tensor 'a_long_tensor_name'"),
    "too many array elements": (RawGGUF().add_raw("big", struct.pack("<IIQ", VT.ARRAY, VT.UINT8, 2**23 + 1) + bytes(2**23 + 1)).build(),
                                "more than 8388608 elements"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_file(tmp_path, case):
    data, message = HOSTILE[case]
    path = tmp_path / "hostile.gguf"
    path.write_bytes(data)
    for use_mmap in (True, False):  # mapped, and read into memory (--no-mmap)
        with pytest.raises(GGUFError) as e:
            _core.gguf_summary(str(path), use_mmap)
        assert message in str(e.value), str(e.value)
        assert str(path) in str(e.value)


@pytest.mark.parametrize("ok", ["header only", "alignment 1", "alignment u8", "zero tensors, no padding"])
def test_edge_files_that_are_valid(tmp_path, ok):
    data = {
        "header only": header(),
        "alignment 1": RawGGUF(alignment=1).add("general.alignment", VT.UINT32, 1)
                       .add_tensor("a", [3], 1).add_tensor("b", [5], 1).build(),
        "alignment u8": RawGGUF(alignment=8).add("general.alignment", VT.UINT8, 8).add_tensor("a", [2]).build(),
        "zero tensors, no padding": RawGGUF().add("k", VT.UINT8, 1).build(),
    }[ok]
    path = tmp_path / "ok.gguf"
    path.write_bytes(data)
    s = _core.gguf_summary(str(path))
    for _name, _ne, _t, offset, n_bytes in s["tensors"]:
        assert offset + n_bytes <= len(data)


# ---------------------------------------------------------------- mutation fuzzing

def base_files(workdir):
    """Real files to mutate, with the size of each one's header region (up to its data)."""
    paths = []
    p = workdir / "base_rich.gguf"
    write_rich_sample(p)
    paths.append(p)
    p = workdir / "base_a64_v2.gguf"
    write_rich_sample(p, alignment=64)
    data = bytearray(p.read_bytes())
    data[4:8] = struct.pack("<I", 2)
    p.write_bytes(bytes(data))
    paths.append(p)
    p = workdir / "base_nested.gguf"
    g = RawGGUF().add("n", VT.ARRAY, (VT.ARRAY, [(VT.STRING, ["ab", "c"]), (VT.STRING, ["d"])]))
    g.add("d", VT.ARRAY, nested(6)).add("general.alignment", VT.UINT32, 32)
    g.add_tensor("x", [256, 2], 12).add_tensor("y", [32], 8).add_tensor("z", [4, 3, 2, 1], 1)
    p.write_bytes(g.build())
    paths.append(p)
    out = []
    for p in paths:
        r = gguf.GGUFReader(str(p))
        out.append((p, min(t.data_offset for t in r.tensors), u64_field_offsets(p)))
    return out


def mutations(workdir, seed, n_cases):
    """Deterministic (description, bytes) cases: the systematic ones, then random ones up to
    n_cases in all."""
    rng = random.Random(seed)
    bases = [(p.name, p.read_bytes(), hdr, u64s) for p, hdr, u64s in base_files(workdir)]
    cases = []
    # Truncation at every byte of the header region, plus random points in the data.
    for name, data, hdr, _ in bases:
        cases += [(f"{name} truncated to {n}", data[:n]) for n in range(hdr + 1)]
        cases += [(f"{name} truncated to {n}", data[:n]) for n in
                  (rng.randrange(hdr, len(data)) for _ in range(20))]
    # Huge values in every u64 field (counts, string/array lengths, dims, offsets).
    for name, data, _, u64s in bases:
        for off in u64s:
            v = rng.choice(HUGE_U64 + [rng.getrandbits(64), rng.randrange(1, 4096)])
            cases.append((f"{name} u64 at {off} = {v}",
                          data[:off] + struct.pack("<Q", v) + data[off + 8:]))
    while len(cases) < n_cases:
        name, data, hdr, u64s = rng.choice(bases)
        buf = bytearray(data)
        kind = rng.random()
        if kind < 0.5:  # random byte flips, mostly where they matter
            where = [rng.randrange(hdr if rng.random() < 0.9 else len(buf)) for _ in range(rng.randint(1, 3))]
            for off in where:
                buf[off] ^= 1 << rng.randrange(8)
            desc = f"{name} bit flips at {where}"
        elif kind < 0.75:  # small 32-bit values at any 4-byte spot (types, n_dims, ids)
            off = rng.randrange(hdr - 4)
            v = rng.choice([0, 1, 2, 5, 7, 9, 12, 13, 41, 2**31, 2**32 - 1])
            buf[off:off + 4] = struct.pack("<I", v)
            desc = f"{name} u32 at {off} = {v}"
        else:  # a huge u64 at an unaligned spot in the header region
            off = rng.randrange(hdr - 8)
            v = rng.choice(HUGE_U64)
            buf[off:off + 8] = struct.pack("<Q", v)
            desc = f"{name} u64 at {off} = {v}"
        cases.append((desc, bytes(buf)))
    return cases


def fuzz_worker(workdir, seed, n_cases, progress_path):
    """Runs in a child process: parse every mutated file, report anything but parse-or-GGUFError."""
    workdir = Path(workdir)
    counts = {"parsed": 0, "rejected": 0}
    failures = []
    # Cases go through an in-memory file: truncating a disk file per case dominates the runtime.
    fd = os.memfd_create("gguf-fuzz-case")
    target = f"/proc/self/fd/{fd}"
    with open(progress_path, "w") as progress:
        for i, (desc, data) in enumerate(mutations(workdir, seed, n_cases)):
            progress.seek(0)
            progress.write(f"case {i}: {desc}\n")
            progress.truncate()
            progress.flush()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            try:
                s = _core.gguf_summary(target)
                bad = [t[0] for t in s["tensors"] if t[3] + t[4] > len(data)]
                if bad:
                    failures.append(f"case {i}: {desc}: tensors past the end accepted: {bad}")
                counts["parsed"] += 1
            except GGUFError:
                counts["rejected"] += 1
            except BaseException as e:  # noqa: BLE001 - any other exception is the bug we hunt
                failures.append(f"case {i}: {desc}: {type(e).__name__}: {e}")
    os.close(fd)
    print(json.dumps({"counts": counts, "failures": failures[:20], "n_failures": len(failures)}))


def test_mutated_files_parse_or_raise_gguf_error(tmp_path):
    progress = tmp_path / "progress.txt"
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import test_gguf_fuzz as m; "
            "m.fuzz_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])")
    proc = subprocess.run(
        [sys.executable, "-c", code, str(HERE), str(tmp_path), str(FUZZ_SEED), str(FUZZ_CASES), str(progress)],
        capture_output=True, text=True, timeout=300, env=dict(os.environ))
    last_case = progress.read_text() if progress.exists() else "(none)"
    assert proc.returncode == 0, (f"fuzz worker died (rc {proc.returncode}, seed {FUZZ_SEED}) at "
                                  f"{last_case}\nstderr: {proc.stderr[-3000:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["n_failures"] == 0, "\n".join(report["failures"])
    counts = report["counts"]
    assert counts["parsed"] + counts["rejected"] >= FUZZ_CASES
    # Both outcomes must occur, or the mutations are not exercising the reader.
    assert counts["parsed"] > 50 and counts["rejected"] > 1000, counts


# ---------------------------------------------------------------- hostile models (issue 19.5)
# Valid GGUF files whose model or tokenizer metadata is wrong: loading fails at once with a
# ValueError that names the key, whichever front loads it (Llama; the server and the engine load
# through _core.Model and GGUFTokenizer.from_gguf, both covered here).

from gguf_edit import copy_gguf  # noqa: E402
from glmoe.__main__ import default_model_path  # noqa: E402
from glmoe.tokenizer import GGUFTokenizer, read_tokenizer_metadata  # noqa: E402

KJV = default_model_path()
_KJV_TOK = read_tokenizer_metadata(KJV)
_TOKENS = _KJV_TOK["tokenizer.ggml.tokens"]
_TYPES = _KJV_TOK["tokenizer.ggml.token_type"]
_MERGES = _KJV_TOK["tokenizer.ggml.merges"]


def _keys(**kv):
    return {"set_keys": kv}


def _merges(*first):
    return _keys(**{"tokenizer.ggml.merges": (list(first) + _MERGES, VT.ARRAY)})


MODEL_HOSTILE = {
    # vocabulary vs embeddings
    "one token too many": (_keys(**{"tokenizer.ggml.tokens": (_TOKENS + ["<extra>"], VT.ARRAY),
                                    "tokenizer.ggml.token_type": (_TYPES + [1], VT.ARRAY)}),
                           "tokenizer.ggml.tokens has 2049 tokens but token_embd.weight has 2048 rows"),
    "one token too few": (_keys(**{"tokenizer.ggml.tokens": (_TOKENS[:-1], VT.ARRAY),
                                   "tokenizer.ggml.token_type": (_TYPES[:-1], VT.ARRAY)}),
                          "tokenizer.ggml.tokens has 2047 tokens but token_embd.weight has 2048 rows"),
    "tokens not strings": (_keys(**{"tokenizer.ggml.tokens": (list(range(2048)), VT.ARRAY)}),
                           "tokenizer.ggml.tokens is not an array of strings"),
    # special token ids
    "eos id = vocab size": (_keys(**{"tokenizer.ggml.eos_token_id": (2048, VT.UINT32)}),
                            "tokenizer.ggml.eos_token_id = 2048 is not a token id of the vocabulary (2048 tokens)"),
    "bos id u32 max": (_keys(**{"tokenizer.ggml.bos_token_id": (2**32 - 1, VT.UINT32)}),
                       "tokenizer.ggml.bos_token_id = 4294967295"),
    "pad id negative": (_keys(**{"tokenizer.ggml.padding_token_id": (-1, VT.INT32)}),
                        "tokenizer.ggml.padding_token_id = -1"),
    "eot id u64 huge": (_keys(**{"tokenizer.ggml.eot_token_id": (2**64 - 1, VT.UINT64)}),
                        "tokenizer.ggml.eot_token_id = 18446744073709551615"),
    "sep id (any *_token_id)": (_keys(**{"tokenizer.ggml.seperator_token_id": (99999, VT.UINT32)}),
                                "tokenizer.ggml.seperator_token_id = 99999"),
    "eos id a string": (_keys(**{"tokenizer.ggml.eos_token_id": ("2", VT.STRING)}),
                        "tokenizer.ggml.eos_token_id is not an integer"),
    "eos id a float": (_keys(**{"tokenizer.ggml.eos_token_id": (2.0, VT.FLOAT32)}),
                       "tokenizer.ggml.eos_token_id is not an integer"),
    # hyperparameters
    "context_length 0": (_keys(**{"glm4moe.context_length": (0, VT.UINT32)}),
                         "glm4moe.context_length is 0, must be at least 1"),
    "rope.freq_base 0": (_keys(**{"glm4moe.rope.freq_base": (0.0, VT.FLOAT32)}), "glm4moe.rope.freq_base must be"),
    "rope.freq_base negative": (_keys(**{"glm4moe.rope.freq_base": (-10000.0, VT.FLOAT32)}),
                                "glm4moe.rope.freq_base must be"),
    "rope.freq_base nan": (_keys(**{"glm4moe.rope.freq_base": (float("nan"), VT.FLOAT32)}),
                           "glm4moe.rope.freq_base must be"),
    "rope.freq_base inf": (_keys(**{"glm4moe.rope.freq_base": (float("inf"), VT.FLOAT32)}),
                           "glm4moe.rope.freq_base must be"),
    "rope.freq_base f64 overflowing f32": (_keys(**{"glm4moe.rope.freq_base": (1e300, VT.FLOAT64)}),
                                           "glm4moe.rope.freq_base must be"),
    "rms epsilon nan": (_keys(**{"glm4moe.attention.layer_norm_rms_epsilon": (float("nan"), VT.FLOAT32)}),
                        "layer_norm_rms_epsilon must be"),
    # tokenizer metadata (the C++ loader accepts these; the tokenizer names the key)
    "merge of a pair that is no token": (_merges("Ġwoman Ġknowledge"),
                                         "tokenizer.ggml.merges[0] = 'Ġwoman Ġknowledge': "
                                         "'ĠwomanĠknowledge' is not in"),
    "merge of an unknown token": (_merges("zzzq qqqz"), "tokenizer.ggml.merges[0] = 'zzzq qqqz': 'zzzq' is not in"),
    "merge without a space": (_merges("ab"), "tokenizer.ggml.merges[0] = 'ab' is not two tokens"),
    "merge empty": (_merges(""), "tokenizer.ggml.merges[0] = '' is not two tokens"),
    "merges not strings": (_keys(**{"tokenizer.ggml.merges": ([1, 2, 3], VT.ARRAY)}),
                           "tokenizer.ggml.merges[0] is a int, not a string"),
    "token_type short": (_keys(**{"tokenizer.ggml.token_type": (_TYPES[:-1], VT.ARRAY)}),
                         "tokenizer.ggml.token_type has 2047 entries, expected one per token (2048)"),
    "token_type 99": (_keys(**{"tokenizer.ggml.token_type": ([99] + _TYPES[1:], VT.ARRAY)}),
                      "tokenizer.ggml.token_type[0] = 99 is not a token type"),
    "token_type strings": (_keys(**{"tokenizer.ggml.token_type": (["x"] * 2048, VT.ARRAY)}),
                           "tokenizer.ggml.token_type[0] = 'x' is not a token type"),
    "tokenizer model llama": (_keys(**{"tokenizer.ggml.model": ("llama", VT.STRING)}),
                              "unsupported tokenizer.ggml.model 'llama'"),
    "tokenizer pre an int": (_keys(**{"tokenizer.ggml.pre": (7, VT.UINT32)}), "tokenizer.ggml.pre = 7 is not a string"),
    # more tokenizer metadata of the wrong type, length or content
    "tokens a string": (_keys(**{"tokenizer.ggml.tokens": ("abc", VT.STRING)}),
                        "tokenizer.ggml.tokens is not an array of strings"),
    "tokens missing": ({"drop_keys": ["tokenizer.ggml.tokens"]}, "the GGUF has no tokenizer.ggml.tokens"),
    "token_type floats": (_keys(**{"tokenizer.ggml.token_type": ([1.0] * 2048, VT.ARRAY)}),
                          "tokenizer.ggml.token_type[0] = 1.0 is not a token type"),
    "token_type a string": (_keys(**{"tokenizer.ggml.token_type": ("1", VT.STRING)}),
                            "tokenizer.ggml.token_type has str entries, expected one per token"),
    "token_type long": (_keys(**{"tokenizer.ggml.token_type": (_TYPES + [1], VT.ARRAY)}),
                        "tokenizer.ggml.token_type has 2049 entries, expected one per token (2048)"),
    "merges a string": (_keys(**{"tokenizer.ggml.merges": ("t h", VT.STRING)}),
                        "tokenizer.ggml.merges is a str, not an array of strings"),
    "merges of arrays": (_keys(**{"tokenizer.ggml.merges": ([["t", "h"]], VT.ARRAY)}),
                         "tokenizer.ggml.merges[0] is a list, not a string"),
    "merge of three parts": (_merges("t h e"), "tokenizer.ggml.merges[0] = 't h e': 'h e' is not in"),
    "tokenizer model missing": ({"drop_keys": ["tokenizer.ggml.model"]}, "unsupported tokenizer.ggml.model None"),
    "tokenizer model an int": (_keys(**{"tokenizer.ggml.model": (3, VT.UINT32)}), "unsupported tokenizer.ggml.model 3"),
    "tokenizer pre unknown": (_keys(**{"tokenizer.ggml.pre": ("nosuch", VT.STRING)}),
                              "unsupported tokenizer.ggml.pre 'nosuch'"),
    "unk id negative i64": (_keys(**{"tokenizer.ggml.unknown_token_id": (-5, VT.INT64)}),
                            "tokenizer.ggml.unknown_token_id = -5 is not a token id"),
    # hyperparameters: huge, negative, of the wrong type, inconsistent with the tensors
    "context_length u32 max": (_keys(**{"glm4moe.context_length": (2**32 - 1, VT.UINT32)}),
                               "glm4moe.context_length is out of range"),
    "context_length u64 max": (_keys(**{"glm4moe.context_length": (2**64 - 1, VT.UINT64)}),
                               "glm4moe.context_length is out of range"),
    "context_length negative": (_keys(**{"glm4moe.context_length": (-1, VT.INT32)}),
                                "glm4moe.context_length is out of range"),
    "context_length a string": (_keys(**{"glm4moe.context_length": ("1024", VT.STRING)}),
                                "glm4moe.context_length is not an integer"),
    "context_length a float": (_keys(**{"glm4moe.context_length": (1024.0, VT.FLOAT32)}),
                               "glm4moe.context_length is not an integer"),
    "rope.freq_base a string": (_keys(**{"glm4moe.rope.freq_base": ("1e4", VT.STRING)}),
                                "glm4moe.rope.freq_base is not a number"),
    "block_count 0": (_keys(**{"glm4moe.block_count": (0, VT.UINT32)}), "block_count must exceed nextn_predict_layers"),
    "block_count past the tensors": (_keys(**{"glm4moe.block_count": (5, VT.UINT32)}),
                                     "missing tensor 'blk.4.attn_norm.weight'"),
    "block_count u32 max": (_keys(**{"glm4moe.block_count": (2**32 - 1, VT.UINT32)}),
                            "glm4moe.block_count is out of range"),
    "embedding_length vs token_embd": (_keys(**{"glm4moe.embedding_length": (191, VT.UINT32)}),
                                       "tensor 'token_embd.weight' has shape [192, 2048], expected [191, 2048]"),
    "embedding_length 2^31": (_keys(**{"glm4moe.embedding_length": (2**31, VT.UINT32)}),
                              "glm4moe.embedding_length is out of range"),
    "head_count 0": (_keys(**{"glm4moe.attention.head_count": (0, VT.UINT32)}),
                     "attention.head_count must be positive"),
    "head_count_kv not dividing": (_keys(**{"glm4moe.attention.head_count_kv": (3, VT.UINT32)}),
                                   "head_count must be a positive multiple of head_count_kv"),
    "key_length odd": (_keys(**{"glm4moe.attention.key_length": (47, VT.UINT32)}),
                       "attention.key_length != attention.value_length is not supported"),
    "rope dimensions odd": (_keys(**{"glm4moe.rope.dimension_count": (23, VT.UINT32)}),
                            "rope.dimension_count must be even and at most the head size"),
    "rope dimensions over the head": (_keys(**{"glm4moe.rope.dimension_count": (1000, VT.UINT32)}),
                                      "rope.dimension_count must be even and at most the head size"),
    "expert_count vs the router": (_keys(**{"glm4moe.expert_count": (9, VT.UINT32)}),
                                   "tensor 'blk.1.ffn_gate_inp.weight' has shape [192, 8], expected [192, 9]"),
    "expert_used_count 0": (_keys(**{"glm4moe.expert_used_count": (0, VT.UINT32)}), "expert_used_count out of range"),
    "expert_used_count over expert_count": (_keys(**{"glm4moe.expert_used_count": (9, VT.UINT32)}),
                                            "expert_used_count out of range"),
    "expert_shared_count 2^31": (_keys(**{"glm4moe.expert_shared_count": (2**31, VT.UINT32)}),
                                 "glm4moe.expert_shared_count is out of range"),
    "expert_gating_func 7": (_keys(**{"glm4moe.expert_gating_func": (7, VT.UINT32)}),
                             "expert_gating_func 7 is not supported"),
    "nextn_predict_layers = block_count": (_keys(**{"glm4moe.nextn_predict_layers": (4, VT.UINT32)}),
                                           "block_count must exceed nextn_predict_layers"),
    "architecture llama": (_keys(**{"general.architecture": ("llama", VT.STRING)}),
                           "architecture 'llama' is not supported"),
    "token_embd missing": ({"drop_tensors": ["token_embd.weight"]}, "missing tensor 'token_embd.weight'"),
    # dimensions of 0 (before: "model dimensions must be positive", naming no key)
    "embedding_length 0": (_keys(**{"glm4moe.embedding_length": (0, VT.UINT32)}),
                           "metadata glm4moe.embedding_length is 0, must be at least 1"),
    "expert_count 0": (_keys(**{"glm4moe.expert_count": (0, VT.UINT32)}),
                       "metadata glm4moe.expert_count is 0, must be at least 1"),
    "expert_feed_forward_length 0": (_keys(**{"glm4moe.expert_feed_forward_length": (0, VT.UINT32)}),
                                     "metadata glm4moe.expert_feed_forward_length is 0, must be at least 1"),
    # before: loaded, and every logit came out NaN (or the routed experts' output vanished) at sampling
    **{f"expert_weights_scale {name}": (_keys(**{"glm4moe.expert_weights_scale": (value, vtype)}),
                                        "metadata glm4moe.expert_weights_scale must be a finite number > 0")
       for name, value, vtype in [("nan", float("nan"), VT.FLOAT32), ("inf", float("inf"), VT.FLOAT32),
                                  ("-inf", float("-inf"), VT.FLOAT64), ("0", 0.0, VT.FLOAT32),
                                  ("negative", -2.5, VT.FLOAT32), ("f64 overflowing f32", 1e300, VT.FLOAT64)]},
    # before: the int became the template text "5"
    "chat_template an int": (_keys(**{"tokenizer.chat_template": (5, VT.UINT32)}),
                             "metadata tokenizer.chat_template is not a string"),
    "named chat_template an array": (_keys(**{"tokenizer.chat_template.tool_use": (["a", "b"], VT.ARRAY)}),
                                     "metadata tokenizer.chat_template.tool_use is not a string"),
    # before: any value was taken by its truth (the string "false" added BOS)
    "add_bos_token an int": (_keys(**{"tokenizer.ggml.add_bos_token": (1, VT.UINT8)}),
                             "tokenizer.ggml.add_bos_token = 1 is not a bool"),
    "add_bos_token a string": (_keys(**{"tokenizer.ggml.add_bos_token": ("false", VT.STRING)}),
                               "tokenizer.ggml.add_bos_token = 'false' is not a bool"),
    "add_eos_token a float": (_keys(**{"tokenizer.ggml.add_eos_token": (0.0, VT.FLOAT32)}),
                              "tokenizer.ggml.add_eos_token = 0.0 is not a bool"),
    # before: a BPE tokenizer without merges (llama.cpp: "cannot find tokenizer merges")
    "merges missing": ({"drop_keys": ["tokenizer.ggml.merges"]},
                       "the GGUF has no tokenizer.ggml.merges, which a BPE (gpt2) tokenizer needs"),
}


def _patch_string(data: bytes, old: str, new: bytes) -> bytes:
    """data with the GGUF string `old` (length-prefixed) replaced by the same-length bytes `new`."""
    enc = old.encode()
    assert len(new) == len(enc)
    needle = struct.pack("<Q", len(enc)) + enc
    assert data.count(needle) >= 1
    return data.replace(needle, struct.pack("<Q", len(new)) + new, 1)


# Strings that are not UTF-8 (gguf-py cannot write them: the bytes are patched in).
RAW_HOSTILE = {
    "token not utf-8": ("host", b"\xff\xfe\xfd\xfc",
                        "cannot read metadata key 'tokenizer.ggml.tokens': UnicodeDecodeError"),
    "token with a surrogate": ("host", b"a\xed\xa0\x80", "cannot read metadata key 'tokenizer.ggml.tokens'"),
    "merge not utf-8": ("Ġlif e", b"\xc3\x28 \xff\xfe\xfd\xfc", "cannot read metadata key 'tokenizer.ggml.merges'"),
}


def _load_error(path):
    """The error loading path as Llama does, or None; never anything but a ValueError."""
    try:
        glmoe.Llama(str(path), n_ctx=32, n_threads=1, verbose=False).close()
    except ValueError as e:
        return str(e)
    return None


import glmoe  # noqa: E402


@pytest.mark.parametrize("case", sorted(MODEL_HOSTILE))
def test_hostile_model_metadata(tmp_path, case):
    edits, message = MODEL_HOSTILE[case]
    path = tmp_path / "hostile.gguf"
    copy_gguf(KJV, str(path), **edits)
    err = _load_error(path)
    assert err is not None and message in err, err


# The server and the engine load through _core.Model and GGUFTokenizer.from_gguf: each refuses its keys.
CORE_REFUSES = ("embedding_length 0", "expert_weights_scale nan", "chat_template an int")
TOKENIZER_REFUSES = ("add_bos_token a string", "merges missing")


@pytest.mark.parametrize("case", CORE_REFUSES + TOKENIZER_REFUSES)
def test_hostile_model_metadata_without_llama(tmp_path, case):
    edits, message = MODEL_HOSTILE[case]
    path = tmp_path / "hostile.gguf"
    copy_gguf(KJV, str(path), **edits)
    load = _core.Model if case in CORE_REFUSES else GGUFTokenizer.from_gguf
    with pytest.raises(ValueError) as e:
        load(str(path))
    assert message in str(e.value)
    if case in CORE_REFUSES:
        assert isinstance(e.value, _core.ModelError)


def _available_host_memory() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("MemAvailable:"))


KV_BYTES_PER_POSITION = 4 * 2 * 2 * 48 * 4  # the tiny model: 4 layers, K and V, 2 kv heads of 48, f32


def test_context_length_whose_kv_cache_cannot_fit_is_refused_at_once(tmp_path):
    """Before: context_length 2^24 with n_ctx=0 spent 35 s zero-filling 48 GiB of KV cache, then
    std::bad_alloc. Now a ValueError up front, with the MiB it needs (here, unless this machine has
    48 GiB free: then a context_length no machine can hold)."""
    n_ctx = 2**24 if 2**24 * KV_BYTES_PER_POSITION > _available_host_memory() else 2**31 - 1
    path = tmp_path / "long.gguf"
    copy_gguf(KJV, str(path), set_keys={"glm4moe.context_length": (n_ctx, VT.UINT32)})
    t0 = time.monotonic()
    e = _returns_promptly(lambda: glmoe.Llama(str(path), n_ctx=0, n_threads=1, verbose=False), timeout=20)
    assert isinstance(e, ValueError), repr(e)
    need_mib = n_ctx * KV_BYTES_PER_POSITION / 2**20
    assert (f"n_ctx {n_ctx} (the model's glm4moe.context_length) needs {need_mib:.2f} MiB of host memory for "
            "the KV cache of 4 layers, but ") in str(e), str(e)
    assert "MiB is available; lower n_ctx" in str(e)
    assert time.monotonic() - t0 < 5
    # An explicit n_ctx is checked the same way; one that fits loads.
    e = _returns_promptly(lambda: glmoe.Llama(KJV, n_ctx=n_ctx, n_threads=1, verbose=False))
    assert isinstance(e, ValueError) and f"n_ctx {n_ctx} needs {need_mib:.2f} MiB" in str(e), repr(e)
    glmoe.Llama(str(path), n_ctx=64, n_threads=1, verbose=False).close()


def test_n_ctx_0_is_the_context_length_as_in_llama_cpp_python(tmp_path):
    """llama-cpp-python: n_ctx=0 takes the model's context_length, n_batch and n_ubatch no bigger."""
    path = tmp_path / "short.gguf"
    copy_gguf(KJV, str(path), set_keys={"glm4moe.context_length": (48, VT.UINT32)})
    llm = glmoe.Llama(str(path), n_ctx=0, n_batch=512, n_threads=1, verbose=False)
    try:
        assert llm.n_ctx() == 48 and llm.n_batch == 48
        assert llm("In the beginning", max_tokens=2)["choices"][0]["finish_reason"] == "length"
    finally:
        llm.close()


@pytest.mark.parametrize("case", sorted(RAW_HOSTILE))
def test_hostile_tokenizer_strings(tmp_path, case):
    old, new, message = RAW_HOSTILE[case]
    path = tmp_path / "hostile.gguf"
    path.write_bytes(_patch_string(open(KJV, "rb").read(), old, new))
    err = _load_error(path)
    if message is None:
        assert err is None
    else:
        assert err is not None and message in err, err


def test_tokenizer_panic_becomes_value_error(monkeypatch):
    """Whatever the Rust side raises while building, a PanicException (a BaseException) included,
    comes out as a ValueError naming the keys."""
    import glmoe.tokenizer as tk

    class PanicException(BaseException):  # pyo3_runtime.PanicException's base
        pass

    def panic(*a, **k):
        raise PanicException("range end index 18 out of range for slice of length 15")

    monkeypatch.setattr(tk.models, "BPE", panic)
    with pytest.raises(ValueError, match="tokenizer.ggml.tokens / merges / token_type cannot be built: "
                                         "PanicException: range end"):
        GGUFTokenizer.from_metadata(_KJV_TOK)


def test_tokenizer_metadata_of_truncated_file(tmp_path):
    data = open(KJV, "rb").read()
    cut = data.index("tokenizer.ggml.tokens".encode()) + 40
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:cut])
    with pytest.raises(ValueError, match="tokenizer.ggml.tokens"):
        GGUFTokenizer.from_gguf(str(path))


def _returns_promptly(fn, timeout=10.0):
    """fn()'s exception (it must raise), failing rather than hanging if fn blocks."""
    import threading

    out = []

    def body():
        try:
            fn()
            out.append(None)
        except BaseException as e:  # noqa: BLE001
            out.append(e)

    t = threading.Thread(target=body, daemon=True)  # a daemon: a hang must not keep pytest alive
    t.start()
    t.join(timeout)
    assert out, f"{fn} blocked for {timeout} s"
    return out[0]


@pytest.mark.parametrize("loader", ["gguf_summary", "Model", "Llama", "tokenizer", "BatchEngine"])
def test_fifo_is_refused_at_once(tmp_path, loader):
    path = str(tmp_path / "model.gguf")
    os.mkfifo(path)
    fn = {
        "gguf_summary": lambda: _core.gguf_summary(path),
        "Model": lambda: _core.Model(path),
        "Llama": lambda: glmoe.Llama(path, verbose=True),
        "tokenizer": lambda: GGUFTokenizer.from_gguf(path),
        "BatchEngine": lambda: _core.BatchEngine(_core.Model(path), 64),
    }[loader]
    e = _returns_promptly(fn)
    assert isinstance(e, ValueError) and "is not a regular file" in str(e), repr(e)


def test_directory_is_refused(tmp_path):
    for fn in (lambda: _core.Model(str(tmp_path)), lambda: GGUFTokenizer.from_gguf(str(tmp_path))):
        e = _returns_promptly(fn)
        assert isinstance(e, ValueError) and "is not a regular file" in str(e), repr(e)


# ---------------------------------------------------------------- hyperparameter grid (issue 19)
# Every model hyperparameter and special-token key set to each hostile value of GRID_VALUES (a
# seeded sample of the grid): loading either refuses with a ValueError / RuntimeError naming the
# key, or the model loads and generates (or refuses to sample with a ValueError); never a crash,
# a hang or any other exception. In a subprocess, so that a crash names its case.

GRID_SEED, GRID_CASES = 19, 48
GRID_VALUES = [(0, VT.UINT32), (1, VT.UINT32), (2**32 - 1, VT.UINT32), (2**64 - 1, VT.UINT64), (-1, VT.INT32),
               (float("nan"), VT.FLOAT32), (float("inf"), VT.FLOAT64), (0.5, VT.FLOAT32), ("7", VT.STRING),
               (True, VT.BOOL)]
# Refusals that name a tensor rather than the key (the C++ loader's messages).
UNNAMED_REFUSALS = ("tensor '", "missing tensor '")


def grid_cases(seed, n_cases):
    special = ("_token_id", "tokenizer.ggml.add_")
    keys = sorted(k for k in gguf.GGUFReader(KJV).fields
                  if k.startswith("glm4moe.") or k.endswith(special[0]) or k.startswith(special[1]))
    return random.Random(seed).sample([(k, v, vt) for k in keys for v, vt in GRID_VALUES], n_cases)


def grid_worker(workdir, seed, n_cases, progress_path):
    counts = {"refused": 0, "generated": 0, "sampling refused": 0}
    failures = []
    path = str(Path(workdir) / "grid.gguf")
    with open(progress_path, "w") as progress:
        for i, (key, value, vtype) in enumerate(grid_cases(seed, n_cases)):
            case = f"case {i}: {key} = {value!r} ({vtype.name})"
            progress.seek(0)
            progress.write(case + "\n")
            progress.truncate()
            progress.flush()
            copy_gguf(KJV, path, set_keys={key: (value, vtype)})
            try:
                llm = glmoe.Llama(path, n_ctx=32, n_threads=1, verbose=False)
            except (ValueError, RuntimeError) as e:
                counts["refused"] += 1
                if key.rsplit(".", 1)[-1] not in str(e) and not any(u in str(e) for u in UNNAMED_REFUSALS):
                    failures.append(f"{case}: the refusal names no key: {e}")
                continue
            except BaseException as e:  # noqa: BLE001 - anything else is the bug we hunt
                failures.append(f"{case}: {type(e).__name__}: {e}")
                continue
            try:
                llm("In the beginning", max_tokens=2, temperature=0)
                counts["generated"] += 1
            except ValueError:  # a model that loads but cannot sample
                counts["sampling refused"] += 1
            except BaseException as e:  # noqa: BLE001
                failures.append(f"{case}: generating: {type(e).__name__}: {e}")
            finally:
                llm.close()
    print(json.dumps({"counts": counts, "failures": failures}))


def test_hostile_hyperparameter_grid(tmp_path):
    progress = tmp_path / "progress.txt"
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import test_gguf_fuzz as m; "
            "m.grid_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])")
    proc = subprocess.run([sys.executable, "-c", code, str(HERE), str(tmp_path), str(GRID_SEED), str(GRID_CASES),
                           str(progress)], capture_output=True, text=True, timeout=300)
    last_case = progress.read_text() if progress.exists() else "(none)"
    assert proc.returncode == 0, f"grid worker died (rc {proc.returncode}) at {last_case}\n{proc.stderr[-3000:]}"
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not report["failures"], "\n".join(report["failures"])
    assert report["counts"]["refused"] > 10 and report["counts"]["generated"] > 5, report["counts"]


# ---------------------------------------------------------------- chat templates in the GGUF (issue 19)
# A template that does not compile, raises, reaches for Python internals, recurses, loops or builds
# a huge value: Llama refuses the chat with a ValueError, the server with a 400 (its rendering has a
# time limit and an output cap), and plain completions still work.

GGUF_TEMPLATES = {
    "does not compile": "{% for m in messages %}{{ m.content }",
    "raises": "{{ raise_exception('this template refuses') }}",
    "reaches for internals": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "calls what is undefined": "{{ nosuch() }}",
    "recurses": "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    # Before: these hung create_chat_completion or raised MemoryError; now they stop under the bounds
    # the server renders with (template_limits.py).
    "loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "balloons": "{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}",
    "builds a huge string": "{{ 'x' * 10000000000 }}",
    "pads to a huge width": "{{ 'x'.ljust(10000000000) }}",
    "formats a huge width": "{{ '%10000000000s' % 'x' }}",
}
# n_ctx 64 tokens of at most LONGEST_PIECE bytes each.
LONGEST_PIECE = GGUFTokenizer.from_gguf(KJV).longest_piece
LLAMA_TEMPLATE_ERRORS = {
    "does not compile": "chat template error: unexpected '}'",
    "raises": "chat template error: this template refuses",
    "reaches for internals": "chat template error: access to attribute '__class__' of 'str' object is unsafe",
    "calls what is undefined": "chat template error: 'nosuch' is undefined",
    "recurses": "chat template error: maximum recursion depth exceeded",
    "loops": "chat template stopped: it took over 1 s (the time limit of a chat template)",
    "balloons": f"chat template stopped: the rendered prompt is over {64 * LONGEST_PIECE} characters; "
                "no text that long fits the context",
    "builds a huge string": "chat template error: the template builds a value over 16777216 items",
    "pads to a huge width": "chat template error: the template passes a number over 16777216",
    "formats a huge width": "chat template error: the template formats with too large a width",
}
# Modes of one template (chosen by chat_template_kwargs) for the server.
SERVER_TEMPLATE = (
    "{% if mode == 'loop' %}{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    "{% elif mode == 'balloon' %}{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}"
    "{% elif mode == 'huge' %}{{ 'x' * 10000000000 }}"
    "{% elif mode == 'raise' %}{{ raise_exception('no') }}"
    "{% elif mode == 'internals' %}{{ ''.__class__.__mro__ }}"
    "{% elif mode == 'recurse' %}{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}"
    "{% else %}{% for m in messages %}<|user|>{{ m.content }}{% endfor %}<|assistant|>{% endif %}")


def _with_template(tmp_path, template, name="template.gguf"):
    path = tmp_path / name
    copy_gguf(KJV, str(path), set_keys={"tokenizer.chat_template": (template, VT.STRING)})
    return path


@pytest.mark.parametrize("case", sorted(GGUF_TEMPLATES))
def test_llama_refuses_a_broken_gguf_template(tmp_path, case, monkeypatch):
    import threading
    import glmoe.template_limits

    monkeypatch.setattr(glmoe.template_limits, "TEMPLATE_TIMEOUT_S", 1.0)  # 5 s by default
    llm = glmoe.Llama(str(_with_template(tmp_path, GGUF_TEMPLATES[case])), n_ctx=64, n_threads=1, verbose=False)
    try:
        t0 = time.monotonic()
        e = _returns_promptly(lambda: llm.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=2))
        assert isinstance(e, ValueError) and LLAMA_TEMPLATE_ERRORS[case] in str(e), repr(e)
        assert time.monotonic() - t0 < 3
        assert llm("In the beginning", max_tokens=2)["choices"][0]["finish_reason"] in ("length", "stop")
        # The template's thread was stopped, not left running.
        time.sleep(0.1)
        assert not [t for t in threading.enumerate() if t.name == "glmoe-template"]
    finally:
        llm.close()


def test_llama_renders_a_good_template_under_the_bounds(tmp_path):
    """The bounds change nothing for a template that stays within them: the prompt is the one the
    template makes, and chat_template_kwargs reach it (but not over the chat's own variables)."""
    template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{{ extra }}{% endif %}")
    llm = glmoe.Llama(str(_with_template(tmp_path, template)), n_ctx=64, n_threads=1, verbose=False)
    try:
        from glmoe.chat import chat_prompt

        assert chat_prompt(llm, [{"role": "user", "content": "hi"}], template_kwargs={"extra": "!"}) == \
            "<|user|>hi<|assistant|>!"
        with pytest.raises(ValueError, match="chat_template_kwargs: 'messages' is set by the chat call itself"):
            llm.create_chat_completion([{"role": "user", "content": "hi"}], chat_template_kwargs={"messages": []})
    finally:
        llm.close()


@pytest.fixture(scope="module")
def template_servers(tmp_path_factory):
    import server_harness as harness

    tmp = tmp_path_factory.mktemp("gguf-templates")
    servers = {"modes": harness.ServerProcess(str(_with_template(tmp, SERVER_TEMPLATE, "modes.gguf"))),
               "broken": harness.ServerProcess(str(_with_template(tmp, GGUF_TEMPLATES["does not compile"],
                                                                  "broken.gguf")))}
    yield servers
    for srv in servers.values():
        srv.stop()


def _chat(srv, **kw):
    import httpx

    body = dict({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, **kw)
    return httpx.post(srv.url + "/v1/chat/completions", json=body, headers=srv.headers(), timeout=60)


@pytest.mark.parametrize("mode", ["loop", "balloon", "huge", "raise", "internals", "recurse"])
def test_server_refuses_a_hostile_gguf_template(template_servers, mode):
    """The GGUF's own template (no --chat-template): a 400 within the 5 s render limit."""
    srv = template_servers["modes"]
    t0 = time.monotonic()
    r = _chat(srv, chat_template_kwargs={"mode": mode})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
    assert time.monotonic() - t0 < 10
    assert _chat(srv, chat_template_kwargs={"mode": "plain"}).status_code == 200


def test_server_with_a_template_that_does_not_compile(template_servers):
    import httpx

    srv = template_servers["broken"]
    r = _chat(srv)
    assert r.status_code == 400 and "chat template error: TemplateSyntaxError" in r.json()["error"]["message"], r.text
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "In the beginning", "max_tokens": 2},
                   headers=srv.headers(), timeout=60)
    assert r.status_code == 200, r.text
