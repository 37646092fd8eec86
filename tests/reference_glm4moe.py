"""Independent float64 reference of the GLM4-MoE forward (DESIGN.md section 3).

Reads the GGUF with gguf-py's GGUFReader and dequantizes with gguf.quants.dequantize; shares no
code with the engine or with tools/make_model.py, so agreement means both got the format and the
math right. Written for clarity, not speed: plain numpy over whole sequences.
"""
from __future__ import annotations

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


class ReferenceModel:
    def __init__(self, path: str):
        self.reader = GGUFReader(path)
        self.fields = self.reader.fields
        self.tensors = {t.name: t for t in self.reader.tensors}
        self._cache: dict[str, np.ndarray] = {}
        arch = self._value("general.architecture")
        if arch != "glm4moe":
            raise ValueError(f"not a glm4moe file: {arch}")
        key = lambda k: f"glm4moe.{k}"  # noqa: E731
        self.block_count = self._value(key("block_count"))
        self.nextn = self._value(key("nextn_predict_layers"), 0)
        self.n_layers = self.block_count - self.nextn  # the trunk; MTP blocks are not run
        self.hidden = self._value(key("embedding_length"))
        self.n_head = self._per_layer(key("attention.head_count"))
        self.n_head_kv = self._per_layer(key("attention.head_count_kv"))
        self.head_dim = self._value(key("attention.key_length"))
        self.n_rot = self._value(key("rope.dimension_count"), self.head_dim)
        self.rope_base = float(self._value(key("rope.freq_base"), 10000.0))
        self.eps = float(self._value(key("attention.layer_norm_rms_epsilon")))
        self.n_experts = self._value(key("expert_count"))
        self.n_used = self._per_layer(key("expert_used_count"))
        self.n_dense = self._value(key("leading_dense_block_count"), 0)
        self.weights_scale = float(self._value(key("expert_weights_scale"), 1.0))
        self.weights_norm = bool(self._value(key("expert_weights_norm"), False))
        self.gating = self._value(key("expert_gating_func"), 2)
        if self.gating != 2:
            raise ValueError(f"only sigmoid gating (2) is implemented, file says {self.gating}")
        self.n_groups = self._value(key("expert_group_count"), 0)
        self.n_group_used = self._value(key("expert_group_used_count"), 0)
        self.vocab = int(self.tensors["token_embd.weight"].shape[1])

    # -- metadata and weights ------------------------------------------------------------------

    def _value(self, name: str, default=None):
        field = self.fields.get(name)
        if field is None:
            if default is None:
                raise KeyError(name)
            return default
        parts = [field.parts[i] for i in field.data]
        if len(field.types) > 1 or len(parts) != 1:  # arrays
            return [p.tolist()[0] if p.dtype != np.uint8 else bytes(p).decode() for p in parts]
        p = parts[0]
        if p.dtype == np.uint8 and field.types[0].name == "STRING":
            return bytes(p).decode()
        return p.tolist()[0]

    def _per_layer(self, name: str) -> list[int]:
        v = self._value(name)
        return list(v) if isinstance(v, list) else [v] * self.block_count

    def has(self, name: str) -> bool:
        return name in self.tensors

    def weight(self, name: str) -> np.ndarray:
        """float64 array in numpy order (reversed ggml ne): a {n_in, n_out} weight is (n_out, n_in)."""
        if name not in self._cache:
            t = self.tensors[name]
            values = dequantize(np.asarray(t.data), t.tensor_type)
            shape = tuple(int(n) for n in reversed(t.shape.tolist()))
            self._cache[name] = np.asarray(values, dtype=np.float64).reshape(shape)
        return self._cache[name]

    # -- forward pieces -----------------------------------------------------------------------

    def _rms_norm(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * w

    def _rope(self, x: np.ndarray) -> np.ndarray:
        """Neox rope on the first n_rot dims of each head: x [T, heads, D], position = row index."""
        half = self.n_rot // 2
        positions = np.arange(x.shape[0], dtype=np.float64)
        freqs = self.rope_base ** (-2.0 * np.arange(half, dtype=np.float64) / self.n_rot)
        angle = positions[:, None] * freqs[None, :]
        cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
        out = x.copy()
        a, b = x[..., :half], x[..., half:self.n_rot]
        out[..., :half] = a * cos - b * sin
        out[..., half:self.n_rot] = b * cos + a * sin
        return out

    def _kv_as_stored(self, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """K (roped) and V [T, n_head_kv, D] as attention reads them back from the cache: exact here."""
        return k, v

    def _attention(self, il: int, h: np.ndarray) -> np.ndarray:
        p = f"blk.{il}."
        T, D = h.shape[0], self.head_dim
        nh, nkv = self.n_head[il], self.n_head_kv[il]
        q = (h @ self.weight(p + "attn_q.weight").T + self.weight(p + "attn_q.bias")).reshape(T, nh, D)
        k = (h @ self.weight(p + "attn_k.weight").T + self.weight(p + "attn_k.bias")).reshape(T, nkv, D)
        v = (h @ self.weight(p + "attn_v.weight").T + self.weight(p + "attn_v.bias")).reshape(T, nkv, D)
        if self.has(p + "attn_q_norm.weight"):
            q = self._rms_norm(q, self.weight(p + "attn_q_norm.weight"))
            k = self._rms_norm(k, self.weight(p + "attn_k_norm.weight"))
        q, k = self._rope(q), self._rope(k)
        k, v = self._kv_as_stored(k, v)
        group = nh // nkv
        causal = np.triu(np.full((T, T), -np.inf), k=1)
        out = np.empty((T, nh, D))
        for j in range(nh):
            kv = j // group
            scores = q[:, j, :] @ k[:, kv, :].T / np.sqrt(D) + causal
            scores = np.exp(scores - scores.max(axis=1, keepdims=True))
            out[:, j, :] = (scores / scores.sum(axis=1, keepdims=True)) @ v[:, kv, :]
        return out.reshape(T, nh * D) @ self.weight(p + "attn_output.weight").T

    @staticmethod
    def _swiglu(h, gate, up, down):
        g, u = h @ gate.T, h @ up.T
        return (g / (1.0 + np.exp(-g)) * u) @ down.T

    def route(self, il: int, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Chosen expert ids [T, k] and their weights [T, k] for MoE layer il."""
        p = f"blk.{il}."
        probs = 1.0 / (1.0 + np.exp(-(h @ self.weight(p + "ffn_gate_inp.weight").T)))
        choice = probs + self.weight(p + "exp_probs_b.bias")  # the bias only steers the choice
        if self.n_groups > 1:
            grouped = choice.reshape(h.shape[0], self.n_groups, -1)
            group_score = np.sort(grouped, axis=2)[:, :, -2:].sum(axis=2)
            dropped = np.argsort(-group_score, axis=1, kind="stable")[:, self.n_group_used:]
            grouped = grouped.copy()
            np.put_along_axis(grouped, dropped[:, :, None], -np.inf, axis=1)
            choice = grouped.reshape(h.shape[0], -1)
        k = self.n_used[il]
        top = np.argsort(-choice, axis=1, kind="stable")[:, :k]
        w = np.take_along_axis(probs, top, axis=1)
        if self.weights_norm:
            w = w / w.sum(axis=1, keepdims=True)
        return top, w * self.weights_scale

    def _moe(self, il: int, h: np.ndarray) -> np.ndarray:
        p = f"blk.{il}."
        top, w = self.route(il, h)
        gate, up, down = (self.weight(p + f"ffn_{n}_exps.weight") for n in ("gate", "up", "down"))
        out = np.zeros_like(h)
        for t in range(h.shape[0]):
            for e, we in zip(top[t], w[t]):
                out[t] += we * self._swiglu(h[t:t + 1], gate[e], up[e], down[e])[0]
        if self.has(p + "ffn_gate_shexp.weight"):
            out += self._swiglu(h, self.weight(p + "ffn_gate_shexp.weight"), self.weight(p + "ffn_up_shexp.weight"),
                                self.weight(p + "ffn_down_shexp.weight"))
        return out

    def hidden_states(self, tokens: list[int]) -> np.ndarray:
        """The residual stream after the trunk, before output_norm: [T, H]."""
        x = self.weight("token_embd.weight")[np.asarray(tokens)]
        for il in range(self.n_layers):
            p = f"blk.{il}."
            x = x + self._attention(il, self._rms_norm(x, self.weight(p + "attn_norm.weight")))
            h = self._rms_norm(x, self.weight(p + "post_attention_norm.weight"))
            if il < self.n_dense:
                x = x + self._swiglu(h, self.weight(p + "ffn_gate.weight"), self.weight(p + "ffn_up.weight"),
                                     self.weight(p + "ffn_down.weight"))
            else:
                x = x + self._moe(il, h)
        return x

    def logits(self, tokens: list[int]) -> np.ndarray:
        x = self._rms_norm(self.hidden_states(tokens), self.weight("output_norm.weight"))
        out = self.weight("output.weight") if self.has("output.weight") else self.weight("token_embd.weight")
        return x @ out.T
