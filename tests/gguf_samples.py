"""Sample GGUF files for the reader tests.

`write_rich_sample` uses gguf-py's GGUFWriter (a "real" file). `RawGGUF` encodes files byte by
byte, for what GGUFWriter refuses to write (empty and deeply nested arrays, hostile fields) and
for large files written faster than GGUFWriter can.
"""
import struct

import numpy as np
import gguf
from gguf import GGMLQuantizationType as QT, GGUFValueType as VT

# Scalar value types and their struct formats (little-endian).
SCALAR_FMT = {
    VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I",
    VT.INT32: "<i", VT.FLOAT32: "<f", VT.BOOL: "<?", VT.UINT64: "<Q", VT.INT64: "<q",
    VT.FLOAT64: "<d",
}

HUGE_U64 = [2**63 - 1, 2**64 - 1, 2**63, 2**40, 2**32, 2**32 - 1]


def write_rich_sample(path, alignment=None, with_tensors=True):
    """Every metadata value type and several tensor types, quantized ones as raw bytes."""
    w = gguf.GGUFWriter(str(path), "testarch")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_uint8("t.u8", 255)
    w.add_int8("t.i8", -128)
    w.add_uint16("t.u16", 65535)
    w.add_int16("t.i16", -32768)
    w.add_uint32("t.u32", 2**32 - 1)
    w.add_int32("t.i32", -(2**31))
    w.add_uint64("t.u64", 2**64 - 1)
    w.add_uint64("t.u64_big", 2**63 + 12345)
    w.add_int64("t.i64", -(2**63))
    w.add_float32("t.f32", 1.5)
    w.add_float64("t.f64", 0.1)
    w.add_bool("t.true", True)
    w.add_bool("t.false", False)
    w.add_string("t.utf8", "héllo wörld ✓ 日本 🎉")
    w.add_string("t.nul", "a\x00b\x00")
    w.add_array("t.arr_i32", [1, -2, 3, 2**31 - 1])
    w.add_array("t.arr_f32", [0.5, -1.25, 3.0])
    w.add_array("t.arr_str", ["alpha", "", "γάμμα", "x" * 300])
    w.add_array("t.arr_bool", [True, False, True])
    w.add_key_value("t.arr_u64", [0, 2**64 - 1, 2**63], VT.ARRAY, sub_type=VT.UINT64)
    w.add_key_value("t.arr_f64", [1e300, -0.0, 2.5], VT.ARRAY, sub_type=VT.FLOAT64)
    w.add_key_value("t.arr_u8", [0, 7, 255], VT.ARRAY, sub_type=VT.UINT8)
    w.add_key_value("t.arr_i16", [-1, 2], VT.ARRAY, sub_type=VT.INT16)
    w.add_key_value("t.nested", [[1, 2], [3], [4, 5, 6]], VT.ARRAY, sub_type=VT.ARRAY)
    if with_tensors:
        rng = np.random.default_rng(0)
        w.add_tensor("f32.weight", rng.standard_normal((3, 5)).astype(np.float32))
        w.add_tensor("f16.weight", rng.standard_normal((2, 7)).astype(np.float16))
        # Quantized tensors as raw bytes: rows of whole blocks (Q4_K: 256 el / 144 B).
        w.add_tensor("q4k.weight", rng.integers(0, 256, (4, 2 * 144), dtype=np.uint8),
                     raw_dtype=QT.Q4_K)
        w.add_tensor("q8_0.weight", rng.integers(0, 256, (3, 2 * 34), dtype=np.uint8),
                     raw_dtype=QT.Q8_0)
        w.add_tensor("q6k.3d", rng.integers(0, 256, (2, 3, 210), dtype=np.uint8),
                     raw_dtype=QT.Q6_K)
        w.add_tensor("vec", np.arange(1, 10, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def u64_field_offsets(path):
    """Absolute offsets of every uint64 field in the header region (counts, lengths, dims,
    tensor offsets), found with gguf-py's reader: the targets for huge-value overwrites."""
    r = gguf.GGUFReader(str(path))
    out = [8, 16]  # n_tensors, n_kv
    fields = list(r.fields.values())[3:]  # the first three are the header's own fields
    fields += [t.field for t in r.tensors]
    for f in fields:
        pos = f.offset
        for part in f.parts:
            if part.dtype == np.uint64 and part.size == 1:
                out.append(pos)
            pos += part.nbytes
    return out


class RawGGUF:
    """Byte-level GGUF encoder. Values are (VT, value); arrays are (VT.ARRAY, (elem_vt, items))."""

    def __init__(self, version=3, alignment=32):
        self.version = version
        self.alignment = alignment
        self.kv = []       # (key bytes, encoded value with type)
        self.tensors = []  # (name, ne, type, offset or None, data bytes)

    @staticmethod
    def enc_str(s):
        b = s.encode() if isinstance(s, str) else bytes(s)
        return struct.pack("<Q", len(b)) + b

    @classmethod
    def enc_value(cls, vt, v):
        if vt in SCALAR_FMT:
            return struct.pack(SCALAR_FMT[vt], v)
        if vt == VT.STRING:
            return cls.enc_str(v)
        elem_vt, items = v
        head = struct.pack("<IQ", elem_vt, len(items))
        if elem_vt == VT.STRING:
            return head + b"".join(cls.enc_str(s) for s in items)
        return head + b"".join(cls.enc_value(elem_vt, x) for x in items)

    def add(self, key, vt, v):
        self.kv.append((key, struct.pack("<I", vt) + self.enc_value(vt, v)))
        return self

    def add_raw(self, key, encoded):
        """A value whose type and bytes are given as-is (for hostile encodings)."""
        self.kv.append((key, encoded))
        return self

    def add_tensor(self, name, ne, ggml_type=0, offset=None, data=None):
        if data is None:
            data = bytes(self.nbytes(ne, ggml_type))
        self.tensors.append((name, list(ne), ggml_type, offset, data))
        return self

    @staticmethod
    def nbytes(ne, ggml_type):
        block, size = gguf.GGML_QUANT_SIZES[QT(ggml_type)]
        n = 1
        for d in ne:
            n *= d
        return n // block * size

    def build(self, n_tensors=None, n_kv=None):
        pad = lambda n: (-n) % self.alignment  # noqa: E731
        head = b"GGUF" + struct.pack("<IQQ", self.version,
                                     len(self.tensors) if n_tensors is None else n_tensors,
                                     len(self.kv) if n_kv is None else n_kv)
        body = b"".join(self.enc_str(k) + v for k, v in self.kv)
        infos, data, next_offset = [], b"", 0
        for name, ne, t, offset, payload in self.tensors:
            if offset is None:
                offset = next_offset
            infos.append(self.enc_str(name) + struct.pack("<I", len(ne))
                         + b"".join(struct.pack("<q", d) for d in ne)
                         + struct.pack("<IQ", t, offset))
            # Data is laid out in order; explicit offsets only change what the info claims.
            data += payload + bytes(pad(len(payload)))
            next_offset = len(data)
        out = head + body + b"".join(infos)
        return out + bytes(pad(len(out))) + data
