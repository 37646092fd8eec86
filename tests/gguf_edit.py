"""Copy a GGUF file with edits (for tests of bad model files), using gguf-py only."""
from __future__ import annotations

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter


def copy_gguf(src: str, dst: str, *, drop_keys=(), set_keys=None, drop_tensors=(), replace_tensors=None,
              raw_tensors=None):
    """Writes dst = src with metadata keys dropped/overridden and tensors dropped/replaced.

    set_keys: {key: (value, GGUFValueType)}; replace_tensors: {name: f32 np.ndarray};
    raw_tensors: {name: (uint8 block bytes, GGMLQuantizationType)} replace or add tensors as given.
    """
    raw_tensors = raw_tensors or {}
    set_keys = set_keys or {}
    replace_tensors = replace_tensors or {}
    r = GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    if "general.architecture" in set_keys:
        arch = set_keys["general.architecture"][0]
    w = GGUFWriter(dst, arch)
    for name, field in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in drop_keys or name in set_keys:
            continue
        vtype = field.types[0]
        value = field.contents()
        if vtype == GGUFValueType.ARRAY:
            w.add_key_value(name, value, vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(name, value, vtype)
    for name, (value, vtype) in set_keys.items():
        if name != "general.architecture":
            w.add_key_value(name, value, vtype)
    for t in r.tensors:
        if t.name in drop_tensors or t.name in raw_tensors:
            continue
        if t.name in replace_tensors:
            w.add_tensor(t.name, np.asarray(replace_tensors[t.name], dtype=np.float32))
            continue
        shape = [int(n) for n in reversed(t.shape.tolist())]
        data = np.asarray(t.data)
        if data.dtype == np.uint8:  # quantized: raw bytes, shape in bytes
            w.add_tensor(t.name, data, raw_dtype=t.tensor_type)
        else:
            w.add_tensor(t.name, data.reshape(shape), raw_dtype=t.tensor_type)
    for name, (raw, qtype) in raw_tensors.items():
        w.add_tensor(name, raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
