"""Write GLM4-MoE GGUF files with random weights in llama.cpp's `glm4moe` layout (DESIGN.md section 2).

Library: `ModelSpec`, `write_model(path, spec, seed)`, the quantizers (`quantize`, `quantize_with_values`),
and the pieces shared with tools/convert_hf.py (`add_glm4moe_metadata`, `tensor_plan`, `write_gguf`).
CLI: `python tools/make_model.py OUT.gguf --preset tiny|small|air-2layer|air-8layer [overrides]`.

Files are written as a stream, tensor by tensor and chunk by chunk, so the 11 GB Air-shaped file
never sits in memory. Numpy array shapes here are row-major, i.e. reversed ggml `ne`.
"""
from __future__ import annotations

import argparse
import os
import dataclasses
import sys
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import gguf
from gguf import GGMLQuantizationType as QT

ARCH = "glm4moe"
QK_K = 256

TYPE_NAMES = {
    "f32": QT.F32, "f16": QT.F16, "bf16": QT.BF16, "q8_0": QT.Q8_0, "q4_0": QT.Q4_0,
    "q5_0": QT.Q5_0, "q4_k": QT.Q4_K, "q5_k": QT.Q5_K, "q6_k": QT.Q6_K,
}
# llama.cpp's fallback when a row is not a whole number of 256-element super-blocks.
K_FALLBACK = {QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_0, QT.Q6_K: QT.Q8_0}
FILE_TYPE = {
    QT.F32: 0, QT.F16: 1, QT.Q4_0: 2, QT.Q8_0: 7, QT.Q5_0: 8, QT.Q4_K: 15, QT.Q5_K: 17, QT.Q6_K: 18,
    QT.BF16: 32,
}


# ----------------------------------------------------------------------------------------------
# Quantizers. Each returns (packed uint8 blocks, the float32 values those blocks decode to); the
# second lets the tests check the packing bit-exactly against gguf.quants.dequantize.

def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def _safe_inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, 0, 1 / np.where(d == 0, 1, d)).astype(np.float32)


def _signed_absmax(blocks: np.ndarray) -> np.ndarray:
    """The element of largest magnitude, with its sign (so it can map to the most negative code)."""
    idx = np.abs(blocks).argmax(axis=-1)[..., None]
    return np.take_along_axis(blocks, idx, axis=-1)[..., 0]


def _q8_0(b: np.ndarray):
    d16 = _f16(np.abs(b).max(axis=1) / 127)
    d = d16.astype(np.float32)
    q = np.clip(np.round(b * _safe_inverse(d)[:, None]), -127, 127).astype(np.int8)
    packed = np.concatenate([d16.view(np.uint8).reshape(-1, 2), q.view(np.uint8)], axis=1)
    return packed, d[:, None] * q.astype(np.float32)


def _legacy_codes(b: np.ndarray, levels: int):
    """Q4_0/Q5_0: x = d*(q - levels/2) with the extreme element at code 0."""
    half = levels // 2
    d16 = _f16(_signed_absmax(b) / -half)
    d = d16.astype(np.float32)
    q = np.clip(np.round(b * _safe_inverse(d)[:, None]) + half, 0, levels - 1).astype(np.uint8)
    return d16, d, q, d[:, None] * (q.astype(np.float32) - half)


def _q4_0(b: np.ndarray):
    d16, _, q, values = _legacy_codes(b, 16)
    nibbles = q[:, :16] | (q[:, 16:] << 4)  # element j low nibble, element j+16 high nibble
    return np.concatenate([d16.view(np.uint8).reshape(-1, 2), nibbles], axis=1), values


def _q5_0(b: np.ndarray):
    d16, _, q, values = _legacy_codes(b, 32)
    high_bits = np.packbits((q >> 4) & 1, axis=1, bitorder="little")  # bit j = element j
    nibbles = (q[:, :16] & 15) | ((q[:, 16:] & 15) << 4)
    return np.concatenate([d16.view(np.uint8).reshape(-1, 2), high_bits, nibbles], axis=1), values


