"""Bytes one generated token reads from GPU memory, for a GLM4-MoE GGUF file at given KV depths,
and the bandwidth that a measured generation speed implies.

A decode step reads every non-expert weight once (attention, norms, router, shared expert, dense
layers, the output head), n_used of the n_expert routed experts of each MoE layer, one embedding
row, and the K and V of every cached position in every layer (f16 unless --ctk/--ctv say
otherwise: bytes per 32 values f16/bf16 64, q8_0 34, q4_0 18).

    python tools/decode_bytes.py MODEL.gguf --depth 0 4096 16384 65536 [--tg 620 580 540 380] [--ctk q8_0 --ctv q8_0]
"""
from __future__ import annotations

import argparse

import numpy as np
from gguf import GGUFReader


def _field(reader: GGUFReader, key: str):
    f = reader.fields.get(key)
    if f is None:
        return None
    v = f.parts[f.data[0]]
    return v.tolist()[0] if len(v) == 1 else v.tolist()


# Bytes per 32 values of each KV cache type (llama.cpp's block layouts).
KV_BYTES_PER_32 = {"f32": 128, "f16": 64, "bf16": 64, "q8_0": 34, "q4_0": 18}


def decode_bytes(path: str, depths: list[int], ctk: str = "f16", ctv: str = "f16") -> dict[int, float]:
    r = GGUFReader(path)
    n_layer = int(_field(r, "glm4moe.block_count")) - int(_field(r, "glm4moe.nextn_predict_layers") or 0)
    n_expert = int(_field(r, "glm4moe.expert_count") or 0)
    n_used = int(_field(r, "glm4moe.expert_used_count") or 0)
    head_dim = int(_field(r, "glm4moe.attention.key_length") or 0) or (
        int(_field(r, "glm4moe.embedding_length")) // int(_field(r, "glm4moe.attention.head_count")))
    n_kv = _field(r, "glm4moe.attention.head_count_kv")
    n_kv = np.broadcast_to(np.asarray(n_kv), (n_layer,))
    weights = 0.0
    for t in r.tensors:
        name = t.name
        if name.startswith("blk."):
            if int(name.split(".")[1]) >= n_layer:
                continue  # MTP block: not run by plain decoding
            if "_exps" in name:
                weights += t.n_bytes * n_used / n_expert
                continue
        if name == "token_embd.weight":
            weights += t.n_bytes / t.shape[-1]  # one row
            if not any(x.name == "output.weight" for x in r.tensors):
                weights += t.n_bytes  # tied output head
            continue
        weights += t.n_bytes
    per_value = (KV_BYTES_PER_32[ctk] + KV_BYTES_PER_32[ctv]) / 32  # K and V
    kv_per_pos = sum(int(k) * head_dim * per_value for k in n_kv)
    return {d: weights + d * kv_per_pos for d in depths}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--depth", type=int, nargs="+", default=[0])
    ap.add_argument("--tg", type=float, nargs="*", help="measured tokens/s at each depth")
    ap.add_argument("--copy-gbs", type=float, help="measured device copy bandwidth, GB/s (read + write)")
    ap.add_argument("--ctk", "--cache-type-k", choices=sorted(KV_BYTES_PER_32), default="f16", help="K cache type")
    ap.add_argument("--ctv", "--cache-type-v", choices=sorted(KV_BYTES_PER_32), default="f16", help="V cache type")
    args = ap.parse_args()
    if args.tg and len(args.tg) != len(args.depth):
        ap.error("give one --tg value per --depth")
    per = decode_bytes(args.model, args.depth, args.ctk, args.ctv)
    for i, d in enumerate(args.depth):
        line = f"depth {d:6d}: {per[d] / 1e9:.3f} GB per token"
        if args.tg:
            gbs = per[d] * args.tg[i] / 1e9
            line += f", {args.tg[i]:.1f} t/s -> {gbs:.0f} GB/s"
            if args.copy_gbs:
                line += f" ({100 * gbs / args.copy_gbs:.0f}% of copy bandwidth)"
        print(line)


if __name__ == "__main__":
    main()