def _pack_k_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins into 12 bytes (Q4_K/Q5_K): the low 6 bits of sub-blocks 0-3 in
    bytes 0-7, sub-blocks 4-7 split as low nibbles in bytes 8-11 and top 2 bits above bytes 0-7."""
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    return out


def _k_min_codes(b: np.ndarray, levels: int):
    """Q4_K/Q5_K: 8 sub-blocks of 32, x = d*sc*q - dmin*m, sc and m 6-bit."""
    sub = b.reshape(-1, 8, 32)
    lo = np.minimum(sub.min(axis=2), 0)
    hi = np.maximum(sub.max(axis=2), 0)
    sub_scale, sub_min = (hi - lo) / (levels - 1), -lo
    d16, dmin16 = _f16(sub_scale.max(axis=1) / 63), _f16(sub_min.max(axis=1) / 63)
    d, dmin = d16.astype(np.float32), dmin16.astype(np.float32)
    # Round scales up so the sub-block range always fits in the codes.
    sc = np.clip(np.ceil(sub_scale * _safe_inverse(d)[:, None]), 0, 63).astype(np.uint8)
    m = np.clip(np.ceil(sub_min * _safe_inverse(dmin)[:, None]), 0, 63).astype(np.uint8)
    step = d[:, None] * sc.astype(np.float32)
    offset = dmin[:, None] * m.astype(np.float32)
    q = np.clip(np.round((sub + offset[..., None]) * _safe_inverse(step)[..., None]), 0, levels - 1).astype(np.uint8)
    values = (step[..., None] * q.astype(np.float32) - offset[..., None]).reshape(b.shape)
    head = np.concatenate([d16.view(np.uint8).reshape(-1, 2), dmin16.view(np.uint8).reshape(-1, 2),
                           _pack_k_scales(sc, m)], axis=1)
    return head, q, values


def _k_nibbles(q: np.ndarray) -> np.ndarray:
    """Sub-blocks 2c and 2c+1 share the 32 bytes of chunk c: low nibble, high nibble."""
    low = q & 15
    return (low[:, 0::2, :] | (low[:, 1::2, :] << 4)).reshape(q.shape[0], 128)


def _q4_k(b: np.ndarray):
    head, q, values = _k_min_codes(b, 16)
    return np.concatenate([head, _k_nibbles(q)], axis=1), values


def _q5_k(b: np.ndarray):
    head, q, values = _k_min_codes(b, 32)
    # Byte l of the 32 high-bit bytes holds bit 4 of element l of sub-block j at bit j.
    high = ((q >> 4) & 1).astype(np.uint8) << np.arange(8, dtype=np.uint8)[None, :, None]
    high_bits = np.bitwise_or.reduce(high, axis=1)
    return np.concatenate([head, high_bits, _k_nibbles(q)], axis=1), values


def _q6_k(b: np.ndarray):
    n = b.shape[0]
    sub = b.reshape(n, 16, 16)
    sub_scale = _signed_absmax(sub) / -32
    d16 = _f16(np.abs(sub_scale).max(axis=1) / 127)
    d = d16.astype(np.float32)
    sc = np.clip(np.round(sub_scale * _safe_inverse(d)[:, None]), -127, 127).astype(np.int8)
    step = d[:, None] * sc.astype(np.float32)
    q = np.clip(np.round(sub * _safe_inverse(step)[..., None]) + 32, 0, 63).astype(np.uint8)
    values = (step[..., None] * (q.astype(np.float32) - 32)).reshape(b.shape)
    # Each half of 128 elements: low nibbles of elements r and r+64 share a byte; the 2 high bits
    # of elements l, l+32, l+64, l+96 share a byte.
    halves = q.reshape(n, 2, 128)
    low, high = (halves & 15).reshape(n, 2, 2, 64), (halves >> 4).reshape(n, 2, 4, 32)
    ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(n, 128)
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(n, 64)
    packed = np.concatenate([ql, qh, sc.view(np.uint8), d16.view(np.uint8).reshape(-1, 2)], axis=1)
    return packed, values


def _bf16(x: np.ndarray):
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # nearest even
    return rounded.view(np.uint8), (rounded.astype(np.uint32) << 16).view(np.float32)


_BLOCK_QUANTIZERS: dict[QT, Callable] = {
    QT.Q8_0: _q8_0, QT.Q4_0: _q4_0, QT.Q5_0: _q5_0, QT.Q4_K: _q4_k, QT.Q5_K: _q5_k, QT.Q6_K: _q6_k,
}


def quantize_with_values(x: np.ndarray, qtype: QT) -> tuple[np.ndarray, np.ndarray]:
    """Quantize rows (last axis) of x. Returns (uint8 array of shape x.shape[:-1] + (bytes per row,)
    for block types / the raw float array for F32/F16, the values it decodes to as float32)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if qtype == QT.F32:
        return x, x
    if qtype == QT.F16:
        h = x.astype(np.float16)
        return h, h.astype(np.float32)
    if qtype == QT.BF16:
        raw, values = _bf16(x)
        return raw.reshape(*x.shape[:-1], x.shape[-1] * 2), values.reshape(x.shape)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if x.shape[-1] % block:
        raise ValueError(f"row length {x.shape[-1]} is not a multiple of {qtype.name}'s block {block}")
    packed, values = _BLOCK_QUANTIZERS[qtype](x.reshape(-1, block))
    return packed.reshape(*x.shape[:-1], x.shape[-1] // block * type_size), values.reshape(x.shape)


def quantize(x: np.ndarray, qtype: QT) -> np.ndarray:
    return quantize_with_values(x, qtype)[0]


def random_blocks(rng: np.random.Generator, shape: Sequence[int], qtype: QT, std: float) -> np.ndarray:
    """Random encoded data with values of roughly zero mean and the given std, without quantizing
    floats (for the multi-GB presets): random code bytes, then sane scale fields written over them.
    Float types are just random normals."""
    if qtype in (QT.F32, QT.F16, QT.BF16):
        x = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
        return quantize(x, qtype)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = int(np.prod(shape)) // block
    out = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)

    def put_f16(col: int, value: float | np.ndarray):
        out[:, col:col + 2] = np.broadcast_to(np.float16(value), (n_blocks,)).astype(np.float16).view(np.uint8).reshape(-1, 2)

    # rms of a uniform code q - mean: 4.61 (4 bits), 9.23 (5 bits), 18.5 (6 bits), 73.9 (int8).
    if qtype == QT.Q8_0:
        put_f16(0, std / 73.9)
    elif qtype == QT.Q4_0:
        put_f16(0, std / 4.61)
    elif qtype == QT.Q5_0:
        put_f16(0, std / 9.23)
    elif qtype in (QT.Q4_K, QT.Q5_K):
        # sc = m in [32, 63] (rms ~48) and dmin = mid-code * d, so each sub-block is centred.
        sc = rng.integers(32, 64, size=(n_blocks, 8), dtype=np.uint8)
        code_rms, mid = (4.61, 7.5) if qtype == QT.Q4_K else (9.23, 15.5)
        d = std / (code_rms * 48.0)
        put_f16(0, d)
        put_f16(2, mid * d)
        out[:, 4:16] = _pack_k_scales(sc, sc)
    elif qtype == QT.Q6_K:
        out[:, 192:208] = rng.integers(64, 128, size=(n_blocks, 16), dtype=np.uint8)  # int8 scales, rms ~97
        put_f16(208, std / (18.5 * 97.0))
    else:
        raise ValueError(f"no random blocks for {qtype.name}")
    return out.reshape(*shape[:-1], shape[-1] // block * type_size)


def effective_type(requested: QT, row_length: int) -> QT:
    """The requested type, or llama.cpp's fallback when the row does not fit its block size."""
    qtype = requested
    if row_length % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = K_FALLBACK.get(qtype, qtype)
    if row_length % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = QT.F16
    return qtype


def nbytes_of(shape: Sequence[int], qtype: QT) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * type_size


# ----------------------------------------------------------------------------------------------
# Model description

@dataclass
class ModelSpec:
    vocab: int = 512
    hidden: int = 64
    n_layers: int = 3                  # trunk layers (block_count = n_layers + nextn_layers)
    n_dense_leading: int = 1
    n_head: int = 4
    n_head_kv: int | list[int] = 2     # a list (one per block incl. nextn) is written as an array
    head_dim: int = 16
    n_rot: int = 8
    ffn: int = 128                     # dense FFN width
    expert_ffn: int = 32
    n_experts: int = 8
    n_used: int | list[int] = 2        # a list (one per block) is written as an array
    n_shared: int = 1
    n_groups: int = 0                  # > 1: group-limited routing
    n_group_used: int = 0
    qk_norm: bool = False
    tied_output: bool = False          # omit `output`, logits use token_embd
    per_layer_arrays: bool = False     # write head_count, head_count_kv, expert_used_count as arrays
    nextn_layers: int = 0              # MTP blocks after the trunk, counted in block_count
    nextn_tensors: bool = True         # write the MTP blocks' tensors (False: only the count)
    weights_scale: float = 1.0
    weights_norm: bool = True
    rope_base: float = 1_000_000.0
    rms_eps: float = 1e-5
    context_length: int = 131072
    name: str = "glmoe-random"
    # Weight types by tensor class; None = default_type. Row lengths that do not fit a K-quant's
    # 256-element blocks fall back as llama.cpp does (Q4_K/Q5_K -> Q5_0, Q6_K -> Q8_0).
    default_type: str = "f32"
    attn_type: str | None = None       # attn_q/k/v/output
    expert_type: str | None = None     # ffn_*_exps
    ffn_type: str | None = None        # dense ffn_* and ffn_*_shexp
    embd_type: str | None = None       # token_embd (and nextn.embed_tokens)
    output_type: str | None = None     # output (and nextn.shared_head_head)
    random_blocks: bool = False        # random encoded blocks instead of quantized random floats

    @property
    def block_count(self) -> int:
        return self.n_layers + self.nextn_layers

    def per_layer(self, value: int | list[int], layer: int) -> int:
        return value[layer] if isinstance(value, (list, tuple)) else value

    def type_of(self, cls: str) -> QT:
        name = getattr(self, f"{cls}_type", None) if cls != "default" else None
        return TYPE_NAMES[(name or self.default_type).lower()]


PRESETS: dict[str, dict] = {
    "tiny": dict(vocab=512, hidden=64, n_layers=3, n_dense_leading=1, n_head=4, n_head_kv=2, head_dim=16,
                 n_rot=8, ffn=128, expert_ffn=32, n_experts=8, n_used=2, n_shared=1),
    # Widths multiple of 256 so every K-quant applies without fallback.
    "small": dict(vocab=1024, hidden=256, n_layers=4, n_dense_leading=1, n_head=8, n_head_kv=2, head_dim=32,
                  n_rot=16, ffn=512, expert_ffn=256, n_experts=16, n_used=4, n_shared=1, n_groups=4,
                  n_group_used=2, qk_norm=True, weights_scale=2.5, default_type="q8_0", expert_type="q4_k",
                  embd_type="q6_k", output_type="q6_k"),
}
_AIR = dict(vocab=151552, hidden=4096, n_dense_leading=1, n_head=96, n_head_kv=8, head_dim=128, n_rot=64,
            ffn=10944, expert_ffn=1408, n_experts=128, n_used=8, n_shared=1, weights_scale=1.0,
            weights_norm=True, rope_base=1_000_000.0, name="GLM-4.5-Air-shaped random",
            default_type="q8_0", expert_type="q4_k", random_blocks=True)
PRESETS["air-2layer"] = dict(_AIR, n_layers=2)
PRESETS["air-8layer"] = dict(_AIR, n_layers=8)


# ----------------------------------------------------------------------------------------------
# Metadata (shared with convert_hf.py)

BYTE_TOKEN_MERGES = ["Ġ t", "h e", "i n", "Ġt he", "e r", "a n", "o n", "Ġ a", "r e", "e n"]
GLM_SPECIAL_TOKENS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>",
                      "<|user|>", "<|assistant|>", "<|observation|>", "<think>", "</think>"]
# The chat template GLM-4.6 ships with (zai-org), so made models format chats as the real ones.
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "glm4moe_chat_template.jinja"), encoding="utf-8") as _f:
    CHAT_TEMPLATE = _f.read()


def gpt2_byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each byte value 0..255 (byte-level BPE)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def synthetic_vocab(vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """Tokens, token types and merges: byte tokens, a few merged tokens, fillers, GLM specials last."""
    n_normal = vocab_size - len(GLM_SPECIAL_TOKENS)
    if n_normal < 1:
        raise ValueError(f"vocab {vocab_size} is too small: the GLM special tokens alone need {len(GLM_SPECIAL_TOKENS)}")
    # A vocab under 278 keeps only the first byte tokens (fine for tests that feed token ids; not
    # every text can be tokenized then).
    tokens = (gpt2_byte_alphabet() + [m.replace(" ", "") for m in BYTE_TOKEN_MERGES])[:n_normal]
    present = set(tokens)
    merges = [m for m in BYTE_TOKEN_MERGES
              if all(part in present for part in m.split(" ")) and m.replace(" ", "") in present]
    if not merges and n_normal >= 3:
        # llama.cpp refuses a BPE vocabulary without tokenizer.ggml.merges, and gguf-py writes no
        # empty array: one merge of the first two byte tokens takes the last slot.
        tokens[n_normal - 1] = tokens[0] + tokens[1]
        merges = [f"{tokens[0]} {tokens[1]}"]
    tokens += [f"<filler_{i}>" for i in range(n_normal - len(tokens))] + GLM_SPECIAL_TOKENS
    types = [int(gguf.TokenType.NORMAL)] * n_normal + [int(gguf.TokenType.CONTROL)] * len(GLM_SPECIAL_TOKENS)
    return tokens, types, merges


def add_glm4moe_metadata(w: gguf.GGUFWriter, spec: ModelSpec,
                         vocab: tuple[list[str], list[int], list[str]] | None = None) -> None:
    """All general.*, glm4moe.* and tokenizer.* keys for a spec. `vocab` (tokens, token types,
    merges; must hold GLM_SPECIAL_TOKENS) replaces the synthetic vocabulary, e.g. a trained one."""
    w.add_name(spec.name)
    w.add_file_type(FILE_TYPE.get(spec.type_of("default"), 0))
    w.add_block_count(spec.block_count)
    w.add_context_length(spec.context_length)
    w.add_embedding_length(spec.hidden)
    w.add_feed_forward_length(spec.ffn)
    arrays = spec.per_layer_arrays
    layers = range(spec.block_count)
    w.add_head_count([spec.n_head] * spec.block_count if arrays else spec.n_head)
    if arrays or isinstance(spec.n_head_kv, (list, tuple)):
        w.add_head_count_kv([spec.per_layer(spec.n_head_kv, i) for i in layers])
    else:
        w.add_head_count_kv(spec.n_head_kv)
    w.add_key_length(spec.head_dim)
    w.add_value_length(spec.head_dim)
    w.add_rope_dimension_count(spec.n_rot)
    w.add_rope_freq_base(spec.rope_base)
    w.add_layer_norm_rms_eps(spec.rms_eps)
    w.add_expert_count(spec.n_experts)
    if arrays or isinstance(spec.n_used, (list, tuple)):
        # gguf-py has no array form of this helper; the key is the same.
        w.add_array(gguf.Keys.LLM.EXPERT_USED_COUNT.format(arch=ARCH),
                    [spec.per_layer(spec.n_used, i) for i in layers])
    else:
        w.add_expert_used_count(spec.n_used)
    w.add_expert_shared_count(spec.n_shared)
    w.add_expert_feed_forward_length(spec.expert_ffn)
    w.add_leading_dense_block_count(spec.n_dense_leading)
    w.add_expert_weights_scale(spec.weights_scale)
    w.add_expert_weights_norm(spec.weights_norm)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    if spec.n_groups > 1:
        w.add_expert_group_count(spec.n_groups)
        w.add_expert_group_used_count(spec.n_group_used)
    w.add_nextn_predict_layers(spec.nextn_layers)

    tokens, types, merges = vocab or synthetic_vocab(spec.vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("glm4")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    special = {t: tokens.index(t) for t in GLM_SPECIAL_TOKENS}
    w.add_bos_token_id(special["[gMASK]"])
    w.add_eos_token_id(special["<|endoftext|>"])
    w.add_eot_token_id(special["<|user|>"])
    w.add_eom_token_id(special["<|observation|>"])
    w.add_unk_token_id(special["<|endoftext|>"])
    w.add_pad_token_id(special["<|endoftext|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)


# ----------------------------------------------------------------------------------------------
# Tensor plan: name, numpy shape, type class, how to fill it. Shared with convert_hf.py, which
# supplies the values from the checkpoint instead of random ones.

@dataclass
class TensorSpec:
    name: str
    shape: tuple[int, ...]     # numpy order (reversed ggml ne)
    cls: str                   # "norm" (always F32), "attn", "expert", "ffn", "embd", "output", "default"
    std: float = 0.0           # random weights: N(0, std); norms: 1 + N(0, std)
    kind: str = "weight"       # "weight", "norm", "bias", "router_bias"


def tensor_plan(spec: ModelSpec, include_nextn_tensors: bool | None = None) -> list[TensorSpec]:
    H, D, V = spec.hidden, spec.head_dim, spec.vocab
    # Embeddings of std 1 give O(1) activations; a tied output reuses them, and then std H^-1/2
    # keeps the logits O(1) as well.
    plan = [TensorSpec("token_embd.weight", (V, H), "embd", H ** -0.5 if spec.tied_output else 1.0),
            TensorSpec("output_norm.weight", (H,), "norm", 0.1, "norm")]
    if not spec.tied_output:
        plan.append(TensorSpec("output.weight", (V, H), "output", H ** -0.5))
    with_nextn = spec.nextn_tensors if include_nextn_tensors is None else include_nextn_tensors
    n_blocks = spec.block_count if with_nextn else spec.n_layers
    for il in range(n_blocks):
        p = f"blk.{il}."
        nkv = spec.per_layer(spec.n_head_kv, il)
        q_out, kv_out = spec.n_head * D, nkv * D
        plan += [
            TensorSpec(p + "attn_norm.weight", (H,), "norm", 0.1, "norm"),
            TensorSpec(p + "attn_q.weight", (q_out, H), "attn", H ** -0.5),
            TensorSpec(p + "attn_q.bias", (q_out,), "norm", 0.1, "bias"),
            TensorSpec(p + "attn_k.weight", (kv_out, H), "attn", H ** -0.5),
            TensorSpec(p + "attn_k.bias", (kv_out,), "norm", 0.1, "bias"),
            TensorSpec(p + "attn_v.weight", (kv_out, H), "attn", H ** -0.5),
            TensorSpec(p + "attn_v.bias", (kv_out,), "norm", 0.1, "bias"),
        ]
        if spec.qk_norm:
            plan += [TensorSpec(p + "attn_q_norm.weight", (D,), "norm", 0.1, "norm"),
                     TensorSpec(p + "attn_k_norm.weight", (D,), "norm", 0.1, "norm")]
        plan += [TensorSpec(p + "attn_output.weight", (H, q_out), "attn", q_out ** -0.5),
                 TensorSpec(p + "post_attention_norm.weight", (H,), "norm", 0.1, "norm")]
        if il < spec.n_dense_leading:
            F = spec.ffn
            plan += [TensorSpec(p + "ffn_gate.weight", (F, H), "ffn", H ** -0.5),
                     TensorSpec(p + "ffn_up.weight", (F, H), "ffn", H ** -0.5),
                     TensorSpec(p + "ffn_down.weight", (H, F), "ffn", F ** -0.5)]
        else:
            E, Fe, S = spec.n_experts, spec.expert_ffn, spec.n_shared
            plan += [TensorSpec(p + "ffn_gate_inp.weight", (E, H), "norm", H ** -0.5),
                     TensorSpec(p + "exp_probs_b.bias", (E,), "norm", 0.05, "router_bias"),
                     TensorSpec(p + "ffn_gate_exps.weight", (E, Fe, H), "expert", H ** -0.5),
                     TensorSpec(p + "ffn_up_exps.weight", (E, Fe, H), "expert", H ** -0.5),
                     TensorSpec(p + "ffn_down_exps.weight", (E, H, Fe), "expert", Fe ** -0.5)]
            if S > 0:
                plan += [TensorSpec(p + "ffn_gate_shexp.weight", (Fe * S, H), "ffn", H ** -0.5),
                         TensorSpec(p + "ffn_up_shexp.weight", (Fe * S, H), "ffn", H ** -0.5),
                         TensorSpec(p + "ffn_down_shexp.weight", (H, Fe * S), "ffn", (Fe * S) ** -0.5)]
        if il >= spec.n_layers:  # MTP block extras
            plan += [TensorSpec(p + "nextn.eh_proj.weight", (H, 2 * H), "default", (2 * H) ** -0.5),
                     TensorSpec(p + "nextn.enorm.weight", (H,), "norm", 0.1, "norm"),
                     TensorSpec(p + "nextn.hnorm.weight", (H,), "norm", 0.1, "norm"),
                     TensorSpec(p + "nextn.shared_head_norm.weight", (H,), "norm", 0.1, "norm")]
    return plan


def storage_type(spec: ModelSpec, t: TensorSpec) -> QT:
    if t.cls == "norm":
        return QT.F32
    return effective_type(spec.type_of(t.cls), t.shape[-1])


ChunkSource = Callable[[], Iterator[np.ndarray]]


def write_gguf(path: str, spec: ModelSpec, tensors: list[tuple[str, tuple[int, ...], QT, ChunkSource]],
               vocab: tuple[list[str], list[int], list[str]] | None = None) -> None:
    """Stream a GGUF: header, metadata and tensor infos first, then each tensor's data from its
    chunk source (encoded arrays in row order), so memory holds one chunk at a time. `vocab` is
    add_glm4moe_metadata's (default: the synthetic one)."""
    w = gguf.GGUFWriter(path, ARCH)
    add_glm4moe_metadata(w, spec, vocab)
    for name, shape, qtype, _ in tensors:
        # With raw_dtype and a non-uint8 dtype, gguf-py takes `shape` as the element shape.
        w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes_of(shape, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    fout = w.fout[0]
    for name, shape, qtype, source in tensors:
        w.write_padding(fout, fout.tell())
        written = 0
        for chunk in source():
            chunk = np.ascontiguousarray(chunk)
            chunk.tofile(fout)
            written += chunk.nbytes
        if written != nbytes_of(shape, qtype):
            raise RuntimeError(f"{name}: wrote {written} bytes, expected {nbytes_of(shape, qtype)}")
    w.write_padding(fout, fout.tell())
    w.close()


def _random_source(spec: ModelSpec, t: TensorSpec, qtype: QT, seed_seq: np.random.SeedSequence) -> ChunkSource:
    def chunks() -> Iterator[np.ndarray]:
        rng = np.random.default_rng(seed_seq)
        if t.kind != "weight":
            x = rng.standard_normal(t.shape) * t.std
            yield (x + 1.0 if t.kind == "norm" else x).astype(np.float32)
            return
        # One expert (or ~16M elements of rows) per chunk keeps memory bounded.
        outer = t.shape[0] if len(t.shape) == 3 else 1
        inner_shape = t.shape[1:] if len(t.shape) == 3 else t.shape
        rows_per_chunk = max(1, (1 << 24) // inner_shape[-1])
        for _ in range(outer):
            for r0 in range(0, inner_shape[0], rows_per_chunk):
                shape = (min(rows_per_chunk, inner_shape[0] - r0), inner_shape[-1])
                if spec.random_blocks:
                    yield random_blocks(rng, shape, qtype, t.std)
                else:
                    yield quantize(rng.standard_normal(shape, dtype=np.float32) * np.float32(t.std), qtype)
    return chunks


def write_model(path: str, spec: ModelSpec, seed: int = 0) -> None:
    plan = tensor_plan(spec)
    # One independent stream per tensor, so a tensor's values do not depend on the type mix.
    seeds = np.random.SeedSequence(seed).spawn(len(plan))
    tensors = []
    for t, s in zip(plan, seeds):
        qtype = storage_type(spec, t)
        tensors.append((t.name, t.shape, qtype, _random_source(spec, t, qtype, s)))
    write_gguf(path, spec, tensors)


# ----------------------------------------------------------------------------------------------
# CLI

def _int_or_list(text: str) -> int | list[int]:
    parts = [int(p) for p in text.split(",")]
    return parts[0] if len(parts) == 1 else parts


def spec_from_args(argv: Sequence[str] | None = None) -> tuple[str, ModelSpec, int]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    flags = {
        "vocab": int, "hidden": int, "n_layers": int, "n_dense_leading": int, "n_head": int,
        "n_head_kv": _int_or_list, "head_dim": int, "n_rot": int, "ffn": int, "expert_ffn": int,
        "n_experts": int, "n_used": _int_or_list, "n_shared": int, "n_groups": int, "n_group_used": int,
        "nextn_layers": int, "weights_scale": float, "rope_base": float, "rms_eps": float,
        "context_length": int, "name": str,
    }
    for key, kind in flags.items():
        ap.add_argument("--" + key.replace("_", "-"), type=kind, help="comma list = per-layer array"
                        if kind is _int_or_list else None)
    for key in ("qk_norm", "tied_output", "per_layer_arrays", "nextn_tensors", "weights_norm", "random_blocks"):
        ap.add_argument("--" + key.replace("_", "-"), action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--type", dest="default_type", choices=sorted(TYPE_NAMES))
    for cls in ("attn", "expert", "ffn", "embd", "output"):
        ap.add_argument(f"--{cls}-type", dest=f"{cls}_type", choices=sorted(TYPE_NAMES))
    args = ap.parse_args(argv)
    values = dict(PRESETS[args.preset])
    for f in dataclasses.fields(ModelSpec):
        if getattr(args, f.name, None) is not None:
            values[f.name] = getattr(args, f.name)
    return args.out, ModelSpec(**values), args.seed


def main(argv: Sequence[str] | None = None) -> None:
    out, spec, seed = spec_from_args(argv)
    write_model(out, spec, seed)
    print(f"wrote {out}: {spec}", file=sys.stderr)


if __name__ == "__main__":
    main()
